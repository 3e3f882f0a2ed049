"""The ``scalefl`` strategy: the server side of ScaleFL (SPEC 2.5-2.7).

Each round trains one stage t of the global :class:`~memfl.methods.scalefl.ScaleFLModel` (blocks 1..t-1
frozen, block t + its output module + projection head trained, block t-1's last layer co-trained
by the Training Harmonizer):

- **Schedule** ``elastic`` (default): a stage runs at least ``r_min`` rounds and moves on when the
  aggregated training loss plateaus -- its least-squares slope over the last ``window`` rounds,
  relative to its mean, improves by less than ``plateau`` per round -- or after ``r_max`` rounds
  (default ``run.rounds // T``, so every stage gets its turn within the run; ``r_min`` is capped
  at ``r_max``). After stage T the
  federation keeps training stage T. ``cyclic``: stage = ((round - 1) mod T) + 1, as in the
  authors' released code.
- **Participation**: a client may train stage t when its predicted stage-t peak
  (``ctx.peak_fn(plan)``, what a client holding blocks 1..t needs) fits its budget; the round's
  clients are drawn uniformly from the eligible ones.
- **Aggregation**: sample-weighted FedAvg over the tensors each client trained (block t, the
  boundary layer of block t-1 -- so the co-adapted layer is merged back --, ``O_t`` and ``P_t``).
  The global model's ``exit_stage`` buffer is set to the deepest stage trained so far, so the
  simulator evaluates ``[block_1..block_s, O_s]`` while stage s trains and the full model from
  stage T on.

Results: every client record carries its plan (``stage:t``), predicted peak and, in ``metrics``,
the nHSIC values of its block; :meth:`ScaleFL.round_report` adds the stage, how many clients could
join it, its predicted peak, the aggregated nHSIC point and why the schedule advanced.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from memfl.core.engine import prepare
from memfl.core.protocol import Instruction, Plan, Result
from memfl.methods.scalefl.config import ScaleFLConfig
from memfl.methods.scalefl.stage import ScaleFLModel, scalefl_model_fn
from memfl.core.aggregate import fedavg
from memfl.core.strategy import ClientInfo, FederationContext, Strategy

def plateaued(losses: list[float], window: int, threshold: float) -> bool:
    """True when the least-squares slope of the last ``window`` losses, divided by their mean,
    shows an improvement of less than ``threshold`` per round (a rising loss counts as a plateau)."""
    if len(losses) < max(2, window):
        return False
    y = np.asarray(losses[-window:], dtype=float)
    x = np.arange(len(y), dtype=float)
    slope = float(np.polyfit(x, y, 1)[0])
    scale = max(abs(float(y.mean())), 1e-12)
    return -slope / scale < threshold


class ScaleFL(Strategy):
    """Sequential block-wise training with the Curriculum Mentor and the Training Harmonizer."""

    name = "scalefl"

    def __init__(self, ctx: FederationContext) -> None:
        super().__init__(ctx)
        s: ScaleFLConfig = ctx.settings or ScaleFLConfig()
        self.settings = s
        self.T = s.blocks
        rounds = ctx.rounds
        self.r_max = s.r_max if s.r_max else max(1, rounds // self.T if rounds else 10)
        self.r_min = min(s.r_min, self.r_max)
        self.schedule = s.schedule
        if self.schedule not in ("elastic", "cyclic"):
            raise ValueError(f"scalefl.schedule {self.schedule!r}: expected 'elastic' or 'cyclic'")
        # the server's reference copy, to name the tensors each stage trains
        self._model = ScaleFLModel(self._reference, self.T, mode=s.partition, input_shape=ctx.input_shape,
                                   batch_size=ctx.hparams.batch_size)
        self._names: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        # schedule state (JSON, checkpointed)
        self.stage = 1
        self.rounds_in_stage = 0
        self.losses: list[float] = []
        self.deepest = 0
        self.transitions: list[dict[str, Any]] = []
        self._report: dict[int, dict[str, Any]] = {}

    # -- the global model -------------------------------------------------------------------------
    @classmethod
    def wrap_model_fn(cls, model_fn: Callable[[Plan], nn.Module],
                      ctx: FederationContext) -> Callable[[Plan], nn.Module]:
        """ScaleFL's global (and client) model is a ScaleFLModel, so output modules and projection
        heads live in the global state dict (stored, aggregated, checkpointed)."""
        s: ScaleFLConfig = ctx.settings or ScaleFLConfig()
        return scalefl_model_fn(model_fn, s.blocks, mode=s.partition, batch_size=ctx.hparams.batch_size)

    # -- plans ------------------------------------------------------------------------------------
    def plan(self, stage: int) -> Plan:
        s = self.settings
        options = {"blocks": self.T, "partition": s.partition, "mentor": s.mentor,
                   "harmonizer": s.harmonizer, "beta": list(s.beta), "gamma": list(s.gamma),
                   "sigma": float(s.sigma)}
        if s.partition == "balanced":
            options["batch_size"] = self.ctx.hparams.batch_size
        return Plan(kind="stage", stage=stage, options=options)

    def stage_for(self, round: int) -> int:
        if self.schedule == "cyclic":
            return (round - 1) % self.T + 1
        return self.stage

    def plan_for(self, client: ClientInfo, round: int) -> Plan | None:
        plan = self.plan(self.stage_for(round))
        return plan if self.ctx.peak_fn(plan) <= client.budget_bytes else None

    def _stage_names(self, plan: Plan) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(trainable names, names a stage-t client needs) for ``plan``."""
        key = json.dumps(plan.to_json(), sort_keys=True)
        if key not in self._names:
            step = prepare(self._model, plan)
            trainable = tuple(step.trainable_names())
            t = int(plan.stage)
            part = self._model.partition
            needed = [k for k in self._model.state_dict()
                      if (part.block_of(k) or self.T + 1) <= t
                      or k.startswith(f"exits.{t}.") or k.startswith(f"projs.{t}.")
                      or (t == self.T and (k == part.head or k.startswith(part.head + ".")))]
            self._names[key] = (trainable, tuple(needed))
        return self._names[key]

    def trainable_for(self, plan: Plan) -> tuple[str, ...]:
        return self._stage_names(plan)[0]

    def instruction(self, round: int, client: ClientInfo, plan: Plan,
                    global_params: dict[str, torch.Tensor]) -> Instruction:
        """Send a stage-t client only what stage t uses: blocks 1..t, O_t (the head at T) and P_t."""
        needed = self._stage_names(plan)[1]
        return super().instruction(round, client, plan, {k: global_params[k] for k in needed if k in global_params})

    # -- the two runtime calls --------------------------------------------------------------------
    def configure_train(self, round: int, global_params: dict[str, torch.Tensor],
                        clients: list[ClientInfo]) -> list[Instruction]:
        stage = self.stage_for(round)
        plan = self.plan(stage)
        peak = self.ctx.peak_fn(plan)
        eligible = sum(1 for c in clients if peak <= c.budget_bytes)
        self._report[round] = {"stage": stage, "eligible": eligible, "stage_peak_bytes": int(peak),
                               "schedule": self.schedule}
        return super().configure_train(round, global_params, clients)

    def aggregate_train(self, round: int, global_params: dict[str, torch.Tensor],
                        results: list[Result]) -> dict[str, torch.Tensor]:
        stage = self.stage_for(round)
        new = fedavg(global_params, results) if results else dict(global_params)
        rep = self._report.setdefault(round, {"stage": stage, "schedule": self.schedule})
        if results:
            self.deepest = max(self.deepest, stage)
            total = float(sum(r.num_samples for r in results))
            loss = sum(r.loss * r.num_samples for r in results) / total
            rep["train_loss"] = loss
            for key in ("nhsic_xz", "nhsic_yz", "nhsic_yp"):
                vals = [(r.metrics[key], r.num_samples) for r in results if key in r.metrics]
                if vals:
                    rep[key] = sum(v * n for v, n in vals) / sum(n for _, n in vals)
            rep["block"] = stage
        if "exit_stage" in new:
            new["exit_stage"] = torch.tensor(self.deepest, dtype=torch.long)
        rep["exit_stage"] = self.deepest
        if self.schedule == "elastic":
            self._advance(round, rep.get("train_loss"))
        return new

    def _advance(self, round: int, loss: float | None) -> None:
        self.rounds_in_stage += 1
        if loss is not None:
            self.losses.append(float(loss))
        if self.stage >= self.T:
            return
        reason = None
        if self.rounds_in_stage >= self.r_max:
            reason = "r_max"
        elif self.rounds_in_stage >= self.r_min and plateaued(
                self.losses, self.settings.window, self.settings.plateau):
            reason = "plateau"
        if reason:
            self.transitions.append({"round": round, "from": self.stage, "to": self.stage + 1,
                                     "reason": reason, "rounds": self.rounds_in_stage})
            self._report[round]["advanced"] = reason
            self.stage += 1
            self.rounds_in_stage = 0
            self.losses = []

    # -- reporting and checkpoints ----------------------------------------------------------------
    def round_report(self, round: int) -> dict[str, Any]:
        return dict(self._report.pop(round, {}))

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "rounds_in_stage": self.rounds_in_stage, "losses": list(self.losses),
                "deepest": self.deepest, "transitions": list(self.transitions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.stage = int(state["stage"])
        self.rounds_in_stage = int(state["rounds_in_stage"])
        self.losses = [float(v) for v in state["losses"]]
        self.deepest = int(state["deepest"])
        self.transitions = list(state.get("transitions", []))
