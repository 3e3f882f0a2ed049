"""One planner over every plan kind: the fastest plan that fits a client's budget.

:func:`auto_plan` weighs, for one model, batch, budget and device speed (and, in a federation, the
current ScaleFL stage), every kind of :mod:`memfl.methods.combined.plan`:

1. **the whole model**: ``full``, else FedHybrid's fastest verified ``hybrid`` plan
   (:func:`memfl.methods.fedhybrid.planner.plan_for_budget` on the model's profile);
2. **a stage** (``--stage t``: that stage; none given: every stage 1..T): the plain ``stage`` plan,
   else the fastest verified ``stage+hybrid`` plan (the same solver on the stage's profile,
   :func:`memfl.methods.combined.profile.stage_profile`, each plan checked with the estimator on
   the real engine);
3. **micro-batched variants** of each, m in ``micro_batches`` (opt-in; the batch split into m micro-batches,
   gradients accumulated; the solver re-run on a profile at the micro-batch size, without the fused
   optimizer step, which cannot accumulate).

Which one wins: a plan that trains the whole model beats any stage plan (a stage plan trains one
block of it); within a scope the fastest predicted step wins. Micro-batching is weighed on both of
its costs: it cannot fuse the optimizer step (the planner's micro-batched plans hold every gradient),
and it changes BatchNorm's batch statistics (each micro-batch is normalised by its own), so for a
model with BatchNorm micro-batched plans of a scope are only tried when no plan of that scope fits
without them; for a model without, they compete on time. Their step time is the plan's predicted
time times the measured cost of splitting a full step into m (``micro_factor``: full steps with
and without the split, timed in this process, only when a micro-batched plan fits).

Memory: every candidate's predicted peak is :func:`memfl.memory.estimate` of the plan on what a
client under it holds (:func:`memfl.methods.combined.plan.client_factory`) -- one memory model for
every kind, the estimator going through the plan's engine -- and a plan fits when that peak is at
most ``budget x (1 - margin) - slack`` (:func:`memfl.methods.fedhybrid.planner.fit_limit`).

Time (predicted, relative to the full step on the same device): full 1; hybrid: FedHybrid's
calibrated time model; a stage: :func:`memfl.methods.combined.profile.stage_step_seconds` (the
frozen prefix's forward plus the trained units' share of the full step); stage+hybrid: that plus
the recompute / pack costs of its units taken from the whole model's calibrated profile.

Nothing fits: :class:`InfeasibleBudget` (FedHybrid's error, so callers catching it keep working)
with the smallest budget any weighed plan fits and that plan's label.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from memfl.core.protocol import Plan
from memfl.methods.combined.plan import (
    DEFAULT_BLOCKS,
    DEFAULT_PARTITION,
    client_factory,
    scope,
    stage_hybrid_plan,
    stage_options,
)
from memfl.methods.combined.profile import stage_model, stage_profile, stage_step_seconds, stage_units
from memfl.methods.fedhybrid.planner import (
    DEFAULT_MARGIN,
    DEFAULT_MIN_BITS,
    ESTIMATOR_SLACK_BYTES,
    PlanChoice,
    budget_needed,
    fit_limit,
    plan_for_budget,
)
from memfl.methods.fedhybrid.planner import InfeasibleBudget as _Infeasible
from memfl.methods.fedhybrid.profile import ModelProfile, profile_model
from memfl.methods.fedhybrid.solve import parse_budget

#: micro-batch counts the planner tries by default: none. Opt in (``micro_batches=(2, 4, 8)``,
#: ``memfl plan --auto --micro-batches 2,4,8``) knowing that the measured peak of micro-batched
#: ResNet-18 steps sits far above the estimate (docs/MEMFL.md, "Limits"): the cnn and an MLP
#: measured within 1.6 MB of it, ResNet-18 stage 1 at 4 samples per micro-batch ~28-34 MB above.
DEFAULT_MICRO_BATCHES: tuple[int, ...] = ()
#: the counts worth trying when opting in
MICRO_BATCH_CHOICES = (2, 4, 8)


class InfeasibleBudget(_Infeasible):
    """No plan of any kind fits the budget. ``min_feasible_bytes``: the smallest budget some
    weighed plan fits; ``plan_label``: that plan; ``candidates``: every plan weighed."""

    def __init__(self, budget_bytes: int, min_feasible_bytes: int, plan_label: str, candidates: list) -> None:
        super().__init__(budget_bytes, min_feasible_bytes)
        self.plan_label = plan_label
        self.candidates = candidates
        need = math.ceil(min_feasible_bytes / 2**20 * 10) / 10  # rounded up: that budget fits
        self.args = (
            f"no plan of any kind (full, hybrid, stage, stage+hybrid, micro-batched) fits a budget of "
            f"{budget_bytes / 2**20:.1f} MB; the smallest feasible budget is {need:.1f} MB ({plan_label})",
        )

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Candidate:
    """One plan the planner weighed.

    label:   the plan kind (``full``, ``hybrid``, ``stage:2``, ``stage:2+hybrid``, ``+micro:4``...).
    plan:    the best plan of that kind for the budget (None: none of that kind fits).
    predicted_peak_bytes: its estimated peak (None: no plan).
    step_time_ratio: predicted step time over the full step on the same device (None: untimed).
    fits:    predicted peak <= the fit limit.
    min_feasible_bytes: the smallest budget a plan of this kind fits (None: not known).
    note:    why it does not fit, or was not tried.
    """

    label: str
    plan: Plan | None
    scope: str
    predicted_peak_bytes: int | None = None
    step_time_ratio: float | None = None
    fits: bool = False
    min_feasible_bytes: int | None = None
    micro_batches: int = 1
    note: str = ""
    choice: PlanChoice | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "plan": self.plan.to_json() if self.plan is not None else None,
            "scope": self.scope,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "step_time_ratio": self.step_time_ratio,
            "fits": self.fits,
            "min_feasible_bytes": self.min_feasible_bytes,
            "micro_batches": self.micro_batches,
            "note": self.note,
        }


@dataclass
class AutoPlan:
    """What :func:`auto_plan` chose: ``chosen`` (the fastest fitting plan of the widest scope) and
    every candidate weighed (``candidates``: fitting ones first, best first; then the rest by the
    smallest budget they would need)."""

    chosen: Candidate
    candidates: list[Candidate]
    budget_bytes: int
    full_peak_bytes: int
    full_step_seconds: float
    profile: ModelProfile | None = field(default=None, repr=False)
    solve_seconds: float = 0.0

    @property
    def plan(self) -> Plan:
        return self.chosen.plan  # type: ignore[return-value]

    @property
    def predicted_peak_bytes(self) -> int:
        return int(self.chosen.predicted_peak_bytes or 0)

    @property
    def step_time_ratio(self) -> float | None:
        return self.chosen.step_time_ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "full_peak_bytes": self.full_peak_bytes,
            "plan": self.plan.to_json(),
            "label": self.chosen.label,
            "scope": self.chosen.scope,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_step_time_ratio": self.step_time_ratio,
            "step_time_ratio": self.step_time_ratio,
            "full_step_seconds": self.full_step_seconds,
            "solve_seconds": self.solve_seconds,
            "candidates": [c.to_json() for c in self.candidates],
        }


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` normalises by batch statistics (BatchNorm in any form)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def micro_factor(
    model_fn: Callable[[], nn.Module], input_shape: tuple[int, ...], micro: int, *, optimizer: str, steps: int = 3
) -> float:
    """Measured CPU time of a full step split into ``micro`` micro-batches over the unsplit one
    (:func:`memfl.memory.measure.interleaved_step_times`, this process, lr 0, median of ``steps``)."""
    import torch

    from memfl.memory.inputs import input_spec, random_input
    from memfl.memory.measure import interleaved_step_times

    model = model_fn()
    x = random_input(tuple(input_shape), input_spec(model))
    with torch.no_grad():
        classes = int(model(x[:2]).shape[-1])
    y = torch.randint(0, classes, (input_shape[0],))
    times = interleaved_step_times(
        model,
        x,
        y,
        {"one": Plan(), "micro": Plan(micro_batches=micro)},
        optimizer=optimizer,
        steps=steps,
        warmup=1,
    )
    one, split = (statistics.median(times[k]["cpu"]) for k in ("one", "micro"))
    return split / one if one > 0 else 1.0


def _key(plan: Plan) -> str:
    return json.dumps(plan.to_json(), sort_keys=True)


def auto_plan(
    model_fn: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    budget: int | str,
    *,
    stage: int | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    speed: float = 1.0,
    margin: float = DEFAULT_MARGIN,
    slack_bytes: int = ESTIMATOR_SLACK_BYTES,
    min_bits: float = DEFAULT_MIN_BITS,
    blocks: int = DEFAULT_BLOCKS,
    partition: str = DEFAULT_PARTITION,
    micro_batches: Sequence[int] = DEFAULT_MICRO_BATCHES,
    kinds: Sequence[str] = ("model", "stage"),
    timing: bool = True,
    calibrate_steps: int = 3,
    profile: ModelProfile | None = None,
) -> AutoPlan:
    """The fastest plan of any kind whose estimated peak fits ``budget`` (see the module docstring).

    model_fn:    zero-argument builder of the whole model (a memfl BlockModel or a model ScaleFL
                 and FedHybrid can cut; picklable if the plan is to be measured).
    input_shape: the batch's shape, batch first, e.g. ``(32, 3, 32, 32)``.
    budget:      bytes, ``"300"``/``"300MB"`` (MB = 2**20) or ``"0.5x"`` (of full training's estimated peak).
    stage:       the federation's current ScaleFL stage (1..blocks): stage plans of that stage
                 only; None: every stage.
    speed:       the device's speed relative to this machine (times only; never changes the plan).
    margin, slack_bytes: a plan fits when its estimated peak is <= budget x (1 - margin) - slack.
    min_bits:    FedHybrid's accuracy guard (lowest average bits of a compressed unit).
    blocks, partition: how ScaleFL cuts the model (T and ``default``/``balanced``).
    micro_batches: the micro-batch counts tried (default none: opt in with e.g. ``(2, 4, 8)``;
                 see :data:`DEFAULT_MICRO_BATCHES` for why).
    kinds:       scopes weighed: ``"model"`` (full, hybrid), ``"stage"`` (stage, stage+hybrid).
    timing, calibrate_steps: profile times (False: memory only; ratios are then None and the
                 smallest peak wins within a scope) and FedHybrid's time-model calibration steps.
    profile:     a ready whole-model :class:`ModelProfile` at this batch (skips profiling).

    Returns an :class:`AutoPlan`. Raises :class:`InfeasibleBudget` when nothing fits (the smallest
    feasible budget and its plan in the message), ValueError for a bad budget, stage, speed,
    blocks, partition, micro-batch count or kind (the message names the argument).
    """
    t0 = time.perf_counter()
    input_shape = tuple(int(s) for s in input_shape)
    batch = input_shape[0]
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    bad = set(kinds) - {"model", "stage"}
    if bad or not kinds:
        raise ValueError(f"kinds {sorted(bad) or list(kinds)}: expected 'model' and/or 'stage'")
    micro = sorted({int(m) for m in micro_batches if int(m) > 1})
    if any(int(m) < 1 for m in micro_batches):
        raise ValueError(f"micro_batches {list(micro_batches)}: every count must be >= 1")
    from memfl.memory import estimate

    cache: dict[str, int] = {}

    def est(plan: Plan) -> int:
        key = _key(plan)
        if key not in cache:
            model = client_factory(model_fn, plan)()
            cache[key] = int(estimate(model, input_shape, optimizer=optimizer, plan=plan, momentum=momentum).peak_bytes)
        return cache[key]

    full_peak = est(Plan())
    budget_bytes = int(budget) if isinstance(budget, int) else parse_budget(budget, full_peak)
    limit = fit_limit(budget_bytes, margin, slack_bytes)
    base = model_fn()
    bn = has_batchnorm(base)
    stages: list[int] = []
    sopts = stage_options(blocks, partition, batch)
    if "stage" in kinds or stage is not None:
        T = stage_model(model_fn, Plan(kind="stage", stage=1, options=sopts)).blocks_count
        if stage is not None and not 1 <= int(stage) <= T:
            raise ValueError(f"stage {stage} out of range: the model is cut into {T} blocks (1..{T})")
        if "stage" in kinds:
            stages = [int(stage)] if stage is not None else list(range(1, T + 1))
    del base
    prof = profile
    if prof is None:
        prof = profile_model(
            model_fn(),
            input_shape,
            optimizer=optimizer,
            momentum=momentum,
            timing=timing,
            calibrate_steps=calibrate_steps if timing else 0,
        )
    full_seconds = prof.step_seconds if prof.timed else 0.0
    solver_kw = dict(speed=speed, margin=margin, slack_bytes=slack_bytes, min_bits=min_bits)

    def ratio(seconds: float) -> float | None:
        return seconds / full_seconds if full_seconds > 0 else None

    factors: dict[int, float] = {}

    def factor(m: int) -> float:
        if m not in factors:
            factors[m] = micro_factor(model_fn, input_shape, m, optimizer=optimizer) if timing else 1.0
        return factors[m]

    def plain(plan: Plan, label: str, seconds: float, m: int = 1) -> Candidate:
        peak = est(plan)
        return Candidate(
            label,
            plan,
            scope(plan),
            peak,
            ratio(seconds),
            peak <= limit,
            budget_needed(peak, margin, slack_bytes),
            micro_batches=m,
        )

    def solved(
        sub: ModelProfile, to_plan: Callable[[Plan], Plan], label: str, sc: str, base_seconds: float, m: int = 1
    ) -> Candidate:
        """FedHybrid's verified solver on ``sub``; its plans mapped to real plans by ``to_plan``."""
        try:
            choice = plan_for_budget(
                sub, budget_bytes, estimate_fn=lambda p: est(to_plan(p)), fused=None if m == 1 else False, **solver_kw
            )
        except _Infeasible as err:
            return Candidate(label, None, sc, None, None, False, err.min_feasible_bytes, m, "infeasible")
        plan = to_plan(choice.plan)
        peak = est(plan)
        seconds = base_seconds + choice.added_seconds * speed  # this machine's seconds
        return Candidate(
            label,
            plan,
            sc,
            peak,
            ratio(seconds),
            peak <= limit,
            budget_needed(peak, margin, slack_bytes),
            m,
            choice=choice,
        )

    def whole(m: int) -> list[Candidate]:
        sfx = f"+micro:{m}" if m > 1 else ""
        mb = m if m > 1 else None
        out = [plain(Plan(micro_batches=mb), "full" + sfx, full_seconds, m)]
        if out[0].fits:
            return out
        sub = prof if m == 1 else _micro_profile(model_fn, input_shape, m, prof, optimizer, momentum)

        def to_plan(p: Plan) -> Plan:
            if p.kind == "full":
                return Plan(micro_batches=mb)
            opts = dict(p.options)
            if m > 1:
                opts.pop("fused_step", None)
            return Plan(kind="hybrid", segments=p.segments, options=opts, micro_batches=mb)

        out.append(solved(sub, to_plan, "hybrid" + sfx, "model", full_seconds, m))
        return out

    def staged(t: int, m: int) -> list[Candidate]:
        sfx = f"+micro:{m}" if m > 1 else ""
        mb = m if m > 1 else None
        sp = Plan(kind="stage", stage=t, options=sopts, micro_batches=mb)
        sm = stage_model(model_fn, sp)
        prefix, tail, trained = stage_units(sm, sp)
        del sm
        grad_seconds = stage_step_seconds(prof, prefix, tail + trained, []) if prof.timed else 0.0
        plain_seconds = stage_step_seconds(prof, prefix, tail + trained, tail) if prof.timed else 0.0
        out = [plain(sp, f"stage:{t}{sfx}", plain_seconds, m)]
        if out[0].fits:
            return out
        sub = stage_profile(
            model_fn,
            (max(1, -(-batch // m)), *input_shape[1:]),
            sp,
            optimizer=optimizer,
            momentum=momentum,
            timings=prof,
        )

        def to_plan(p: Plan) -> Plan:
            if p.kind == "full":
                return sp
            opts = {**sopts, **p.options}
            if m > 1:
                opts.pop("fused_step", None)
            return stage_hybrid_plan(t, dict(p.segments or {}), options=opts, micro_batches=mb)

        out.append(solved(sub, to_plan, f"stage:{t}+hybrid{sfx}", f"stage:{t}", grad_seconds, m))
        return out

    def scope_runs() -> list[tuple[str, Callable[[int], list[Candidate]]]]:
        runs: list[tuple[str, Callable[[int], list[Candidate]]]] = []
        if "model" in kinds:
            runs.append(("model", whole))
        for t in stages:
            runs.append((f"stage:{t}", lambda m, t=t: staged(t, m)))
        return runs

    candidates: list[Candidate] = []
    for _, run in scope_runs():
        found = run(1)
        candidates += found
        if bn and any(c.fits for c in found):
            continue  # BatchNorm: micro-batches only where nothing fits without them
        for m in micro:
            if batch // m < (2 if bn else 1):
                break
            more = run(m)
            for c in more:  # the split's own cost, measured only for a plan that fits
                if c.fits and c.step_time_ratio is not None:
                    c.step_time_ratio *= factor(m)
                elif c.plan is not None:
                    c.step_time_ratio = None  # not timed: it does not fit
            candidates += more
            if any(c.fits for c in more):
                break  # more micro-batches only cost time

    fitting = [c for c in candidates if c.fits]
    if not fitting:
        known = [c for c in candidates if c.min_feasible_bytes is not None]
        best = min(known, key=lambda c: c.min_feasible_bytes)
        raise InfeasibleBudget(budget_bytes, int(best.min_feasible_bytes), best.label, candidates)

    def rank(c: Candidate) -> tuple:
        t = c.step_time_ratio if c.step_time_ratio is not None else float("inf")
        return (c.scope != "model", t, c.predicted_peak_bytes)

    fitting.sort(key=rank)
    rest = sorted((c for c in candidates if not c.fits), key=lambda c: c.min_feasible_bytes or float("inf"))
    return AutoPlan(
        chosen=fitting[0],
        candidates=fitting + rest,
        budget_bytes=budget_bytes,
        full_peak_bytes=full_peak,
        full_step_seconds=full_seconds,
        profile=prof,
        solve_seconds=time.perf_counter() - t0,
    )


def _micro_profile(
    model_fn: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    m: int,
    timed: ModelProfile,
    optimizer: str,
    momentum: float,
) -> ModelProfile:
    """The whole model's memory structure at the micro-batch size, with ``timed``'s unit times
    (the recompute / pack cost of a step is the same work split m ways)."""
    mb = max(1, -(-int(input_shape[0]) // m))
    sub = profile_model(model_fn(), (mb, *input_shape[1:]), optimizer=optimizer, momentum=momentum, timing=False)
    if timed.timed:
        for seg, src in zip(sub.segments, timed.segments):
            seg.fwd_seconds, seg.pack_seconds = src.fwd_seconds, dict(src.pack_seconds)
        sub.pack_fit, sub.calibration = dict(timed.pack_fit), timed.calibration
        sub.step_seconds, sub.fused_seconds, sub.timed = timed.step_seconds, timed.fused_seconds, True
    # the whole batch stays in memory while its micro-batches run
    sub.input_bytes = timed.input_bytes
    return sub
