"""Shared helpers of the hybrid benchmarks."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

MB = 2**20


def machine() -> dict[str, Any]:
    """Where the numbers come from (timings depend on it)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_1min": load,
    }


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / MB:.1f}"


def mode_summary(modes: dict[str, str]) -> str:
    """``keep x3, recompute x2, q4 x4`` (in that order of modes)."""
    counts: dict[str, int] = {}
    for m in modes.values():
        counts[m] = counts.get(m, 0) + 1
    order = sorted(counts, key=lambda m: (m != "keep", m != "recompute", -float(m[1:]) if m.startswith("q") else 0))
    return ", ".join(f"{m} x{counts[m]}" for m in order)
