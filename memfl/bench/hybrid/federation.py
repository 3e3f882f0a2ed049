"""Benchmark ``hybrid-federation``: FedHybrid against random, Oort and Oort+FedProx.

Fashion-MNIST, ``cnn`` at width 0.5 (run.model_width; a full-width epoch takes minutes on the 2
reference cores), 100 clients, Dirichlet(0.5) label skew, 10 per round, 1 local epoch of batch 32,
SGD lr 0.01 momentum 0.9, the same seed for every method.

Budgets that bind: the device table's budgets are GBs while this model needs ~10 MB, so every
client's *capacity* is drawn ``relative:0.85-1.35`` x the full-training peak (estimated), and
contention traces (``[fedhybrid] contention = true``, memfl/methods/fedhybrid/budget.py) take 2-30% of it away
round by round. The server sees the predicted budget; the simulator checks the real one (a client
whose plan's predicted peak exceeds the real budget is killed: status ``oom``). Devices (and so
speeds and contention models) come from the device table.

- ``fedhybrid``: memory-aware selection + per-client hybrid plans (clients down to ~85% of the full
  peak can train; below that nothing fits this model: the first layer's backward working set).
- ``random``, ``oort``, ``oort+fedprox``: full-model training only, among clients whose predicted
  budget fits it.

Reported: time to reach the target accuracy on the simulator's virtual clock (measured local
compute / device speed + transfer; a round lasts as long as its slowest client), and on a
*profiled* clock (steps x the profiled step time of the client's plan / speed + transfer), which
is immune to the load of the shared machine; final and best accuracy; budget violations, both as
predicted by the simulator and *measured*: every distinct plan used is measured once for real
(fresh subprocess, peak RSS) and compared with the real budget of every round it was used in.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from memfl.bench.hybrid.common import machine, mb
from memfl.config import build_config
from memfl.core.protocol import Plan
from memfl.memory import measure
from memfl.methods.fedhybrid.profile import profile_model
from memfl.models import build_model
from memfl.report import plot_accuracy
from memfl.runtime.sim import run_experiment

METHODS = ("fedhybrid", "random", "oort", "oort+fedprox")
#: extra runs: name -> (method, [fedhybrid] overrides); the paper's baselines are memory-unaware
VARIANTS = {"random-unaware": ("random", {"baseline_memory": "unaware"})}
TARGETS = (0.70, 0.75, 0.80)
TARGET = 0.75
GOAL_SPEEDUP = 3.0


def base_config(quick: bool) -> dict[str, Any]:
    return {
        "run": {
            "model": "cnn",
            "model_width": 0.5,
            "dataset": "fashion-mnist",
            "clients": 100,
            "per_round": 10,
            "rounds": 4 if quick else 40,
            "eval_every": 1,
            "partition": "dirichlet:0.5",
            "budgets": "relative:0.85-1.35",
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
        "fedhybrid": {"contention": True},
    }


def _time_to(rounds: list[dict[str, Any]], target: float, clock: str) -> float | None:
    for r in rounds:
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return r[clock]
    return None


def _profiled_clock(res: dict[str, Any], step_seconds: float) -> None:
    """Add ``profiled_seconds`` (cumulative) to every round of ``res``."""
    speed = {c["id"]: c["speed"] for c in res["clients"]}
    total = 0.0
    for r in res["rounds"]:
        report = (r.get("strategy") or {}).get("clients", {})
        times = []
        for c in r["clients"]:
            if c["status"] != "ok":
                continue
            ratio = (report.get(str(c["id"])) or {}).get("step_time_ratio", 1.0)
            transfer = c["virtual_seconds"] - c["compute_seconds"] / speed[c["id"]]
            times.append(c["steps"] * step_seconds * ratio / speed[c["id"]] + transfer)
        total += max(times, default=0.0)
        r["profiled_seconds"] = total


def _plans_used(res: dict[str, Any]) -> dict[str, Plan]:
    plans: dict[str, Plan] = {}
    for r in res["rounds"]:
        report = (r.get("strategy") or {}).get("clients", {})
        for c in r["clients"]:
            plan = Plan.from_json((report.get(str(c["id"])) or {}).get("plan")) if c["plan"] != "full" else Plan()
            plans[json.dumps(plan.to_json(), sort_keys=True)] = plan
    return plans


def run(out: Path, quick: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # 2 OpenMP threads on 2 cores shared with other jobs stall badly
    t0 = time.time()
    base = base_config(quick)
    runs: dict[str, dict[str, Any]] = {}
    for method in (*METHODS, *VARIANTS):
        cfg = json.loads(json.dumps(base))
        real_method, overrides = VARIANTS.get(method, (method, {}))
        cfg["run"]["method"] = real_method
        cfg["fedhybrid"].update(overrides)
        cfg["run"]["out"] = str(out / f"hybrid-federation-{method}")
        print(f"[hybrid-federation] {method} ...", flush=True)
        t1 = time.time()
        runs[method] = run_experiment(build_config(cfg, source="hybrid-federation benchmark"), progress=False)
        s = runs[method]["summary"]
        print(
            f"[hybrid-federation] {method}: final {100 * s['final_accuracy']:.2f}%, virtual "
            f"{s['virtual_seconds']:.0f} s, wall {time.time() - t1:.0f} s",
            flush=True,
        )

    # the profiled clock and the measured budget check
    r0 = base["run"]
    shape = (base["train"]["batch_size"], 1, 28, 28)
    factory = partial(build_model, "cnn", in_channels=1, num_classes=10, image_size=28, width=r0["model_width"])
    prof = profile_model(factory(), shape, timing=True)
    measured: dict[str, int] = {}
    for res in runs.values():
        _profiled_clock(res, prof.step_seconds)
        for key, plan in _plans_used(res).items():
            if key not in measured:
                measured[key] = measure(factory, shape, plan=plan, steps=2).peak_bytes
    rows = {}
    for method, res in runs.items():
        report_plans = {}
        viol_measured, scheduled, hybrid = 0, 0, 0
        for r in res["rounds"]:
            report = (r.get("strategy") or {}).get("clients", {})
            for c in r["clients"]:
                scheduled += 1
                plan = Plan.from_json((report.get(str(c["id"])) or {}).get("plan")) if c["plan"] != "full" else Plan()
                hybrid += plan.kind == "hybrid"
                peak = measured[json.dumps(plan.to_json(), sort_keys=True)]
                report_plans[c["plan"]] = report_plans.get(c["plan"], 0) + 1
                if peak > c["real_budget_bytes"]:
                    viol_measured += 1
        s = res["summary"]
        rows[method] = {
            "final_accuracy": s["final_accuracy"],
            "best_accuracy": s["best_accuracy"],
            "virtual_seconds": s["virtual_seconds"],
            "profiled_seconds": res["rounds"][-1]["profiled_seconds"],
            "time_to": {
                f"{t:.2f}": {
                    "virtual": _time_to(res["rounds"], t, "virtual_seconds"),
                    "profiled": _time_to(res["rounds"], t, "profiled_seconds"),
                }
                for t in TARGETS
            },
            "scheduled": scheduled,
            "hybrid_plans": hybrid,
            "oom_predicted": s.get("budget_violations", 0),
            "violations_measured": viol_measured,
            "eligible_per_round": [(r.get("strategy") or {}).get("eligible") for r in res["rounds"]],
            "accuracy_per_round": [r["accuracy"] for r in res["rounds"]],
            "virtual_per_round": [r["virtual_seconds"] for r in res["rounds"]],
            "profiled_per_round": [r["profiled_seconds"] for r in res["rounds"]],
        }
    plot_accuracy(
        list(runs.values()),
        out / "hybrid-federation.png",
        labels=list(runs),
        x="virtual_seconds",
        title="cnn on Fashion-MNIST, 100 clients, contention: accuracy vs virtual time",
    )
    key = f"{TARGET:.2f}"
    speedup, speedup_unaware = {}, {}
    for clock in ("virtual", "profiled"):
        fh, rnd = rows["fedhybrid"]["time_to"][key][clock], rows["random"]["time_to"][key][clock]
        speedup[clock] = (rnd / fh) if fh and rnd else None
        if "random-unaware" in rows:
            un = rows["random-unaware"]["time_to"][key][clock]
            speedup_unaware[clock] = (un / fh) if fh and un else None
    summary = {
        "config": base,
        "machine": machine(),
        "seconds": time.time() - t0,
        "target": TARGET,
        "profiled_step_seconds": prof.step_seconds,
        "measured_plan_peaks": measured,
        "methods": rows,
        "speedup_vs_random": speedup,
        "speedup_vs_random_unaware": speedup_unaware,
        "goal": {
            "speedup": GOAL_SPEEDUP,
            "met": bool(
                speedup["virtual"]
                and speedup["virtual"] >= GOAL_SPEEDUP
                and rows["fedhybrid"]["violations_measured"] == 0
            ),
        },
    }
    (out / "hybrid-federation.json").write_text(json.dumps(summary, indent=1))
    (out / "hybrid-federation.md").write_text(_markdown(summary, out, quick))
    return summary


def _fmt_t(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.0f}"


def _markdown(s: dict[str, Any], out: Path, quick: bool) -> str:
    r, t = s["config"]["run"], s["config"]["train"]
    lines = [
        "### Federation: time to accuracy under memory contention",
        "",
        f"Command: `memfl bench hybrid-federation --out {out}{' --quick' if quick else ''}` "
        f"(torch {s['machine']['torch']}, {s['machine']['threads']} threads; wall {s['seconds'] / 60:.0f} min)",
        "",
        f"`{r['model']}` width {r['model_width']} on {r['dataset']}, {r['clients']} clients, {r['partition']}, "
        f"{r['per_round']} per round, {r['rounds']} rounds, {t['local_epochs']} local epoch of batch {t['batch_size']}, "  # noqa: E501
        f"SGD lr {t['lr']} momentum {t['momentum']}, seed {r['seed']}. Capacities `{r['budgets']}` x the "
        "full-training peak, then contention traces per device kind (predicted budgets for the server, real ones "
        "for the check). Times in virtual seconds.",
        "",
        f"| method | final acc. | best acc. | time to {TARGETS[0]:.0%} | time to {TARGET:.0%} (virtual / profiled) "
        f"| time to {TARGETS[2]:.0%} | hybrid plans / scheduled | OOM (predicted) | violations (measured) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, row in s["methods"].items():
        tt = row["time_to"]
        lines.append(
            f"| {m} | {100 * row['final_accuracy']:.2f}% | {100 * row['best_accuracy']:.2f}% | "
            f"{_fmt_t(tt[f'{TARGETS[0]:.2f}']['virtual'])} | {_fmt_t(tt[f'{TARGET:.2f}']['virtual'])} / "
            f"{_fmt_t(tt[f'{TARGET:.2f}']['profiled'])} | {_fmt_t(tt[f'{TARGETS[2]:.2f}']['virtual'])} | "
            f"{row['hybrid_plans']} / {row['scheduled']} | {row['oom_predicted']} | {row['violations_measured']} |"
        )
    sp = s["speedup_vs_random"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    lines += [
        "",
        "![accuracy vs virtual time](hybrid-federation.png)",
        "",
        f"FedHybrid reaches {TARGET:.0%} {fmt(sp['virtual'])} sooner than random on the virtual clock "
        f"({fmt(sp['profiled'])} on the profiled clock). Goal: >= {s['goal']['speedup']:.0f}x with no measured "
        f"budget violation: {'met' if s['goal']['met'] else '**not met**'}. Distinct plans measured: "
        f"{len(s['measured_plan_peaks'])} (peaks {', '.join(mb(v) for v in sorted(s['measured_plan_peaks'].values()))} MB).",  # noqa: E501
        "",
    ]
    su = s.get("speedup_vs_random_unaware") or {}
    if su:
        lines += [
            f"Against the memory-unaware random baseline (`random-unaware`: `[fedhybrid] baseline_memory = "
            f'"unaware"`, clients sent whatever their budget, those whose real budget is below the peak '
            f"killed; a killed client adds no time to its round): {fmt(su.get('virtual'))} sooner on the virtual "
            f"clock ({fmt(su.get('profiled'))} profiled).",
            "",
        ]
    return "\n".join(lines)
