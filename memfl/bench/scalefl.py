"""Benchmark ``scalefl``: ScaleFL's memory reduction and its accuracy against the baselines.

Memory (SPEC 2, issue 3): ResNet-18 at CIFAR-10 shapes (3x32x32, batch 64, SGD with momentum 0.9):
the estimated (:func:`memfl.memory.estimate`) and measured (:func:`memfl.memory.measure`, a fresh
subprocess) peak of full training and of every stage, for the spec's cut (the four ResNet stages,
stem in block 1) and the memory-balanced cut, T = 4, plus the balanced cut at T = 6. A stage-t
client holds only blocks 1..t, O_t and P_t (:func:`memfl.methods.scalefl.stage_client_model`). The
figure of merit is the reduction of the *largest* stage against full training (goal >= 60%).

Accuracy: Fashion-MNIST, ``cnn``, 100 clients, Dirichlet(0.5), 10 per round, budgets
``relative:0.1-1.1``, the same rounds and seed for ``fedavg`` (upper bound), ``exclusive``,
``heterofl``, ``scalefl`` and ``scalefl`` without the mentor / without the harmonizer (goals:
scalefl >= exclusive + 5 points, within 2 points of fedavg). The ScaleFL run's nHSIC plane is drawn.

Mentor search (``python -m memfl.bench.scalefl --mentor-search OUT``): the beta/gamma curriculum
candidates trained as centralised sequential block-wise training of the same cnn on Fashion-MNIST
(a cheap, low-noise proxy of a ScaleFL run); docs/SCALEFL.md records the result and the choice.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

MB = 2**20


# ------------------------------------------------------------------------------------ memory


def _resnet18_factory():
    from memfl.models import build_model

    return functools.partial(build_model, "resnet18", in_channels=3, num_classes=10, image_size=32)


def memory_rows(quick: bool) -> dict[str, Any]:
    """Estimated and measured peaks of full training and of every stage (see the module doc)."""
    from memfl.core.protocol import Plan
    from memfl.memory import estimate, measure
    from memfl.methods.scalefl import stage_client_factory

    batch = 8 if quick else 64
    shape = (batch, 3, 32, 32)
    base = _resnet18_factory()
    cuts = [("default", 4)] if quick else [("default", 4), ("balanced", 4), ("balanced", 6)]

    def one(factory, plan) -> dict[str, Any]:
        e = estimate(factory(), shape, optimizer="sgd", momentum=0.9, plan=plan)
        m = measure(factory, shape, optimizer="sgd", momentum=0.9, plan=plan)
        print(
            f"[scalefl memory] {plan.label} {plan.options.get('partition', '')}: "
            f"est {e.peak_bytes / MB:.1f} MB, measured {m.peak_bytes / MB:.1f} MB",
            flush=True,
        )
        return {"estimated_bytes": e.peak_bytes, "measured_bytes": m.peak_bytes, "breakdown": e.breakdown()}

    full = one(base, Plan())
    out: dict[str, Any] = {
        "model": "resnet18",
        "input_shape": list(shape),
        "optimizer": "sgd, momentum 0.9",
        "full": full,
        "cuts": [],
    }
    for mode, blocks in cuts:
        from memfl.methods.scalefl import ScaleFLModel

        groups = ScaleFLModel(base(), blocks, mode=mode, batch_size=batch).partition.groups
        stages = []
        for t in range(1, blocks + 1):
            plan = Plan(kind="stage", stage=t, options={"blocks": blocks, "partition": mode, "batch_size": batch})
            stages.append(
                {
                    "stage": t,
                    "units": list(groups[t - 1]),
                    **one(stage_client_factory(base, t, blocks, mode, batch), plan),
                }
            )
        row = {"partition": mode, "blocks": blocks, "stages": stages}
        for kind in ("estimated", "measured"):
            largest = max(s[f"{kind}_bytes"] for s in stages)
            row[f"largest_{kind}_bytes"] = largest
            row[f"reduction_{kind}_pct"] = 100 * (1 - largest / full[f"{kind}_bytes"])
        out["cuts"].append(row)
    return out


def memory_markdown(mem: dict[str, Any]) -> list[str]:
    full = mem["full"]
    lines = [
        f"### Memory: {mem['model']}, input {'x'.join(map(str, mem['input_shape']))}, {mem['optimizer']}",
        "",
        f"Full training: estimated {full['estimated_bytes'] / MB:.1f} MB, measured "
        f"{full['measured_bytes'] / MB:.1f} MB.",
        "",
        "| cut | T | stage | block units | estimated (MB) | measured (MB) | vs full (measured) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for cut in mem["cuts"]:
        for s in cut["stages"]:
            units = ", ".join(u.replace("blocks.", "") for u in s["units"])
            lines.append(
                f"| {cut['partition']} | {cut['blocks']} | {s['stage']} | {units} | "
                f"{s['estimated_bytes'] / MB:.1f} | {s['measured_bytes'] / MB:.1f} | "
                f"{100 * s['measured_bytes'] / full['measured_bytes']:.0f}% |"
            )
    lines += [
        "",
        "| cut | T | largest stage, estimated | largest stage, measured | reduction (est.) | "
        "reduction (measured) | goal >= 60% |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for cut in mem["cuts"]:
        ok = "met" if cut["reduction_measured_pct"] >= 60 else "not met"
        lines.append(
            f"| {cut['partition']} | {cut['blocks']} | {cut['largest_estimated_bytes'] / MB:.1f} MB | "
            f"{cut['largest_measured_bytes'] / MB:.1f} MB | {cut['reduction_estimated_pct']:.1f}% | "
            f"{cut['reduction_measured_pct']:.1f}% | {ok} |"
        )
    return lines


# ---------------------------------------------------------------------------------- accuracy

#: the accuracy benchmark's federation; sized so the six runs take < 30 min on 2 busy CPU cores
ACCURACY = {"model_width": 0.25, "rounds": 60, "max_steps": 10, "eval_every": 2}


def accuracy_base(quick: bool) -> dict[str, Any]:
    a = ACCURACY
    return {
        "run": {
            "model": "cnn",
            "dataset": "fashion-mnist",
            "clients": 100,
            "per_round": 10,
            "rounds": 4 if quick else a["rounds"],
            "eval_every": 1 if quick else a["eval_every"],
            "partition": "dirichlet:0.5",
            "budgets": "relative:0.1-1.1",
            "seed": 0,
            "model_width": a["model_width"],
        },
        "train": {
            "local_epochs": 1,
            "batch_size": 32,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "max_steps": 2 if quick else a["max_steps"],
        },
        "scalefl": {"r_min": 1, "r_max": 1} if quick else {},
    }


VARIANTS = {
    "fedavg": {"run": {"method": "fedavg"}},
    "exclusive": {"run": {"method": "exclusive"}},
    "heterofl": {"run": {"method": "heterofl"}},
    "scalefl": {"run": {"method": "scalefl"}},
    "scalefl-no-mentor": {"run": {"method": "scalefl"}, "scalefl": {"mentor": False}},
    "scalefl-no-harmonizer": {"run": {"method": "scalefl"}, "scalefl": {"harmonizer": False}},
}


def accuracy(out: Path, quick: bool, command: str) -> dict[str, Any]:
    from memfl.bench.federation import compare
    from memfl.report import load_results
    from memfl.report.nhsic import plot_nhsic_plane

    base = accuracy_base(quick)
    summary = compare(out, "scalefl-accuracy", VARIANTS, base, command)
    run_dir = out / "scalefl-accuracy-scalefl"
    plot_nhsic_plane(
        load_results(run_dir), out / "scalefl-nhsic.png", title="nHSIC plane, scalefl (cnn, Fashion-MNIST)"
    )
    return summary


# ------------------------------------------------------------------------------ the benchmark


def run(out: Path, quick: bool) -> dict[str, Any]:
    command = f"memfl bench scalefl --out {out}" + (" --quick" if quick else "")
    # The small models here run ~10x faster with one intra-op thread than with two when the two
    # cores are shared with other jobs (OpenMP workers spin waiting for each other); results are
    # the same, only the wall time changes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, quick, command)
    finally:
        torch.set_num_threads(threads)


def _last(values: list[float | None], n: int = 5) -> float:
    """Mean of the last ``n`` evaluated accuracies (less noisy than the final round alone)."""
    vals = [v for v in values if v is not None][-n:]
    return sum(vals) / len(vals)


def _run(out: Path, quick: bool, command: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    mem = memory_rows(quick)
    t_mem = time.perf_counter() - t0
    acc = accuracy(out, quick, command)
    t_acc = time.perf_counter() - t0 - t_mem
    fin = {k: 100 * v["final_accuracy"] for k, v in acc.items()}
    goals = {
        "memory_reduction_ge_60pct": {
            cut["partition"] + f":T{cut['blocks']}": cut["reduction_measured_pct"] >= 60 for cut in mem["cuts"]
        },
        "scalefl_ge_exclusive_plus_5": fin["scalefl"] >= fin["exclusive"] + 5,
        "scalefl_within_2_of_fedavg": fin["scalefl"] >= fin["fedavg"] - 2,
    }
    result = {
        "command": command,
        "quick": quick,
        "torch": torch.__version__,
        "memory": mem,
        "accuracy": acc,
        "goals": goals,
        "seconds": {"memory": t_mem, "accuracy": t_acc},
    }
    (out / "scalefl.json").write_text(json.dumps(result, indent=1))
    write_markdown(out, result)
    return result


def write_markdown(out: Path, result: dict[str, Any]) -> Path:
    """``out/scalefl.md`` from ``result`` (the content of ``scalefl.json``) and the accuracy table."""
    acc, mem, command = result["accuracy"], result["memory"], result["command"]
    a = accuracy_base(result.get("quick", False))
    fin = {k: 100 * v["final_accuracy"] for k, v in acc.items()}
    last = {k: 100 * _last(v["accuracy_per_round"]) for k, v in acc.items()}
    best = {k: 100 * v["best_accuracy"] for k, v in acc.items()}

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    acc_md = (out / "scalefl-accuracy.md").read_text().splitlines()
    lines = (
        [f"## ScaleFL (`{command}`, torch {result['torch']})", ""]
        + memory_markdown(mem)
        + ["", "### Accuracy", ""]
        + acc_md
        + ["", "| method | final | mean of the last 5 evaluations | best |", "|---|---:|---:|---:|"]
    )
    lines += [f"| {k} | {fin[k]:.2f}% | {last[k]:.2f}% | {best[k]:.2f}% |" for k in acc]
    lines += [
        "",
        "![nHSIC plane](scalefl-nhsic.png)",
        "",
        "Goals (points of test accuracy):",
        f"- scalefl >= exclusive + 5: final {fin['scalefl']:.2f} vs {fin['exclusive'] + 5:.2f} "
        f"({verdict(fin['scalefl'] >= fin['exclusive'] + 5)}); last-5 mean {last['scalefl']:.2f} vs "
        f"{last['exclusive'] + 5:.2f} ({verdict(last['scalefl'] >= last['exclusive'] + 5)})",
        f"- scalefl within 2 of fedavg: final {fin['scalefl']:.2f} vs {fin['fedavg'] - 2:.2f} "
        f"({verdict(fin['scalefl'] >= fin['fedavg'] - 2)}); last-5 mean {last['scalefl']:.2f} vs "
        f"{last['fedavg'] - 2:.2f} ({verdict(last['scalefl'] >= last['fedavg'] - 2)})",
        "",
        f"Model width {a['run']['model_width']}, {a['run']['rounds']} rounds of at most "
        f"{a['train']['max_steps']} local steps of batch {a['train']['batch_size']}, evaluation every "
        f"{a['run']['eval_every']} rounds, one intra-op thread: chosen so that the six runs fit in 30 minutes on "
        f"this 2-core machine (took {result['seconds']['accuracy'] / 60:.1f} min; memory part "
        f"{result['seconds']['memory'] / 60:.1f} min).",
    ]
    path = out / "scalefl.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ mentor search

#: the beta/gamma curricula tried by the mentor search (first block -> last block)
MENTOR_GRID = {
    "off": None,
    "label only (g .1)": {"beta": [0.0, 0.0], "gamma": [0.1, 0.1]},
    "compress only (b 0->.1)": {"beta": [0.0, 0.1], "gamma": [0.0, 0.0]},
    "b 0->.1, g .1": {"beta": [0.0, 0.1], "gamma": [0.1, 0.1]},
    "b 0->.5, g .5": {"beta": [0.0, 0.5], "gamma": [0.5, 0.5]},
    "b -.1->.1, g .1": {"beta": [-0.1, 0.1], "gamma": [0.1, 0.1]},
    "b 0->.1, g .3->.1": {"beta": [0.0, 0.1], "gamma": [0.3, 0.1]},
}


def _load_fmnist():
    from memfl.data import load_dataset

    return load_dataset("fashion-mnist")


def blockwise_proxy(
    data,
    mentor: dict[str, Any] | None,
    *,
    steps: int = 150,
    batch: int = 64,
    width: float = 0.25,
    seed: int = 0,
    harmonizer: bool = True,
    exit_width: str = "light",
) -> dict[str, Any]:
    """Centralised sequential block-wise training (ScaleFL's local computation without the
    federation): each of the 4 stages trains ``steps`` SGD steps; returns the test accuracy of every
    exit after its stage and of the final model, and the nHSIC point of each block."""
    from memfl.core.engine import prepare
    from memfl.core.optim import make_optimizer
    from memfl.core.protocol import Plan
    from memfl.core.trainer import evaluate
    from memfl.methods.scalefl import ScaleFLModel
    from memfl.models import build_model

    torch.manual_seed(seed)
    sm = ScaleFLModel(build_model("cnn", width=width), 4, exit_width=exit_width)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.train_x, data.train_y
    options = {"mentor": mentor is not None, "harmonizer": harmonizer, **(mentor or {})}
    per_stage, points = [], []
    for t in range(1, 5):
        sm.train()
        step = prepare(sm, Plan(kind="stage", stage=t, options=options))
        params = [p for _, p in step.trainable]
        opt = make_optimizer(params, "sgd", 0.05, 0.9, 5e-4)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss, _ = step.loss(x[idx], y[idx])
            loss.backward()
            opt.step()
        m = step.metrics()
        points.append({"block": t, "nhsic_xz": m.get("nhsic_xz"), "nhsic_yz": m.get("nhsic_yz")})
        sm.exit_stage.fill_(t)
        per_stage.append(evaluate(sm, data.test_x, data.test_y)[0])
    return {"stage_accuracy": per_stage, "final_accuracy": per_stage[-1], "nhsic": points}


def end_to_end_proxy(data, *, steps: int = 600, batch: int = 64, width: float = 0.25, seed: int = 0) -> float:
    """The reference for the mentor search: the same cnn trained end to end for as many steps."""
    from memfl.core.optim import make_optimizer
    from memfl.core.trainer import evaluate
    from memfl.models import build_model

    torch.manual_seed(seed)
    model = build_model("cnn", width=width)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(list(model.parameters()), "sgd", 0.05, 0.9, 5e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_x), (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
    return evaluate(model, data.test_x, data.test_y)[0]


def mentor_search(out: Path, quick: bool = False, seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    data = _load_fmnist()
    steps = 20 if quick else 150
    grid = dict(list(MENTOR_GRID.items())[:2]) if quick else MENTOR_GRID
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for label, mentor in grid.items():
        runs = [blockwise_proxy(data, mentor, steps=steps, seed=s) for s in (seeds[:1] if quick else seeds)]
        finals = [r["final_accuracy"] for r in runs]
        results[label] = {"mentor": mentor, "final_accuracy": sum(finals) / len(finals), "runs": runs}
        print(
            f"[mentor search] {label}: final {100 * results[label]['final_accuracy']:.2f}% "
            f"(stages {[round(100 * a, 1) for a in runs[0]['stage_accuracy']]})",
            flush=True,
        )
    ref = [end_to_end_proxy(data, steps=4 * steps, seed=s) for s in (seeds[:1] if quick else seeds)]
    print(f"[mentor search] end-to-end reference: {100 * sum(ref) / len(ref):.2f}%", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scalefl-mentor-search.json").write_text(json.dumps({"candidates": results, "end_to_end": ref}, indent=1))
    lines = [
        "| curriculum | beta (first->last) | gamma (first->last) | final acc. (mean of seeds) | "
        "acc. after stage 1..4 (seed 0) |",
        "|---|---|---|---:|---|",
    ]
    for label, r in results.items():
        m = r["mentor"] or {}
        lines.append(
            f"| {label} | {m.get('beta', '-')} | {m.get('gamma', '-')} | {100 * r['final_accuracy']:.2f}% | "
            + ", ".join(f"{100 * a:.1f}" for a in r["runs"][0]["stage_accuracy"])
            + " |"
        )
    lines.append(
        f"| end-to-end training, {4 * steps} steps (reference) | - | - | {100 * sum(ref) / len(ref):.2f}% | - |"
    )
    lines += [
        "",
        f"{steps} SGD steps of batch 64 per stage, lr 0.05, cnn width 0.25, seeds {list(seeds)}; "
        f"{(time.perf_counter() - t0) / 60:.1f} min.",
    ]
    (out / "scalefl-mentor-search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":  # python -m memfl.bench.scalefl --mentor-search OUT [--quick]
    if len(sys.argv) >= 3 and sys.argv[1] == "--mentor-search":
        torch.set_num_threads(1)  # see run(): one intra-op thread on a shared 2-core machine
        mentor_search(Path(sys.argv[2]), quick="--quick" in sys.argv)
    else:
        print(
            "usage: python -m memfl.bench.scalefl --mentor-search OUT [--quick]  "
            "(the benchmark itself: memfl bench scalefl)"
        )
