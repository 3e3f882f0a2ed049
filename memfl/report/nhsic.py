"""The nHSIC plane of a ScaleFL run: nHSIC(X, Z_t) against nHSIC(Y, Z_t) per block over the rounds.

Each ScaleFL client reports, in its result ``metrics``, the mean over its local batches of
nHSIC(X, Z_t) (how much of the input block t's feature keeps) and nHSIC(Y, Z_t) (how much of the
label it carries); the strategy's round report holds their sample-weighted mean over the round's
clients (``rounds[i]["strategy"]``). One trajectory per block, coloured by round: an
information-bottleneck picture in which deeper blocks should move left (compress the input) and up
(toward the label).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def nhsic_points(results: dict[str, Any]) -> dict[int, list[tuple[int, float, float]]]:
    """block -> [(round, nHSIC(X, Z_t), nHSIC(Y, Z_t)), ...] from a results dict."""
    out: dict[int, list[tuple[int, float, float]]] = {}
    for r in results.get("rounds", []):
        rep = r.get("strategy") or {}
        if "nhsic_xz" in rep and "nhsic_yz" in rep:
            block = int(rep.get("block", rep.get("stage", 0)))
            out.setdefault(block, []).append((int(r["round"]), float(rep["nhsic_xz"]), float(rep["nhsic_yz"])))
            continue
        # fall back on the clients' own metrics
        per_block: dict[int, list[tuple[float, float, int]]] = {}
        for c in r.get("clients", []):
            m = c.get("metrics") or {}
            if "nhsic_xz" in m and "nhsic_yz" in m:
                per_block.setdefault(int(m.get("block", 0)), []).append(
                    (float(m["nhsic_xz"]), float(m["nhsic_yz"]), int(c.get("num_samples", 1)))
                )
        for block, vals in per_block.items():
            n = sum(w for *_, w in vals)
            out.setdefault(block, []).append(
                (int(r["round"]), sum(x * w for x, _, w in vals) / n, sum(y * w for _, y, w in vals) / n)
            )
    return out


def has_nhsic(results: dict[str, Any]) -> bool:
    """Whether ``results`` holds nHSIC values (a ScaleFL run)."""
    return bool(nhsic_points(results))


def plot_nhsic_plane(results: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Draw the nHSIC plane of ``results`` to a PNG at ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = nhsic_points(results)
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=120)
    rounds = [r for pts in points.values() for r, _, _ in pts]
    lo, hi = (min(rounds), max(rounds)) if rounds else (0, 1)
    cmap = plt.get_cmap("viridis")
    markers = "osD^vP*X"
    sc = None
    for i, (block, pts) in enumerate(sorted(points.items())):
        rs, xs, ys = zip(*pts)
        ax.plot(xs, ys, "-", color="0.6", lw=0.8, zorder=1)
        sc = ax.scatter(
            xs,
            ys,
            c=rs,
            cmap=cmap,
            vmin=lo,
            vmax=max(hi, lo + 1),
            marker=markers[i % len(markers)],
            s=28,
            edgecolors="k",
            linewidths=0.4,
            zorder=2,
            label=f"block {block}",
        )
        ax.annotate(f"{block}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="round")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("nHSIC(X, Z_t)  (input information kept)")
    ax.set_ylabel("nHSIC(Y, Z_t)  (label information)")
    cfg = (results.get("config") or {}).get("run", {})
    ax.set_title(title or f"nHSIC plane: {cfg.get('method', '')} {cfg.get('model', '')} on {cfg.get('dataset', '')}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
