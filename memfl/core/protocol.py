"""Plain data exchanged between the server side (strategies) and the client side (trainers).

Everything here is a dataclass of tensors and JSON-able values, so that the same objects can travel
in-process (the simulator), as Flower records (the deployment runtime) or to disk (checkpoints),
never as pickles.

- :class:`Plan`        how a client trains: the whole model, a ScaleFL stage, a hybrid
                       recompute/compress plan, or a width-scaled sub-model.
- :class:`Instruction` what the server sends to one client for one round.
- :class:`Result`      what the client sends back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

PLAN_KINDS = ("full", "stage", "hybrid", "width", "stage+hybrid")


@dataclass(frozen=True)
class Plan:
    """How one client trains in one round.

    kind:     "full" (every parameter, nothing saved specially), "stage" (ScaleFL stage ``stage``),
              "hybrid" (per-segment keep / recompute / compress, see ``segments``), "width"
              (a HeteroFL sub-model with width fraction ``width``), or "stage+hybrid" (ScaleFL
              stage ``stage`` whose trained units and harmonized tail run under the per-segment
              modes of ``segments``; :mod:`memfl.methods.combined`).
    stage:    the ScaleFL stage, 1-based, when kind is "stage" or "stage+hybrid".
    segments: segment name -> "keep" | "recompute" | "q8" | "q4" | "q2" (or fractional "q3.5"),
              when kind is "hybrid" or "stage+hybrid".
    width:    width fraction in (0, 1], when kind == "width".
    options:  free-form JSON-able switches for the engine (e.g. mentor/harmonizer on or off).
    micro_batches: split every batch into this many micro-batches and accumulate their gradients
              before the optimizer step (None or 1: no split; any kind). Cuts the activations by
              about that factor; refused together with the fused optimizer step (option
              ``fused_step``), and BatchNorm then normalises each micro-batch by its own statistics
              (see :func:`memfl.core.engine.forward_backward`).
    """

    kind: str = "full"
    stage: int | None = None
    segments: dict[str, str] | None = None
    width: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    micro_batches: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"unknown plan kind {self.kind!r}; expected one of {', '.join(PLAN_KINDS)}")
        if self.kind in ("stage", "stage+hybrid") and (self.stage is None or self.stage < 1):
            raise ValueError(f"a {self.kind!r} plan needs stage >= 1")
        if self.micro_batches is not None and (
            isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1
        ):
            raise ValueError(f"plan micro_batches must be an integer >= 1, got {self.micro_batches!r}")
        if self.kind == "width" and not (self.width and 0 < self.width <= 1):
            raise ValueError("a 'width' plan needs 0 < width <= 1")

    def __hash__(self) -> int:  # dict fields: hash the canonical JSON form
        return hash(json.dumps(self.to_json(), sort_keys=True))

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``full``, ``stage:2``, ``width:0.5``, ``hybrid``,
        ``stage:2+hybrid``; ``+micro:4`` appended for a plan split into 4 micro-batches."""
        if self.kind == "stage":
            base = f"stage:{self.stage}"
        elif self.kind == "stage+hybrid":
            base = f"stage:{self.stage}+hybrid"
        elif self.kind == "width":
            base = f"width:{self.width:g}"
        else:
            base = self.kind
        return f"{base}+micro:{self.micro_batches}" if (self.micro_batches or 1) > 1 else base

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Plan":
        return cls(**(data or {}))

    @classmethod
    def parse(cls, text: str) -> "Plan":
        """Parse the command-line form: ``full``, ``stage:T``, ``width:W``."""
        kind, _, arg = text.partition(":")
        try:
            if kind == "full" and not arg:
                return cls()
            if kind == "stage":
                return cls(kind="stage", stage=int(arg))
            if kind == "width":
                return cls(kind="width", width=float(arg))
        except ValueError as err:
            raise ValueError(f"bad plan {text!r}: {err}") from None
        raise ValueError(f"bad plan {text!r}; expected 'full', 'stage:T' or 'width:W'")


@dataclass
class HyperParams:
    """Local training hyper-parameters for one round."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    prox_mu: float = 0.0
    max_steps: int | None = None  # cap on local steps per round (None: full epochs)


@dataclass
class Instruction:
    """What the server sends one client for one round.

    params:    global tensors the client needs, by state-dict name (parameters and buffers).
    trainable: the names (a subset of ``params``) the client trains and must send back.
    plan:      how to train (see :class:`Plan`).
    hparams:   local hyper-parameters.
    seed:      seed for the client's shuffling / stochastic rounding this round.
    """

    round: int
    client_id: int
    params: dict[str, torch.Tensor]
    trainable: list[str]
    plan: Plan = field(default_factory=Plan)
    hparams: HyperParams = field(default_factory=HyperParams)
    seed: int = 0
    predicted_peak_bytes: int | None = None
    budget_bytes: int | None = None

    def meta_json(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-able data."""
        return {
            "round": self.round,
            "client_id": self.client_id,
            "trainable": list(self.trainable),
            "plan": self.plan.to_json(),
            "hparams": asdict(self.hparams),
            "seed": self.seed,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "budget_bytes": self.budget_bytes,
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Instruction":
        meta = dict(meta)
        return cls(
            params=dict(tensors),
            plan=Plan.from_json(meta.pop("plan", None)),
            hparams=HyperParams(**meta.pop("hparams", {})),
            **meta,
        )


@dataclass
class Result:
    """What a client returns for one round.

    params:        updated tensors by state-dict name: the trainable parameters and the BN
                   buffers of the trained part.
    num_samples:   local training samples (FedAvg weight).
    loss:          mean training loss over the round.
    sample_losses: a sample of per-example losses from the last epoch (for data utility).
    compute_seconds: measured time of local training on this machine: CPU seconds of the training
                     process (user + system, summed over its threads) on CPU, wall seconds on GPU.
    """

    client_id: int
    params: dict[str, torch.Tensor]
    num_samples: int
    loss: float
    sample_losses: list[float] = field(default_factory=list)
    compute_seconds: float = 0.0
    steps: int = 0
    predicted_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def meta_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Result":
        return cls(params=dict(tensors), **meta)


def dumps(meta: dict[str, Any]) -> str:
    """JSON text of a meta dict (used where a transport wants one string)."""
    return json.dumps(meta, sort_keys=True)
