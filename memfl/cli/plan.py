"""``memfl plan``: FedHybrid's fastest keep/recompute/compress plan under a budget (and
``--measure``: its measured peak and step time)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from memfl.cli.common import UsageError, model_factory, parse_shape
from memfl.cli.memory import timing_json, timing_line
from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.planner import DEFAULT_MARGIN, DEFAULT_MIN_BITS, InfeasibleBudget
from memfl.methods.fedhybrid.solve import MB, segment_rows, solve_for_model


def cmd_plan(args: Any) -> int:
    """``memfl plan``."""
    shape = parse_shape(args.input)
    factory = model_factory(args.model, shape, args.classes)
    if args.width != 1.0:
        from functools import partial

        factory = partial(factory, width=args.width)
    input_shape = (args.batch, *shape)
    try:
        choice, prof, full_peak = solve_for_model(
            factory,
            input_shape,
            args.budget,
            optimizer=args.optimizer,
            speed=args.speed,
            margin=args.margin,
            min_bits=args.min_bits,
            slack_bytes=int(args.slack * MB),
        )
    except InfeasibleBudget as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        raise UsageError(f"--budget: {err}") from None
    out: dict[str, Any] = {
        "model": args.model,
        "input_shape": list(input_shape),
        "optimizer": args.optimizer,
        "budget_bytes": choice.budget_bytes,
        "full_peak_bytes": full_peak,
        "fused_step": bool(choice.plan.options.get("fused_step", False)),
        "predicted_peak_bytes": choice.predicted_peak_bytes,
        "added_seconds": choice.added_seconds,
        "full_step_seconds": choice.step_seconds,
        "step_time_ratio": choice.step_time_ratio,
        "predicted_step_time_ratio": choice.step_time_ratio,
        "plan": choice.plan.to_json(),
        "segments": segment_rows(prof, choice, args.speed),
        "solve_seconds": choice.solve_seconds,
        "speed": args.speed,
        # the profile's time model: isolated timings scaled by whole steps (profile.calibrate)
        "time_model_calibration": prof.calibration,
    }
    if args.measure:
        from memfl.memory import measure, time_steps

        m = measure(factory, input_shape, optimizer=args.optimizer, plan=choice.plan, steps=args.steps)
        f = measure(factory, input_shape, optimizer=args.optimizer, plan=Plan(), steps=args.steps)
        out["measured_peak_bytes"] = m.peak_bytes
        out["measured_full_peak_bytes"] = f.peak_bytes
        out["fits"] = m.peak_bytes <= choice.budget_bytes
        # step times the way training runs: another child, the trainer's allocator and threads,
        # full and plan interleaved (the memory child's mmap threshold slows steps)
        t = time_steps(
            factory,
            input_shape,
            {"full": Plan(), "plan": choice.plan},
            optimizer=args.optimizer,
            steps=args.time_steps,
            warmup=1,
        )
        out.update(timing_json(t))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{args.model} {args.input} batch {args.batch}, {args.optimizer}: plan for "
        f"{choice.budget_bytes / MB:.1f} MB ({choice.budget_bytes / full_peak:.0%} of "
        f"the full-training peak {full_peak / MB:.1f} MB)"
    )
    table.add_column("segment")
    table.add_column("mode")
    table.add_column("saved MB (full precision)", justify="right")
    table.add_column("added ms", justify="right")
    for r in out["segments"]:
        table.add_row(r["segment"], r["mode"], f"{r['saved_bytes'] / MB:.2f}", f"{1000 * r['added_seconds']:.1f}")
    console = Console()
    console.print(table)
    console.print(
        f"predicted peak {choice.predicted_peak_bytes / MB:.1f} MB (budget "
        f"{choice.budget_bytes / MB:.1f} MB, margin {args.margin:.0%}); added "
        f"{1000 * choice.added_seconds:.0f} ms per step = {choice.step_time_ratio:.2f}x the "
        f"full step (predicted, device speed {args.speed:g}); solved in {choice.solve_seconds:.1f} s"
    )
    if args.measure:
        console.print(
            f"measured peak {out['measured_peak_bytes'] / MB:.1f} MB "
            f"({'fits' if out['fits'] else 'DOES NOT FIT'}); " + timing_line(out)
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``memfl plan`` on the CLI's sub-parsers."""
    p = sub.add_parser("plan", help="FedHybrid: the fastest keep/recompute/compress plan under a budget")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="one sample's shape, CxHxW (e.g. 3x32x32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget", required=True, help="MB (e.g. 300) or a fraction of the full-training peak (0.5x)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--speed", type=float, default=1.0, help="device speed (1.0 = this machine)")
    p.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN, help="plan for a peak of at most budget x (1 - margin)"
    )
    p.add_argument(
        "--slack",
        type=float,
        default=0.0,
        help="MB kept free on top of the margin (the estimator's absolute error, 1-3 MB, matters for small models)",
    )
    p.add_argument(
        "--min-bits",
        dest="min_bits",
        type=float,
        default=DEFAULT_MIN_BITS,
        help="accuracy guard: lowest average bits a segment may be compressed to",
    )
    p.add_argument("--steps", type=int, default=3, help="training steps per memory measurement")
    p.add_argument(
        "--time-steps",
        dest="time_steps",
        type=int,
        default=5,
        help="timed steps per plan (median, after one warm-up) in the step-timing child",
    )
    p.add_argument("--measure", action="store_true", help="also measure the plan and full training")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
