"""The FedHybrid planner: per segment keep / recompute / compress-b, fastest plan under a budget.

The problem (SPEC 3.3)
----------------------
Given a :class:`~memfl.methods.fedhybrid.profile.ModelProfile` (per-segment saved tensors and times), a memory
budget and a device speed, choose one mode per segment -- ``keep``, ``recompute`` or ``qB`` for
the allowed bit-widths (``bits``, default 8/4/2; ``min_bits`` is the accuracy guard: no segment
is compressed below it) -- minimising the time the plan adds to a training step subject to the
predicted peak <= budget.

It is solved **exactly** by a dynamic program over the chain of segments (:func:`_solve_dp`); the
same model is also available as a 0-1 integer linear program for HiGHS (``highspy``,
``method="ilp"``), used to cross-check the DP (the tests compare both with brute force):

- the memory model of :func:`memfl.methods.fedhybrid.profile.plan_memory`: a saved tensor that only one
  segment touches costs a constant per mode of that segment; one touched by two consecutive
  segments (a ReLU output saved by one segment and by the next, the input of a recomputed segment)
  a constant per *pair* of their modes (tensors touched otherwise -- none in the shipped models --
  are charged their worst case);
- one memory row per segment ``s``: fixed bytes + gradients alive + tensors alive while ``s`` runs
  its backward + the recompute of ``s`` (if recomputed) + the transient of ``s`` in its mode
  (gradient buffers, decompressed copies) <= budget, and one for the end of the forward;
- objective: sum of added seconds (recompute = the segment's forward; compression = its pack +
  unpack cost), divided by the device's speed (which therefore never changes the plan, only its
  time).
- ``fused``: the optimizer step runs inside backward (plan option ``fused_step``,
  :class:`memfl.core.optim.StepInBackward`), so a row holds one module's gradients instead of all
  those produced so far; on by default for every hybrid plan when the optimizer is per-parameter
  (:func:`fusable`). It only adds a constant (``ModelProfile.fused_seconds``: one optimizer call per
  parameter) to every plan's time, so it never changes which plan is fastest.

DP: after segment ``s`` the state is its mode plus the Pareto set of (bytes alive so far, seconds
so far) of the partial plans reaching it; a row is checked once the next segment's mode is known.
Dominated partial plans can never finish better, so pruning them keeps the result exact. Chains
longer than :data:`EXACT_SEGMENTS` round the bytes up to ``budget / 2**14`` (conservative) to bound
the Pareto sets. Measured on this 2-core machine (synthetic chains, docs/FEDHYBRID.md): ResNet-18
(9 segments) a few milliseconds, 17 segments (ResNet-34) tens of milliseconds, 50 segments ~1-2 s,
100-400 segments 2-15 s. The ILP (sparse cumulative formulation) agrees but is slower (seconds at
17 segments, minutes at 100). The smallest feasible budget is the same DP minimising the peak.

Verification
------------
The program's memory model is a fast approximation. :func:`plan_for_budget` checks every candidate
against the project's memory estimator (:func:`memfl.memory.estimate`, which profiles the real
engine's allocations) and re-solves with a corrected model budget until the *estimated* peak is
within ``budget * (1 - margin)``; the margin covers the estimator's own error against a measured
peak. The plan it returns carries that estimate as ``predicted_peak_bytes``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.profile import (
    ModelProfile,
    plan_memory,
    plan_seconds,
    recompute_bytes,
    tensor_cost,
    transient_bytes,
)

#: compression widths a plan may use by default
DEFAULT_BITS = (8, 4, 2)
#: default accuracy guard: no segment compressed below this many average bits
DEFAULT_MIN_BITS = 2
#: default safety margin between the estimated peak and the budget
DEFAULT_MARGIN = 0.03
#: absolute slack (bytes) on top of the margin, default 0: the estimator leaves out runtime state
#: that is no tensor beyond its 1 MiB constant (measured minus estimated: -0.6 to +2.8 MiB on the
#: shipped models, see memfl.memory.estimate; hybrid plans of a width-0.25 ResNet-18 at batch 16
#: measured 1.3-2.9 MB above their estimate). The 3% margin covers that from ~100 MB budgets up;
#: for smaller models pass ``slack_bytes`` (``memfl plan --slack MB``), e.g. SMALL_MODEL_SLACK_BYTES
ESTIMATOR_SLACK_BYTES = 0
SMALL_MODEL_SLACK_BYTES = 3 << 20
#: chains up to this many segments are solved exactly; longer ones with memory rounded up to
#: budget / 2**14 (conservative; see _solve_dp)
EXACT_SEGMENTS = 64


class InfeasibleBudget(ValueError):
    """No plan fits the budget; ``min_feasible_bytes`` is the smallest budget that has one."""

    def __init__(self, budget_bytes: int, min_feasible_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.min_feasible_bytes = int(min_feasible_bytes)
        super().__init__(
            f"no plan fits a budget of {budget_bytes / 2**20:.1f} MB; the smallest feasible budget "
            f"is {min_feasible_bytes / 2**20:.1f} MB (everything recomputed or compressed at the "
            f"lowest allowed bits)"
        )


@dataclass
class PlanChoice:
    """A solved plan.

    plan:                 the :class:`~memfl.core.protocol.Plan` (``full`` when nothing needs to change).
    modes:                segment -> mode (every segment).
    predicted_peak_bytes: the estimated peak (the memory estimator's when verified, else the model's).
    model_peak_bytes:     the planner's own memory model's peak.
    added_seconds:        seconds the plan adds per step on the device (profile time / speed).
    step_seconds:         the full-training step time on the device (profile time / speed).
    budget_bytes:         the budget asked for.
    solve_seconds:        wall time of the solves (DP or ILP) and estimates.
    """

    plan: Plan
    modes: dict[str, str]
    predicted_peak_bytes: int
    model_peak_bytes: int
    added_seconds: float
    step_seconds: float
    budget_bytes: int
    solve_seconds: float = 0.0
    verified: bool = False
    iterations: int = 0

    @property
    def step_time_ratio(self) -> float:
        """Predicted (full step + added) / full step."""
        return (self.step_seconds + self.added_seconds) / self.step_seconds if self.step_seconds else 1.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["plan"] = self.plan.to_json()
        out["step_time_ratio"] = self.step_time_ratio
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PlanChoice":
        """Inverse of :meth:`to_json` (derived keys such as ``step_time_ratio`` are ignored)."""
        fields = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in data.items() if k in fields}
        kw["plan"] = Plan.from_json(data["plan"])
        return cls(**kw)


def allowed_modes(
    bits: Sequence[float] = DEFAULT_BITS, min_bits: float = DEFAULT_MIN_BITS, recompute: bool = True
) -> list[str]:
    """The modes a plan may use: keep, recompute (optional), qB for B in ``bits`` with B >= min_bits."""
    modes = ["keep"] + (["recompute"] if recompute else [])
    for b in sorted(set(bits), reverse=True):
        if b < min_bits:
            continue
        if not 1 <= b <= 8:
            raise ValueError(f"compression bits must be in [1, 8], got {b}")
        modes.append(f"q{b:g}")
    return modes


# ------------------------------------------------------------------------------- the program


@dataclass
class _Program:
    prof: ModelProfile
    modes: list[str]
    mixed: bool
    min_bits: int
    n_x: int = 0
    cols_cost: list[float] = field(default_factory=list)
    cols_upper: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    rows: list[tuple[dict[int, float], float, float]] = field(default_factory=list)
    mem_rows: list[dict[int, float]] = field(default_factory=list)
    mem_const: list[float] = field(default_factory=list)

    def x(self, s: int, m: int) -> int:
        return s * len(self.modes) + m

    def add_col(self, cost: float, upper: float, integer: bool) -> int:
        self.cols_cost.append(cost)
        self.cols_upper.append(upper)
        self.integer.append(integer)
        return len(self.cols_cost) - 1


def _build(
    prof: ModelProfile, modes: list[str], *, mixed: bool, min_bits: int, speed: float, fused: bool = False
) -> _Program:
    S, M = prof.head, len(modes)
    pg = _Program(prof, modes, mixed, min_bits)
    for s in range(S):
        for mode in modes:
            pg.add_col(prof.added_seconds(s, mode, speed), 1.0, True)
    pg.n_x = S * M
    for s in range(S):  # one mode per segment
        pg.rows.append(({pg.x(s, m): 1.0 for m in range(M)}, 1.0, 1.0))

    # tensors: group by the planned segments they involve, cost per combination of modes
    base = ["keep"] * S
    live: list[dict[int, float]] = [dict() for _ in range(S + 1)]  # by first involvement
    const = [0.0] * (S + 1)
    groups: dict[tuple[int, ...], dict[tuple[int, ...], float]] = {}
    group_first: dict[tuple[int, ...], int] = {}
    for rec in prof.tensors:
        inv = rec.involved()
        first = min(inv) if inv else S
        planned = tuple(s for s in inv if s < S)
        if not planned:
            full, packed = tensor_cost(rec, base, S, mixed=mixed, min_bits=min_bits)
            const[first] += full + packed
            continue
        if len(planned) > 3:  # never seen in shipped models: charge the worst case
            worst = 0
            for combo in itertools.product(range(M), repeat=len(planned)):
                assign = list(base)
                for s, m in zip(planned, combo):
                    assign[s] = modes[m]
                worst = max(worst, sum(tensor_cost(rec, assign, S, mixed=mixed, min_bits=min_bits)))
            const[first] += worst
            continue
        table = groups.setdefault(planned, {})
        group_first[planned] = min(group_first.get(planned, first), first)
        for combo in itertools.product(range(M), repeat=len(planned)):
            assign = list(base)
            for s, m in zip(planned, combo):
                assign[s] = modes[m]
            c = sum(tensor_cost(rec, assign, S, mixed=mixed, min_bits=min_bits))
            if c:
                table[combo] = table.get(combo, 0.0) + c
    # a tensor's first involvement can differ within a group only through the head (never
    # planned), so one `first` per group is exact
    for planned, table in groups.items():
        first = group_first[planned]
        for combo, c in table.items():
            if len(planned) == 1:
                col = pg.x(planned[0], combo[0])
            else:
                col = pg.add_col(0.0, 1.0, False)
                coeffs = {pg.x(s, m): 1.0 for s, m in zip(planned, combo)}
                coeffs[col] = -1.0
                pg.rows.append((coeffs, -np.inf, float(len(planned) - 1)))
            live[first][col] = live[first].get(col, 0.0) + c
    # memory rows: while segment s runs its backward, tensors first involved at <= s are alive.
    # A_s (continuous) = A_{s-1} + the bytes of the tensors first involved at s, so every row is
    # sparse: A_s + recompute of s + transient of s <= budget - constants
    acc_col = -1
    acc_const = 0.0
    for s in range(S + 1):
        col_a = pg.add_col(0.0, np.inf, False)
        link = {col_a: 1.0}
        if acc_col >= 0:
            link[acc_col] = -1.0
        for col, c in live[s].items():
            link[col] = link.get(col, 0.0) - c
        pg.rows.append((link, 0.0, 0.0))
        acc_col = col_a
        acc_const += const[s]
        row = {col_a: 1.0}
        if s < S and "recompute" in modes:
            col = pg.x(s, modes.index("recompute"))
            row[col] = row.get(col, 0.0) + recompute_bytes(prof, s)
        if s < S:
            for m, mode in enumerate(modes):
                col = pg.x(s, m)
                row[col] = row.get(col, 0.0) + transient_bytes(prof, s, mode)
        pg.mem_rows.append(row)
        pg.mem_const.append(acc_const + prof.fixed_bytes() + prof.grads_alive(s, fused))
    return pg


def _solve(pg: _Program, *, budget: float | None) -> tuple[list[str], float] | None:
    """Solve; ``budget`` None minimises the peak instead. Returns (modes per segment, objective)."""
    import highspy

    cost = list(pg.cols_cost)
    upper = list(pg.cols_upper)
    integer = list(pg.integer)
    rows = list(pg.rows)
    peak_col = None
    if budget is None:  # minimise P subject to every memory row <= P
        cost = [0.0] * len(cost)
        peak_col = len(cost)
        cost.append(1.0)
        upper.append(np.inf)
        integer.append(False)
        for row, c in zip(pg.mem_rows, pg.mem_const):
            r = dict(row)
            r[peak_col] = -1.0
            rows.append((r, -np.inf, -c))
    else:
        for row, c in zip(pg.mem_rows, pg.mem_const):
            rows.append((row, -np.inf, budget - c))

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 1e-9)
    lp = highspy.HighsLp()
    n = len(cost)
    lp.num_col_ = n
    lp.num_row_ = len(rows)
    lp.col_cost_ = np.asarray(cost, dtype=float)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.asarray(upper, dtype=float)
    lp.row_lower_ = np.asarray([lo for _, lo, _ in rows], dtype=float)
    lp.row_upper_ = np.asarray([hi for _, _, hi in rows], dtype=float)
    starts, index, value = [0], [], []
    for coeffs, _, _ in rows:
        for col, v in sorted(coeffs.items()):
            index.append(col)
            value.append(v)
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.asarray(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray(value, dtype=float)
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integer]
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    sol = np.asarray(h.getSolution().col_value)
    S, M = pg.prof.head, len(pg.modes)
    chosen = []
    for s in range(S):
        m = int(np.argmax(sol[s * M : (s + 1) * M]))
        chosen.append(pg.modes[m])
    return chosen, float(h.getInfo().objective_function_value)


def _choice(
    prof: ModelProfile,
    modes: list[str],
    budget: int,
    speed: float,
    *,
    mixed: bool,
    min_bits: int,
    seconds: float,
    fused: bool = False,
) -> PlanChoice:
    seg = dict(zip(prof.names, modes))
    options: dict[str, Any] = {"mixed": mixed, "min_bits": int(min_bits)}
    if fused:
        options["fused_step"] = True
    mem = plan_memory(prof, seg, options)["peak_bytes"]
    if all(m == "keep" for m in modes) and not fused:
        plan = Plan()
    else:
        plan = Plan(kind="hybrid", segments={k: v for k, v in seg.items() if v != "keep"}, options=options)
    return PlanChoice(
        plan=plan,
        modes=seg,
        predicted_peak_bytes=mem,
        model_peak_bytes=mem,
        added_seconds=plan_seconds(prof, seg, speed) + (prof.fused_seconds / speed if fused else 0.0),
        step_seconds=prof.step_seconds / speed,
        budget_bytes=int(budget),
        solve_seconds=seconds,
    )


@dataclass
class _Chain:
    """The memory model of :func:`plan_memory` cut along the chain of segments (for the DP)."""

    modes: list[str]
    unary: list[list[float]]  # [s][m]: tensors only s touches
    pair: list[list[list[float]]]  # [s][m][m2]: tensors s and s + 1 touch
    row_const: list[float]  # [s]: fixed + gradients alive + constant tensors first touched <= s
    extra: list[list[float]]  # [s][m]: recompute + transient of s in mode m (row s only)
    time: list[list[float]]  # [s][m]


def _chain(
    prof: ModelProfile, modes: list[str], *, mixed: bool, min_bits: int, speed: float, fused: bool = False
) -> _Chain:
    S, M = prof.head, len(modes)
    base = ["keep"] * S
    unary = [[0.0] * M for _ in range(S)]
    pair = [[[0.0] * M for _ in range(M)] for _ in range(S)]
    const = [0.0] * (S + 1)

    def cost(rec, assign: dict[int, str]) -> float:
        full = list(base)
        for s, m in assign.items():
            full[s] = m
        return float(sum(tensor_cost(rec, full, S, mixed=mixed, min_bits=min_bits)))

    for rec in prof.tensors:
        inv = rec.involved()
        planned = [s for s in inv if s < S]
        first = min(inv) if inv else S
        if not planned:
            const[first] += cost(rec, {})
        elif len(planned) == 1:
            s = planned[0]
            for m, mode in enumerate(modes):
                unary[s][m] += cost(rec, {s: mode})
        elif len(planned) == 2 and planned[1] == planned[0] + 1:
            s = planned[0]
            for m, mode in enumerate(modes):
                for m2, mode2 in enumerate(modes):
                    pair[s][m][m2] += cost(rec, {s: mode, s + 1: mode2})
        else:  # never seen in the shipped models: charge the worst case at its first row
            const[first] += max(
                cost(rec, dict(zip(planned, combo))) for combo in itertools.product(modes, repeat=len(planned))
            )
    row_const, acc = [], 0.0
    for s in range(S + 1):
        acc += const[s]
        row_const.append(prof.fixed_bytes() + prof.grads_alive(s, fused) + acc)
    extra = [
        [(recompute_bytes(prof, s) if mode == "recompute" else 0) + transient_bytes(prof, s, mode) for mode in modes]
        for s in range(S)
    ]
    time_ = [[prof.added_seconds(s, mode, speed) for mode in modes] for s in range(S)]
    return _Chain(modes, unary, pair, row_const, extra, time_)


def _pareto(acc: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Indices of the entries not dominated in (acc, obj), i.e. no other has both <= (one <)."""
    order = np.lexsort((obj, acc))
    o = obj[order]
    best_before = np.minimum.accumulate(o)
    keep = np.ones(len(o), dtype=bool)
    keep[1:] = o[1:] < best_before[:-1]
    return order[keep]


def _solve_dp(ch: _Chain, budget: float | None, resolution: float = 0.0) -> tuple[list[str], float] | None:
    """Exact dynamic program over the chain of segments (vectorised with numpy).

    ``budget`` given: the fastest plan with every row <= budget; the state after segment s is its
    mode with the Pareto set of (bytes alive so far, seconds so far). ``budget`` None: the plan
    with the smallest peak (Pareto set of (bytes alive so far, highest row so far)). A row of
    segment s is checked once s + 1's mode is known (tensors shared by s and s + 1 are alive in
    row s). Dominated partial plans can never complete better, so pruning them keeps it exact.
    ``resolution`` > 0 rounds the bytes alive up to its multiples after every segment (bounding
    the Pareto sets of long chains; conservative by at most segments x resolution bytes).
    """
    S, M = len(ch.unary), len(ch.modes)
    minimise_peak = budget is None
    unary = np.asarray(ch.unary)
    pair = np.asarray(ch.pair)
    extra = np.asarray(ch.extra)
    times = np.asarray(ch.time)
    # stage arrays: mode of the current segment, bytes alive so far, objective, parent index
    mode = np.arange(M)
    acc = np.zeros(M)
    obj = np.zeros(M) if minimise_peak else times[0].copy()
    stages = [(mode, np.full(M, -1))]
    for s in range(S):
        last = s == S - 1
        base_acc = acc + unary[s][mode]
        row_base = ch.row_const[s] + extra[s][mode]
        new_mode, new_acc, new_obj, new_parent = [], [], [], []
        for m2 in range(1 if last else M):
            acc_s = base_acc + (0.0 if last else pair[s][mode, m2])
            if resolution > 0:
                acc_s = np.ceil(acc_s / resolution) * resolution
            row = row_base + acc_s
            if last:
                row = np.maximum(row, ch.row_const[S] + acc_s)
            if minimise_peak:
                o = np.maximum(obj, row)
                idx = np.arange(len(acc_s))
            else:
                idx = np.nonzero(row <= budget)[0]
                acc_s = acc_s[idx]
                o = obj[idx] + (0.0 if last else times[s + 1][m2])
            if len(idx) == 0:
                continue
            keep = _pareto(acc_s, o)
            new_mode.append(np.full(len(keep), m2))
            new_acc.append(acc_s[keep])
            new_obj.append(o[keep])
            new_parent.append(idx[keep])
        if not new_acc:
            return None
        mode, acc, obj = np.concatenate(new_mode), np.concatenate(new_acc), np.concatenate(new_obj)
        stages.append((mode, np.concatenate(new_parent)))
    best = int(np.lexsort((acc, obj))[0])
    chosen = [""] * S
    # walk back: stage s + 1's parent indexes stage s, whose mode is segment s's
    for s in range(S, 0, -1):
        _, parents = stages[s]
        best = int(parents[best])
        chosen[s - 1] = ch.modes[int(stages[s - 1][0][best])]
    return chosen, float(obj.min())


def solve(
    prof: ModelProfile,
    budget_bytes: float,
    *,
    speed: float = 1.0,
    bits: Sequence[float] = DEFAULT_BITS,
    min_bits: float = DEFAULT_MIN_BITS,
    recompute: bool = True,
    mixed: bool = True,
    method: str = "dp",
    fused: bool | None = None,
) -> PlanChoice:
    """The fastest plan whose *model* peak is <= ``budget_bytes`` (exact; no verification).

    method: ``"dp"`` (default, the dynamic program) or ``"ilp"`` (HiGHS); both are exact for the
    same model and give the same added time (tests check it against brute force).
    fused:  fuse the optimizer step into backward (plan option ``fused_step``; default
            :func:`fusable`: when the profile's optimizer is per-parameter).
    Raises :class:`InfeasibleBudget` (with the smallest feasible model budget) when none is.
    """
    modes = allowed_modes(bits, min_bits, recompute)
    fused = fusable(prof) if fused is None else bool(fused)
    t0 = time.perf_counter()
    mb = int(max(1, min_bits))
    if method == "dp":
        # exact up to EXACT_SEGMENTS segments; longer chains round memory to budget / 2**14
        resolution = 0.0 if prof.head <= EXACT_SEGMENTS else float(budget_bytes) / 2**14
        res = _solve_dp(
            _chain(prof, modes, mixed=mixed, min_bits=mb, speed=speed, fused=fused), float(budget_bytes), resolution
        )
    elif method == "ilp":
        res = _solve(
            _build(prof, modes, mixed=mixed, min_bits=mb, speed=speed, fused=fused), budget=float(budget_bytes)
        )
    else:
        raise ValueError(f"unknown method {method!r}; expected 'dp' or 'ilp'")
    if res is None:
        raise InfeasibleBudget(
            budget_bytes,
            min_feasible(prof, bits=bits, min_bits=min_bits, recompute=recompute, mixed=mixed, fused=fused),
        )
    return _choice(
        prof, res[0], int(budget_bytes), speed, mixed=mixed, min_bits=mb, seconds=time.perf_counter() - t0, fused=fused
    )


def min_peak_choice(
    prof: ModelProfile,
    *,
    bits: Sequence[float] = DEFAULT_BITS,
    min_bits: float = DEFAULT_MIN_BITS,
    recompute: bool = True,
    mixed: bool = True,
    speed: float = 1.0,
    method: str = "dp",
    fused: bool | None = None,
) -> PlanChoice:
    """The plan with the smallest model peak (exact)."""
    modes = allowed_modes(bits, min_bits, recompute)
    fused = fusable(prof) if fused is None else bool(fused)
    t0 = time.perf_counter()
    mb = int(max(1, min_bits))
    if method == "dp":
        res = _solve_dp(_chain(prof, modes, mixed=mixed, min_bits=mb, speed=speed, fused=fused), None)
    else:
        res = _solve(_build(prof, modes, mixed=mixed, min_bits=mb, speed=speed, fused=fused), budget=None)
    assert res is not None, "minimising the peak is always feasible"
    return _choice(prof, res[0], 0, speed, mixed=mixed, min_bits=mb, seconds=time.perf_counter() - t0, fused=fused)


def fusable(prof: ModelProfile) -> bool:
    """Whether the profile's optimizer updates each parameter from its own gradient and state
    alone (SGD with momentum / weight decay / a FedProx term, Adam), so its step can be fused
    into backward exactly (:class:`memfl.core.optim.StepInBackward`)."""
    return prof.optimizer in ("sgd", "adam")


def min_feasible(prof: ModelProfile, **kw: Any) -> int:
    """The smallest model peak any allowed plan reaches."""
    return min_peak_choice(prof, **kw).model_peak_bytes


def uniform_plan(prof: ModelProfile, mode: str, *, mixed: bool = True, fused: bool = False) -> Plan:
    """Every segment in ``mode`` (the baselines: ``recompute`` everything, uniform ``q2``)."""
    options: dict[str, Any] = {"mixed": mixed, "min_bits": 1}
    if fused:
        options["fused_step"] = True
    return Plan(kind="hybrid", segments={n: mode for n in prof.names}, options=options)


# ------------------------------------------------------------------ verified against the estimator


def fit_limit(budget_bytes: float, margin: float = DEFAULT_MARGIN, slack_bytes: int = ESTIMATOR_SLACK_BYTES) -> float:
    """The largest estimated peak a plan may have to be given a budget: ``budget x (1 - margin) -
    slack`` (the margin and slack cover the estimator's error against a measured peak)."""
    return budget_bytes * (1.0 - margin) - slack_bytes


def budget_needed(
    predicted_peak_bytes: float, margin: float = DEFAULT_MARGIN, slack_bytes: int = ESTIMATOR_SLACK_BYTES
) -> int:
    """The smallest budget whose :func:`fit_limit` admits ``predicted_peak_bytes``."""
    return int((predicted_peak_bytes + slack_bytes) / (1.0 - margin)) + 1


def plan_for_budget(
    prof: ModelProfile,
    budget_bytes: int,
    *,
    estimate_fn: Callable[[Plan], int] | None,
    speed: float = 1.0,
    margin: float = DEFAULT_MARGIN,
    slack_bytes: int = ESTIMATOR_SLACK_BYTES,
    bits: Sequence[float] = DEFAULT_BITS,
    min_bits: float = DEFAULT_MIN_BITS,
    recompute: bool = True,
    mixed: bool = True,
    max_iter: int = 6,
    fused: bool | None = None,
) -> PlanChoice:
    """The fastest plan whose peak, as ``estimate_fn`` predicts it, is <= :func:`fit_limit`
    (budget x (1 - margin) - slack).

    ``estimate_fn``: plan -> estimated peak bytes (``memfl.memory.estimate`` on the model); None
    trusts the planner's own model. Full training is returned when it fits; otherwise every plan
    fuses the optimizer step into backward when ``fused`` (default :func:`fusable`), which costs
    no time and frees the gradients as they are used. The model budget is
    corrected by the estimator's disagreement and the program re-solved (at most ``max_iter``
    times); the fastest verified plan wins. Raises :class:`InfeasibleBudget` naming the smallest
    budget with a verified plan.
    """
    t0 = time.perf_counter()
    target = fit_limit(budget_bytes, margin, slack_bytes)
    fused = fusable(prof) if fused is None else bool(fused)
    kw = dict(bits=bits, min_bits=min_bits, recompute=recompute, mixed=mixed, fused=fused)
    cache: dict[str, int] = {}

    def est(choice: PlanChoice) -> int:
        if estimate_fn is None:
            return choice.model_peak_bytes
        key = json.dumps(choice.plan.to_json(), sort_keys=True)
        if key not in cache:
            cache[key] = int(estimate_fn(choice.plan))
        return cache[key]

    full = _choice(
        prof, ["keep"] * prof.head, budget_bytes, speed, mixed=mixed, min_bits=int(max(1, min_bits)), seconds=0.0
    )
    e_full = est(full)
    if e_full <= target:
        full.predicted_peak_bytes, full.verified = e_full, estimate_fn is not None
        full.solve_seconds = time.perf_counter() - t0
        return full

    # the smallest-peak plan bounds the search from below (and is the fallback)
    lowest = min_peak_choice(prof, speed=speed, **kw)
    lowest.predicted_peak_bytes, lowest.verified = est(lowest), estimate_fn is not None
    if lowest.predicted_peak_bytes > target:
        raise InfeasibleBudget(budget_bytes, budget_needed(lowest.predicted_peak_bytes, margin, slack_bytes))
    best = lowest
    top = _choice(
        prof,
        ["keep"] * prof.head,
        budget_bytes,
        speed,
        mixed=mixed,
        min_bits=int(max(1, min_bits)),
        seconds=0.0,
        fused=fused,
    )  # keep all (fused)
    lo_b, hi_b = float(lowest.model_peak_bytes), float(top.model_peak_bytes)
    model_budget = min(max(float(target), lo_b), hi_b)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 -- read after the loop: the steps it took
        try:
            c = solve(prof, model_budget, speed=speed, **kw)
        except InfeasibleBudget:
            c = None
        if c is not None:
            e = est(c)
            c.predicted_peak_bytes, c.verified = e, estimate_fn is not None
        if c is not None and e <= target:
            if c.added_seconds < best.added_seconds:
                best = c
            lo_b = max(lo_b, model_budget)
            nxt = model_budget + (target - e) if hi_b >= top.model_peak_bytes else (lo_b + hi_b) / 2
        else:
            hi_b = min(hi_b, model_budget)
            nxt = (model_budget - (e - target)) if c is not None else (lo_b + hi_b) / 2
            if not lo_b < nxt < hi_b:
                nxt = (lo_b + hi_b) / 2
        nxt = min(max(nxt, lo_b), hi_b)
        if estimate_fn is None or hi_b - lo_b < 0.002 * target or abs(nxt - model_budget) < 4096:
            break
        model_budget = nxt
    best.budget_bytes = int(budget_bytes)
    best.iterations = iterations
    best.solve_seconds = time.perf_counter() - t0
    return best


def full_choice(
    prof: ModelProfile,
    *,
    estimate_fn: Callable[[Plan], int] | None,
    speed: float = 1.0,
    margin: float = DEFAULT_MARGIN,
    slack_bytes: int = ESTIMATOR_SLACK_BYTES,
) -> PlanChoice:
    """Full training as a :class:`PlanChoice` (its estimated peak; budget: :func:`budget_needed`)."""
    c = _choice(prof, ["keep"] * prof.head, 0, speed, mixed=True, min_bits=1, seconds=0.0)
    if estimate_fn is not None:
        c.predicted_peak_bytes, c.verified = int(estimate_fn(c.plan)), True
    c.budget_bytes = budget_needed(c.predicted_peak_bytes, margin, slack_bytes)
    return c


def frontier(
    prof: ModelProfile,
    *,
    estimate_fn: Callable[[Plan], int] | None,
    levels: int = 16,
    margin: float = DEFAULT_MARGIN,
    speed: float = 1.0,
    slack_bytes: int = ESTIMATOR_SLACK_BYTES,
    **kw: Any,
) -> list[PlanChoice]:
    """A table of plans a server looks clients' budgets up in (:func:`pick`), fastest first.

    The exact program is solved for ``levels`` model budgets from the smallest peak to full
    training; every distinct plan found (plus the smallest-peak plan and full training) is
    estimated once with ``estimate_fn``, and only the Pareto-optimal ones are kept: each is faster
    than every plan with a lower estimated peak. ``budget_bytes`` of an entry is the smallest
    budget it fits with the margin.
    """
    kw = dict(kw)
    kw["fused"] = fusable(prof) if kw.get("fused") is None else bool(kw["fused"])
    lo = min_peak_choice(prof, speed=speed, **kw)
    mb = int(max(1, kw.get("min_bits", DEFAULT_MIN_BITS)))
    full = _choice(prof, ["keep"] * prof.head, 0, speed, mixed=kw.get("mixed", True), min_bits=mb, seconds=0.0)
    top = _choice(
        prof, ["keep"] * prof.head, 0, speed, mixed=kw.get("mixed", True), min_bits=mb, seconds=0.0, fused=kw["fused"]
    )

    def key(c: PlanChoice) -> str:
        return json.dumps(c.plan.to_json(), sort_keys=True)

    found: dict[str, PlanChoice] = {key(c): c for c in (lo, full, top)}
    for b in np.linspace(lo.model_peak_bytes, top.model_peak_bytes, levels)[1:-1]:
        c = solve(prof, float(b), speed=speed, **kw)
        found.setdefault(key(c), c)
    for c in found.values():
        if estimate_fn is not None:
            c.predicted_peak_bytes, c.verified = int(estimate_fn(c.plan)), True
        c.budget_bytes = budget_needed(c.predicted_peak_bytes, margin, slack_bytes)
    table: list[PlanChoice] = []
    # fastest first; at equal time full training (no fused step) before the rest
    for c in sorted(found.values(), key=lambda c: (c.added_seconds, c.plan.kind != "full", c.predicted_peak_bytes)):
        if not table or c.predicted_peak_bytes < min(t.predicted_peak_bytes for t in table):
            table.append(c)
    return table


def pick(
    table: Sequence[PlanChoice],
    budget_bytes: int,
    margin: float = DEFAULT_MARGIN,
    slack_bytes: int = ESTIMATOR_SLACK_BYTES,
) -> PlanChoice | None:
    """The fastest plan of a :func:`frontier` table whose estimated peak is <= :func:`fit_limit`
    of the budget, or None when the budget is below every plan's."""
    limit = fit_limit(budget_bytes, margin, slack_bytes)
    for c in table:  # fastest first
        if c.predicted_peak_bytes <= limit:
            return c
    return None
