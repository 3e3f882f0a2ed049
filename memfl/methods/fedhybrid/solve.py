"""Solving a plan for one model and budget: what ``memfl plan`` and the ``budget:X`` plans of
``memfl memory --plan`` run (the commands live in :mod:`memfl.cli.plan`).

``memfl plan --model NAME --input CxHxW --batch B --budget X [--measure] [--json]`` profiles the
model, solves the planner (the dynamic program, each plan verified against the memory estimator) and prints the plan:
per segment its mode and saved bytes, the predicted peak and added step time; ``--measure`` also
measures the plan's and full training's peak and step time in fresh subprocesses. ``X`` is in MB
(``300``, ``300MB``) or a fraction of the full-training peak (``0.5x``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.planner import (
    DEFAULT_MARGIN,
    DEFAULT_MIN_BITS,
    PlanChoice,
    plan_for_budget,
)
from memfl.methods.fedhybrid.profile import ModelProfile, profile_model

MB = 2**20


def parse_budget(text: str, full_peak_bytes: int | None = None) -> int:
    """``"300"``/``"300MB"`` -> bytes (MB = 2**20); ``"0.5x"`` -> that fraction of ``full_peak_bytes``."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(x|mb|m|mib)?", s)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(
            f"bad budget {text!r}: expected MB (e.g. 300 or 300MB) or a fraction of the full-training peak (e.g. 0.5x)"
        )
    value = float(m.group(1))
    if m.group(2) == "x":
        if full_peak_bytes is None:
            raise ValueError(f"budget {text!r} is relative: the full-training peak is needed")
        return int(value * full_peak_bytes)
    return int(value * MB)


def estimator(
    model_fn: Callable[[], Any], input_shape: tuple[int, ...], optimizer: str, momentum: float = 0.9
) -> Callable[[Plan], int]:
    """plan -> :func:`memfl.memory.estimate` peak bytes (memoised per plan)."""
    from memfl.memory import estimate

    cache: dict[str, int] = {}

    def fn(plan: Plan) -> int:
        key = json.dumps(plan.to_json(), sort_keys=True)
        if key not in cache:
            cache[key] = estimate(model_fn(), input_shape, optimizer=optimizer, plan=plan, momentum=momentum).peak_bytes
        return cache[key]

    return fn


def solve_for_model(
    model_fn: Callable[[], Any],
    input_shape: tuple[int, ...],
    budget: str | int,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    speed: float = 1.0,
    margin: float = DEFAULT_MARGIN,
    min_bits: float = DEFAULT_MIN_BITS,
    timing: bool = True,
    profile: ModelProfile | None = None,
    **kw: Any,
) -> tuple[PlanChoice, ModelProfile, int]:
    """Profile ``model_fn()`` and solve for ``budget`` (bytes, or the text forms of
    :func:`parse_budget`). Returns (choice, profile, full-training estimated peak)."""
    prof = profile or profile_model(model_fn(), input_shape, optimizer=optimizer, momentum=momentum, timing=timing)
    est = estimator(model_fn, input_shape, optimizer, momentum)
    full_peak = est(Plan())
    budget_bytes = budget if isinstance(budget, int) else parse_budget(budget, full_peak)
    choice = plan_for_budget(prof, budget_bytes, estimate_fn=est, speed=speed, margin=margin, min_bits=min_bits, **kw)
    return choice, prof, full_peak


def segment_rows(prof: ModelProfile, choice: PlanChoice, speed: float = 1.0) -> list[dict[str, Any]]:
    """One row per segment: name, mode, full-precision saved bytes, added seconds."""
    rows = []
    for i, seg in enumerate(prof.segments):
        saved = sum(t.nbytes for t in prof.tensors if i in t.savers)
        mode = choice.modes[seg.name]
        rows.append(
            {
                "segment": seg.name,
                "mode": mode,
                "saved_bytes": saved,
                "added_seconds": prof.added_seconds(i, mode, speed),
            }
        )
    return rows
