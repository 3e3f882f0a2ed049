"""The ``scalefl`` strategy: the server side of ScaleFL (SPEC 2.5-2.7).

Each round trains one stage t of the global :class:`~memfl.methods.scalefl.ScaleFLModel` (blocks 1..t-1
frozen, block t + its output module + projection head trained, block t-1's last layer co-trained
by the Training Harmonizer):

- **Schedule** (:mod:`memfl.methods.scalefl.schedule`) ``elastic`` (default): a stage runs at
  least ``r_min`` rounds and moves on when the aggregated training loss plateaus -- its
  least-squares slope over the last ``window`` rounds, relative to its mean, improves by less than
  ``plateau`` per round -- or after ``r_max`` rounds (default ``run.rounds // T``, so every stage
  gets its turn within the run; ``r_min`` is capped at ``r_max``); ``advance = "movement"``: the
  authors' effective movement of the active block's sampled parameters over ``movement_window``
  rounds instead of the loss plateau. After stage T the federation
  keeps training stage T. ``cyclic``: stage = ((round - 1) mod T) + 1, as in the authors' released
  code.
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
from memfl.core.strategy import ClientInfo, FederationContext, Strategy
from memfl.methods.scalefl.config import ScaleFLConfig
from memfl.methods.scalefl.model import ScaleFLModel, scalefl_model_fn
from memfl.methods.scalefl.schedule import StageSchedule, plateaued

__all__ = ["ScaleFL", "plateaued", "stage_schedule"]


def stage_schedule(s: ScaleFLConfig, phases: int, rounds: int) -> StageSchedule:
    """``[scalefl]``'s schedule over ``phases`` stages; ``r_max`` defaults to ``rounds // phases``
    (every phase gets its turn within the run; 10 when the run length is unknown)."""
    r_max = s.r_max if s.r_max else max(1, rounds // phases if rounds else 10)
    return StageSchedule(
        s.schedule,
        phases,
        s.r_min,
        r_max,
        s.window,
        s.plateau,
        rule=s.advance,
        movement_window=s.movement_window,
        movement_threshold=s.movement_threshold,
    )


class ScaleFL(Strategy):
    """Sequential block-wise training with the Curriculum Mentor and the Training Harmonizer."""

    name = "scalefl"

    def __init__(self, ctx: FederationContext) -> None:
        super().__init__(ctx)
        s: ScaleFLConfig = ctx.settings or ScaleFLConfig()
        self.settings = s
        self.T = s.blocks
        self.schedule = s.schedule
        # the stage schedule (JSON state, checkpointed)
        self.scheduler = stage_schedule(s, self.T, ctx.rounds)
        # the server's reference copy, to name the tensors each stage trains
        self._model = ScaleFLModel(
            self._reference,
            self.T,
            mode=s.partition,
            input_shape=ctx.input_shape,
            batch_size=ctx.hparams.batch_size,
            exit_width=s.exit_width,
            projection=s.projection,
        )
        self._movement_index: dict[int, tuple[list[str], np.ndarray]] = {}
        # a model that does not record its input shape gets it in the plan (for the estimator)
        arch = getattr(self._reference, "arch", None) or {}
        self._shape_option = None if {"in_channels", "image_size"} <= arch.keys() else list(ctx.input_shape)
        self._names: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self.deepest = 0
        # per-round facts, written by configure_train / aggregate_train, read by round_report
        self._report: dict[int, dict[str, Any]] = {}

    # -- the schedule's state, as attributes ------------------------------------------------------
    @property
    def r_max(self) -> int:
        return self.scheduler.r_max

    @property
    def r_min(self) -> int:
        return self.scheduler.r_min

    @property
    def stage(self) -> int:
        """The elastic schedule's current stage (settable)."""
        return self.scheduler.stage

    @stage.setter
    def stage(self, value: int) -> None:
        self.scheduler.stage = int(value)

    @property
    def transitions(self) -> list[dict[str, Any]]:
        return self.scheduler.transitions

    # -- the global model -------------------------------------------------------------------------
    @classmethod
    def wrap_model_fn(
        cls, model_fn: Callable[[Plan], nn.Module], ctx: FederationContext
    ) -> Callable[[Plan], nn.Module]:
        """ScaleFL's global (and client) model is a ScaleFLModel, so output modules and projection
        heads live in the global state dict (stored, aggregated, checkpointed)."""
        s: ScaleFLConfig = ctx.settings or ScaleFLConfig()
        return scalefl_model_fn(
            model_fn,
            s.blocks,
            mode=s.partition,
            input_shape=tuple(ctx.input_shape),
            batch_size=ctx.hparams.batch_size,
            exit_width=s.exit_width,
            projection=s.projection,
        )

    # -- plans ------------------------------------------------------------------------------------
    def plan(self, stage: int) -> Plan:
        s = self.settings
        options = {
            "blocks": self.T,
            "partition": s.partition,
            "mentor": s.mentor,
            "harmonizer": s.harmonizer,
            "beta": list(s.beta),
            "gamma": list(s.gamma),
            "sigma": float(s.sigma),
        }
        # the fidelity switches travel only when not the engine's default (plans stay as before)
        for key, default in (
            ("nhsic_scale", "raw"),
            ("frozen_bn", "eval"),
            ("exit_width", "light"),
            ("projection", "light"),
        ):
            if getattr(s, key) != default:
                options[key] = getattr(s, key)
        if s.lambda1 is not None:
            options["lambda1"], options["lambda2"] = list(s.lambda1), list(s.lambda2 or [])
        if s.partition == "balanced":
            options["batch_size"] = self.ctx.hparams.batch_size
        if self._shape_option is not None:
            options["input_shape"] = self._shape_option
        return Plan(kind="stage", stage=stage, options=options)

    def stage_for(self, round: int) -> int:
        """The stage round ``round`` trains (the schedule's)."""
        return self.scheduler.stage_for(round)

    def plan_for(self, client: ClientInfo, round: int) -> Plan | None:
        """Round ``round``'s stage plan when its predicted peak fits ``client``'s budget, else None."""
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
            needed = [
                k
                for k in self._model.state_dict()
                if (part.block_of(k) or self.T + 1) <= t
                or k.startswith(f"exits.{t}.")
                or k.startswith(f"projs.{t}.")
                or (t == self.T and (k == part.head or k.startswith(part.head + ".")))
            ]
            self._names[key] = (trainable, tuple(needed))
        return self._names[key]

    def trainable_for(self, plan: Plan) -> tuple[str, ...]:
        return self._stage_names(plan)[0]

    def instruction(
        self, round: int, client: ClientInfo, plan: Plan, global_params: dict[str, torch.Tensor]
    ) -> Instruction:
        """Send a stage-t client only what stage t uses: blocks 1..t, O_t (the head at T) and P_t."""
        needed = self._stage_names(plan)[1]
        return super().instruction(round, client, plan, {k: global_params[k] for k in needed if k in global_params})

    # -- the two runtime calls --------------------------------------------------------------------
    def configure_train(
        self, round: int, global_params: dict[str, torch.Tensor], clients: list[ClientInfo]
    ) -> list[Instruction]:
        stage = self.stage_for(round)
        peak = self.ctx.peak_fn(self.plan(stage))
        plans, chosen = self.plan_and_select(round, clients)
        eligible = sum(1 for p in plans.values() if p is not None)
        self._report[round] = {
            "stage": stage,
            "eligible": eligible,
            "stage_peak_bytes": int(peak),
            "schedule": self.schedule,
        }
        return [self.instruction(round, c, plans[c.id], global_params) for c in chosen]

    def aggregate_train(
        self, round: int, global_params: dict[str, torch.Tensor], results: list[Result]
    ) -> dict[str, torch.Tensor]:
        stage = self.stage_for(round)
        new = self.aggregate(global_params, results)  # [aggregation]: FedAvg unless configured
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
            update = self._sampled_update(stage, global_params, new) if results else None
            self._advance(round, rep.get("train_loss"), update)
        return new

    def _sampled_update(
        self, stage: int, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
    ) -> np.ndarray | None:
        """The movement rule's view of a round: ``new - old`` at up to ``movement_samples`` parameter
        elements of block ``stage`` (a seeded sample per stage, fixed for the run)."""
        if self.settings.advance != "movement":
            return None
        if stage not in self._movement_index:
            part = self._model.partition
            keys = sorted(n for n, p in self._model.named_parameters() if part.block_of(n) == stage)
            total = sum(int(old[k].numel()) for k in keys if k in old)
            k = min(self.settings.movement_samples, total)
            rng = np.random.default_rng([int(self.ctx.seed), stage, 0x3E])
            idx = np.sort(rng.choice(total, size=k, replace=False)) if k < total else np.arange(total)
            self._movement_index[stage] = (keys, idx)
        keys, idx = self._movement_index[stage]
        flat = [(new[k].detach().float() - old[k].detach().float()).reshape(-1) for k in keys if k in old]
        if not flat:
            return None
        return torch.cat(flat).numpy()[idx]

    def _advance(self, round: int, loss: float | None, update: np.ndarray | None = None) -> None:
        reason = self.scheduler.advance(round, loss, update)
        mv = self.scheduler.last_movement
        if mv is not None:
            self._report[round]["movement"] = mv
        if reason:
            self._report[round]["advanced"] = reason

    # -- reporting and checkpoints ----------------------------------------------------------------
    def round_report(self, round: int) -> dict[str, Any]:
        return dict(self._report.pop(round, {}))

    def state_dict(self) -> dict[str, Any]:
        sched = self.scheduler.state_dict()
        return {
            "stage": sched["stage"],
            "rounds_in_stage": sched["rounds_in_stage"],
            "losses": sched["losses"],
            "deepest": self.deepest,
            "transitions": sched["transitions"],
            **({"updates": sched["updates"]} if "updates" in sched else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.scheduler.load_state_dict(state)
        self.deepest = int(state["deepest"])
