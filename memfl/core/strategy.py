"""The server side: who trains what, with which plan, and how the results are merged.

A :class:`Strategy` mirrors Flower's message-API strategy: :meth:`Strategy.configure_train`
turns the global model and the available clients into one :class:`~memfl.core.protocol.Instruction`
per selected client, and :meth:`Strategy.aggregate_train` merges the returned
:class:`~memfl.core.protocol.Result` objects into the next global model. Both runtimes (the in-process
simulator and the Flower ServerApp) call exactly these two methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from memfl.core.aggregate import AggregationConfig, aggregate
from memfl.core.engine import prepare
from memfl.core.protocol import HyperParams, Instruction, Plan, Result
from memfl.core.seeding import round_seed


@dataclass
class ClientInfo:
    """What the server knows about one client when it plans a round.

    budget_bytes: the memory the client can spend on training this round (declared or predicted).
    speed:        relative compute speed of its device (1.0 = the reference machine).
    """

    id: int
    num_samples: int
    device: str
    speed: float
    budget_bytes: int


@dataclass
class FederationContext:
    """Everything a strategy may know about the task, shared by both runtimes.

    model_fn:    plan -> fresh model with the structure the plan needs.
    input_shape: one sample's shape (C, H, W).
    peak_fn:     plan -> predicted peak training bytes at the configured batch size.
    rounds:      the rounds the run asks for (a schedule may pace itself by it).
    settings:    the method's typed config section (``[scalefl]``, ``[fedhybrid]``, ...; a pydantic
                 model, the one source of the method's defaults), or None for a method without one.
    aggregation: the ``[aggregation]`` section (rule, trim, clip_norm), read by
                 :meth:`Strategy.aggregate`; None: plain FedAvg.
    sections:    every registered method section of the config by table name (``{"scalefl": ...,
                 "fedhybrid": ...}``), for a method that combines others' settings (``memfl``).
    """

    model_fn: Callable[[Plan], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    hparams: HyperParams
    per_round: int
    seed: int
    peak_fn: Callable[[Plan], int]
    rounds: int = 0
    settings: Any = None
    aggregation: AggregationConfig | None = None
    sections: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """FedAvg: every client may train the full model; budgets are ignored (the upper bound).

    Subclasses override the hooks :meth:`plan_for` (eligibility and plan per client), :meth:`select`
    (client selection), :meth:`trainable_for`, :meth:`wrap_model_fn` and/or the runtime calls. A
    hook returns what it computes and keeps no state for another hook to read: what :meth:`select`
    needs of the plans is handed to it (the ``plans`` :meth:`configure_train` got from
    :meth:`plan_for`).
    """

    name = "fedavg"

    def __init__(self, ctx: FederationContext) -> None:
        self.ctx = ctx
        self._reference = ctx.model_fn(Plan())
        self._trainable_cache: dict[Plan, tuple[str, ...]] = {}
        #: round -> clients whose plan fits their (predicted) budget, from :meth:`plan_and_select`
        self.eligible: dict[int, int] = {}

    # -- hooks -------------------------------------------------------------------------------
    def plan_for(self, client: ClientInfo, round: int) -> Plan | None:
        """The plan ``client`` would train with this round, or None if it cannot take part.
        Pure: the same (client, round) gives the same plan, and nothing is recorded."""
        return Plan()

    def select(
        self, round: int, candidates: list[ClientInfo], k: int, rng: np.random.Generator, plans: Mapping[int, Plan]
    ) -> list[ClientInfo]:
        """Pick ``k`` of the eligible ``candidates`` (uniformly at random here).

        plans: client id -> the plan :meth:`plan_for` gave each candidate (a selector that weighs
        a client's cost under its plan reads it here)."""
        if len(candidates) <= k:
            return list(candidates)
        idx = rng.choice(len(candidates), size=k, replace=False)
        return [candidates[i] for i in sorted(idx)]

    @classmethod
    def wrap_model_fn(
        cls, model_fn: Callable[[Plan], nn.Module], ctx: FederationContext
    ) -> Callable[[Plan], nn.Module]:
        """The model every client and the server hold, built from the architecture's ``model_fn``.

        Identity here; a method whose global model holds more than the architecture overrides it
        (ScaleFL: the model plus its output modules and projection heads). A class method, so that
        a client builds its model without building the server's strategy; both runtimes call it on
        the server and on every client before building any model.
        """
        return model_fn

    # -- the two calls a runtime makes -----------------------------------------------------
    def configure_train(
        self, round: int, global_params: dict[str, torch.Tensor], clients: list[ClientInfo]
    ) -> list[Instruction]:
        """One instruction per selected client for ``round`` (1-based)."""
        plans, chosen = self.plan_and_select(round, clients)
        return [self.instruction(round, c, plans[c.id], global_params) for c in chosen]

    def aggregate_train(
        self, round: int, global_params: dict[str, torch.Tensor], results: list[Result]
    ) -> dict[str, torch.Tensor]:
        """Merge ``results`` into the next global parameters (:meth:`aggregate`)."""
        return self.aggregate(global_params, results)

    def aggregate(self, global_params: dict[str, torch.Tensor], results: list[Result]) -> dict[str, torch.Tensor]:
        """The configured aggregation (``[aggregation]``: FedAvg by default, or the coordinate-wise
        median / trimmed mean, after optional update clipping; :func:`memfl.core.aggregate.aggregate`)
        of ``results``; the global parameters unchanged when there are none. A strategy that
        merges in its own ``aggregate_train`` calls this for the merge itself."""
        return aggregate(global_params, results, self.ctx.aggregation)

    # -- helpers -----------------------------------------------------------------------------
    def plan_and_select(self, round: int, clients: list[ClientInfo]) -> tuple[dict[int, Plan | None], list[ClientInfo]]:
        """(client id -> :meth:`plan_for`'s plan or None, the clients :meth:`select` chose among
        those with a plan); the selection's generator is seeded by (seed, round)."""
        rng = np.random.default_rng([self.ctx.seed, round])
        plans = {c.id: self.plan_for(c, round) for c in clients}
        # every method's `eligible_clients` (issue 12): clients whose plan's predicted peak fits the
        # budget they were planned for (a memory-unaware baseline plans full training for everyone)
        self.eligible[round] = sum(
            1 for c in clients if plans[c.id] is not None and self.ctx.peak_fn(plans[c.id]) <= c.budget_bytes
        )
        candidates = [c for c in clients if plans[c.id] is not None]
        chosen = self.select(round, candidates, self.ctx.per_round, rng, {c.id: plans[c.id] for c in candidates})
        return plans, chosen

    def instruction(
        self, round: int, client: ClientInfo, plan: Plan, global_params: dict[str, torch.Tensor]
    ) -> Instruction:
        return Instruction(
            round=round,
            client_id=client.id,
            params=global_params,
            trainable=list(self.trainable_for(plan)),
            plan=plan,
            hparams=self.ctx.hparams,
            seed=round_seed(self.ctx.seed, round, client.id),
            predicted_peak_bytes=self.ctx.peak_fn(plan),
            budget_bytes=client.budget_bytes,
        )

    def trainable_for(self, plan: Plan) -> tuple[str, ...]:
        """The state-dict names a client trains (and sends back) under ``plan``; cached per plan.
        Override to name them another way (ScaleFL asks its stage model)."""
        if plan not in self._trainable_cache:
            self._trainable_cache[plan] = tuple(prepare(self._reference, plan).trainable_names())
        return self._trainable_cache[plan]

    def round_report(self, round: int) -> dict[str, Any]:
        """JSON-able facts about ``round`` for the results file (e.g. the ScaleFL stage)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able strategy state for checkpoints (stateless here)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
