"""Benchmark ``overhead``: simulator round time against a bare PyTorch loop doing the same work.

For every simulated FedAvg round, right after it finishes (so both see the same machine state),
a bare loop trains the same clients on the same tensors with the same batches, optimizer and
hyper-parameters, then averages their weights. The ratio of the two wall times is the price of
memfl's machinery (instructions, results, strategy, aggregation, bookkeeping). Rounds without an
evaluation are compared (evaluation is not part of a bare training round). Both start each round
from the same global weights and draw the same batches from the same per-round seeds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from memfl.config import build_config
from memfl.core.protocol import Plan
from memfl.core.seeding import round_seed
from memfl.data import DataError
from memfl.runtime.sim import run_experiment
from memfl.server.checkpoint import CHECKPOINT_TENSORS
from memfl.server.setup import build_federation, load_data, model_builder


def _bare_round(config, rnd, clients_by_id, client_ids, global_state, model) -> float:
    """Train ``client_ids`` from ``global_state`` with plain PyTorch; return the wall seconds."""
    t = config.train
    start = time.perf_counter()
    states, weights = [], []
    for cid in client_ids:
        x, y = clients_by_id[cid].x, clients_by_id[cid].y
        model.load_state_dict(global_state)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        gen = torch.Generator().manual_seed(round_seed(config.run.seed, rnd, cid))
        for _ in range(t.local_epochs):
            order = torch.randperm(len(x), generator=gen)
            for lo in range(0, len(x), t.batch_size):
                idx = order[lo : lo + t.batch_size]
                if len(idx) < 2:
                    continue
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        weights.append(len(x))
    total = sum(weights)
    avg = {}
    for k, ref in global_state.items():
        if ref.dtype.is_floating_point:
            avg[k] = sum(s[k] * (w / total) for s, w in zip(states, weights))
        else:
            avg[k] = torch.stack([s[k] for s in states]).max(0).values
    model.load_state_dict(avg)
    return time.perf_counter() - start


def run(out: Path, quick: bool) -> dict[str, Any]:
    rounds = 3 if quick else 6
    cfg = {
        "run": {
            "method": "fedavg",
            "model": "cnn",
            "dataset": "fashion-mnist",
            "clients": 100,
            "per_round": 4 if quick else 10,
            "rounds": rounds,
            "eval_every": 10_000,
            "partition": "dirichlet:0.5",
            "budgets": "profiles",
            "seed": 0,
            "out": str(out / "overhead-run"),
        },
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.01},
    }
    config = build_config(cfg, source="overhead benchmark")
    try:
        data = load_data(config)
    except DataError:
        cfg["run"]["dataset"] = "synthetic"
        config = build_config(cfg, source="overhead benchmark")
        data = load_data(config)
    model_fn = model_builder(config, data.input_shape, data.num_classes)
    clients = {c.info.id: c for c in build_federation(config, data, full_peak=1)}
    bare_model = model_fn(Plan())
    rows: list[dict[str, Any]] = []
    shutil.rmtree(out / "overhead-run", ignore_errors=True)
    torch.manual_seed(config.run.seed)
    previous = {k: v.clone() for k, v in model_fn(Plan()).state_dict().items()}

    def after_round(entry: dict[str, Any]) -> None:
        ids = [c["id"] for c in entry["clients"]]
        bare = _bare_round(config, entry["round"], clients, ids, previous, bare_model)
        # the next round starts from the simulator's new global model (its checkpoint)
        previous.clear()
        previous.update(load_file(str(out / "overhead-run" / CHECKPOINT_TENSORS)))
        rows.append(
            {
                "round": entry["round"],
                "sim_seconds": entry["round_seconds"],
                "bare_seconds": bare,
                "evaluated": entry["accuracy"] is not None,
            }
        )

    run_experiment(config, progress=False, on_round=after_round)
    usable = [r for r in rows if not r["evaluated"] and r["round"] > 1] or rows
    ratios = [r["sim_seconds"] / r["bare_seconds"] for r in usable]
    summary = {
        "dataset": config.run.dataset,
        "model": "cnn",
        "per_round": config.run.per_round,
        "rounds": rows,
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "goal": 1.15,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "overhead.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "### Simulator overhead",
        "",
        f"Command: `memfl bench overhead --out {out}{' --quick' if quick else ''}` "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "",
        f"FedAvg, `cnn` on {config.run.dataset}, 100 clients (Dirichlet 0.5), {config.run.per_round} per round, "
        "1 local epoch, batch 32. Each simulated round is followed at once by a bare PyTorch loop training "
        "the same clients on the same tensors and averaging them; rounds with an evaluation and the first "
        "(warm-up) round are left out.",
        "",
        "| round | simulator s | bare loop s | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        note = " (eval)" if r["evaluated"] else ""
        lines.append(
            f"| {r['round']}{note} | {r['sim_seconds']:.2f} | {r['bare_seconds']:.2f} | "
            f"{r['sim_seconds'] / r['bare_seconds']:.3f} |"
        )
    lines += ["", f"**Median ratio: {summary['median_ratio']:.3f}** (goal <= 1.15)", ""]
    (out / "overhead.md").write_text("\n".join(lines))
    return summary
