"""``memfl flower app`` and ``memfl flower local``: the Flower runtime's sub-commands.

Both take the flags of ``memfl run`` (and its ``--config FILE.toml``), so an experiment moves from
the simulator to Flower by changing the command, not the config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memfl.cli.common import add_run_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``memfl flower {app,local}`` on the top-level sub-parsers."""
    flower = sub.add_parser(
        "flower",
        help="run on Flower's deployment runtime (real devices, or 127.0.0.1)",
        description="memfl strategies and trainers on Flower (see docs/FLOWER.md).",
    )
    fsub = flower.add_subparsers(dest="flower_command", required=True)

    p = fsub.add_parser(
        "app",
        help="write the Flower app (pyproject.toml) for an experiment",
        description="Write DIR/pyproject.toml: the Flower app that runs this experiment "
        "with `flwr run DIR CONNECTION`.",
    )
    add_run_flags(p)
    p.add_argument("--app-dir", default="flower-app", help="folder to write the app into (default: flower-app)")
    p.add_argument(
        "--min-nodes",
        type=int,
        default=None,
        help="nodes the server waits for before round 1 (default: the config's clients)",
    )
    p.add_argument("--wait-nodes", type=float, default=300.0, help="seconds to wait for them (default 300)")
    p.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        help="seconds a round waits for replies; later ones count as failed (default 600)",
    )
    p.add_argument("--print", action="store_true", help="print the pyproject.toml instead of writing it")
    p.set_defaults(func=cmd_flower_app)

    p = fsub.add_parser(
        "local",
        help="run an experiment on a SuperLink and N SuperNodes on 127.0.0.1",
        description="Start a Flower SuperLink and N SuperNodes on 127.0.0.1 (node i is "
        "client i of the simulator: same data partition, device and budget), "
        "run the experiment through them, stop them. Same flags and results "
        "file as `memfl run`.",
    )
    add_run_flags(p)
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes to start (= clients; default 3)")
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="bound on the whole job, start to stop, in seconds (default 3600)"
    )
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for replies")
    p.add_argument(
        "--workdir", default=None, help="keep FLWR_HOME, the app and every log here (default: a temp folder)"
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="Flower's own SuperExec: a fresh flwr-clientapp process (importing torch) per message; "
        "default: memfl's warm SuperExec, which forks each ClientApp from a process that has "
        "imported torch already (python -m memfl.runtime.flower.superexec)",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="TLS and SuperNode authentication: a throw-away CA, a server certificate for 127.0.0.1 and "
        "one registered key pair per node (flwr supernode register), kept in WORKDIR/secrets (0700) "
        "and deleted at the end; see docs/FLOWER.md",
    )
    p.set_defaults(func=cmd_flower_local)


def cmd_flower_app(args: argparse.Namespace) -> int:
    from memfl.cli.common import config_from_args, console
    from memfl.runtime.flower.appconfig import AppSettings, app_pyproject, write_app

    config = config_from_args(args)
    settings = AppSettings(
        config=config,
        min_nodes=args.min_nodes or config.run.clients,
        wait_nodes=args.wait_nodes,
        round_timeout=args.round_timeout,
    )
    if args.print:
        print(app_pyproject(settings), end="")
        return 0
    folder = write_app(args.app_dir, settings)
    console.print(
        f"Flower app written to {folder / 'pyproject.toml'} ({config.run.method}, {config.run.rounds} rounds, "
        f"waits for {settings.min_nodes} nodes)\n"
        f"run it with:  flwr run {folder} CONNECTION   (a [superlink.CONNECTION] in $FLWR_HOME/config.toml)\n"
        f"results land in {config.run.out}/results.json on the SuperLink's machine; see docs/FLOWER.md",
        highlight=False,
    )
    return 0


def cmd_flower_local(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memfl.cli.common import UsageError, config_from_args, console
    from memfl.report import rounds_table
    from memfl.runtime.flower.local import FlowerError, run_local

    if args.nodes < 1:
        raise UsageError("--nodes must be >= 1")
    if args.clients is not None and args.clients != args.nodes:
        raise UsageError(
            f"--clients {args.clients} with --nodes {args.nodes}: on Flower every SuperNode is one "
            "client; give --nodes only"
        )
    config = config_from_args(args)
    try:
        results = run_local(
            config,
            args.nodes,
            timeout=args.timeout,
            round_timeout=args.round_timeout,
            workdir=args.workdir,
            log=lambda line: console.print(line, highlight=False, markup=False),
            warm=not args.cold,
            secure=args.secure,
        )
    except FlowerError as err:
        console.print(f"[red]Flower run failed:[/red] {err}", highlight=False)
        return 1
    out = Path(results["config"]["run"]["out"])
    Console().print(rounds_table(results))
    s, f = results["summary"], results["flower_run"]
    acc = f"{100 * s['final_accuracy']:.2f}%" if s["final_accuracy"] is not None else "n/a"
    Console().print(
        f"final accuracy {acc}  ·  Flower run {f['run-id']} {f['status']} in {f['wall_seconds']:.0f} s"
        f"  ·  results in {out / 'results.json'}, plot {out / 'accuracy.png'}"
    )
    return 0
