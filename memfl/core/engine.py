"""Local training engines: how one client turns (model, plan) into a differentiable step.

An engine is a function ``prepare(model, plan) -> TrainStep``. The trainer, the memory estimator and
the memory measurer all go through :func:`prepare`, so a new kind of plan (a ScaleFL stage, a hybrid
recompute/compress plan) is understood everywhere once its engine is registered with
:func:`register_engine`. ``core`` ships only ``full``; each method registers its own kind.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.nn import functional as F

from memfl.core.protocol import Plan


@dataclass
class TrainStep:
    """One client's trainable view of the model under a plan.

    module:    the module whose parameters/buffers live in memory during training (may hold frozen
               parts and extra heads).
    trainable: (state-dict name, parameter) pairs the optimizer updates and the client sends back.
    forward:   input batch -> logits, running whatever recompute/compress/freeze the plan asks.
    extra_loss: optional (x, y, logits) -> tensor added to the cross-entropy (e.g. the HSIC mentor).
    saved_tensors: optional context manager factory wrapping the forward (e.g. compression hooks).
    sent_buffers: buffer names (state-dict) the client sends back along with ``trainable``.
    metrics:   optional () -> JSON-able dict the trainer merges into ``Result.metrics`` after the
               round (e.g. ScaleFL's per-block nHSIC values).
    step_in_backward: the optimizer step is fused into backward (:class:`StepInBackward`): each
               parameter is updated, and its gradient freed, as soon as its gradient is complete,
               so the gradients never all coexist. Build the optimizer with
               :func:`make_step_optimizer`; the memory estimator models it the same way.
    micro_batches: the batch is split into this many micro-batches whose gradients accumulate
               before the optimizer step (:func:`forward_backward`); set by :func:`prepare` from
               ``Plan.micro_batches`` for every plan kind. Incompatible with ``step_in_backward``.
    """

    module: nn.Module
    trainable: list[tuple[str, nn.Parameter]]
    forward: Callable[[torch.Tensor], torch.Tensor]
    extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    saved_tensors: Callable[[], ContextManager] | None = None
    sent_buffers: list[str] = field(default_factory=list)
    metrics: Callable[[], dict] | None = None
    step_in_backward: bool = False
    micro_batches: int = 1

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean loss to backpropagate, per-sample cross-entropy detached)."""
        logits = self.forward(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        loss = per_sample.mean()
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(x, y, logits)
        return loss, per_sample.detach()

    def trainable_names(self) -> list[str]:
        return [name for name, _ in self.trainable]


def prepare_full(model: nn.Module, plan: Plan) -> TrainStep:
    """Train every parameter of ``model`` the ordinary way."""
    return TrainStep(
        module=model,
        trainable=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
        forward=model,
        sent_buffers=[n for n, _ in model.named_buffers()],
    )


#: plan kind -> engine; methods add theirs with :func:`register_engine` when they are imported
ENGINES: dict[str, Callable[[nn.Module, Plan], TrainStep]] = {"full": prepare_full}


def register_engine(kind: str, engine: Callable[[nn.Module, Plan], TrainStep]) -> None:
    """Make ``prepare(model, plan)`` run ``engine`` for plans of ``kind`` (a method package calls
    this when it is imported: ``memfl.methods`` imports every shipped method). Registering the
    same engine twice is harmless; a different engine for a taken kind is refused."""
    if kind in ENGINES and ENGINES[kind] is not engine:
        raise ValueError(f"plan kind {kind!r} already has an engine ({ENGINES[kind].__module__})")
    ENGINES[kind] = engine


def prepare(model: nn.Module, plan: Plan | None = None) -> TrainStep:
    """Build the :class:`TrainStep` for ``plan`` (default: full training).

    ``plan.micro_batches`` (any kind) becomes ``TrainStep.micro_batches``; a plan that also fuses
    the optimizer step into backward is refused (ValueError naming both fields): gradient
    accumulation needs every micro-batch's gradient before the step."""
    plan = plan or Plan()
    try:
        engine = ENGINES[plan.kind]
    except KeyError:
        raise ValueError(f"no engine for plan kind {plan.kind!r}; available: {', '.join(sorted(ENGINES))}") from None
    step = engine(model, plan)
    micro = int(plan.micro_batches or 1)
    if micro > 1:
        if step.step_in_backward:
            raise ValueError(
                f"plan micro_batches={micro} accumulates gradients over micro-batches before the optimizer "
                "step; it cannot be combined with the optimizer step fused into backward (plan option "
                "fused_step), which updates each parameter as soon as its gradient is complete"
            )
        step.micro_batches = micro
    return step


def micro_slices(n: int, micro_batches: int) -> list[slice]:
    """``n`` samples cut into ``min(micro_batches, n)`` contiguous slices whose sizes differ by at
    most one (the larger ones first)."""
    m = max(1, min(int(micro_batches), int(n)))
    size, extra = divmod(int(n), m)
    out, lo = [], 0
    for i in range(m):
        hi = lo + size + (1 if i < extra else 0)
        out.append(slice(lo, hi))
        lo = hi
    return out


def forward_backward(
    step: TrainStep,
    x: torch.Tensor,
    y: torch.Tensor,
    extra: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward and backward of one training step (no optimizer step), as the trainer, the
    memory measurer and the step timer run it.

    Each forward runs inside ``step.saved_tensors()`` when the step has one. With
    ``step.micro_batches`` = m > 1 the batch is cut by :func:`micro_slices` and each micro-batch
    runs forward and backward on its own, its loss scaled by its share of the batch, so the
    gradients autograd accumulates in ``.grad`` equal those of the whole batch's mean loss
    (exactly, up to float rounding, for a model without batch-dependent layers). Caveats:
    BatchNorm normalises each micro-batch with that micro-batch's statistics and updates its
    running statistics once per micro-batch; a batch-level extra loss (ScaleFL's nHSIC mentor)
    is computed per micro-batch.

    extra: optional ``() -> tensor`` added once per step (e.g. the FedProx term); with micro-batches
    it is added to each micro-batch's loss scaled by its share (the same total gradient).
    Returns (the batch's mean loss, detached; the per-sample losses, detached).
    """
    saved = step.saved_tensors or contextlib.nullcontext
    n = int(x.shape[0])
    if step.micro_batches <= 1 or n < 2:
        with saved():
            loss, per_sample = step.loss(x, y)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
        return loss.detach(), per_sample
    total = None
    parts = []
    for sl in micro_slices(n, step.micro_batches):
        share = (sl.stop - sl.start) / n
        with saved():
            loss, per_sample = step.loss(x[sl], y[sl])
            if extra is not None:
                loss = loss + extra()
            (loss * share).backward()
        value = loss.detach() * share
        total = value if total is None else total + value
        parts.append(per_sample)
        del loss
    return total, torch.cat(parts)
