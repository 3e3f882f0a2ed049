"""The ``heterofl`` baseline: width-scaled nested sub-models (Diao et al., ICLR 2021).

Every client trains the leading-slice sub-model of the global model whose width it can afford:
the largest width in ``[heterofl] widths`` (default 1, 1/2, 1/4, 1/8) whose predicted training
peak fits its budget (clients that fit none are left out). ``build_model(..., width=w)`` gives a
model with the same state-dict keys whose every tensor is a leading slice of the full one, so:

- the server sends each client the leading slices of the global tensors (:func:`slice_to`);
- the client trains its sub-model with the ordinary engine (``"width"`` plans,
  :func:`prepare_width`; the trainer's ``model_fn(plan)`` builds the narrower model);
- aggregation is nested (:func:`nested_fedavg`): every element of a global tensor is the
  sample-weighted mean over the clients whose slice holds it, and keeps its value when none does;
  ``[aggregation] rule = "median" | "trimmed-mean"`` combines each element over the same clients.

Simplifications against the paper, stated: BatchNorm keeps running statistics (aggregated nested
like the weights) instead of HeteroFL's static BN, and there is no per-width output scaler or
label masking.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from memfl.core.aggregate import aggregate
from memfl.core.engine import TrainStep, prepare_full
from memfl.core.protocol import Instruction, Plan, Result
from memfl.core.strategy import ClientInfo, FederationContext, Strategy
from memfl.methods.heterofl.config import HeteroFLConfig


def prepare_width(model: nn.Module, plan: Plan) -> TrainStep:
    """Engine for ``Plan(kind="width")``: ``model`` is already the width-scaled sub-model (built by
    ``model_fn(plan)``), trained in full."""
    return prepare_full(model, plan)


def slice_to(tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The leading slice of ``tensor`` with ``shape`` (same number of dimensions, each <=)."""
    if tensor.dim() != len(shape) or any(s > n for s, n in zip(shape, tensor.shape)):
        raise ValueError(f"cannot slice a tensor of shape {tuple(tensor.shape)} to {tuple(shape)}")
    return tensor[tuple(slice(0, s) for s in shape)]


def nested_fedavg(global_params: dict[str, torch.Tensor], results: list[Result]) -> dict[str, torch.Tensor]:
    """HeteroFL aggregation: each element averaged (by ``num_samples``) over the clients whose leading
    slice holds it; untouched elements keep their value; integer buffers take the maximum."""
    new = dict(global_params)
    senders: dict[str, list[Result]] = {}
    for r in results:
        for k in r.params:
            if k not in global_params:
                raise KeyError(f"client {r.client_id} sent unknown tensor {k!r}")
            senders.setdefault(k, []).append(r)
    for k, rs in senders.items():
        ref = global_params[k]
        if not ref.dtype.is_floating_point:
            new[k] = torch.stack([r.params[k] for r in rs]).max(0).values
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        weight = torch.zeros(ref.shape, dtype=torch.float64)
        for r in rs:
            t = r.params[k]
            idx = tuple(slice(0, s) for s in t.shape)
            if t.dim() != ref.dim() or any(s > n for s, n in zip(t.shape, ref.shape)):
                raise ValueError(
                    f"client {r.client_id} sent {k!r} with shape {tuple(t.shape)}, not a leading "
                    f"slice of {tuple(ref.shape)}"
                )
            acc[idx] += t.to(torch.float64) * r.num_samples
            weight[idx] += r.num_samples
        out = ref.to(torch.float64).clone()
        held = weight > 0
        out[held] = acc[held] / weight[held]
        new[k] = out.to(ref.dtype)
    return new


class HeteroFL(Strategy):
    """Width-scaled sub-models sized to each client's budget, nested-width aggregation."""

    name = "heterofl"

    def __init__(self, ctx: FederationContext) -> None:
        super().__init__(ctx)
        widths = (ctx.settings or HeteroFLConfig()).widths
        self.widths = tuple(sorted({float(w) for w in widths}, reverse=True))
        if not self.widths or not all(0 < w <= 1 for w in self.widths):
            raise ValueError(f"heterofl.widths {list(widths)}: every width must be in (0, 1]")
        self._shapes: dict[str, dict[str, torch.Size]] = {}

    @staticmethod
    def width_plan(width: float) -> Plan:
        return Plan() if width >= 1 else Plan(kind="width", width=width)

    def plan_for(self, client: ClientInfo, round: int) -> Plan | None:
        for w in self.widths:
            plan = self.width_plan(w)
            if self.ctx.peak_fn(plan) <= client.budget_bytes:
                return plan
        return None

    def _sub_shapes(self, plan: Plan) -> dict[str, torch.Size]:
        key = json.dumps(plan.to_json(), sort_keys=True)
        if key not in self._shapes:
            model = self._reference if plan.kind == "full" else self.ctx.model_fn(plan)
            self._shapes[key] = {k: v.shape for k, v in model.state_dict().items()}
        return self._shapes[key]

    def trainable_for(self, plan: Plan) -> tuple[str, ...]:
        # the sub-model has the full model's keys: its trainable names are the full model's
        return tuple(n for n, p in self._reference.named_parameters() if p.requires_grad)

    def instruction(
        self, round: int, client: ClientInfo, plan: Plan, global_params: dict[str, torch.Tensor]
    ) -> Instruction:
        """The client's leading slices of the global tensors."""
        shapes = self._sub_shapes(plan)
        params = {k: slice_to(global_params[k], s).clone() for k, s in shapes.items()}
        return super().instruction(round, client, plan, params)

    def aggregate_train(
        self, round: int, global_params: dict[str, torch.Tensor], results: list[Result]
    ) -> dict[str, torch.Tensor]:
        # [aggregation]: nested FedAvg by default; the robust rules combine each element over the
        # clients whose slice holds it (memfl.core.aggregate.robust_combine), clipping per slice
        return aggregate(global_params, results, self.ctx.aggregation, mean=nested_fedavg)

    def round_report(self, round: int) -> dict[str, Any]:
        return {"widths": list(self.widths)}
