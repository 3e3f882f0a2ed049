"""Benchmark ``hybrid`` (FedHybrid, issue 4): ``memfl bench hybrid [--out DIR] [--quick]``.

Three parts, each also runnable alone (``memfl bench hybrid-fit | hybrid-predictor |
hybrid-federation``), each writing ``out/hybrid-PART.json`` and ``.md``; ``hybrid`` runs all three
and writes ``out/hybrid.json`` and ``out/hybrid.md``:

- **Fit** (:mod:`.fit`): ResNet-18 at 3x32x32, batch 64, SGD with momentum, budgets of 75/50/35/25%
  of the measured full-training peak: the planner's plan, its predicted and measured peak and step
  time against full training, and the two baselines (recompute everything, uniform 2-bit).
- **Predictor** (:mod:`.predictor`): violation rate and mean unused headroom on held-out traces.
- **Federation** (:mod:`.federation`): Fashion-MNIST, ``cnn``, 100 clients, Dirichlet 0.5, device
  profiles with contention: time-to-target-accuracy on the virtual clock and final accuracy for
  ``fedhybrid``, ``random``, ``oort`` and ``oort+fedprox``, and measured budget violations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARTS = ("fit", "predictor", "federation")


def run(out: Path, quick: bool) -> dict[str, Any]:
    from memfl.bench.hybrid import federation, fit, predictor

    results: dict[str, Any] = {}
    md = ["## FedHybrid (`memfl bench hybrid`)", ""]
    for name, module in (("fit", fit), ("predictor", predictor), ("federation", federation)):
        results[name] = module.run(out, quick)
        md.append((out / f"hybrid-{name}.md").read_text())
    (out / "hybrid.json").write_text(json.dumps(results, indent=1))
    (out / "hybrid.md").write_text("\n".join(md))
    return results
