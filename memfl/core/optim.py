"""Optimizers for a :class:`~memfl.core.engine.TrainStep`: plain SGD/Adam, or the step fused
into backward (:class:`StepInBackward`) when the plan asks for it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from memfl.core.engine import TrainStep


def make_optimizer(
    params: list[nn.Parameter], name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
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

    def __init__(
        self,
        params: list[nn.Parameter],
        factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        prox_mu: float = 0.0,
        anchor: list[torch.Tensor] | None = None,
    ) -> None:
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
            self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

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


def make_step_optimizer(
    step: TrainStep,
    params: list[nn.Parameter],
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    prox_mu: float = 0.0,
    anchor: list[torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
):
    """The optimizer for ``step``: :func:`make_optimizer`, or a :class:`StepInBackward` when the
    step fuses the optimizer into backward (``step.step_in_backward``).

    ``prox_mu``/``anchor``: with a fused step the FedProx term is applied in the hook (the caller
    must then not add it to the loss); without, the caller adds it to the loss as usual.
    ``max_grad_norm``: gradient clipping by global norm needs every gradient before the step, so
    it is refused for a fused step (a :class:`ValueError` naming the conflict).
    """
    if not step.step_in_backward:
        return make_optimizer(params, name, lr, momentum, weight_decay)
    if step.micro_batches > 1:
        raise ValueError(
            "gradient accumulation over micro-batches (plan micro_batches) needs all gradients before the "
            "step; it cannot be combined with a plan that fuses the optimizer step into backward "
            "(plan option fused_step)"
        )
    if max_grad_norm is not None:
        raise ValueError(
            "gradient clipping by global norm needs all gradients before the step; "
            "it cannot be combined with a plan that fuses the optimizer step into "
            "backward (plan option fused_step)"
        )
    if name not in ("sgd", "adam"):
        raise ValueError(f"optimizer {name!r} is not known to be per-parameter; a fused step supports 'sgd' and 'adam'")
    return StepInBackward(
        params, lambda ps: make_optimizer(ps, name, lr, momentum, weight_decay), prox_mu=prox_mu, anchor=anchor
    )
