"""The ``memfl`` command: ``run``, ``demo``, ``memory``, ``plan``, ``bench``, ``report``, ``flower``.

One module per sub-command (:mod:`memfl.cli.run`, ...), each with ``add_parser(sub)`` and its
``cmd_*`` function. Errors the user can fix (bad config, missing data, bad flag values) are
printed as one clear message with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from memfl.cli import bench, demo, flower, memory, plan, report, run
from memfl.cli.common import UsageError, console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfl", description="Federated learning for memory-constrained clients.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (run, demo, memory, bench, report, plan, flower):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from memfl.config import ConfigError
    from memfl.data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]; `memfl run` resumes from the last finished round")
        return 130


if __name__ == "__main__":
    sys.exit(main())
