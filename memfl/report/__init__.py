"""Tables and plots from results files (``memfl report DIR``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table


def load_results(path: str | Path) -> dict[str, Any]:
    """Read ``results.json`` from a results folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no results.json at {path}; run `memfl run --out DIR` first")
    return json.loads(path.read_text())


def plot_accuracy(
    runs: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    x: str = "round",
    title: str | None = None,
) -> Path:
    """Test accuracy against rounds (``x="round"``) or virtual seconds (``x="virtual_seconds"``)
    for one or more results dicts; writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, run in enumerate(runs):
        pts = [(r[x], r["accuracy"]) for r in run["rounds"] if r["accuracy"] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        label = labels[i] if labels else run["config"]["run"]["method"]
        ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
    ax.set_xlabel("round" if x == "round" else "virtual time (s)")
    ax.set_ylabel("test accuracy (%)")
    cfg = runs[0]["config"]["run"] if runs else {}
    ax.set_title(title or f"{cfg.get('model', '')} on {cfg.get('dataset', '')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def rounds_table(results: dict[str, Any]) -> Table:
    """A rich table: one row per round with accuracy, loss, participants and times."""
    table = Table(
        title=f"{results['config']['run']['method']} — {results['config']['run']['model']} on "
        f"{results['config']['run']['dataset']}"
    )
    for col in ("round", "accuracy", "loss", "clients", "failed", "plans", "virtual s", "wall s"):
        table.add_column(col, justify="right")
    for r in results["rounds"]:
        plans: dict[str, int] = {}
        for c in r["clients"]:
            plans[c["plan"]] = plans.get(c["plan"], 0) + 1
        table.add_row(
            str(r["round"]),
            f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else "-",
            f"{r['loss']:.4f}" if r["loss"] is not None else "-",
            str(len(r["clients"])),
            str(r.get("failed", 0)),
            " ".join(f"{k}x{v}" for k, v in sorted(plans.items())),
            f"{r['virtual_seconds']:.1f}",
            f"{r['round_seconds']:.1f}",
        )
    return table
