"""``memfl demo`` (``make demo``): what memfl is for, in about five minutes on this machine.

The memory-wall regime (``configs/demo-memory-wall.toml``: ``configs/memory-wall.toml`` shortened
to 40 rounds) run with ``memfl``, ``exclusive`` (only the clients that fit full training) and
``fedavg`` (everyone trains the full model, budgets ignored: the upper bound no real federation
has), two one-thread ``memfl run`` subprocesses at a time (:func:`memfl.bench.memory_wall.schedule`;
a complete run is skipped, an interrupted one resumes). Then the comparison
(:mod:`memfl.report.compare`): a table with final / best accuracy, the share of all clients that
could take part (mean and worst round), client rounds trained, virtual time; and
``OUT/demo.png``: accuracy against virtual time and participation per round. ``OUT/demo.md`` holds
the table with the command.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from memfl.bench import memory_wall as mw

NAME = "demo"
METHODS = ("memfl", "exclusive", "fedavg")


def config_path() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "demo-memory-wall.toml"


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    """Run the demo into ``out`` (``quick``: 6 rounds, a smoke test) and print the comparison."""
    from rich.console import Console

    from memfl.report import load_results
    from memfl.report.compare import comparison_markdown, comparison_rows, comparison_table, plot_comparison

    config = config_path()
    if not config.exists():
        raise FileNotFoundError(f"{config} not found: `memfl demo` runs from a memfl checkout")
    rounds = 6 if quick else 40
    t0 = time.perf_counter()
    jobs = []
    for method in METHODS:
        run_out = out / method
        argv = [sys.executable, "-m", "memfl.cli", "run", "--config", str(config), "--method", method]
        argv += ["--out", str(run_out), "--quiet"]
        if quick:
            argv += ["--rounds", str(rounds), "--eval-every", "3"]
        jobs.append(mw.Job(method, 0, argv, run_out, rounds))
    print(f"[demo] {len(jobs)} runs of {rounds} rounds, two at a time; logs in {out}", flush=True)
    mw.schedule(jobs, lambda job: None, tag=NAME)
    runs = [load_results(j.out) for j in jobs]
    labels = list(METHODS)
    Console().print(comparison_table(runs, labels))
    png = plot_comparison(
        runs,
        out / "demo.png",
        labels=labels,
        title="memory wall: budgets 0.1-1.1x full training\nresnet18 w0.125, Fashion-MNIST, 200 clients x 100 images",
    )
    command = f"memfl demo --out {out}" + (" --quick" if quick else "")
    wall = time.perf_counter() - t0
    md = f"`{command}` ({wall:.0f} s on this machine)\n\n" + comparison_markdown(runs, labels)
    (out / "demo.md").write_text(md)
    print(f"[demo] {wall:.0f} s; table {out / 'demo.md'}, figure {png}", flush=True)
    return {"command": command, "wall_seconds": wall, "rows": comparison_rows(runs, labels), "png": str(png)}
