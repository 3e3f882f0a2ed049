"""The ``memfl`` command: ``run``, ``memory``, ``bench``, ``report``.

Each sub-command is a small function taking the parsed arguments; errors the user can fix (bad
config, missing data, bad flag values) are printed as one clear message with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

console = Console(stderr=True)


class UsageError(ValueError):
    """A command-line value is wrong; printed without a traceback."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> ``(3, 32, 32)``."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input {text!r}: expected CxHxW, e.g. 1x28x28 or 3x32x32") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input {text!r}: expected CxHxW with three positive integers, e.g. 3x32x32")
    return shape


# ---------------------------------------------------------------------------------------- run
RUN_FLAGS: dict[str, tuple[str, type]] = {
    # flag: (config key, type)
    "method": ("run.method", str),
    "model": ("run.model", str),
    "dataset": ("run.dataset", str),
    "data_dir": ("run.data_dir", str),
    "clients": ("run.clients", int),
    "per_round": ("run.per_round", int),
    "rounds": ("run.rounds", int),
    "eval_every": ("run.eval_every", int),
    "partition": ("run.partition", str),
    "budgets": ("run.budgets", str),
    "seed": ("run.seed", int),
    "out": ("run.out", str),
    "device": ("run.device", str),
    "local_epochs": ("train.local_epochs", int),
    "batch_size": ("train.batch_size", int),
    "lr": ("train.lr", float),
    "max_steps": ("train.max_steps", int),
    "model_width": ("run.model_width", float),
    # method = scalefl (docs/SCALEFL.md)
    "schedule": ("scalefl.schedule", str),
    "blocks": ("scalefl.blocks", int),
    "cut": ("scalefl.partition", str),
    # method = fedhybrid (docs/FEDHYBRID.md)
    "selection": ("fedhybrid.selection", str),
}

#: on/off switches: flag -> (config key, value it sets)
RUN_SWITCHES: dict[str, tuple[str, bool]] = {
    "no_mentor": ("scalefl.mentor", False),
    "no_harmonizer": ("scalefl.harmonizer", False),
}


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags shared by ``memfl run`` and the other runtimes."""
    p.add_argument("--config", help="TOML config file (flags override it)")
    for flag, (key, typ) in RUN_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None,
                       help=f"overrides {key}")
    for flag, (key, value) in RUN_SWITCHES.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_const", const=value,
                       default=None, help=f"sets {key} = {str(value).lower()}")


def config_from_args(args: argparse.Namespace):
    from memfl.config import load_config, with_overrides

    config = load_config(args.config)
    overrides = {key: getattr(args, flag, None) for flag, (key, _) in RUN_FLAGS.items()}
    overrides.update({key: getattr(args, flag, None) for flag, (key, _) in RUN_SWITCHES.items()})
    return with_overrides(config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from memfl.report import rounds_table
    from memfl.runtime.sim import run_experiment

    config = config_from_args(args)
    results = run_experiment(config, console=console, progress=not args.quiet)
    out = Path(config.run.out)
    from memfl.report.nhsic import has_nhsic, plot_nhsic_plane

    if has_nhsic(results):  # ScaleFL: the nHSIC plane next to the results
        console.print(f"plot: {plot_nhsic_plane(results, out / 'nhsic_plane.png')}")
    Console().print(rounds_table(results))
    s = results["summary"]
    Console().print(f"final accuracy {100 * (s['final_accuracy'] or 0):.2f}%  ·  virtual time {s['virtual_seconds']:.0f} s"
                    f"  ·  results in {out / 'results.json'}, plot {out / 'accuracy.png'}")
    return 0


# ------------------------------------------------------------------------------------- memory
def model_factory(name: str, shape: tuple[int, ...], classes: int) -> Callable:
    """A picklable ``() -> model`` for the memory measurer."""
    from memfl.models import MODEL_NAMES, build_model

    if name not in MODEL_NAMES:
        raise UsageError(f"--model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return partial(build_model, name, in_channels=shape[0], num_classes=classes, image_size=shape[-1])


def parse_plan(text: str, **context: Any):
    """Plan from its command-line form (``full``, ``stage:T``, ``width:W``).

    ``context`` (model_fn, input_shape, optimizer) is what a budget-driven plan needs to be solved.
    """
    from memfl.protocol import Plan

    if text.startswith("budget:"):  # FedHybrid: the fastest hybrid plan under budget X (docs/FEDHYBRID.md)
        from memfl.hybrid.cli import solve_for_model
        from memfl.hybrid.planner import InfeasibleBudget

        try:
            choice, _, _ = solve_for_model(context["model_fn"], context["input_shape"], text[len("budget:"):],
                                           optimizer=context.get("optimizer", "sgd"), timing=True)
        except (InfeasibleBudget, ValueError) as err:
            raise UsageError(f"--plan {text}: {err}") from None
        return choice.plan
    try:
        return Plan.parse(text)
    except ValueError as err:
        raise UsageError(f"--plan: {err}") from None


def cmd_memory(args: argparse.Namespace) -> int:
    from memfl.memory import estimate, measure

    shape = parse_shape(args.input)
    factory = model_factory(args.model, shape, args.classes)
    input_shape = (args.batch, *shape)
    plan = parse_plan(args.plan, model_fn=factory, input_shape=input_shape, optimizer=args.optimizer)
    if plan.kind == "stage":  # a stage-t client holds blocks 1..t only (memfl.scalefl.stage)
        from memfl.scalefl import stage_client_factory

        factory = stage_client_factory(factory, plan.stage)
    elif plan.kind == "width":  # a HeteroFL client holds the width-scaled sub-model
        factory = partial(factory, width=plan.width)
    est = estimate(factory(), input_shape, optimizer=args.optimizer, plan=plan)
    out: dict[str, Any] = {"model": args.model, "input_shape": list(input_shape), "optimizer": args.optimizer,
                           "plan": plan.to_json(), "peak_bytes": est.peak_bytes, "breakdown": est.breakdown()}
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


# -------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from memfl.bench import BENCHMARKS, run_benchmark

    if args.name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    out = Path(args.out)
    run_benchmark(args.name, out, quick=args.quick)
    md = out / f"{args.name}.md"
    if md.exists():
        print(md.read_text())
    console.print(f"results in {out}")
    return 0


# ------------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from memfl.report import load_results, plot_accuracy, rounds_table

    runs = [load_results(p) for p in args.dirs]
    for run in runs:
        Console().print(rounds_table(run))
    out = Path(args.out) if args.out else (Path(args.dirs[0]) if Path(args.dirs[0]).is_dir() else Path("."))
    labels = [Path(d).name if len(args.dirs) > 1 else r["config"]["run"]["method"] for d, r in zip(args.dirs, runs)]
    path = plot_accuracy(runs, out / "accuracy.png", labels=labels)
    console.print(f"plot: {path}")
    if any(r["rounds"] and r["rounds"][-1].get("virtual_seconds") for r in runs):
        console.print(f"plot: {plot_accuracy(runs, out / 'accuracy_time.png', labels=labels, x='virtual_seconds')}")
    from memfl.report.nhsic import has_nhsic, plot_nhsic_plane

    for d, run, label in zip(args.dirs, runs, labels):
        if has_nhsic(run):  # ScaleFL results: the nHSIC plane
            name = "nhsic_plane.png" if len(runs) == 1 else f"nhsic_plane_{Path(d).name}.png"
            console.print(f"plot: {plot_nhsic_plane(run, out / name, title=f'nHSIC plane: {label}')}")
    return 0


# --------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfl", description="Federated learning for memory-constrained clients.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an experiment in the in-process simulator")
    add_run_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

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

    p = sub.add_parser("bench", help="run a named benchmark (results + markdown table)")
    p.add_argument("name", help="memory | overhead | fedavg | scalefl | hybrid (hybrid-fit, hybrid-predictor, "
                   "hybrid-federation) | flower")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--quick", action="store_true", help="a smaller version for a smoke test")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="tables and plots from one or more results folders")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out", help="folder for the plots (default: the first results folder)")
    p.set_defaults(func=cmd_report)

    from memfl.hybrid.cli import add_plan_parser  # `memfl plan` (FedHybrid's planner)

    add_plan_parser(sub)

    from memfl.runtime.flower.cli import add_flower_commands  # `memfl flower app|local` (flwr loaded lazily)

    add_flower_commands(sub, add_run_flags)

    return parser


def main(argv: list[str] | None = None) -> int:
    from memfl.config import ConfigError
    from memfl.data import DataError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "memory" and args.batch < 1:
            raise UsageError("--batch must be >= 1")
        return args.func(args)
    except (UsageError, ConfigError, DataError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]; `memfl run` resumes from the last finished round")
        return 130


if __name__ == "__main__":
    sys.exit(main())
