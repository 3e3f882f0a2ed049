"""The ``"stage+hybrid"`` engine: a ScaleFL stage whose units with grad run under a hybrid plan.

``prepare_stage_hybrid(model, plan)`` (registered as ``ENGINES["stage+hybrid"]``) is ScaleFL's stage
engine (:func:`memfl.methods.scalefl.engine.prepare_stage`: the frozen prefix under ``no_grad``,
the output module ``O_t`` or the head, the Curriculum Mentor's loss, the trainable set and the
buffers sent back are all the stage's) with one difference: the units that run with grad -- the
harmonized tail of block t-1 and block t's units (:func:`~memfl.methods.scalefl.engine.stage_segments`,
named as in :func:`memfl.models.units`, e.g. ``blocks.0.unit1``) -- run through FedHybrid's
:class:`~memfl.methods.fedhybrid.engine.SegmentChain`, each in the mode ``plan.segments`` names
(``keep``, ``recompute``, ``q8``/``q4``/``q2``/fractional; unnamed units are kept, so the tail is
*kept* unless the plan recomputes it, whereas the plain stage engine recomputes it by default).
The frozen prefix already saves nothing; ``O_t`` / the head keep their tensors.

``plan.options``: every ScaleFL stage option (``blocks``, ``partition``, ``mentor``, ``harmonizer``,
... see :mod:`memfl.methods.scalefl.engine`; ``recompute_tail`` is ignored: the tail's mode is its
segment's) and the hybrid ones: ``mixed`` (default True), ``min_bits`` (default 1),
``fused_step`` (default False: the optimizer step fused into backward,
:class:`memfl.core.optim.StepInBackward`). ``plan.micro_batches`` works as for every kind
(:func:`memfl.core.engine.prepare`), not together with ``fused_step``.

The step's ``saved_tensors`` is the chain's hook context, so the trainer, ``memfl.memory.estimate``
(which wraps the chain's pack hook and counts what it stores) and ``memfl.memory.measure`` see
the compressed tensors exactly as for a ``hybrid`` plan.
"""

from __future__ import annotations

from torch import nn

from memfl.core.engine import TrainStep
from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.engine import SegmentChain
from memfl.methods.scalefl.engine import prepare_stage

KIND = "stage+hybrid"


def prepare_stage_hybrid(model: nn.Module, plan: Plan) -> TrainStep:
    """Train ScaleFL stage ``plan.stage`` of ``model`` with the per-unit modes ``plan.segments``.

    model: a :class:`~memfl.methods.scalefl.ScaleFLModel` (e.g. a stage client's,
    :func:`memfl.methods.scalefl.stage_client_model`) or a model it can adopt. Raises ValueError for
    another plan kind, a stage outside 1..T, or a segment name that is not a unit of the stage
    (the message lists the stage's units)."""
    if plan.kind != KIND:
        raise ValueError(f"prepare_stage_hybrid needs a {KIND!r} plan, got {plan.kind!r}")
    opts = dict(plan.options or {})

    def wrap(segments: list[tuple[str, nn.Module]]):
        chain = SegmentChain(
            segments,
            plan.segments,
            mixed=bool(opts.get("mixed", True)),
            min_bits=int(opts.get("min_bits", 1)),
            what=f"plan {plan.label} (segments: the stage's units with grad)",
        )
        return chain.run, chain.hooks

    step = prepare_stage(model, Plan(kind="stage", stage=plan.stage, options=opts), wrap=wrap)
    step.step_in_backward = bool(opts.get("fused_step", False))
    return step
