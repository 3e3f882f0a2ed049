"""``memfl bench NAME``: a named benchmark, written to ``OUT/NAME.json`` and ``OUT/NAME.md``."""

from __future__ import annotations

import argparse
from pathlib import Path

from memfl.cli.common import UsageError, console


def cmd_bench(args: argparse.Namespace) -> int:
    from memfl.bench import BENCHMARKS, run_benchmark

    if args.name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    out = Path(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        run_benchmark(args.name, out, quick=args.quick, methods=methods, report_only=args.report_only)
    except ValueError as err:
        raise UsageError(str(err)) from None
    md = out / f"{args.name}.md"
    if md.exists():
        print(md.read_text())
    console.print(f"results in {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a named benchmark (results + markdown table)")
    p.add_argument(
        "name",
        help="memory | overhead | fedavg | scalefl | hybrid (hybrid-fit, hybrid-predictor, hybrid-federation) | flower",
    )
    p.add_argument("--out", default="results/bench")
    p.add_argument("--quick", action="store_true", help="a smaller version for a smoke test")
    p.add_argument(
        "--methods",
        help="comma-separated subset of the benchmark's methods (memory-wall); runs already complete in OUT are kept",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="start no run: rebuild the tables (and references) from the runs already complete in OUT (memory-wall)",
    )
    p.set_defaults(func=cmd_bench)
