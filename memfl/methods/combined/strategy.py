"""The ``memfl`` strategy: ScaleFL's stages, FedHybrid's selection and budgets, and per client per
round the fastest plan that fits (issue 12; docs/MEMFL.md).

Every round:

1. **Phase** (:class:`~memfl.methods.scalefl.schedule.StageSchedule`, ScaleFL's elastic or cyclic
   schedule and its ``[scalefl]`` settings): stage t = 1..T trains block t with its output module,
   the Curriculum Mentor and the Training Harmonizer, exactly as ``scalefl``; with ``[memfl]
   end_to_end = true`` (default) the elastic schedule has one more phase, T + 1, the
   **end-to-end phase**, reached when stage T's own advance rule fires (``r_max`` defaults to
   ``run.rounds // (T + 1)``, so every phase gets its turn) and kept to the end.
2. **Budgets**: the client's predicted budget (``ClientInfo.budget_bytes``; with ``[fedhybrid]
   contention = true`` the simulator's predictor, as for ``fedhybrid``).
3. **Plan** (:meth:`Memfl.plan_for`): the fastest plan of the phase's *plan table* whose predicted
   peak is at most ``budget x (1 - margin) - slack`` (FedHybrid's fit rule, ``[fedhybrid] margin``
   and ``slack_mb``). A phase's table is solved once, when first needed, and checkpointed:

   - stage t: the plain ``stage`` plan and the Pareto-optimal ``stage+hybrid`` plans (FedHybrid's
     planner on the stage's profile, :func:`memfl.methods.combined.profile.stage_profile`, at
     ``[memfl] plan_levels`` budgets, every plan's peak from the memory estimator on the real
     engine, :attr:`FederationContext.peak_fn`);
   - end-to-end: ``full`` and the Pareto-optimal ``hybrid`` plans of the whole model (the same
     planner, :func:`memfl.methods.fedhybrid.planner.frontier`); a client with no whole-model
     plan then trains stage T's table (``[memfl] rest = "last-stage"``) or sits out (``"sit-out"``).

   This is the combined planner's rule (:func:`memfl.methods.combined.auto_plan`) restricted to the
   federation's current scope: within a scope the fastest predicted step that fits wins. The
   tables replace a per-client solve (seconds to minutes each) by a lookup.
4. **Selection**: FedHybrid's selector (``[fedhybrid] selection``, exploration ``explore*``) among the
   clients with a plan; CompStat uses the client's predicted round time under its plan (the
   plan's predicted step seconds, from the whole model's timed profile, / the device speed, plus
   the transfer of what its plan sends), MemStat its budget over the full-training peak.
5. **Training and aggregation**: a stage client receives and returns only its stage's tensors
   (ScaleFL's); an end-to-end client receives the whole global model and returns every tensor
   of it (the output modules and projection heads unchanged: they get no gradient), so
   sample-weighted FedAvg per tensor merges whole-model and stage-T clients of one round.

Round records: ``round_report`` gives the phase, the stage, the table scope, how many clients had
a plan, the exploration share, and per chosen client its plan label, predicted peak, predicted
step-time ratio, predicted seconds and budget; every client record carries its plan's predicted
peak next to its budget (``predicted_peak_bytes``, ``budget_bytes``), and every round record
``eligible_clients`` (clients whose plan fits the budget they were planned for).

Caveats: an end-to-end client in this implementation holds the output modules and projection
heads too (0.5 MB on the memory-wall regime's model); the predicted peak counts them. Micro-batched
plans are not used (their measured peak on ResNet-18 sits far above the estimate; docs/MEMFL.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from memfl.core.protocol import Instruction, Plan, Result
from memfl.core.strategy import ClientInfo, FederationContext
from memfl.methods.combined.config import MemflConfig
from memfl.methods.combined.plan import stage_hybrid_plan
from memfl.methods.combined.profile import stage_model, stage_profile, stage_step_seconds, stage_units
from memfl.methods.fedhybrid.config import FedHybridConfig
from memfl.methods.fedhybrid.planner import fit_limit, frontier
from memfl.methods.fedhybrid.profile import ModelProfile, profile_model
from memfl.methods.fedhybrid.selection import Candidate, Selector
from memfl.methods.fedhybrid.strategy import BANDWIDTH_MBPS, local_steps
from memfl.methods.scalefl.config import ScaleFLConfig
from memfl.methods.scalefl.strategy import ScaleFL, stage_schedule

#: the scope name of the end-to-end phase's table
WHOLE = "model"


@dataclass
class Entry:
    """One plan of a scope's table: the plan, its predicted peak (bytes) and predicted step seconds
    on this machine (divided by a client's speed for its device)."""

    plan: Plan
    peak: int
    seconds: float

    def __post_init__(self) -> None:
        self.plan = Plan.from_json(self.plan.to_json())  # canonical: equal to itself after a checkpoint

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan.to_json(), "peak": self.peak, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Entry":
        return cls(Plan.from_json(d["plan"]), int(d["peak"]), float(d["seconds"]))


def _r4(x: float) -> float:
    return float(f"{x:.4f}")


def sections(ctx: FederationContext) -> tuple[MemflConfig, ScaleFLConfig, FedHybridConfig]:
    """``[memfl]``, ``[scalefl]``, ``[fedhybrid]`` of the context (defaults where absent).

    memfl is the default method, so it must take small models too: when ``[scalefl] blocks`` is
    not set and the model has fewer units with parameters than the default T, the model is cut
    into as many blocks as it has (an MLP of two linear layers: 2). An explicit ``blocks`` the
    model cannot take still raises ScaleFL's PartitionError."""
    own = ctx.settings if isinstance(ctx.settings, MemflConfig) else MemflConfig()
    sc = ctx.sections.get("scalefl") or ScaleFLConfig()
    fh = ctx.sections.get("fedhybrid") or FedHybridConfig()
    if "blocks" not in sc.model_fields_set and sc.blocks > 1:
        sc = sc.model_copy(update={"blocks": _blocks_that_fit(ctx, sc)})
    return own, sc, fh


def _blocks_that_fit(ctx: FederationContext, sc: ScaleFLConfig) -> int:
    """The largest T <= ``sc.blocks`` the model can be cut into."""
    from memfl.methods.scalefl.model import ScaleFLModel
    from memfl.methods.scalefl.partition import PartitionError

    with torch.random.fork_rng(devices=[]):
        arch = getattr(ctx.model_fn(Plan()), "arch", None) or {}
    shape = None if {"in_channels", "image_size"} <= arch.keys() else tuple(ctx.input_shape)
    for blocks in range(sc.blocks, 1, -1):
        try:
            with torch.random.fork_rng(devices=[]):  # building a model draws from the global RNG
                ScaleFLModel(
                    ctx.model_fn(Plan()),
                    blocks,
                    mode=sc.partition,
                    input_shape=shape,
                    batch_size=ctx.hparams.batch_size,
                    exit_width=sc.exit_width,
                    projection=sc.projection,
                )
            return blocks
        except PartitionError as err:
            if "cannot cut it into" not in str(err):
                raise
    return 1


class Memfl(ScaleFL):
    """memfl's own method (see the module docs)."""

    name = "memfl"

    def __init__(self, ctx: FederationContext) -> None:
        own, sc, fh = sections(ctx)
        super().__init__(replace(ctx, settings=sc))
        self.own, self.fh = own, fh
        self.end_to_end = own.end_to_end and sc.schedule == "elastic"
        if self.end_to_end:  # one more phase, T + 1: the whole model
            self.scheduler = stage_schedule(sc, self.T + 1, ctx.rounds)
        self.selector = Selector(
            name=fh.selection,
            explore=fh.explore,
            explore_decay=fh.explore_decay,
            explore_min=fh.explore_min,
            explore_rule=fh.explore_rule,
        )
        self.margin, self.slack = fh.margin, int(fh.slack_mb * 2**20)
        self.full_peak = int(ctx.peak_fn(Plan()))
        # what an end-to-end client holds besides the model: the output modules and projection heads
        self._extra_bytes = sum(
            t.numel() * t.element_size()
            for n, t in [*self._model.named_parameters(), *self._model.named_buffers()]
            if n.startswith(("exits.", "projs."))
        )
        self._tables: dict[str, list[Entry]] = {}
        self._profile: ModelProfile | None = None
        self._full_step_seconds = 0.0  # set with the tables (and restored from a checkpoint)
        self._speeds: dict[int, float] = {}
        self._sent: dict[int, float] = {}  # client -> transfer seconds of its last instruction
        self._transfers: dict[str, float] = {}  # scope -> transfer seconds of what its plans send

    @classmethod
    def wrap_model_fn(
        cls, model_fn: Callable[[Plan], nn.Module], ctx: FederationContext
    ) -> Callable[[Plan], nn.Module]:
        """ScaleFL's global model (blocks + output modules + projection heads), cut as ``[scalefl]`` says."""
        return ScaleFL.wrap_model_fn(model_fn, replace(ctx, settings=sections(ctx)[1]))

    # -- phases ---------------------------------------------------------------------------------
    def phase_for(self, round: int) -> int:
        """1..T: stage t; T + 1: the end-to-end phase."""
        return self.scheduler.stage_for(round)

    def stage_for(self, round: int) -> int:
        """The ScaleFL stage of round ``round`` (T in the end-to-end phase)."""
        return min(self.phase_for(round), self.T)

    # -- plan tables ----------------------------------------------------------------------------
    def _base(self) -> nn.Module:
        return self.ctx.model_fn(Plan())

    def profile(self) -> ModelProfile:
        """The whole model's timed profile at the configured batch (the time of every plan)."""
        if self._profile is None:
            hp = self.ctx.hparams
            self._profile = profile_model(
                self._base(), (hp.batch_size, *self.ctx.input_shape), optimizer=hp.optimizer, momentum=hp.momentum
            )
        return self._profile

    def _frontier_kw(self) -> dict[str, Any]:
        fh = self.fh
        return dict(
            levels=self.own.plan_levels,
            margin=self.margin,
            slack_bytes=self.slack,
            bits=fh.bits,
            min_bits=fh.min_bits,
            mixed=fh.mixed,
            recompute=fh.recompute,
        )

    def whole_peak(self, plan: Plan) -> int:
        """Predicted peak of a whole-model plan on an end-to-end client (the model + the output
        modules and projection heads it holds)."""
        return int(self.ctx.peak_fn(plan)) + self._extra_bytes

    def scopes(self) -> list[str]:
        """The scopes this run plans in: every stage, and the whole model with the end-to-end phase."""
        return [f"stage:{t}" for t in range(1, self.T + 1)] + ([WHOLE] if self.end_to_end else [])

    def table(self, scope: str) -> list[Entry]:
        """The plans of ``scope`` (``"model"`` or ``"stage:t"``), fastest first, each faster than
        every plan with a lower peak. Every scope's table is solved at the first call (a few
        seconds each on the memory-wall regime's model) and checkpointed, so a resumed run plans
        exactly as the uninterrupted one."""
        if not self._tables:
            prof = self.profile()
            self._full_step_seconds = prof.step_seconds
            for sc in self.scopes():
                if sc == WHOLE:
                    found = frontier(prof, estimate_fn=self.whole_peak, **self._frontier_kw())
                    entries = [
                        Entry(c.plan, c.predicted_peak_bytes, prof.step_seconds + c.added_seconds) for c in found
                    ]
                else:
                    entries = self._stage_table(int(sc.split(":")[1]), prof)
                entries.sort(key=lambda e: (e.seconds, e.peak))
                pareto: list[Entry] = []
                for e in entries:
                    if not pareto or e.peak < pareto[-1].peak:
                        pareto.append(e)
                self._tables[sc] = pareto
        if scope not in self._tables:
            raise ValueError(f"no plan table for scope {scope!r}; this run plans in {', '.join(self._tables)}")
        return self._tables[scope]

    def _stage_table(self, t: int, prof: ModelProfile) -> list[Entry]:
        hp = self.ctx.hparams
        sp = self.plan(t)
        sm = stage_model(self._base, sp)
        prefix, tail, trained = stage_units(sm, sp)
        del sm
        plain_seconds = stage_step_seconds(prof, prefix, tail + trained, tail)
        grad_seconds = stage_step_seconds(prof, prefix, tail + trained, [])
        sub = stage_profile(
            self._base,
            (hp.batch_size, *self.ctx.input_shape),
            sp,
            optimizer=hp.optimizer,
            momentum=hp.momentum,
            timings=prof,
        )

        def to_plan(p: Plan) -> Plan:
            if p.kind == "full":
                return sp
            return stage_hybrid_plan(t, dict(p.segments or {}), options={**sp.options, **p.options})

        found = frontier(sub, estimate_fn=lambda p: int(self.ctx.peak_fn(to_plan(p))), **self._frontier_kw())
        out = []
        for c in found:
            plan = to_plan(c.plan)
            seconds = plain_seconds if plan == sp else grad_seconds + c.added_seconds
            out.append(Entry(plan, c.predicted_peak_bytes, seconds))
        return out

    def entry_for(self, client: ClientInfo, round: int) -> tuple[str, Entry] | None:
        """(scope, the table entry) of ``client``'s plan in round ``round``, or None: no plan fits."""
        limit = fit_limit(client.budget_bytes, self.margin, self.slack)
        phase = self.phase_for(round)
        scopes = [f"stage:{phase}"] if phase <= self.T else [WHOLE]
        if phase > self.T and self.own.rest == "last-stage":
            scopes.append(f"stage:{self.T}")
        for sc in scopes:
            for e in self.table(sc):  # fastest first
                if e.peak <= limit:
                    return sc, e
        return None

    def plan_for(self, client: ClientInfo, round: int) -> Plan | None:
        found = self.entry_for(client, round)
        return None if found is None else found[1].plan

    def _entry(self, client: ClientInfo, round: int, plan: Plan | None) -> Entry | None:
        found = self.entry_for(client, round)
        if found is not None and (plan is None or found[1].plan == plan):
            return found[1]
        for entries in self._tables.values():
            for e in entries:
                if e.plan == plan:
                    return e
        return None if found is None else found[1]

    def _whole(self, plan: Plan) -> bool:
        return plan.kind in ("full", "hybrid")

    # -- what each client is sent ---------------------------------------------------------------
    def trainable_for(self, plan: Plan) -> tuple[str, ...]:
        if self._whole(plan):
            return tuple(n for n, _ in self._model.named_parameters())
        return super().trainable_for(plan)

    def _needed(self, plan: Plan, global_params: dict[str, torch.Tensor]) -> list[str]:
        if self._whole(plan):
            return list(global_params)
        return [k for k in self._stage_names(plan)[1] if k in global_params]

    def instruction(
        self, round: int, client: ClientInfo, plan: Plan, global_params: dict[str, torch.Tensor]
    ) -> Instruction:
        needed = self._needed(plan, global_params)
        ins = super(ScaleFL, self).instruction(round, client, plan, {k: global_params[k] for k in needed})
        if self._whole(plan):
            ins.predicted_peak_bytes = self.whole_peak(plan)
        return ins

    def _transfer_seconds(self, plan: Plan) -> float:
        """Seconds to send and return what ``plan`` needs at :data:`BANDWIDTH_MBPS` (once per scope:
        every plan of a scope sends the same tensors)."""
        key = WHOLE if self._whole(plan) else f"stage:{plan.stage}"
        if key not in self._transfers:
            state = self._model.state_dict()
            names = state if self._whole(plan) else self._stage_names(plan)[1]
            nbytes = sum(state[k].numel() * state[k].element_size() for k in names if k in state)
            self._transfers[key] = 2 * nbytes * 8 / (BANDWIDTH_MBPS * 1e6)
        return self._transfers[key]

    def predicted_seconds(self, client: ClientInfo, entry: Entry) -> float:
        """Round time of ``client`` under ``entry``'s plan on its device: compute + transfer."""
        steps = local_steps(self.ctx.hparams, client.num_samples)
        return steps * entry.seconds / client.speed + self._transfer_seconds(entry.plan)

    # -- selection ------------------------------------------------------------------------------
    def select(
        self, round: int, candidates: list[ClientInfo], k: int, rng: np.random.Generator, plans: Mapping[int, Plan]
    ) -> list[ClientInfo]:
        cands = []
        for c in candidates:
            e = self._entry(c, round, plans.get(c.id))
            seconds = self.predicted_seconds(c, e) if e is not None else float("inf")
            cands.append(
                Candidate(
                    id=c.id,
                    num_samples=c.num_samples,
                    speed=c.speed,
                    seconds=seconds,
                    mem_stat=min(1.0, c.budget_bytes / max(1, self.full_peak)),
                )
            )
        ids = set(self.selector.select(round, cands, k, rng))
        return [c for c in candidates if c.id in ids]

    # -- the two runtime calls ------------------------------------------------------------------
    def configure_train(
        self, round: int, global_params: dict[str, torch.Tensor], clients: list[ClientInfo]
    ) -> list[Instruction]:
        phase, stage = self.phase_for(round), self.stage_for(round)
        plans, chosen = self.plan_and_select(round, clients)
        self._speeds.update({c.id: c.speed for c in clients})
        eligible = [cid for cid, p in plans.items() if p is not None]
        unexplored = self.selector.unexplored(eligible)
        report: dict[str, Any] = {
            "phase": "end-to-end" if phase > self.T else "stage",
            "stage": stage,
            "eligible": len(eligible),
            "selection": self.selector.name,
            "epsilon": float(f"{self.selector.epsilon(round, unexplored, len(eligible)):.4f}"),
            "schedule": self.schedule,
            "clients": {},
        }
        if phase > self.T:
            report["whole_model"] = sum(1 for p in plans.values() if p is not None and self._whole(p))
        out = []
        for c in chosen:
            plan = plans[c.id]
            e = self._entry(c, round, plan)
            ins = self.instruction(round, c, plan, global_params)
            self._sent[c.id] = self._transfer_seconds(plan)
            if e is not None:
                report["clients"][str(c.id)] = {
                    "plan": plan.to_json(),
                    "label": plan.label,
                    "predicted_peak_bytes": int(ins.predicted_peak_bytes),
                    "step_time_ratio": _r4(e.seconds / max(1e-12, self._full_step_seconds)),
                    "predicted_seconds": _r4(self.predicted_seconds(c, e)),
                    "budget_bytes": c.budget_bytes,
                }
            out.append(ins)
        self._report[round] = report
        return out

    def aggregate_train(
        self, round: int, global_params: dict[str, torch.Tensor], results: list[Result]
    ) -> dict[str, torch.Tensor]:
        for r in results:
            speed = self._speeds.get(r.client_id, 1.0)
            self.selector.update(
                round,
                r.client_id,
                r.sample_losses,
                r.num_samples,
                duration=r.compute_seconds / speed + self._sent.get(r.client_id, 0.0),
            )
        phase = self.phase_for(round)
        if phase <= self.T:  # ScaleFL's aggregation, nHSIC report and schedule advance
            return super().aggregate_train(round, global_params, results)
        new = self.aggregate(global_params, results)
        rep = self._report.setdefault(round, {"phase": "end-to-end", "stage": self.T})
        if results:
            total = float(sum(r.num_samples for r in results))
            rep["train_loss"] = sum(r.loss * r.num_samples for r in results) / total
        self.deepest = self.T
        if "exit_stage" in new:
            new["exit_stage"] = torch.tensor(self.deepest, dtype=torch.long)
        rep["exit_stage"] = self.deepest
        return new

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # the tables are saved: they are solved from timings measured when the server starts, so a
        # resumed run re-solving them could pick other (equally valid) plans and diverge
        return {
            **super().state_dict(),
            "selector": self.selector.state_dict(),
            "tables": {k: [e.to_json() for e in v] for k, v in self._tables.items()},
            "full_step_seconds": self._full_step_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        super().load_state_dict(state)
        if state.get("selector"):
            self.selector.load_state_dict(state["selector"])
        self._tables = {k: [Entry.from_json(e) for e in v] for k, v in (state.get("tables") or {}).items()}
        if state.get("full_step_seconds") is not None:
            self._full_step_seconds = float(state["full_step_seconds"])

    def tables_json(self) -> str:
        """The solved tables as JSON (for a report or a test)."""
        return json.dumps({k: [e.to_json() for e in v] for k, v in self._tables.items()}, sort_keys=True)
