"""``memfl memory``: the estimated (and measured) peak training memory of a model under a plan."""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any

from rich.console import Console

from memfl.cli.common import UsageError, model_factory, parse_plan, parse_shape
from memfl.core.protocol import Plan


def cmd_memory(args: argparse.Namespace) -> int:
    from memfl.memory import estimate, measure, time_steps

    if args.batch < 1:
        raise UsageError("--batch must be >= 1")
    shape = parse_shape(args.input)
    if not 0 < args.width <= 1:
        raise UsageError(f"--width {args.width}: expected a model width in (0, 1]")
    factory = model_factory(args.model, shape, args.classes)
    if args.width != 1.0:
        factory = partial(factory, width=args.width)
    input_shape = (args.batch, *shape)
    plan = _plan_arg(args, factory, input_shape)
    if args.micro_batches is not None:
        if args.micro_batches < 1:
            raise UsageError(f"--micro-batches {args.micro_batches}: expected >= 1")
        try:
            plan = Plan(**{**plan.__dict__, "micro_batches": args.micro_batches})
        except ValueError as err:
            raise UsageError(f"--micro-batches: {err}") from None
        if args.micro_batches > 1 and plan.options.get("fused_step"):
            raise UsageError(
                "--micro-batches: the plan fuses the optimizer step into backward (option fused_step), "
                "which cannot accumulate gradients over micro-batches"
            )
    if plan.kind in ("stage", "stage+hybrid"):  # a stage-t client holds blocks 1..t only (scalefl.model)
        from memfl.methods.scalefl import stage_client_factory

        heads = {"exit_width": args.exit_width, "projection": args.projection}
        if heads != {"exit_width": "light", "projection": "light"}:  # the plan names the heads it trains
            plan = Plan(**{**plan.__dict__, "options": {**plan.options, **heads}})
        opts = plan.options or {}
        factory = stage_client_factory(
            factory,
            plan.stage,
            blocks=int(opts.get("blocks", 4)),
            mode=opts.get("partition", "default"),
            batch_size=int(opts.get("batch_size", 32)),
            **heads,
        )
    elif plan.kind == "width":  # a HeteroFL client holds the width-scaled sub-model
        factory = partial(factory, width=args.width * plan.width)
    est = estimate(factory(), input_shape, optimizer=args.optimizer, plan=plan)
    out: dict[str, Any] = {
        "model": args.model,
        "input_shape": list(input_shape),
        "optimizer": args.optimizer,
        "plan": plan.to_json(),
        "peak_bytes": est.peak_bytes,
        "breakdown": est.breakdown(),
    }
    if args.measure:
        m = measure(factory, input_shape, optimizer=args.optimizer, plan=plan, device=args.device)
        out["measured_peak_bytes"] = m.peak_bytes
        out["error_pct"] = 100 * (est.peak_bytes - m.peak_bytes) / m.peak_bytes
        if args.device == "cpu":
            # step times the way training runs (another child: the trainer's allocator and threads)
            # (against full training for a hybrid plan: same model; a stage/width client is its own model)
            same_model = plan.kind == "hybrid" or (plan.kind == "full" and (plan.micro_batches or 1) > 1)
            plans = {"full": Plan(), "plan": plan} if same_model else {"plan": plan}
            t = time_steps(factory, input_shape, plans, optimizer=args.optimizer, steps=args.time_steps)
            out.update(timing_json(t))
        else:
            out["step_seconds"] = m.step_seconds  # wall, in the measuring child (CUDA synchronised)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"{args.model} {args.input} batch {args.batch}, {args.optimizer}, plan {plan.label}")
    table.add_column("part")
    table.add_column("MB", justify="right")
    for k, v in est.breakdown().items():
        table.add_row(k, f"{v / 2**20:.2f}")
    table.add_row("[bold]estimated peak[/bold]", f"[bold]{est.peak_bytes / 2**20:.2f}[/bold]")
    if args.measure:
        table.add_row("[bold]measured peak[/bold]", f"[bold]{out['measured_peak_bytes'] / 2**20:.2f}[/bold]")
        table.add_row("error", f"{out['error_pct']:+.1f}%")
    Console().print(table)
    if args.measure and "step_cpu_seconds" in out:
        Console().print(timing_line(out))
    return 0


def _plan_arg(args: argparse.Namespace, factory: Any, input_shape: tuple[int, ...]) -> Plan:
    """``--plan``: ``full | stage:T | width:W | budget:X`` (:func:`parse_plan`), ``auto:X`` (the
    combined planner's choice for budget X, any kind; ``--stage`` restricts its stage plans) or a
    plan as JSON (e.g. ``{"kind": "stage+hybrid", "stage": 1, "segments": {"blocks.0.unit0": "q2"}}``)."""
    text = args.plan.strip()
    if text.startswith("{"):
        try:
            return Plan.from_json(json.loads(text))
        except (ValueError, TypeError) as err:
            raise UsageError(f"--plan: not a plan as JSON ({err})") from None
    if text.startswith("auto:"):
        from memfl.methods.combined import InfeasibleBudget, auto_plan

        try:
            return auto_plan(
                factory, input_shape, text[len("auto:") :], stage=args.stage, optimizer=args.optimizer
            ).plan
        except (InfeasibleBudget, ValueError) as err:
            raise UsageError(f"--plan {text}: {err}") from None
    return parse_plan(text, model_fn=factory, input_shape=input_shape, optimizer=args.optimizer)


def timing_json(t: Any, name: str = "plan") -> dict[str, Any]:
    """The JSON keys of a :class:`~memfl.memory.StepTiming` of ``{"full": ..., name: ...}``:
    ``step_seconds`` / ``measured_full_step_seconds`` / ``step_time_ratio`` are CPU seconds (the
    trainer's clock on CPU), with ``_cpu`` and ``_wall`` variants, and the timing's thread count."""
    out = {
        "step_seconds": t.cpu_seconds[name],
        "step_cpu_seconds": t.cpu_seconds[name],
        "step_wall_seconds": t.wall_seconds[name],
        "timing_threads": t.threads,
        "timing_steps": t.steps,
        "timing_mmap_threshold": t.mmap_threshold,
    }
    if "full" in t.cpu_seconds:
        out.update(
            measured_full_step_seconds=t.cpu_seconds["full"],
            full_step_cpu_seconds=t.cpu_seconds["full"],
            full_step_wall_seconds=t.wall_seconds["full"],
            step_time_ratio=t.ratio(name, clock="cpu"),
            step_time_ratio_cpu=t.ratio(name, clock="cpu"),
            step_time_ratio_wall=t.ratio(name, clock="wall"),
        )
    return out


def timing_line(out: dict[str, Any]) -> str:
    """One line for the console: the plan's step against full training, CPU and wall."""
    vs = (
        f" vs full {out['full_step_cpu_seconds']:.3f} / {out['full_step_wall_seconds']:.3f} s = "
        f"{out['step_time_ratio_cpu']:.2f}x CPU, {out['step_time_ratio_wall']:.2f}x wall"
        if "full_step_cpu_seconds" in out
        else ""
    )
    return (
        f"step {out['step_cpu_seconds']:.3f} CPU s / {out['step_wall_seconds']:.3f} wall s{vs} "
        f"(median of {out['timing_steps']} interleaved steps, {out['timing_threads']} thread(s), "
        "trainer's allocator)"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="estimate (and measure) the peak training memory of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="one sample's shape, CxHxW (e.g. 3x32x32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier (e.g. 0.125)")
    p.add_argument(
        "--plan",
        default="full",
        help="full | stage:T | width:W | budget:X | auto:X | a plan as JSON, e.g. "
        '\'{"kind": "stage+hybrid", "stage": 1, "segments": {"blocks.0.unit0": "q2"}}\' (see docs)',
    )
    p.add_argument(
        "--micro-batches",
        dest="micro_batches",
        type=int,
        default=None,
        help="split each batch into this many micro-batches, gradients accumulated (any plan)",
    )
    p.add_argument("--stage", type=int, default=None, help="--plan auto:X: the federation's current ScaleFL stage")
    p.add_argument(
        "--exit-width",
        dest="exit_width",
        choices=["light", "model"],
        default="light",
        help="stage plans: ScaleFL's output-module widths (light: ours; model: the authors', the model's own)",
    )
    p.add_argument(
        "--projection",
        choices=["light", "authors"],
        default="light",
        help="stage plans: ScaleFL's projection head (authors: 2056 -> 1024 -> 512, scaled by width)",
    )
    p.add_argument("--measure", action="store_true", help="also measure a few real steps in a subprocess")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--time-steps", dest="time_steps", type=int, default=5, help="timed steps per plan with --measure (median)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_memory)
