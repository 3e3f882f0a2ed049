"""``memfl memory``: the estimated (and measured) peak training memory of a model under a plan."""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any

from rich.console import Console

from memfl.cli.common import UsageError, model_factory, parse_plan, parse_shape


def cmd_memory(args: argparse.Namespace) -> int:
    from memfl.memory import estimate, measure

    if args.batch < 1:
        raise UsageError("--batch must be >= 1")
    shape = parse_shape(args.input)
    factory = model_factory(args.model, shape, args.classes)
    input_shape = (args.batch, *shape)
    plan = parse_plan(args.plan, model_fn=factory, input_shape=input_shape, optimizer=args.optimizer)
    if plan.kind == "stage":  # a stage-t client holds blocks 1..t only (memfl.methods.scalefl.model)
        from memfl.methods.scalefl import stage_client_factory

        factory = stage_client_factory(factory, plan.stage)
    elif plan.kind == "width":  # a HeteroFL client holds the width-scaled sub-model
        factory = partial(factory, width=plan.width)
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
        out["step_seconds"] = m.step_seconds
        out["error_pct"] = 100 * (est.peak_bytes - m.peak_bytes) / m.peak_bytes
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
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="estimate (and measure) the peak training memory of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="one sample's shape, CxHxW (e.g. 3x32x32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--plan", default="full", help="full | stage:T | budget:X (see docs)")
    p.add_argument("--measure", action="store_true", help="also measure a few real steps in a subprocess")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_memory)
