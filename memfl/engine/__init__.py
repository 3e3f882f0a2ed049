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


class StepInBackward:
    """The optimizer step fused into backward (PyTorch's "optimizer step in backward" recipe).

    One optimizer per parameter; a ``register_post_accumulate_grad_hook`` on each parameter runs
    its optimizer as soon as autograd has accumulated the parameter's gradient and then drops the
    gradient, so the gradients of the whole model never coexist (at most the ones autograd is
    producing at that moment). Exact for optimizers that update each parameter from its own
    gradient and state alone (SGD with momentum / weight decay, Adam): the result equals
    ``backward(); optimizer.step()`` (tests: tests/test_planner.py). The FedProx term
    ``prox_mu / 2 * ||p - anchor||^2`` is added to the gradient in the hook (its gradient is
    ``prox_mu * (p - anchor)``) instead of through the loss, which would keep a parameter-sized
    tensor per parameter alive through the backward. Anything that needs all gradients before the
    step -- gradient clipping by global norm, gradient accumulation over micro-batches -- is
    incompatible and refused by :func:`make_step_optimizer`.

    Use it like an optimizer: ``zero_grad()`` and ``step()`` are no-ops (the step already happened
    in ``backward()``); ``remove()`` detaches the hooks.
    """

    def __init__(self, params: list[nn.Parameter],
                 factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 prox_mu: float = 0.0, anchor: list[torch.Tensor] | None = None) -> None:
        self.params = list(params)
        self.optimizers = [factory([p]) for p in self.params]
        self.prox_mu = float(prox_mu)
        self.anchor = anchor
        if self.prox_mu and (anchor is None or len(anchor) != len(self.params)):
            raise ValueError("a FedProx term needs one anchor tensor per parameter")
        self._handles: list = []
        self.attach()

    def attach(self) -> None:
        """(Re-)register the hooks (after :meth:`remove`; the optimizers keep their state)."""
        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                             for i, p in enumerate(self.params)]

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        opt = self.optimizers[i]

        def hook(p: torch.Tensor) -> None:
            if self.prox_mu:
                with torch.no_grad():
                    p.grad.add_(p - self.anchor[i], alpha=self.prox_mu)
            opt.step()
            p.grad = None

        return hook

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """No-op: every parameter was stepped during ``backward()``."""

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def make_step_optimizer(step: TrainStep, params: list[nn.Parameter], name: str, lr: float,
                        momentum: float = 0.9, weight_decay: float = 0.0, *,
                        prox_mu: float = 0.0, anchor: list[torch.Tensor] | None = None,
                        max_grad_norm: float | None = None):
    """The optimizer for ``step``: :func:`make_optimizer`, or a :class:`StepInBackward` when the
    step fuses the optimizer into backward (``step.step_in_backward``).

    ``prox_mu``/``anchor``: with a fused step the FedProx term is applied in the hook (the caller
    must then not add it to the loss); without, the caller adds it to the loss as usual.
    ``max_grad_norm``: gradient clipping by global norm needs every gradient before the step, so
    it is refused for a fused step (a :class:`ValueError` naming the conflict).
    """
    if not step.step_in_backward:
        return make_optimizer(params, name, lr, momentum, weight_decay)
    if max_grad_norm is not None:
        raise ValueError("gradient clipping by global norm needs all gradients before the step; "
                         "it cannot be combined with a plan that fuses the optimizer step into "
                         "backward (plan option fused_step)")
    if name not in ("sgd", "adam"):
        raise ValueError(f"optimizer {name!r} is not known to be per-parameter; a fused step "
                         "supports 'sgd' and 'adam'")
    return StepInBackward(params, lambda ps: make_optimizer(ps, name, lr, momentum, weight_decay),
                          prox_mu=prox_mu, anchor=anchor)
