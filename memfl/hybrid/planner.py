"""The FedHybrid planner: per segment keep / recompute / compress-b, fastest plan under a budget.

The problem (SPEC 3.3)
----------------------
Given a :class:`~memfl.hybrid.profile.ModelProfile` (per-segment saved tensors and times), a memory
budget and a device speed, choose one mode per segment -- ``keep``, ``recompute`` or ``qB`` for
the allowed bit-widths (``bits``, default 8/4/2; ``min_bits`` is the accuracy guard: no segment
is compressed below it) -- minimising the time the plan adds to a training step subject to the
predicted peak <= budget.

It is solved **exactly** as a 0-1 integer linear program with HiGHS (``highspy``):

- ``x[s, m]`` binary, one mode per segment;
- the memory model of :func:`memfl.hybrid.profile.plan_memory`, linearised: a saved tensor that
  only one segment touches costs a constant per mode of that segment; one touched by two or three
  segments (a ReLU output saved by one segment and by the next, the input of a recomputed segment)
  costs a constant per *combination* of their modes, carried by a continuous ``z`` >= sum of the
  combination's ``x`` - (k - 1) (exact: ``z`` only appears with non-negative weights in <= rows);
- one row per segment ``s``: fixed bytes + tensors alive while ``s`` runs its backward + the
  recompute of ``s`` (if recomputed) + the transient of ``s`` in its mode (gradient buffers,
  decompressed copies) <= budget, and one for the end of the forward;
- objective: sum of added seconds (recompute = the segment's forward; compression = its pack +
  unpack cost), divided by the device's speed (which therefore never changes the plan, only its
  time).

ResNet-18 (9 segments x 5 modes, ~250 variables) solves in a few milliseconds; a chain of 200
segments (~5,000 variables) in well under a second (see docs/FEDHYBRID.md for the measured table).
The smallest feasible budget is the optimum of the same program with the peak as the objective.

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
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from memfl.hybrid.profile import (
    ModelProfile,
    plan_memory,
    plan_seconds,
    recompute_bytes,
    tensor_cost,
    transient_bytes,
)
from memfl.protocol import Plan

#: compression widths a plan may use by default
DEFAULT_BITS = (8, 4, 2)
#: default accuracy guard: no segment compressed below this many average bits
DEFAULT_MIN_BITS = 2
#: default safety margin between the estimated peak and the budget
DEFAULT_MARGIN = 0.03


class InfeasibleBudget(ValueError):
    """No plan fits the budget; ``min_feasible_bytes`` is the smallest budget that has one."""

    def __init__(self, budget_bytes: int, min_feasible_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.min_feasible_bytes = int(min_feasible_bytes)
        super().__init__(
            f"no plan fits a budget of {budget_bytes / 2**20:.1f} MB; the smallest feasible budget "
            f"is {min_feasible_bytes / 2**20:.1f} MB (everything recomputed or compressed at the "
            f"lowest allowed bits)")


@dataclass
class PlanChoice:
    """A solved plan.

    plan:                 the :class:`~memfl.protocol.Plan` (``full`` when nothing needs to change).
    modes:                segment -> mode (every segment).
    predicted_peak_bytes: the estimated peak (the memory estimator's when verified, else the model's).
    model_peak_bytes:     the planner's own memory model's peak.
    added_seconds:        seconds the plan adds per step on the device (profile time / speed).
    step_seconds:         the full-training step time on the device (profile time / speed).
    budget_bytes:         the budget asked for.
    solve_seconds:        wall time of the ILP solves (and estimates).
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


def allowed_modes(bits: Sequence[float] = DEFAULT_BITS, min_bits: float = DEFAULT_MIN_BITS,
                  recompute: bool = True) -> list[str]:
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


def _build(prof: ModelProfile, modes: list[str], *, mixed: bool, min_bits: int,
           speed: float) -> _Program:
    S, M = prof.head, len(modes)
    pg = _Program(prof, modes, mixed, min_bits)
    for s in range(S):
        for m, mode in enumerate(modes):
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
    # memory rows: while segment s runs its backward, tensors first involved at <= s are alive
    acc: dict[int, float] = {}
    acc_const = 0.0
    for s in range(S + 1):
        for col, c in live[s].items():
            acc[col] = acc.get(col, 0.0) + c
        acc_const += const[s]
        row = dict(acc)
        if s < S and "recompute" in modes:
            col = pg.x(s, modes.index("recompute"))
            row[col] = row.get(col, 0.0) + recompute_bytes(prof, s)
        if s < S:
            for m, mode in enumerate(modes):
                col = pg.x(s, m)
                row[col] = row.get(col, 0.0) + transient_bytes(prof, s, mode)
        pg.mem_rows.append(row)
        pg.mem_const.append(acc_const + prof.fixed_bytes() + prof.grads_alive(s))
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
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in integer]
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    sol = np.asarray(h.getSolution().col_value)
    S, M = pg.prof.head, len(pg.modes)
    chosen = []
    for s in range(S):
        m = int(np.argmax(sol[s * M:(s + 1) * M]))
        chosen.append(pg.modes[m])
    return chosen, float(h.getInfo().objective_function_value)


def _choice(prof: ModelProfile, modes: list[str], budget: int, speed: float, *, mixed: bool,
            min_bits: int, seconds: float) -> PlanChoice:
    seg = dict(zip(prof.names, modes))
    options = {"mixed": mixed, "min_bits": int(min_bits)}
    mem = plan_memory(prof, seg, options)["peak_bytes"]
    if all(m == "keep" for m in modes):
        plan = Plan()
    else:
        plan = Plan(kind="hybrid", segments={k: v for k, v in seg.items() if v != "keep"},
                    options=options)
    return PlanChoice(plan=plan, modes=seg, predicted_peak_bytes=mem, model_peak_bytes=mem,
                      added_seconds=plan_seconds(prof, seg, speed),
                      step_seconds=prof.step_seconds / speed, budget_bytes=int(budget),
                      solve_seconds=seconds)


def solve(prof: ModelProfile, budget_bytes: float, *, speed: float = 1.0,
          bits: Sequence[float] = DEFAULT_BITS, min_bits: float = DEFAULT_MIN_BITS,
          recompute: bool = True, mixed: bool = True) -> PlanChoice:
    """The fastest plan whose *model* peak is <= ``budget_bytes`` (exact ILP; no verification).

    Raises :class:`InfeasibleBudget` (with the smallest feasible model budget) when none is.
    """
    modes = allowed_modes(bits, min_bits, recompute)
    t0 = time.perf_counter()
    pg = _build(prof, modes, mixed=mixed, min_bits=int(max(1, min_bits)), speed=speed)
    res = _solve(pg, budget=float(budget_bytes))
    if res is None:
        raise InfeasibleBudget(budget_bytes, min_feasible(prof, bits=bits, min_bits=min_bits,
                                                          recompute=recompute, mixed=mixed))
    return _choice(prof, res[0], int(budget_bytes), speed, mixed=mixed,
                   min_bits=int(max(1, min_bits)), seconds=time.perf_counter() - t0)


def min_peak_choice(prof: ModelProfile, *, bits: Sequence[float] = DEFAULT_BITS,
                    min_bits: float = DEFAULT_MIN_BITS, recompute: bool = True,
                    mixed: bool = True, speed: float = 1.0) -> PlanChoice:
    """The plan with the smallest model peak (exact ILP)."""
    modes = allowed_modes(bits, min_bits, recompute)
    t0 = time.perf_counter()
    pg = _build(prof, modes, mixed=mixed, min_bits=int(max(1, min_bits)), speed=speed)
    res = _solve(pg, budget=None)
    assert res is not None, "minimising the peak is always feasible"
    return _choice(prof, res[0], 0, speed, mixed=mixed, min_bits=int(max(1, min_bits)),
                   seconds=time.perf_counter() - t0)


def min_feasible(prof: ModelProfile, **kw: Any) -> int:
    """The smallest model peak any allowed plan reaches."""
    return min_peak_choice(prof, **kw).model_peak_bytes


def uniform_plan(prof: ModelProfile, mode: str, *, mixed: bool = True) -> Plan:
    """Every segment in ``mode`` (the baselines: ``recompute`` everything, uniform ``q2``)."""
    return Plan(kind="hybrid", segments={n: mode for n in prof.names},
                options={"mixed": mixed, "min_bits": 1})


# ------------------------------------------------------------------ verified against the estimator

def plan_for_budget(prof: ModelProfile, budget_bytes: int, *,
                    estimate_fn: Callable[[Plan], int] | None, speed: float = 1.0,
                    margin: float = DEFAULT_MARGIN, bits: Sequence[float] = DEFAULT_BITS,
                    min_bits: float = DEFAULT_MIN_BITS, recompute: bool = True,
                    mixed: bool = True, max_iter: int = 6) -> PlanChoice:
    """The fastest plan whose peak, as ``estimate_fn`` predicts it, is <= budget * (1 - margin).

    ``estimate_fn``: plan -> estimated peak bytes (``memfl.memory.estimate`` on the model); None
    trusts the planner's own model. Full training is returned when it fits. The model budget is
    corrected by the estimator's disagreement and the program re-solved (at most ``max_iter``
    times); the fastest verified plan wins. Raises :class:`InfeasibleBudget` naming the smallest
    budget with a verified plan.
    """
    t0 = time.perf_counter()
    target = budget_bytes * (1.0 - margin)
    kw = dict(bits=bits, min_bits=min_bits, recompute=recompute, mixed=mixed)
    cache: dict[str, int] = {}

    def est(choice: PlanChoice) -> int:
        if estimate_fn is None:
            return choice.model_peak_bytes
        key = repr(sorted(choice.modes.items()))
        if key not in cache:
            cache[key] = int(estimate_fn(choice.plan))
        return cache[key]

    full = _choice(prof, ["keep"] * prof.head, budget_bytes, speed, mixed=mixed,
                   min_bits=int(max(1, min_bits)), seconds=0.0)
    e_full = est(full)
    if e_full <= target:
        full.predicted_peak_bytes, full.verified = e_full, estimate_fn is not None
        full.solve_seconds = time.perf_counter() - t0
        return full

    # the smallest-peak plan bounds the search from below (and is the fallback)
    lowest = min_peak_choice(prof, speed=speed, **kw)
    lowest.predicted_peak_bytes, lowest.verified = est(lowest), estimate_fn is not None
    if lowest.predicted_peak_bytes > target:
        raise InfeasibleBudget(budget_bytes, int(lowest.predicted_peak_bytes / (1.0 - margin)) + 1)
    best = lowest
    lo_b, hi_b = float(lowest.model_peak_bytes), float(full.model_peak_bytes)
    model_budget = min(max(float(target), lo_b), hi_b)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # secant steps, then bisection on the model budget
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
            nxt = model_budget + (target - e) if hi_b >= full.model_peak_bytes else (lo_b + hi_b) / 2
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


def full_choice(prof: ModelProfile, *, estimate_fn: Callable[[Plan], int] | None,
                speed: float = 1.0, margin: float = DEFAULT_MARGIN) -> PlanChoice:
    """Full training as a :class:`PlanChoice` (its estimated peak; budget = the peak / (1 - margin))."""
    c = _choice(prof, ["keep"] * prof.head, 0, speed, mixed=True, min_bits=1, seconds=0.0)
    if estimate_fn is not None:
        c.predicted_peak_bytes, c.verified = int(estimate_fn(c.plan)), True
    c.budget_bytes = int(c.predicted_peak_bytes / (1.0 - margin)) + 1
    return c


def frontier(prof: ModelProfile, *, estimate_fn: Callable[[Plan], int] | None, levels: int = 16,
             margin: float = DEFAULT_MARGIN, speed: float = 1.0, **kw: Any) -> list[PlanChoice]:
    """A table of plans a server looks clients' budgets up in (:func:`pick`), fastest first.

    The exact program is solved for ``levels`` model budgets from the smallest peak to full
    training; every distinct plan found (plus the smallest-peak plan and full training) is
    estimated once with ``estimate_fn``, and only the Pareto-optimal ones are kept: each is faster
    than every plan with a lower estimated peak. ``budget_bytes`` of an entry is the smallest
    budget it fits with the margin.
    """
    lo = min_peak_choice(prof, speed=speed, **kw)
    full = _choice(prof, ["keep"] * prof.head, 0, speed, mixed=kw.get("mixed", True),
                   min_bits=int(max(1, kw.get("min_bits", DEFAULT_MIN_BITS))), seconds=0.0)
    found: dict[str, PlanChoice] = {repr(sorted(c.modes.items())): c for c in (lo, full)}
    for b in np.linspace(lo.model_peak_bytes, full.model_peak_bytes, levels)[1:-1]:
        c = solve(prof, float(b), speed=speed, **kw)
        found.setdefault(repr(sorted(c.modes.items())), c)
    for c in found.values():
        if estimate_fn is not None:
            c.predicted_peak_bytes, c.verified = int(estimate_fn(c.plan)), True
        c.budget_bytes = int(c.predicted_peak_bytes / (1.0 - margin)) + 1
    table: list[PlanChoice] = []
    for c in sorted(found.values(), key=lambda c: (c.added_seconds, c.predicted_peak_bytes)):
        if not table or c.predicted_peak_bytes < min(t.predicted_peak_bytes for t in table):
            table.append(c)
    return table


def pick(table: Sequence[PlanChoice], budget_bytes: int,
         margin: float = DEFAULT_MARGIN) -> PlanChoice | None:
    """The fastest plan of a :func:`frontier` table whose estimated peak is <= budget * (1 - margin),
    or None when the budget is below every plan's."""
    limit = budget_bytes * (1.0 - margin)
    for c in table:  # fastest first
        if c.predicted_peak_bytes <= limit:
            return c
    return None
