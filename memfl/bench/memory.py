"""Benchmark ``memory``: the estimated peak training memory against a measured one.

For every shipped model (``cnn`` on 1x28x28; ``resnet18``, ``resnet34``, ``vgg11``, ``vgg16``,
``vit-tiny`` on 3x32x32; 10 classes) at batch 32 and 128, full training with SGD (momentum 0.9):
:func:`memfl.memory.estimate` (no training) against :func:`memfl.memory.measure` (3 real steps in a
fresh subprocess, peak RSS growth). ``quick``: cnn and resnet18 at batch 32 only.

Writes ``out/memory.json`` (raw numbers and each estimate's breakdown) and ``out/memory.md`` (the
table, with the command and the torch version).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from memfl.memory import estimate, measure

MODELS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("cnn", (1, 28, 28)),
    ("resnet18", (3, 32, 32)),
    ("resnet34", (3, 32, 32)),
    ("vgg11", (3, 32, 32)),
    ("vgg16", (3, 32, 32)),
    ("vit-tiny", (3, 32, 32)),
)
BATCHES = (32, 128)
QUICK = (("cnn", (1, 28, 28)), ("resnet18", (3, 32, 32)))
NUM_CLASSES = 10
TOLERANCE_PCT = 10.0
MB = 2**20


def _say(text: str) -> None:
    try:
        from rich.console import Console

        Console(stderr=True).print(text, highlight=False, soft_wrap=True)
    except Exception:  # noqa: BLE001 - progress output must never break the benchmark
        print(text, flush=True)


def cases(quick: bool) -> list[tuple[str, tuple[int, int, int], int]]:
    """(model, input CxHxW, batch) of the benchmark."""
    if quick:
        return [(name, shape, 32) for name, shape in QUICK]
    return [(name, shape, b) for b in BATCHES for name, shape in MODELS]


def run(out: Path, quick: bool) -> dict[str, Any]:
    """Estimate vs measure every case; write ``out/memory.json`` and ``out/memory.md``."""
    from memfl.models import build_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    todo = cases(quick)
    for i, (name, shape, batch) in enumerate(todo, 1):
        model_fn = partial(build_model, name, in_channels=shape[0], num_classes=NUM_CLASSES, image_size=shape[1])
        input_shape = (batch, *shape)
        t0 = time.perf_counter()
        est = estimate(model_fn(), input_shape, optimizer="sgd", momentum=0.9)
        t_est = time.perf_counter() - t0
        t0 = time.perf_counter()
        meas = measure(model_fn, input_shape, optimizer="sgd", momentum=0.9, steps=3)
        t_meas = time.perf_counter() - t0
        error = 100.0 * (est.peak_bytes - meas.peak_bytes) / meas.peak_bytes
        rows.append(
            {
                "model": name,
                "input": "x".join(map(str, shape)),
                "batch": batch,
                "estimated_bytes": est.peak_bytes,
                "measured_bytes": meas.peak_bytes,
                "error_pct": round(error, 2),
                "peak_phase": est.peak_phase,
                "breakdown": est.breakdown(),
                "baseline_bytes": meas.baseline_bytes,
                "step_seconds": round(meas.step_seconds, 3),
                "device": meas.device,
                "estimate_seconds": round(t_est, 2),
                "measure_seconds": round(t_meas, 2),
            }
        )
        _say(
            f"[{i}/{len(todo)}] {name:9s} {'x'.join(map(str, shape)):8s} batch {batch:4d}: "
            f"estimated {est.peak_bytes / MB:8.1f} MB, measured {meas.peak_bytes / MB:8.1f} MB, "
            f"error {error:+6.2f}%  (estimate {t_est:.1f} s, measure {t_meas:.1f} s)"
        )

    worst = max((abs(r["error_pct"]) for r in rows), default=0.0)
    summary: dict[str, Any] = {
        "benchmark": "memory",
        "command": f"memfl bench memory --out OUT{' --quick' if quick else ''}",
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "optimizer": "sgd (momentum 0.9)",
        "num_classes": NUM_CLASSES,
        "quick": quick,
        "tolerance_pct": TOLERANCE_PCT,
        "max_abs_error_pct": worst,
        "within_tolerance": worst <= TOLERANCE_PCT,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    (out / "memory.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "memory.md").write_text(_markdown(summary))
    _say(
        f"memory: max |error| {worst:.2f}% over {len(rows)} cases "
        f"({summary['seconds']:.0f} s); wrote {out / 'memory.md'}"
    )
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| model | input | batch | estimated MB | measured MB | error % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['batch']} | "
            f"{r['estimated_bytes'] / MB:.1f} | {r['measured_bytes'] / MB:.1f} | "
            f"{r['error_pct']:+.2f} |"
        )
    lines += [
        "",
        f"Full training, {summary['optimizer']}, {summary['num_classes']} classes; estimate: "
        "`memfl.memory.estimate` (no training run); measured: peak RSS growth over 3 training "
        "steps in a fresh process (`memfl.memory.measure`, CPU, "
        f"{summary['threads']} threads). MB = 2^20 bytes. Max |error| "
        f"{summary['max_abs_error_pct']:.2f}% (goal: within {summary['tolerance_pct']:g}%).",
        "",
        f"Command: `{summary['command']}` ({summary['date']}, torch {summary['torch']}, Python {summary['python']}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    run(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out"), quick="--quick" in sys.argv)
