"""The executor benchmark's mmap-threshold sweep, on a tiny size (slow: it forks a real pool with
enforced budgets on Fashion-MNIST, one round per threshold)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memfl.bench.executor import FMNIST, threshold_sweep

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the pool forks its workers"),
    pytest.mark.skipif(not Path(FMNIST).exists(), reason="needs Fashion-MNIST (make data)"),
]


def test_threshold_sweep_small_threshold_fits_the_predicted_peak():
    res = threshold_sweep(thresholds=(65536, 4194304), multiples=(1.5,), steps=3, reps=1)
    assert set(res["step_seconds"]) == {"no cap", "65536", "4194304"}
    assert all(t > 0 for t in res["step_seconds"].values())
    at_64k, at_4m = res["cap_needed"]["65536"]["1.5"], res["cap_needed"]["4194304"]["1.5"]
    # the pool's own threshold: every full plan fits 1.5x its predicted peak (docs/BENCHMARKS.md)
    assert at_64k["ok"] == at_64k["clients"] == 10
    # with large blocks kept in the heap a warm worker's data segment outgrows the estimate
    assert at_4m["ok"] < at_64k["ok"]
    assert "| 64 KiB |" in res["table"] and "| 4 MiB |" in res["table"]
