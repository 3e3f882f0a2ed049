"""Local training engines: how one client turns (model, plan) into a differentiable step.

An engine is a function ``prepare(model, plan) -> TrainStep``. The trainer, the memory estimator and
the memory measurer all go through :func:`prepare`, so a new kind of plan (a ScaleFL stage, a hybrid
recompute/compress plan) is understood everywhere once its engine is registered with
:func:`register_engine`. ``core`` ships only ``full``; each method registers its own kind.
"""

from __future__ import annotations

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
    """

    module: nn.Module
    trainable: list[tuple[str, nn.Parameter]]
    forward: Callable[[torch.Tensor], torch.Tensor]
    extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    saved_tensors: Callable[[], ContextManager] | None = None
    sent_buffers: list[str] = field(default_factory=list)
    metrics: Callable[[], dict] | None = None
    step_in_backward: bool = False

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
    """Build the :class:`TrainStep` for ``plan`` (default: full training)."""
    plan = plan or Plan()
    try:
        engine = ENGINES[plan.kind]
    except KeyError:
        raise ValueError(f"no engine for plan kind {plan.kind!r}; available: {', '.join(sorted(ENGINES))}") from None
    return engine(model, plan)
