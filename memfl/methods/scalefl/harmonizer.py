"""ScaleFL's Training Harmonizer: block t-1's last layer co-trains with block t (SPEC 2.4).

When stage t trains, the blocks before it are frozen; the harmonizer un-freezes the *last layer*
of block t-1 (:meth:`~memfl.methods.scalefl.partition.Partition.boundary_layers`, found by
:func:`memfl.models.last_layer_names`: ResNet conv2 + bn2 of the last residual unit, CNN/VGG the
last conv + BN, ViT the last transformer layer; for a user's module the last weighted leaf of the
block's last unit with parameters -- an MLP's last ``nn.Linear``, an ``nn.Embedding`` -- with a norm
right after a conv/linear joined to it), so the interface between the frozen prefix and the new
block adapts and is merged back by the server.

How it runs (:class:`Harmonizer`): the units of block t-1 before the one holding that layer stay
frozen; that unit and any after it in block t-1 (the *tail*) run with grad, only the boundary
layer's parameters requiring it, its BatchNorms in train mode and the rest of the tail in eval
mode. With ``recompute`` (default) the tail runs under a non-reentrant checkpoint: it keeps only
its input and is recomputed in the backward, without updating BN statistics a second time.

It is off (``boundary == []``, ``reason`` says why) at stage 1, when the plan turns it off, and
when block t-1 has no layer with parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfl.methods.scalefl.partition import Partition


def no_bn_update_on_recompute(modules: list[nn.Module]):
    """``context_fn`` for the checkpointed harmonizer tail: during the backward's recompute the
    BatchNorms use the same batch statistics but leave their running statistics alone."""
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextlib.contextmanager
    def frozen_stats() -> Iterator[None]:
        saved = [
            (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms
        ]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum, n in saved:
                m.momentum = momentum
                if n is not None:
                    m.num_batches_tracked.copy_(n)

    return lambda: (contextlib.nullcontext(), frozen_stats())


@dataclass
class Harmonizer:
    """Which units of blocks 1..t-1 stage t runs frozen and which as the co-trained tail.

    boundary:     module names of block t-1's last layer (empty: the harmonizer is off).
    frozen_units: unit names run under ``no_grad`` in eval mode.
    tail_units:   the units of block t-1 from the one holding the boundary layer on.
    reason:       why the harmonizer is off (None when on).
    """

    boundary: list[str]
    frozen_units: list[str]
    tail_units: list[str] = field(default_factory=list)
    reason: str | None = None

    def owns(self, key: str) -> bool:
        """True for a state-dict key of the boundary layer (trained and sent back)."""
        return any(key.startswith(b + ".") for b in self.boundary)


def harmonizer_for(model: nn.Module, part: Partition, stage: int, enabled: bool = True) -> Harmonizer:
    """The harmonizer of stage ``stage`` (1-based) of ``model`` cut by ``part``."""
    frozen = [u for g in part.groups[: stage - 1] for u in g]
    if stage <= 1:
        return Harmonizer([], frozen, reason="stage 1 has no block before it")
    if not enabled:
        return Harmonizer([], frozen, reason="off in the plan")
    boundary = part.boundary_layers(model, stage - 1)
    if not boundary:
        return Harmonizer([], frozen, reason=f"block {stage - 1} has no layer with parameters")
    prev = list(part.groups[stage - 2])
    first = next(i for i, u in enumerate(prev) if any(b == u or b.startswith(u + ".") for b in boundary))
    return Harmonizer(boundary, frozen[: len(frozen) - len(prev) + first], prev[first:])


class HarmonizedTail:
    """Runs the tail of block t-1 for stage t (see the module docstring).

    model: the model holding the units; harmonizer: from :func:`harmonizer_for`; recompute: keep
    only the tail's input and recompute it in the backward."""

    def __init__(self, model: nn.Module, harmonizer: Harmonizer, recompute: bool = True) -> None:
        self.mods = [model.get_submodule(u) for u in harmonizer.tail_units]
        self.all = [m for u in self.mods for m in u.modules()]
        self.train_ids = {id(m) for b in harmonizer.boundary for m in model.get_submodule(b).modules()}
        self.recompute = recompute

    def __bool__(self) -> bool:
        return bool(self.mods)

    def set_modes(self, frozen_train: bool = False) -> None:
        """Only the boundary layer trains (its BN updates its statistics); the rest is eval
        (``frozen_train``: train mode too, batch statistics -- ``frozen_bn = "train"``)."""
        for m in self.all:
            m.training = frozen_train or id(m) in self.train_ids

    def _run(self, h: torch.Tensor) -> torch.Tensor:
        for m in self.mods:
            h = m(h)
        return h

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._run, h, use_reentrant=False, context_fn=no_bn_update_on_recompute(self.all))
        return self._run(h)
