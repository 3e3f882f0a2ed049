"""Local training engines: how one client turns (model, plan) into a differentiable step.

An engine is a function ``prepare(model, plan) -> TrainStep``. The trainer, the memory estimator and
the memory measurer all go through :func:`prepare`, so a new kind of plan (a ScaleFL stage, a hybrid
recompute/compress plan) is understood everywhere once its engine is registered in ``ENGINES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.nn import functional as F

from memfl.protocol import Plan


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
    """

    module: nn.Module
    trainable: list[tuple[str, nn.Parameter]]
    forward: Callable[[torch.Tensor], torch.Tensor]
    extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    saved_tensors: Callable[[], ContextManager] | None = None
    sent_buffers: list[str] = field(default_factory=list)
    metrics: Callable[[], dict] | None = None

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


ENGINES: dict[str, Callable[[nn.Module, Plan], TrainStep]] = {"full": prepare_full}


def _prepare_stage(model: nn.Module, plan: Plan) -> TrainStep:
    from memfl.scalefl.stage import prepare_stage  # lazy: memfl.scalefl imports this module

    return prepare_stage(model, plan)


def _prepare_width(model: nn.Module, plan: Plan) -> TrainStep:
    from memfl.strategies.heterofl import prepare_width

    return prepare_width(model, plan)


def _prepare_hybrid(model: nn.Module, plan: Plan) -> TrainStep:
    from memfl.hybrid.engine import prepare_hybrid  # lazy: memfl.hybrid imports this module

    return prepare_hybrid(model, plan)


ENGINES["stage"] = _prepare_stage  # ScaleFL stage t (memfl/scalefl/stage.py)
ENGINES["width"] = _prepare_width  # HeteroFL width-scaled sub-model (memfl/strategies/heterofl.py)
ENGINES["hybrid"] = _prepare_hybrid  # FedHybrid keep/recompute/compress per segment (memfl/hybrid/)


def prepare(model: nn.Module, plan: Plan | None = None) -> TrainStep:
    """Build the :class:`TrainStep` for ``plan`` (default: full training)."""
    plan = plan or Plan()
    try:
        engine = ENGINES[plan.kind]
    except KeyError:
        raise ValueError(
            f"no engine for plan kind {plan.kind!r}; available: {', '.join(sorted(ENGINES))}"
        ) from None
    return engine(model, plan)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd' or 'adam'")
