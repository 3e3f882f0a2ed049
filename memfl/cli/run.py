"""``memfl run``: an experiment in the in-process simulator."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from memfl.cli.common import add_run_flags, config_from_args, console


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
    Console().print(
        f"final accuracy {100 * (s['final_accuracy'] or 0):.2f}%  ·  virtual time {s['virtual_seconds']:.0f} s"
        f"  ·  results in {out / 'results.json'}, plot {out / 'accuracy.png'}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment in the in-process simulator")
    add_run_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
