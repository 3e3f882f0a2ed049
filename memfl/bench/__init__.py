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
    # issue 10: the search that chose the mentor's lambda1/lambda2 (seed 3 of the same regime)
    "memory-wall-mentor": "memfl.bench.mentor_search",
    # issue 11: FedHybrid against the memory-aware and -unaware baselines in the memory-wall regime
    "hybrid-memory-wall": "memfl.bench.hybrid.memory_wall",
}


def run_benchmark(
    name: str, out: Path, quick: bool = False, methods: list[str] | None = None, report_only: bool = False
) -> dict[str, Any]:
    """Run benchmark ``name``, writing its files under ``out``.

    ``methods``: only these of the benchmark's methods; ``report_only``: start no run, rebuild the
    tables from the runs already complete in ``out`` (benchmarks whose ``run`` takes these keywords,
    e.g. ``memory-wall``; ValueError for the others)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    module = importlib.import_module(BENCHMARKS[name])
    out.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {}
    if methods:
        options["methods"] = methods
    if report_only:
        options["report_only"] = True
    if options:
        import inspect

        accepted = inspect.signature(module.run).parameters
        for key in options:
            if key not in accepted:
                flag = "--methods" if key == "methods" else "--report-only"
                raise ValueError(f"benchmark {name!r} does not take {flag}")
    return module.run(out, quick, **options)
