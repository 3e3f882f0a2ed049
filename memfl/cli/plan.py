"""``memfl plan``: FedHybrid's fastest keep/recompute/compress plan under a budget (and
``--measure``: its measured peak and step time); ``memfl plan --auto``: the fastest plan of any kind
(full, hybrid, ScaleFL stage, stage+hybrid, micro-batched; :mod:`memfl.methods.combined.auto`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from memfl.cli.common import UsageError, model_factory, parse_shape
from memfl.cli.memory import timing_json, timing_line
from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.planner import DEFAULT_MARGIN, DEFAULT_MIN_BITS, InfeasibleBudget
from memfl.methods.fedhybrid.solve import MB, segment_rows, solve_for_model


def _micro_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        counts = (0,)
    if any(c < 1 for c in counts):
        raise UsageError(f"--micro-batches {text!r}: expected comma-separated counts >= 1 (e.g. 2,4,8; 1: none)")
    return counts


def cmd_plan_auto(args: Any, factory: Any, input_shape: tuple[int, ...]) -> int:
    """``memfl plan --auto``: the combined planner over every plan kind
    (:func:`memfl.methods.combined.auto_plan`); ``--measure`` measures the chosen plan's peak (on
    what a client under it holds) and full training's, and both step times as training runs."""
    from memfl.methods.combined import InfeasibleBudget as AutoInfeasible
    from memfl.methods.combined import auto_plan, client_factory

    if args.stage is not None and args.stage < 1:
        raise UsageError(f"--stage {args.stage}: expected a ScaleFL stage >= 1")
    if args.blocks < 1:
        raise UsageError(f"--blocks {args.blocks}: expected >= 1")
    if args.calibrate_steps < 0:
        raise UsageError(f"--calibrate-steps {args.calibrate_steps}: expected >= 0")
    try:
        result = auto_plan(
            factory,
            input_shape,
            args.budget,
            stage=args.stage,
            optimizer=args.optimizer,
            speed=args.speed,
            margin=args.margin,
            slack_bytes=int(args.slack * MB),
            min_bits=args.min_bits,
            blocks=args.blocks,
            micro_batches=_micro_counts(args.micro_batches),
            calibrate_steps=args.calibrate_steps,
        )
    except AutoInfeasible as err:
        raise UsageError(f"--budget {args.budget}: {err}") from None
    except ValueError as err:
        text = str(err)
        flag = "--stage" if "stage" in text else "--budget"
        raise UsageError(f"{flag}: {text}") from None
    out: dict[str, Any] = {
        "model": args.model,
        "input_shape": list(input_shape),
        "optimizer": args.optimizer,
        "auto": True,
        "stage": args.stage,
        **result.to_json(),
        "fused_step": bool(result.plan.options.get("fused_step", False)),
        "speed": args.speed,
    }
    if args.measure:
        from memfl.memory import measure, time_steps

        plan = result.plan
        m = measure(client_factory(factory, plan), input_shape, optimizer=args.optimizer, plan=plan, steps=args.steps)
        f = measure(factory, input_shape, optimizer=args.optimizer, plan=Plan(), steps=args.steps)
        out["measured_peak_bytes"] = m.peak_bytes
        out["measured_full_peak_bytes"] = f.peak_bytes
        out["fits"] = m.peak_bytes <= result.budget_bytes
        if plan.kind in ("full", "hybrid"):  # the same model: full and the plan interleaved
            t = time_steps(
                factory, input_shape, {"full": Plan(), "plan": plan}, optimizer=args.optimizer, steps=args.time_steps
            )
            out.update(timing_json(t))
        else:  # a stage client holds another model: two timing children (not interleaved)
            tf = time_steps(factory, input_shape, {"full": Plan()}, optimizer=args.optimizer, steps=args.time_steps)
            tp = time_steps(
                client_factory(factory, plan),
                input_shape,
                {"plan": plan},
                optimizer=args.optimizer,
                steps=args.time_steps,
            )
            tp.cpu_seconds["full"], tp.wall_seconds["full"] = tf.cpu_seconds["full"], tf.wall_seconds["full"]
            out.update(timing_json(tp))
            out["timing_interleaved"] = False
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    budget, full_peak = result.budget_bytes, result.full_peak_bytes
    table = Table(
        title=f"{args.model} {args.input} batch {args.batch}, {args.optimizer}: every plan kind for "
        f"{budget / MB:.1f} MB ({budget / full_peak:.0%} of the full-training peak {full_peak / MB:.1f} MB)"
        + (f", stage {args.stage}" if args.stage else "")
    )
    for col in ("", "plan", "peak MB", "step (x full)", "fits", "needs MB", "note"):
        table.add_column(col, justify="right" if col in ("peak MB", "step (x full)", "needs MB") else "left")
    shown = [c for c in result.candidates if c.fits][:8]
    shown += [c for c in result.candidates if not c.fits][: max(3, 8 - len(shown))]
    for c in shown:
        table.add_row(
            "[bold]->[/bold]" if c is result.chosen else "",
            c.label,
            f"{c.predicted_peak_bytes / MB:.1f}" if c.predicted_peak_bytes is not None else "-",
            f"{c.step_time_ratio:.2f}" if c.step_time_ratio is not None else "-",
            "yes" if c.fits else "no",
            f"{c.min_feasible_bytes / MB:.1f}" if c.min_feasible_bytes is not None else "-",
            c.note,
        )
    console = Console()
    console.print(table)
    if len(shown) < len(result.candidates):
        console.print(f"({len(result.candidates) - len(shown)} more plans weighed: --json lists them all)")
    ratio = f"{result.step_time_ratio:.2f}x" if result.step_time_ratio is not None else "?"
    console.print(
        f"chosen {result.chosen.label}: predicted peak {result.predicted_peak_bytes / MB:.1f} MB (budget "
        f"{budget / MB:.1f} MB, margin {args.margin:.0%}), predicted step {ratio} the full step; "
        f"plan {json.dumps(result.plan.to_json())}; solved in {result.solve_seconds:.1f} s"
    )
    if args.measure:
        console.print(
            f"measured peak {out['measured_peak_bytes'] / MB:.1f} MB "
            f"({'fits' if out['fits'] else 'DOES NOT FIT'}); " + timing_line(out)
        )
    return 0


def cmd_plan(args: Any) -> int:
    """``memfl plan`` (``--auto``: :func:`cmd_plan_auto`)."""
    shape = parse_shape(args.input)
    factory = model_factory(args.model, shape, args.classes)
    if args.width != 1.0:
        from functools import partial

        factory = partial(factory, width=args.width)
    input_shape = (args.batch, *shape)
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: expected >= 1")
    if args.auto:
        return cmd_plan_auto(args, factory, input_shape)
    if args.stage is not None:
        raise UsageError("--stage needs --auto (plain `memfl plan` plans the whole model)")
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
    p.add_argument(
        "--auto",
        action="store_true",
        help="weigh every plan kind (full, hybrid, stage, stage+hybrid, micro-batched) and pick the fastest that fits",
    )
    p.add_argument("--stage", type=int, default=None, help="--auto: the federation's current ScaleFL stage")
    p.add_argument("--blocks", type=int, default=4, help="--auto: ScaleFL's number of blocks T")
    p.add_argument(
        "--micro-batches",
        dest="micro_batches",
        default="1",
        help="--auto: micro-batch counts to try, e.g. 2,4,8 (default 1: none; see docs/MEMFL.md for the caveats)",
    )
    p.add_argument(
        "--calibrate-steps",
        dest="calibrate_steps",
        type=int,
        default=3,
        help="--auto: whole steps per plan calibrating the time model (0: isolated timings only, faster)",
    )
    p.add_argument("--measure", action="store_true", help="also measure the plan and full training")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
