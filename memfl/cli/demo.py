"""``memfl demo``: memfl against exclusive and fedavg where the memory wall is real (:mod:`memfl.bench.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from memfl.bench.demo import run

    run(Path(args.out), quick=args.quick)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="memfl vs exclusive vs fedavg on the memory-wall regime (40 rounds, ~5 min on 2 cores)"
    )
    p.add_argument("--out", default="results/demo", help="folder for the runs, the table and demo.png")
    p.add_argument("--quick", action="store_true", help="6 rounds: a smoke test of the demo")
    p.set_defaults(func=cmd_demo)
