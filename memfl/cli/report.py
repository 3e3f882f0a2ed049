"""``memfl report DIR...``: tables and plots from results folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from memfl.cli.common import console


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
    from memfl.report.compare import comparison_table, plot_comparison

    # side by side: accuracy, who could take part, time (the figure `memfl demo` draws)
    Console().print(comparison_table(runs, labels))
    console.print(f"plot: {plot_comparison(runs, out / 'comparison.png', labels=labels)}")
    from memfl.report.nhsic import has_nhsic, plot_nhsic_plane

    for d, run, label in zip(args.dirs, runs, labels):
        if has_nhsic(run):  # ScaleFL results: the nHSIC plane
            name = "nhsic_plane.png" if len(runs) == 1 else f"nhsic_plane_{Path(d).name}.png"
            console.print(f"plot: {plot_nhsic_plane(run, out / name, title=f'nHSIC plane: {label}')}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and plots from one or more results folders")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out", help="folder for the plots (default: the first results folder)")
    p.set_defaults(func=cmd_report)
