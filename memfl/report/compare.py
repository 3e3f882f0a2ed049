"""Runs side by side: what memfl is for, in one table and one figure (``memfl report``, ``memfl demo``).

:func:`comparison_rows` reads, per run (a ``results.json`` dict):

- ``final`` / ``best`` test accuracy;
- **who could take part**: ``eligible_clients`` of every round (clients whose plan fits the budget
  they were planned for; a method without a plan for a client counts it out) over the
  federation's clients -- the mean and the worst round;
- ``trained``: client rounds that ended ``ok``, and ``failed`` the others;
- ``virtual_seconds``: the virtual clock at the end (devices' speeds, transfers, deadlines).

:func:`plot_comparison` draws accuracy against virtual time (top) and the share of clients that
could take part in each round (bottom), one line per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rich.table import Table


def participation(run: dict[str, Any]) -> list[tuple[int, float]]:
    """(round, share of all clients with a fitting plan) for every round that records it."""
    n = max(1, len(run.get("clients", [])) or int(run["config"]["run"]["clients"]))
    return [(r["round"], r["eligible_clients"] / n) for r in run["rounds"] if r.get("eligible_clients") is not None]


def comparison_rows(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per run with the numbers of the comparison table (see the module docs)."""
    rows = []
    for label, run in zip(labels, runs):
        share = [s for _, s in participation(run)]
        statuses: dict[str, int] = {}
        for r in run["rounds"]:
            for c in r["clients"]:
                statuses[c.get("status", "ok")] = statuses.get(c.get("status", "ok"), 0) + 1
        accs = [r["accuracy"] for r in run["rounds"] if r.get("accuracy") is not None]
        rows.append(
            {
                "label": label,
                "method": run["config"]["run"]["method"],
                "rounds": len(run["rounds"]),
                "final_accuracy": accs[-1] if accs else None,
                "best_accuracy": max(accs) if accs else None,
                "mean_participation": sum(share) / len(share) if share else None,
                "min_participation": min(share) if share else None,
                "trained": statuses.get("ok", 0),
                "failed": sum(v for k, v in statuses.items() if k != "ok"),
                "virtual_seconds": run["rounds"][-1].get("virtual_seconds") if run["rounds"] else None,
            }
        )
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def comparison_table(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> Table:
    """A rich table of :func:`comparison_rows`."""
    table = Table(
        title="runs side by side",
        caption="fit: share of all clients whose plan fits their budget (mean over rounds / worst round)",
    )
    cols = ("run", "rounds", "final", "best", "fit: mean/min", "trained", "failed")
    for col in (*cols, "virtual s"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for r in comparison_rows(runs, labels):
        table.add_row(
            r["label"],
            str(r["rounds"]),
            _pct(r["final_accuracy"]),
            _pct(r["best_accuracy"]),
            f"{_pct(r['mean_participation'])}/{_pct(r['min_participation'])}",
            str(r["trained"]),
            str(r["failed"]),
            "-" if r["virtual_seconds"] is None else f"{r['virtual_seconds']:.0f}",
        )
    return table


def comparison_markdown(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """The same table as markdown (for docs)."""
    lines = [
        "| run | rounds | final acc | best acc | plan fits: mean / worst round | trained | failed | virtual time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in comparison_rows(runs, labels):
        vt = "-" if r["virtual_seconds"] is None else f"{r['virtual_seconds']:.0f} s"
        lines.append(
            f"| {r['label']} | {r['rounds']} | {_pct(r['final_accuracy'])} | {_pct(r['best_accuracy'])} | "
            f"{_pct(r['mean_participation'])} / {_pct(r['min_participation'])} | "
            f"{r['trained']} | {r['failed']} | {vt} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(
    runs: Sequence[dict[str, Any]], path: str | Path, *, labels: Sequence[str], title: str | None = None
) -> Path:
    """Accuracy against virtual time (top) and the share of clients that could take part per round
    (bottom); writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 6.4), dpi=120, height_ratios=(3, 2))
    for label, run in zip(labels, runs):
        pts = [(r.get("virtual_seconds"), r["accuracy"]) for r in run["rounds"] if r.get("accuracy") is not None]
        pts = [(x, y) for x, y in pts if x is not None]
        if pts:
            xs, ys = zip(*pts)
            top.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
        share = participation(run)
        if share:
            rs, ss = zip(*share)
            bottom.plot(rs, [100 * s for s in ss], label=label, drawstyle="steps-mid")
    top.set_xlabel("virtual time (s)")
    top.set_ylabel("test accuracy (%)")
    cfg = runs[0]["config"]["run"] if runs else {}
    top.set_title(title or f"{cfg.get('model', '')} on {cfg.get('dataset', '')}, {cfg.get('clients', '')} clients")
    top.title.set_fontsize(10)
    top.grid(alpha=0.3)
    top.legend()
    bottom.set_xlabel("round")
    bottom.set_ylabel("clients that could\ntake part (%)")
    bottom.set_ylim(0, 105)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
