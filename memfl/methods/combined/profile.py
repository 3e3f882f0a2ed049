"""A ScaleFL stage profiled the way FedHybrid profiles a model, so FedHybrid's solver plans it.

:func:`stage_profile` cuts out what stage t runs with grad -- the harmonized tail of block t-1 and
block t's units (:func:`memfl.methods.scalefl.engine.stage_segments`) followed by ``O_t`` (or the
head at t = T) -- profiles that chain with :func:`memfl.methods.fedhybrid.profile.profile_model`
(memory structure only: what each unit saves, at the real batch) on an input of the frozen
prefix's output shape, and returns a :class:`~memfl.methods.fedhybrid.profile.ModelProfile` whose
segments are the stage's units (by name) and whose head is ``O_t``. Its fixed part counts the
trained parameters, their optimizer state, the frozen prefix's tensors (held, not trained), and the
raw input batch. Times are not measured again: each unit's forward and pack/unpack costs are
copied from the whole model's profile (same modules, same batch), and the stage's own step time
comes from :func:`stage_step_seconds`.

The profile is the planner's fast model; the planner verifies every plan it returns with the
memory estimator on the real ``stage+hybrid`` engine (FedHybrid's
:func:`~memfl.methods.fedhybrid.planner.plan_for_budget`), so the model's approximations (the
frozen tail profiled as if trained, the prefix's no-grad forward not modelled) only cost solver
iterations, never a wrong peak.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from memfl.core.protocol import Plan
from memfl.memory.inputs import input_spec, random_input
from memfl.methods.fedhybrid.profile import ModelProfile, profile_model
from memfl.methods.scalefl.engine import scalefl_options
from memfl.methods.scalefl.harmonizer import harmonizer_for
from memfl.methods.scalefl.model import ScaleFLModel


def stage_model(base_factory: Callable[[], nn.Module], plan: Plan) -> ScaleFLModel:
    """A :class:`ScaleFLModel` of ``base_factory()`` cut as the stage plan's options say."""
    opts = scalefl_options(plan)
    return ScaleFLModel(
        base_factory(),
        opts["blocks"],
        mode=opts["partition"],
        batch_size=opts["batch_size"],
        input_shape=opts["input_shape"],
        exit_width=opts["exit_width"],
        projection=opts["projection"],
    )


def stage_units(sm: ScaleFLModel, plan: Plan) -> tuple[list[str], list[str], list[str]]:
    """(frozen prefix units, harmonized tail units, trained units) of the plan's stage."""
    t = int(plan.stage)
    if not 1 <= t <= sm.blocks_count:
        raise ValueError(f"--stage {t} out of range: the model is cut into {sm.blocks_count} blocks")
    harm = harmonizer_for(sm, sm.partition, t, scalefl_options(plan)["harmonizer"])
    return list(harm.frozen_units), list(harm.tail_units), list(sm.partition.groups[t - 1])


def stage_step_seconds(prof: ModelProfile, prefix: list[str], grad: list[str], recomputed: list[str]) -> float:
    """A stage step's seconds on this machine from the whole model's profile ``prof``: the frozen
    ``prefix`` units' forwards (no grad), plus each unit with grad at its share of the full step
    (``step_seconds x its forward / all forwards``: forward, backward and update in proportion),
    plus one more forward of each ``recomputed`` unit (the plain stage's checkpointed tail). The
    mentor's nHSIC terms and the output module are not counted (small next to the units).
    0 when ``prof`` is not timed."""
    if not prof.timed or prof.step_seconds <= 0:
        return 0.0
    fwd = {s.name: s.fwd_seconds for s in prof.segments}
    total = sum(fwd.values()) or 1.0
    per_fwd = prof.step_seconds / total
    return (
        sum(fwd.get(n, 0.0) for n in prefix)
        + per_fwd * sum(fwd.get(n, 0.0) for n in grad)
        + sum(fwd.get(n, 0.0) for n in recomputed)
    )


def stage_profile(
    base_factory: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    plan: Plan,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    timings: ModelProfile | None = None,
) -> ModelProfile:
    """The profile of stage ``plan.stage``'s units with grad at batch ``input_shape[0]`` (see the
    module docstring). ``plan``: a stage plan carrying the ScaleFL options (blocks, partition...).
    ``timings``: the whole model's timed profile at the same batch whose unit times are copied
    (None: an untimed profile, ``step_seconds`` 0). Raises ValueError for a stage out of range."""
    sm = stage_model(base_factory, plan)
    sm.train()
    prefix, tail, trained = stage_units(sm, plan)
    names = tail + trained
    t = int(plan.stage)
    out = sm.get_submodule(sm.partition.head) if t == sm.blocks_count else sm.exits[str(t)]
    batch = int(input_shape[0])
    spec = input_spec(sm)
    with torch.no_grad():  # the chain's input: the frozen prefix's output (its shape)
        h = random_input((min(batch, 2), *input_shape[1:]), spec)
        for u in prefix:
            h = sm.get_submodule(u)(h)
    chain = nn.Sequential(*[copy.deepcopy(sm.get_submodule(u)) for u in names], copy.deepcopy(out))
    prof = profile_model(
        chain, (batch, *h.shape[1:]), optimizer=optimizer, momentum=momentum, timing=False, num_classes=sm.num_classes
    )
    # the last segment is O_t / the head: make it the profile's (always kept) head pseudo-segment
    head_seg = prof.segments.pop()
    S = len(prof.segments)
    for rec in prof.tensors:
        rec.savers = sorted({min(s, S) for s in rec.savers})
        rec.inputs_of = [s for s in rec.inputs_of if s < S]
    prof.head_max_module_param_bytes = head_seg.max_module_param_bytes
    for seg, name in zip(prof.segments, names):
        seg.name = name
    # the fixed part: the frozen prefix's tensors are held too; the batch is the raw input's
    held = sum(p.numel() * p.element_size() for u in prefix for p in sm.get_submodule(u).parameters())
    held += sum(b.numel() * b.element_size() for u in prefix for b in sm.get_submodule(u).buffers())
    prof.buffer_bytes += held
    x_bytes = batch * int(torch.tensor(input_shape[1:]).prod()) * (4 if spec.dtype is None else 8)
    prof.input_bytes = x_bytes + batch * 8
    prof.input_shape = tuple(int(s) for s in input_shape)
    if timings is not None and timings.timed:
        by_name = {s.name: s for s in timings.segments}
        for seg in prof.segments:
            src = by_name.get(seg.name)
            if src is not None:
                seg.fwd_seconds = src.fwd_seconds
                seg.pack_seconds = dict(src.pack_seconds)
        prof.pack_fit = dict(timings.pack_fit)
        prof.calibration = timings.calibration
        prof.step_seconds = stage_step_seconds(timings, prefix, names, [])
        n_all = sum(1 for n, _ in sm.named_parameters() if not n.startswith(("exits.", "projs.")))
        prof.fused_seconds = timings.fused_seconds * sum(1 for _ in chain.parameters()) / max(1, n_all)
        prof.timed = True
    return prof
