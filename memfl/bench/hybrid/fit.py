"""Benchmark ``hybrid-fit``: does the planner's plan fit, and what does it cost?

ResNet-18 at 3x32x32, batch 64, SGD with momentum 0.9 (``--quick``: width 0.25, batch 16). The
full-training peak is *measured* (fresh subprocess, peak RSS); budgets are 75/50/35/25% of it. For
each budget the planner (exact ILP, verified against ``memfl.memory.estimate`` with the default 3%
margin; ``--quick``: also a 3 MiB slack) gives a plan, or says the budget is infeasible and names the smallest
feasible budget.
Each plan's peak is measured for real (fresh subprocess, peak RSS); step times are measured the
way training runs (``memfl.memory.time_steps``: one more fresh process, the trainer's allocator,
all plans interleaved round-robin, median of 6 steps per plan after a warm-up, CPU and wall
time), one thread. Predicted ratios come from the planner's time model, calibrated by whole steps
in the profile (``memfl.methods.fedhybrid.profile.calibrate``). Baselines,
measured the same way: recompute every segment, and uniform 2-bit compression of every segment.
A row of the smallest-peak plan shows the floor.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from memfl.bench.hybrid.common import machine, mb, mode_summary
from memfl.core.protocol import Plan
from memfl.memory import StepTiming, measure, time_steps
from memfl.methods.fedhybrid.planner import (
    DEFAULT_MARGIN,
    SMALL_MODEL_SLACK_BYTES,
    InfeasibleBudget,
    budget_needed,
    min_peak_choice,
    plan_for_budget,
    uniform_plan,
)
from memfl.methods.fedhybrid.profile import plan_seconds, profile_model
from memfl.methods.fedhybrid.solve import estimator
from memfl.models import build_model

FRACTIONS = (0.75, 0.5, 0.35, 0.25)
GOAL_RATIO_AT_HALF = 1.3


def synthetic_profile(segments: int, seed: int = 0):
    """A chain of ``segments`` conv-like segments (each saves its input, shared with the previous
    segment's ReLU output, and two more activations) with random sizes and times: for timing the
    solver on models larger than the shipped ones."""
    import numpy as np

    from memfl.methods.fedhybrid.profile import ModelProfile, SavedTensor, SegmentProfile

    rng = np.random.default_rng(seed)
    segs, tensors = [], []
    for i in range(segments):
        c, hw = int(rng.choice([16, 32, 64, 128])), int(rng.choice([4, 8, 16, 32]))
        shape = (32, c, hw, hw)
        nbytes = 4 * 32 * c * hw * hw
        segs.append(
            SegmentProfile(
                name=f"s{i}",
                fwd_seconds=float(rng.uniform(0.005, 0.05)),
                pack_seconds={"q8": nbytes * 2e-9, "q4": nbytes * 3e-9, "q2": nbytes * 4e-9},
                largest_bytes=nbytes,
                param_bytes=4 * 9 * c * c,
            )
        )
        # the ReLU output of segment i, saved by i and by i + 1 (its input)
        tensors.append(
            SavedTensor(
                nbytes=nbytes,
                shape=shape,
                kind="float",
                relu=True,
                savers=[i] + ([i + 1] if i + 1 < segments else []),
                inputs_of=[i + 1] if i + 1 < segments else [],
            )
        )
        tensors.append(SavedTensor(nbytes=nbytes, shape=shape, kind="float", savers=[i]))
    params = sum(sg.param_bytes for sg in segs)
    return ModelProfile(
        input_shape=(32, 3, 32, 32),
        optimizer="sgd",
        momentum=0.9,
        segments=segs,
        tensors=tensors,
        param_bytes=params,
        grad_bytes=params,
        optimizer_bytes=params,
        buffer_bytes=0,
        input_bytes=0,
        step_seconds=1.0,
    )


def solver_scaling(sizes=(9, 17, 50, 100, 200)) -> list[dict[str, Any]]:
    """Wall time of the exact planner (the DP) on synthetic chains, at a budget halfway between the
    smallest peak and full training."""
    from memfl.methods.fedhybrid.planner import min_feasible, solve
    from memfl.methods.fedhybrid.profile import plan_memory

    rows = []
    for n in sizes:
        prof = synthetic_profile(n)
        lo, hi = min_feasible(prof), plan_memory(prof, {})["peak_bytes"]
        t0 = time.perf_counter()
        c = solve(prof, (lo + hi) / 2)
        rows.append(
            {"segments": n, "modes": 5, "seconds": time.perf_counter() - t0, "step_time_ratio": c.step_time_ratio}
        )
    return rows


def time_plans(factory, shape: tuple[int, ...], plans: dict[str, Plan], steps: int = 6) -> StepTiming:
    """Per-plan step times measured the way training runs (:func:`memfl.memory.time_steps`): a
    fresh process with the trainer's allocator (no ``MALLOC_MMAP_THRESHOLD_``: the memory
    measurement's child sets it, which slows steps by a third and allocation-heavy plans most)
    and this process's thread count, one model, every plan interleaved round-robin so that the
    load of the shared machine hits all of them alike, one warm-up step each, then the median of
    ``steps`` steps per plan, CPU time (``time.process_time``, the trainer's clock on CPU: waiting
    for a core, which dominates wall time on the loaded 2-core machine, is not counted) and wall
    time."""
    return time_steps(factory, shape, plans, optimizer="sgd", steps=steps, warmup=1, momentum=0.9)


def run(out: Path, quick: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # 2 OpenMP threads on 2 cores shared with other jobs stall badly
    width, batch, steps = (0.25, 16, 2) if quick else (1.0, 64, 3)
    # the estimator's absolute error (1-3 MB) exceeds the 3% margin of the quick model's ~15 MB
    slack = SMALL_MODEL_SLACK_BYTES if quick else 0
    shape = (batch, 3, 32, 32)
    factory = partial(build_model, "resnet18", in_channels=3, num_classes=10, image_size=32, width=width)
    t0 = time.time()
    prof = profile_model(factory(), shape, optimizer="sgd", momentum=0.9, timing=True)
    est = estimator(factory, shape, "sgd", 0.9)
    full_est = est(Plan())
    full = measure(factory, shape, plan=Plan(), steps=steps)
    print(f"[hybrid-fit] full training: estimated {mb(full_est)} MB, measured {mb(full.peak_bytes)} MB", flush=True)

    plans: dict[str, Plan] = {"full": Plan()}
    baselines: dict[str, dict[str, Any]] = {}
    for name, plan in (
        ("recompute_all", uniform_plan(prof, "recompute")),
        ("uniform_2bit", uniform_plan(prof, "q2", mixed=False)),
        ("fused_only", Plan(kind="hybrid", options={"fused_step": True})),
        ("recompute_all_fused", uniform_plan(prof, "recompute", fused=True)),
        ("uniform_2bit_fused", uniform_plan(prof, "q2", mixed=False, fused=True)),
    ):
        plans[name] = plan
        baselines[name] = {
            "plan": plan.to_json(),
            "predicted_peak_bytes": est(plan),
            "predicted_step_time_ratio": 1 + plan_seconds(prof, plan.segments) / prof.step_seconds,
            "measured_peak_bytes": measure(factory, shape, plan=plan, steps=steps).peak_bytes,
        }
        print(f"[hybrid-fit] {name}: measured {mb(baselines[name]['measured_peak_bytes'])} MB", flush=True)

    lowest = min_peak_choice(prof)
    plans["floor"] = lowest.plan
    floor = {
        "modes": lowest.modes,
        "plan": lowest.plan.to_json(),
        "predicted_peak_bytes": est(lowest.plan),
        "predicted_step_time_ratio": lowest.step_time_ratio,
        "measured_peak_bytes": measure(factory, shape, plan=lowest.plan, steps=steps).peak_bytes,
    }
    floor["smallest_feasible_budget_bytes"] = budget_needed(floor["predicted_peak_bytes"], DEFAULT_MARGIN, slack)
    print(
        f"[hybrid-fit] smallest-peak plan: predicted {mb(floor['predicted_peak_bytes'])} MB, measured "
        f"{mb(floor['measured_peak_bytes'])} MB ({floor['measured_peak_bytes'] / full.peak_bytes:.0%} of full)",
        flush=True,
    )

    rows = []
    for frac in FRACTIONS:
        budget = int(frac * full.peak_bytes)
        row: dict[str, Any] = {"fraction": frac, "budget_bytes": budget}
        try:
            choice = plan_for_budget(prof, budget, estimate_fn=est, margin=DEFAULT_MARGIN, slack_bytes=slack)
        except InfeasibleBudget as err:
            row.update(feasible=False, min_feasible_bytes=err.min_feasible_bytes, error=str(err))
        else:
            m = measure(factory, shape, plan=choice.plan, steps=steps)
            row.update(
                feasible=True,
                plan=choice.plan.to_json(),
                modes=choice.modes,
                predicted_peak_bytes=choice.predicted_peak_bytes,
                predicted_step_time_ratio=choice.step_time_ratio,
                solve_seconds=choice.solve_seconds,
                measured_peak_bytes=m.peak_bytes,
                fits=m.peak_bytes <= budget,
            )
            plans[f"{frac:.2f}"] = choice.plan
        for name, b in baselines.items():
            row[f"{name}_fits"] = b["measured_peak_bytes"] <= budget
        rows.append(row)
        print(
            f"[hybrid-fit] {frac:.0%}: "
            + (f"measured {mb(row['measured_peak_bytes'])} / {mb(budget)} MB" if row["feasible"] else row["error"]),
            flush=True,
        )

    timing = time_plans(factory, shape, plans, steps=3 if quick else 6)
    times = timing.cpu_seconds
    ratio = {name: t / times["full"] for name, t in times.items()}
    wall_ratio = {name: timing.ratio(name, clock="wall") for name in times}

    def put(d: dict[str, Any], key: str) -> None:
        d["step_seconds"], d["step_time_ratio"] = times[key], ratio[key]
        d["step_wall_seconds"], d["step_time_ratio_wall"] = timing.wall_seconds[key], wall_ratio[key]
        d["predicted_vs_measured"] = d["predicted_step_time_ratio"] / ratio[key] - 1

    for name, b in baselines.items():
        put(b, name)
    put(floor, "floor")
    for row in rows:
        if row["feasible"]:
            put(row, f"{row['fraction']:.2f}")
    print("[hybrid-fit] step time vs full: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()), flush=True)

    half = next(r for r in rows if r["fraction"] == 0.5)
    scaling = solver_scaling((9, 17, 50) if quick else (9, 17, 50, 100, 200))
    summary = {
        "model": "resnet18",
        "width": width,
        "input_shape": list(shape),
        "optimizer": "sgd, momentum 0.9",
        "margin": DEFAULT_MARGIN,
        "slack_bytes": slack,
        "machine": machine(),
        "seconds": time.time() - t0,
        "full": {
            "estimated_peak_bytes": full_est,
            "measured_peak_bytes": full.peak_bytes,
            "step_seconds": times["full"],
            "step_wall_seconds": timing.wall_seconds["full"],
            "profiled_step_seconds": prof.step_seconds,
        },
        "timing": timing.to_json(),
        "calibration": prof.calibration,
        "time_model_within_10pct": all(abs(r["predicted_vs_measured"]) <= 0.10 for r in rows if r["feasible"]),
        "baselines": baselines,
        "floor": floor,
        "rows": rows,
        "solver_scaling": scaling,
        "all_fit": all(r.get("fits", True) for r in rows),
        "goal": {
            "ratio_at_half": GOAL_RATIO_AT_HALF,
            "met": bool(half["feasible"] and half["step_time_ratio"] <= GOAL_RATIO_AT_HALF),
        },
    }
    (out / "hybrid-fit.json").write_text(json.dumps(summary, indent=1))
    (out / "hybrid-fit.md").write_text(_markdown(summary, out, quick))
    return summary


def _markdown(s: dict[str, Any], out: Path, quick: bool) -> str:
    full = s["full"]
    lines = [
        "### Fit: plans under a budget",
        "",
        f"Command: `memfl bench hybrid-fit --out {out}{' --quick' if quick else ''}` "
        f"(torch {s['machine']['torch']}, {s['machine']['threads']} threads, 1-min load "
        f"{s['machine']['load_1min']:.1f} at the start)",
        "",
        f"ResNet-18 (width {s['width']}) at {'x'.join(map(str, s['input_shape'][1:]))}, batch "
        f"{s['input_shape'][0]}, SGD momentum 0.9. Full training: measured peak {mb(full['measured_peak_bytes'])} MB "
        f"(estimated {mb(full['estimated_peak_bytes'])} MB), step {full['step_seconds']:.2f} CPU s. Budgets are "
        f"fractions of the measured peak; plans are verified against the estimator with a "
        f"{s['margin']:.0%} margin{' and a ' + mb(s['slack_bytes']) + ' MB slack' if s.get('slack_bytes') else ''}, then measured in a fresh subprocess (peak RSS). Step times: median of "  # noqa: E501
        f"{s['timing']['steps']} interleaved steps per plan (after one warm-up) in one fresh process with "
        "the trainer's allocator (no mmap threshold), CPU time (user + system, the trainer's clock; wall "
        "time on the shared machine mostly measures the wait for a core), "
        f"{s['timing']['threads']} thread(s) (2 OpenMP threads on the 2 shared cores stall under load). "
        "Predicted ratios: the planner's time model, calibrated by whole steps in the profile "
        "(docs/FEDHYBRID.md).",
        "",
        "| budget | plan | predicted peak MB | measured peak MB | fits | step time vs full (measured / predicted) "
        "| recompute-all fits (plain / fused step) | uniform 2-bit fits (plain / fused step) |",
        "|---|---|---:|---:|:-:|---:|:-:|:-:|",
    ]
    for r in s["rows"]:
        head = f"| {r['fraction']:.0%} ({mb(r['budget_bytes'])} MB) "
        yn = lambda k, r=r: "yes" if r[k] else "no"  # noqa: E731
        base = (
            f"| {yn('recompute_all_fits')} / {yn('recompute_all_fused_fits')} | "
            f"{yn('uniform_2bit_fits')} / {yn('uniform_2bit_fused_fits')} |"
        )
        if not r["feasible"]:
            lines.append(
                head + f"| infeasible: smallest feasible budget {mb(r['min_feasible_bytes'])} MB "
                f"({r['min_feasible_bytes'] / full['measured_peak_bytes']:.0%}) | - | - | - | - " + base
            )
            continue
        fused = " + fused step" if r["plan"].get("options", {}).get("fused_step") else ""
        lines.append(
            head + f"| {mode_summary(r['modes'])}{fused} | {mb(r['predicted_peak_bytes'])} | "
            f"{mb(r['measured_peak_bytes'])} | {'yes' if r['fits'] else '**no**'} | "
            f"{r['step_time_ratio']:.2f}x / {r['predicted_step_time_ratio']:.2f}x " + base
        )
    lines += [
        "",
        "| baseline / floor | predicted peak MB | measured peak MB | % of full | step time vs full (measured / predicted) |",  # noqa: E501
        "|---|---:|---:|---:|---:|",
    ]
    for name, b in (
        ("recompute everything", s["baselines"]["recompute_all"]),
        ("uniform 2-bit everywhere", s["baselines"]["uniform_2bit"]),
        ("optimizer step fused into backward only (keep all)", s["baselines"]["fused_only"]),
        ("recompute everything + fused step", s["baselines"]["recompute_all_fused"]),
        ("uniform 2-bit everywhere + fused step", s["baselines"]["uniform_2bit_fused"]),
        (
            "smallest-peak plan ("
            + mode_summary(s["floor"]["modes"])
            + (" + fused step" if s["floor"].get("plan", {}).get("options", {}).get("fused_step") else "")
            + ")",
            s["floor"],
        ),
    ):
        lines.append(
            f"| {name} | {mb(b['predicted_peak_bytes'])} | {mb(b['measured_peak_bytes'])} | "
            f"{b['measured_peak_bytes'] / full['measured_peak_bytes']:.0%} | "
            f"{b['step_time_ratio']:.2f}x / {b['predicted_step_time_ratio']:.2f}x |"
        )
    half = next(r for r in s["rows"] if r["fraction"] == 0.5)
    verdict = ("met" if s["goal"]["met"] else "**not met**") + (
        f" ({half['step_time_ratio']:.2f}x)" if half["feasible"] else " (the 50% budget is infeasible)"
    )
    lines += [
        "",
        "Exact solver (dynamic program) on synthetic chains, 5 modes per segment, budget halfway between "
        "the smallest peak and full training: "
        + ", ".join(f"{r['segments']} segments {1000 * r['seconds']:.0f} ms" for r in s["solver_scaling"])
        + ".",
    ]
    lines += [
        "",
        f"Goal: at 50% of the full peak, <= {s['goal']['ratio_at_half']}x the full step time: {verdict}. "
        f"Measured peak <= budget in every feasible row: {'yes' if s['all_fit'] else '**no**'}. "
        f"Predicted step-time ratio within 10% of the measured one in every feasible row: "
        f"{'yes' if s['time_model_within_10pct'] else '**no**'}.",
        "",
    ]
    return "\n".join(lines)
