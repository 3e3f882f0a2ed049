"""The ``hybrid`` engine: per-segment keep / recompute / compress-b for full-model training.

``prepare_hybrid(model, plan)`` (registered as ``ENGINES["hybrid"]``) returns a
:class:`~memfl.core.engine.TrainStep` that trains every parameter, like full training, but runs the
model segment by segment (:func:`memfl.methods.fedhybrid.profile.segments_of`), each as its plan says:

- ``keep``: the ordinary forward; autograd keeps what it saves.
- ``recompute``: PyTorch's non-reentrant ``torch.utils.checkpoint`` (``use_reentrant=False``): the
  forward keeps nothing of the segment but its input, and the segment's forward runs again during
  backward. The recompute does not update BatchNorm running statistics a second time (momentum
  0 and ``num_batches_tracked`` restored inside checkpoint's recompute context).
- ``qB`` (``q8``, ``q4``, ``q2``, fractional ``q3.5``): every compressible activation the segment
  saves is quantised per channel with stochastic rounding to B average bits and bit-packed
  (:mod:`memfl.methods.fedhybrid.compress`); backward dequantises it.

The head (pooling, classifier, loss) always keeps its tensors; segments the plan does not name are
kept. ``plan.options``: ``mixed`` (default True: more bits for wide-range channels; False: uniform
bits, the baseline), ``min_bits`` (default 1: the floor of the per-channel bits), ``fused_step``
(default False: the optimizer step runs inside backward, each parameter updated and its gradient
freed as soon as the gradient is complete -- ``TrainStep.step_in_backward``, see
:class:`memfl.core.optim.StepInBackward`; exact for per-parameter optimizers).

The segment-by-segment running is :class:`SegmentChain` (named modules in their modes, with the
hook context below); :class:`HybridForward` is a chain over the whole model's segments plus the
head, and :mod:`memfl.methods.combined` runs a ScaleFL stage's units through one.

Hooks: ``TrainStep.saved_tensors`` is one ``saved_tensors_hooks`` context for the whole step whose
pack hook dispatches on the segment being run (recomputed segments never reach it: checkpoint
pushes its own hooks inside). The trainer, ``memfl.memory.estimate`` (which wraps the pack hook to
count what it stores) and ``memfl.memory.measure`` all enter it around the forward; a forward
called outside it enters it by itself. One packing cache per step means a tensor saved twice (a
ReLU output that the next conv saves again) is packed once.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfl.core.engine import TrainStep
from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.compress import Compressor, parse_mode
from memfl.methods.fedhybrid.profile import check_segments, segments_of

_BN = nn.modules.batchnorm._BatchNorm
_KEEP = ("keep", None)


class _FrozenBNStats:
    """Context: BatchNorm layers of ``module`` do not update running statistics (recompute)."""

    def __init__(self, module: nn.Module) -> None:
        self.bns = [m for m in module.modules() if isinstance(m, _BN) and m.track_running_stats]
        self.saved: list[tuple[Any, torch.Tensor | None]] = []

    def __enter__(self) -> "_FrozenBNStats":
        self.saved = []
        for bn in self.bns:
            nbt = bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
            self.saved.append((bn.momentum, nbt))
            bn.momentum = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        for bn, (momentum, nbt) in zip(self.bns, self.saved):
            bn.momentum = momentum
            if nbt is not None:
                bn.num_batches_tracked.copy_(nbt)


def _recompute_context(module: nn.Module):
    def context_fn():
        return contextlib.nullcontext(), _FrozenBNStats(module)

    return context_fn


class HybridHooks(torch.autograd.graph.saved_tensors_hooks):
    """The step's saved-tensors context: the chain's dispatching pack hook."""

    def __init__(self, forward: "SegmentChain | HybridForward") -> None:
        chain = forward.chain if isinstance(forward, HybridForward) else forward
        super().__init__(chain.pack, Compressor.unpack)
        self.forward = chain

    def __enter__(self) -> None:
        self.forward._begin()
        super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.forward._end()


class SegmentChain:
    """Runs named modules in order, each in its mode: ``keep``, ``recompute`` (non-reentrant
    checkpoint, BN statistics not updated twice) or ``qB`` (what it saves packed by a
    :class:`~memfl.methods.fedhybrid.compress.Compressor` through :meth:`hooks`).

    segments: ``[(name, module)]`` in forward order; modes: name -> mode (unnamed: keep; an unknown
    name is a ValueError listing the chain's names, ``what`` names the plan in the message);
    mixed / min_bits: the compressor's options. The hybrid engine runs the whole model's segments
    through one (:class:`HybridForward`); :mod:`memfl.methods.combined` runs a ScaleFL stage's
    trained units and harmonized tail through one.
    """

    def __init__(
        self,
        segments: list[tuple[str, nn.Module]],
        modes: dict[str, str] | None,
        *,
        mixed: bool = True,
        min_bits: int = 1,
        what: str = "hybrid plan",
    ) -> None:
        self.segments = list(segments)
        names = [n for n, _ in self.segments]
        modes = dict(modes or {})
        unknown = set(modes) - set(names)
        if unknown:
            raise ValueError(
                f"{what} names unknown segments {sorted(unknown)[:3]}; its segments are {', '.join(names) or '(none)'}"
            )
        self.modes = [parse_mode(modes.get(name, "keep")) for name in names]
        self.mixed = bool(mixed)
        self.min_bits = int(min_bits)
        self._contexts = [_recompute_context(mod) for _, mod in self.segments]
        self._depth = 0
        self._current = _KEEP
        self._compressors: dict[float, Compressor] = {}

    # -- the step's hook context ------------------------------------------------------------------
    def hooks(self) -> HybridHooks:
        return HybridHooks(self)

    def _begin(self) -> None:
        self._depth += 1
        if self._depth == 1:
            cache: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
            self._compressors = {
                bits: Compressor(bits, mixed=self.mixed, min_bits=self.min_bits, cache=cache)
                for kind, bits in set(self.modes)
                if kind == "q"
            }

    def _end(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._compressors = {}
            self._current = _KEEP

    def pack(self, t: torch.Tensor) -> Any:
        kind, bits = self._current
        if kind != "q":
            return t
        return self._compressors[bits].pack(t)

    @property
    def active(self) -> bool:
        """Inside the chain's hook context (:meth:`hooks`)."""
        return self._depth > 0

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The segments in order on ``x``, each in its mode (compression only inside :meth:`hooks`;
        a call outside it with grad enabled enters it by itself)."""
        if self._depth == 0 and torch.is_grad_enabled() and any(k == "q" for k, _ in self.modes):
            with self.hooks():
                return self._run(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        grad = torch.is_grad_enabled()
        try:
            for (_, mod), mode, ctx in zip(self.segments, self.modes, self._contexts):
                self._current = mode
                if mode[0] == "recompute" and grad:
                    h = checkpoint(mod, h, use_reentrant=False, context_fn=ctx)
                else:
                    h = mod(h)
        finally:
            self._current = _KEEP
        return h


class HybridForward:
    """Callable ``x -> logits`` running each segment of the model in its plan's mode."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model = model
        self.head = model.head if hasattr(model, "head") and hasattr(model, "blocks") else None
        # a user's model cut from its children: checked once (on its first batch) that its forward
        # is those children in order (memfl.methods.fedhybrid.profile.check_segments)
        self._unchecked = not getattr(model, "_memfl_segments_checked", False)
        opts = plan.options or {}
        self.chain = SegmentChain(
            segments_of(model),
            plan.segments,
            mixed=bool(opts.get("mixed", True)),
            min_bits=int(opts.get("min_bits", 1)),
        )
        self.segments = self.chain.segments
        self.modes = self.chain.modes
        self.mixed, self.min_bits = self.chain.mixed, self.chain.min_bits

    # -- the step's hook context ------------------------------------------------------------------
    def hooks(self) -> HybridHooks:
        return HybridHooks(self.chain)

    def pack(self, t: torch.Tensor) -> Any:
        return self.chain.pack(t)

    # -- forward ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._unchecked:
            check_segments(self.model, x[:2])
            object.__setattr__(self.model, "_memfl_segments_checked", True)  # not a module attribute
            self._unchecked = False
        if not self.chain.active and torch.is_grad_enabled():
            with self.hooks():
                return self._run(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        h = self.chain._run(x)
        return self.head(h) if self.head is not None else h


def prepare_hybrid(model: nn.Module, plan: Plan) -> TrainStep:
    """Train every parameter of ``model`` with the per-segment plan ``plan`` (kind ``hybrid``)."""
    if plan.kind != "hybrid":
        raise ValueError(f"prepare_hybrid needs a 'hybrid' plan, got {plan.kind!r}")
    forward = HybridForward(model, plan)
    return TrainStep(
        module=model,
        trainable=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
        forward=forward,
        saved_tensors=forward.hooks,
        sent_buffers=[n for n, _ in model.named_buffers()],
        step_in_backward=bool((plan.options or {}).get("fused_step", False)),
    )
