"""Named, reproducible benchmarks: ``memfl bench NAME [--out DIR] [--quick]``.

Each benchmark module exposes ``run(out: Path, quick: bool) -> dict`` which writes
``out/NAME.json`` (raw numbers) and ``out/NAME.md`` (the table for docs/BENCHMARKS.md, with the
command that produced it) and returns the JSON-able summary.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# name -> module path (imported lazily so that `memfl --help` stays fast)
BENCHMARKS: dict[str, str] = {
    "memory": "memfl.bench.memory",
    "overhead": "memfl.bench.overhead",
    "fedavg": "memfl.bench.federation",
    "flower": "memfl.bench.flower",
    # FedHybrid (docs/FEDHYBRID.md): all three parts, or one of them
    "hybrid": "memfl.bench.hybrid",
    "hybrid-fit": "memfl.bench.hybrid.fit",
    "hybrid-predictor": "memfl.bench.hybrid.predictor",
    "hybrid-federation": "memfl.bench.hybrid.federation",
    # ScaleFL (docs/SCALEFL.md): memory per stage + accuracy against the baselines
    "scalefl": "memfl.bench.scalefl",
    # worker processes (memfl.runtime.pool): 1 vs 2 workers on the same FedAvg rounds
    "executor": "memfl.bench.executor",
    # issue 13: every injected fault at once vs no faults (validation, deadline, robust rules)
    "faults": "memfl.bench.faults",
    # issue 10: ScaleFL and the baselines where most clients cannot train the full model
    "memory-wall": "memfl.bench.memory_wall",
}


def run_benchmark(name: str, out: Path, quick: bool = False) -> dict[str, Any]:
    """Run benchmark ``name``, writing its files under ``out``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    module = importlib.import_module(BENCHMARKS[name])
    out.mkdir(parents=True, exist_ok=True)
    return module.run(out, quick)
