"""FedHybrid (SPEC 3) and its selection baselines ``oort``, ``random``, ``oort+fedprox``.

``fedhybrid``: every round, for every client,

1. its *predicted* budget (the runtime puts it in ``ClientInfo.budget_bytes``; with
   ``[fedhybrid] contention = true`` the simulator predicts it from the client's memory trace,
   :mod:`memfl.methods.fedhybrid.budget`);
2. its plan: the fastest hybrid keep/recompute/compress plan whose estimated peak is at most
   ``budget * (1 - margin)`` -- looked up in a table of plans the server solves once (the planner's
   dynamic program, :func:`memfl.methods.fedhybrid.planner.frontier`, each verified with
   :func:`memfl.memory.estimate`), full
   training when it fits; clients below the cheapest plan sit the round out;
3. selection among the eligible clients by ``[fedhybrid] selection`` (default ``fedhybrid``:
   Stat x MemStat x CompStat + UCB, :mod:`memfl.methods.fedhybrid.selection`), where CompStat uses the client's
   predicted round time *under its plan* on its device;
4. the client trains with the ``hybrid`` engine; the server aggregates with FedAvg and feeds the
   reported sample losses and durations back to the selector.

Baselines (the paper's): ``random``, ``oort`` and ``oort+fedprox`` train the full model only: a
client is eligible when the full-training estimate fits its predicted budget the same way
(memory-unaware training, but they are not sent clients that would surely fail; with
``[fedhybrid] baseline_memory = "unaware"`` they are, and the simulator's contention check kills
those whose real budget is too small, as the paper's memory-unaware baselines); ``oort+fedprox``
adds FedProx's proximal term (``train.prox_mu``, or ``[fedhybrid] prox_mu`` when that is 0).
``memfl run --method fedhybrid --selection random|oort`` keeps FedHybrid's plans and swaps only
the selector (the ablation).

``[fedhybrid] plans = "keep"`` (issue 11 part 3: the plans' compression error, measured apart from
everything else): the strategy decides exactly as with ``"planned"`` -- the same plans decide who is
eligible, the selector sees the same candidates with the same planned round times and memory
factors, and each instruction carries the *planned* plan's predicted peak, so the simulator's
memory check kills the same clients -- and then sends the chosen clients full training (every
segment ``keep``) instead of their hybrid plan: a counterfactual in which the client has the memory
it lacks. With ``selection = "random"`` the picks of a seed are then identical to the planned
run's (eligibility and kills depend on the contention traces only), so the accuracy difference per
round is the compression error alone; with the ``fedhybrid`` selector the picks diverge only through
the reported losses (its utility uses predicted, not measured, round times), and ``oort`` is fed the
measured duration scaled by the planned plan's step-time ratio, the time the plan would have
taken. What differs is the local compute: the virtual clock of a ``keep`` run charges full training,
so compare accuracy per round, not time to accuracy. A client record's ``plan`` is then ``full``
while its ``predicted_peak_bytes`` / ``budget_violation`` are the planned plan's; the round report
names the planned plan and ``"trained": "full"``. A measurement tool for the simulator: on a runtime
that enforces budgets (worker caps, Flower) the full step can really exceed the budget.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping

import numpy as np
import torch

from memfl.core.protocol import HyperParams, Instruction, Plan, Result
from memfl.core.strategy import ClientInfo, FederationContext, Strategy
from memfl.methods.fedhybrid.config import FedHybridConfig
from memfl.methods.fedhybrid.planner import PlanChoice, frontier, full_choice, pick
from memfl.methods.fedhybrid.profile import profile_model
from memfl.methods.fedhybrid.selection import Candidate, Selector

#: bandwidth the selector assumes for transfers (the simulator's virtual clock uses the same)
BANDWIDTH_MBPS = 20.0


def local_steps(hp: HyperParams, num_samples: int) -> int:
    """Optimizer steps of one client round: epochs x batches (the trainer skips 1-sample batches;
    at most ``max_steps``)."""
    bs = max(2, min(hp.batch_size, num_samples))
    steps = hp.local_epochs * max(1, math.ceil(num_samples / bs))
    return min(steps, hp.max_steps) if hp.max_steps else steps


class FedHybrid(Strategy):
    """Memory-aware selection + per-client hybrid plans (see the module docs)."""

    name = "fedhybrid"
    selection: str | None = None  # None: [fedhybrid] selection
    plans = "hybrid"  # "hybrid" | "full"
    fedprox = False

    def __init__(self, ctx: FederationContext) -> None:
        super().__init__(ctx)
        s: FedHybridConfig = ctx.settings or FedHybridConfig()
        self.settings = s
        self.selector = Selector(
            name=self.selection or s.selection,
            explore=s.explore,
            explore_decay=s.explore_decay,
            explore_min=s.explore_min,
            explore_rule=s.explore_rule,
        )
        #: issue 11 part 3: hybrid plans decide everything, chosen clients train in full (module docs)
        self.keep_plans = self.plans == "hybrid" and s.plans == "keep"
        self.margin = s.margin
        self.full_peak = int(ctx.peak_fn(Plan()))
        self._table: list[PlanChoice] | None = None
        # written by the runtime calls, not by hooks: client speeds seen by configure_train (for
        # aggregate_train's durations) and the last round's facts (for round_report)
        self._speeds: dict[int, float] = {}
        self._ratios: dict[int, float] = {}  # keep_plans: the planned step-time ratio of each chosen client
        self._report: dict[str, Any] = {}
        hp = ctx.hparams
        self.prox_mu = (hp.prox_mu or s.prox_mu) if self.fedprox else hp.prox_mu
        param_bytes = sum(t.numel() * t.element_size() for t in self._reference.state_dict().values())
        self._transfer = 2 * param_bytes * 8 / (BANDWIDTH_MBPS * 1e6)

    # -- plans ----------------------------------------------------------------------------------
    def table(self) -> list[PlanChoice]:
        """The plans this server hands out, fastest first (solved and verified once)."""
        if self._table is None:
            s, hp = self.settings, self.ctx.hparams
            shape = (hp.batch_size, *self.ctx.input_shape)
            prof = profile_model(
                self.ctx.model_fn(Plan()), shape, optimizer=hp.optimizer, momentum=hp.momentum, timing=True
            )
            self._full_step_seconds = prof.step_seconds
            if self.plans == "full":
                self._table = [full_choice(prof, estimate_fn=self.ctx.peak_fn, margin=self.margin)]
            else:
                self._table = frontier(
                    prof,
                    estimate_fn=self.ctx.peak_fn,
                    levels=s.plan_levels,
                    margin=self.margin,
                    bits=s.bits,
                    min_bits=s.min_bits,
                    mixed=s.mixed,
                    recompute=s.recompute,
                )
        return self._table

    def choice_for(self, client: ClientInfo) -> PlanChoice | None:
        """The table's plan for ``client``: the fastest that fits its budget (the memory-unaware
        baselines: full training whatever the budget), or None when none fits."""
        if self.plans == "full" and self.settings.baseline_memory == "unaware":
            return self.table()[0]  # memory-unaware baseline: full training, whatever the budget
        return pick(self.table(), client.budget_bytes, self.margin, slack_bytes=int(self.settings.slack_mb * 2**20))

    def plan_for(self, client: ClientInfo, round: int) -> Plan | None:
        choice = self.choice_for(client)
        return None if choice is None else choice.plan

    def _choice(self, client: ClientInfo, plan: Plan | None) -> PlanChoice | None:
        """The table entry behind ``plan`` (the client's own choice when it is that plan; a plan
        given some other way is looked up in the table; unknown: the client's own choice)."""
        own = self.choice_for(client)
        if plan is None or (own is not None and own.plan == plan):
            return own
        return next((c for c in self.table() if c.plan == plan), own)

    # -- selection ------------------------------------------------------------------------------
    def _steps(self, client: ClientInfo) -> int:
        return local_steps(self.ctx.hparams, client.num_samples)

    def predicted_seconds(self, client: ClientInfo, choice: PlanChoice | None) -> float:
        """Round time on the client's device under ``choice`` (None: full training): compute +
        transfer."""
        step = choice.step_seconds + choice.added_seconds if choice else self._full_step_seconds
        return self._steps(client) * step / client.speed + self._transfer

    def select(
        self, round: int, candidates: list[ClientInfo], k: int, rng: np.random.Generator, plans: Mapping[int, Plan]
    ) -> list[ClientInfo]:
        """The selector's pick; CompStat weighs each candidate's round time under its plan."""
        cands = [
            Candidate(
                id=c.id,
                num_samples=c.num_samples,
                speed=c.speed,
                seconds=self.predicted_seconds(c, self._choice(c, plans.get(c.id))),
                mem_stat=min(1.0, c.budget_bytes / max(1, self.full_peak)),
            )
            for c in candidates
        ]
        ids = set(self.selector.select(round, cands, k, rng))
        return [c for c in candidates if c.id in ids]

    def round_facts(self, round: int, plans: Mapping[int, Plan | None], chosen: list[ClientInfo]) -> dict[str, Any]:
        """What :meth:`round_report` says about ``round``: the selector, how many were eligible,
        its exploration rate and each chosen client's plan, peak and predicted time."""
        eligible = [cid for cid, p in plans.items() if p is not None]
        unexplored = self.selector.unexplored(eligible)  # the selector's view during this round's pick
        facts = {
            "selection": self.selector.name,
            "eligible": len(eligible),
            "unexplored": unexplored,
            "epsilon": float(f"{self.selector.epsilon(round, unexplored, len(eligible)):.4f}"),
            "clients": {str(c.id): self._client_report(c, self._choice(c, plans[c.id])) for c in chosen},
        }
        if self.keep_plans:
            facts["plans"] = "keep"
        return facts

    def _client_report(self, c: ClientInfo, choice: PlanChoice | None) -> dict[str, Any]:
        if choice is None:
            return {}
        report = {
            "plan": choice.plan.to_json(),
            "predicted_peak_bytes": choice.predicted_peak_bytes,
            "step_time_ratio": round(choice.step_time_ratio, 4),
            "predicted_seconds": round(self.predicted_seconds(c, choice), 4),
            "budget_bytes": c.budget_bytes,
        }
        if self.keep_plans:
            report["trained"] = "full"
        return report

    def configure_train(
        self, round: int, global_params: dict[str, torch.Tensor], clients: list[ClientInfo]
    ) -> list[Instruction]:
        plans, chosen = self.plan_and_select(round, clients)
        self._speeds.update({c.id: c.speed for c in clients})
        self._report = self.round_facts(round, plans, chosen)
        if self.keep_plans:
            for c in chosen:
                choice = self._choice(c, plans[c.id])
                self._ratios[c.id] = choice.step_time_ratio if choice is not None else 1.0
        return [self.instruction(round, c, plans[c.id], global_params) for c in chosen]

    def instruction(
        self, round: int, client: ClientInfo, plan: Plan, global_params: dict[str, torch.Tensor]
    ) -> Instruction:
        planned_peak = None
        if self.keep_plans and plan.kind != "full":  # train in full, keep the plan's memory claim
            planned_peak = self.ctx.peak_fn(plan)
            plan = Plan()
        ins = super().instruction(round, client, plan, global_params)
        if planned_peak is not None:
            ins.predicted_peak_bytes = planned_peak
        if self.prox_mu != ins.hparams.prox_mu:
            ins.hparams = replace(ins.hparams, prox_mu=self.prox_mu)
        return ins

    # -- aggregation and feedback ---------------------------------------------------------------
    def aggregate_train(
        self, round: int, global_params: dict[str, torch.Tensor], results: list[Result]
    ) -> dict[str, torch.Tensor]:
        for r in results:
            speed = self._speeds.get(r.client_id, 1.0)
            compute = r.compute_seconds * (self._ratios.get(r.client_id, 1.0) if self.keep_plans else 1.0)
            self.selector.update(
                round, r.client_id, r.sample_losses, r.num_samples, duration=compute / speed + self._transfer
            )
        return super().aggregate_train(round, global_params, results)

    def round_report(self, round: int) -> dict[str, Any]:
        return dict(self._report)

    def state_dict(self) -> dict[str, Any]:
        # The plan table is saved too: it is solved from timings measured when the server starts,
        # so a resumed run re-solving it could pick other (equally valid) plans and diverge.
        table = (
            None
            if self._table is None
            else {"plans": [c.to_json() for c in self._table], "full_step_seconds": self._full_step_seconds}
        )
        return {"selector": self.selector.state_dict(), "table": table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("selector"):
            self.selector.load_state_dict(state["selector"])
        if state.get("table"):
            self._table = [PlanChoice.from_json(c) for c in state["table"]["plans"]]
            self._full_step_seconds = float(state["table"]["full_step_seconds"])


class RandomBaseline(FedHybrid):
    """Random selection, full-model training only (the paper's ``random`` baseline)."""

    name = "random"
    selection = "random"
    plans = "full"


class OortBaseline(FedHybrid):
    """Oort selection, full-model training only."""

    name = "oort"
    selection = "oort"
    plans = "full"


class OortFedProx(OortBaseline):
    """Oort selection + FedProx's proximal term, full-model training only."""

    name = "oort+fedprox"
    fedprox = True
