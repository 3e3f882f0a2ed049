"""Benchmark ``fedavg``: FedAvg (the upper bound) and exclusive FedAvg on Fashion-MNIST.

100 clients with Dirichlet(0.5) label skew, 10 per round, budgets ``relative:0.1-1.1`` of the full
training peak, the same rounds and seed for both methods: test accuracy per round, a table and
an accuracy-vs-round plot. ``compare`` is reused by the other accuracy benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memfl.config import build_config
from memfl.report import plot_accuracy
from memfl.runtime.sim import run_experiment


def base_config(out: Path, quick: bool) -> dict[str, Any]:
    """The shared federation: Fashion-MNIST, cnn, 100 clients, Dirichlet 0.5, 10 per round."""
    return {
        "run": {
            "model": "cnn",
            "dataset": "fashion-mnist",
            "clients": 100,
            "per_round": 10,
            "rounds": 4 if quick else 12,
            "eval_every": 1,
            "partition": "dirichlet:0.5",
            "budgets": "relative:0.1-1.1",
            "seed": 0,
        },
        "train": {
            "local_epochs": 1,
            "batch_size": 32,
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            **({"max_steps": 5} if quick else {}),
        },
    }


def compare(
    out: Path,
    name: str,
    variants: dict[str, dict[str, Any]],
    base: dict[str, Any],
    command: str,
    goal_lines: list[str] | None = None,
) -> dict[str, Any]:
    """Run each variant (label -> overrides of ``base``, nested like the TOML) side by side;
    write ``out/name.json``, ``out/name.md`` and ``out/name.png``; return the summary."""
    runs: dict[str, dict[str, Any]] = {}
    for label, overrides in variants.items():
        cfg = json.loads(json.dumps(base))
        for section, values in overrides.items():
            cfg.setdefault(section, {}).update(values)
        cfg["run"]["out"] = str(out / f"{name}-{label}")
        print(f"[{name}] {label} ...", flush=True)
        runs[label] = run_experiment(build_config(cfg, source=f"{name} benchmark"), progress=False)
        s = runs[label]["summary"]
        print(
            f"[{name}] {label}: final {100 * s['final_accuracy']:.2f}%  best {100 * s['best_accuracy']:.2f}%",
            flush=True,
        )
    plot_accuracy(
        list(runs.values()),
        out / f"{name}.png",
        labels=list(runs),
        title=f"{base['run']['model']} on {base['run']['dataset']}, {base['run']['clients']} clients",
    )
    summary = {
        label: {
            **r["summary"],
            "accuracy_per_round": [x["accuracy"] for x in r["rounds"]],
            "participants_per_round": [len(x["clients"]) for x in r["rounds"]],
        }
        for label, r in runs.items()
    }
    (out / f"{name}.json").write_text(json.dumps({"config": base, "runs": summary}, indent=1))
    r, t = base["run"], base["train"]
    lines = [
        f"Command: `{command}` (torch {torch.__version__})",
        "",
        f"`{r['model']}` (width {r.get('model_width', 1.0)}) on {r['dataset']}, {r['clients']} clients, "
        f"{r['partition']}, {r['per_round']} sampled per round, budgets `{r['budgets']}`, {r['rounds']} rounds, "
        f"{t['local_epochs']} local epoch(s) of batch {t['batch_size']}"
        f"{', at most ' + str(t['max_steps']) + ' local steps' if t.get('max_steps') else ''}, "
        f"SGD lr {t['lr']}, seed {r['seed']}.",
        "",
        "| method | final acc. | best acc. | mean clients / round | virtual time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, s in summary.items():
        mean_clients = sum(s["participants_per_round"]) / len(s["participants_per_round"])
        lines.append(
            f"| {label} | {100 * s['final_accuracy']:.2f}% | {100 * s['best_accuracy']:.2f}% | "
            f"{mean_clients:.1f} | {s['virtual_seconds']:.0f} |"
        )
    lines += ["", f"![accuracy per round]({name}.png)", ""] + (goal_lines or [])
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return summary


def run(out: Path, quick: bool) -> dict[str, Any]:
    command = f"memfl bench fedavg --out {out}" + (" --quick" if quick else "")
    return compare(
        out,
        "fedavg",
        {"fedavg": {"run": {"method": "fedavg"}}, "exclusive": {"run": {"method": "exclusive"}}},
        base_config(out, quick),
        command,
    )
