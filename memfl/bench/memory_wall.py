"""Benchmark ``memory-wall`` (issue 10): ScaleFL where most clients cannot train the full model.

The regime is ``configs/memory-wall.toml`` (resnet18 width 0.125 on Fashion-MNIST, 200 clients x 100
samples, ``dirichlet-fixed:0.1``, budgets ``relative:0.1-1.1``, 10 per round, 200 rounds), read from
the repository and checked against :data:`REGIME` (the same settings, embedded so that an installed
package without the file still runs it). Methods: fedavg (upper bound, budgets ignored), exclusive,
heterofl, scalefl, scalefl without mentor, without harmonizer, and with the cyclic schedule; seeds
0, 1, 2.

Every run is ``python -m memfl.cli run --config ... --method M --seed S --out OUT/runs/M-sS --quiet``
in its own subprocess with one torch thread (``OMP_NUM_THREADS=1``), two at a time (:data:`JOBS`):
on two cores two one-thread jobs side by side finish more work than two-thread jobs on top of each
other. After every finished run the table so far is written to ``OUT/memory-wall.json`` and
``OUT/memory-wall.md``; a run whose ``results.json`` is complete is not run again, and an
interrupted run resumes from its own checkpoint, so a killed bench started again goes on.

Reported per method and seed: final accuracy, mean of the last 5 evaluations, best, virtual time,
wall time, and clients eligible per stage (ScaleFL's round reports carry ``stage`` and
``eligible``; for the others, how many clients' budgets fit full training). Then means over seeds
and the issue's goals, marked met / not met from the numbers.

``--quick``: the same regime shape with 40 clients, 20 rounds, seed 0, and fedavg / exclusive /
scalefl: a smoke test of the benchmark, not its result.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME = "memory-wall"
#: experiments at once (each with one torch thread)
JOBS = 2

#: configs/memory-wall.toml, embedded (asserted equal to the file when the file is there)
REGIME: dict[str, Any] = {
    "run": {
        "method": "scalefl",
        "model": "resnet18",
        "model_width": 0.125,
        "dataset": "fashion-mnist",
        "clients": 200,
        "samples_per_client": 100,
        "partition": "dirichlet-fixed:0.1",
        "per_round": 10,
        "rounds": 200,
        "eval_every": 5,
        "budgets": "relative:0.1-1.1",
        "seed": 0,
        "out": "results/memory-wall",
    },
    "scalefl": {"advance": "movement"},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
}

#: method label -> (memfl method, extra ``memfl run`` flags)
METHODS: dict[str, tuple[str, list[str]]] = {
    "fedavg": ("fedavg", []),
    "exclusive": ("exclusive", []),
    "heterofl": ("heterofl", []),
    "scalefl": ("scalefl", []),
    "scalefl-no-mentor": ("scalefl", ["--no-mentor"]),
    "scalefl-no-harmonizer": ("scalefl", ["--no-harmonizer"]),
    "scalefl-cyclic": ("scalefl", ["--schedule", "cyclic"]),
    # issue 12: FedHybrid in this regime (budgets as configured, no contention) and memfl's own method
    "fedhybrid": ("fedhybrid", []),
    "memfl": ("memfl", []),
}
SEEDS = (0, 1, 2)
QUICK_METHODS = ("fedavg", "exclusive", "scalefl")
QUICK_FLAGS = ["--clients", "40", "--rounds", "20"]


def config_path() -> Path:
    """``configs/memory-wall.toml`` of the repository this package lies in."""
    return Path(__file__).resolve().parents[2] / "configs" / "memory-wall.toml"


def regime_config() -> Path | None:
    """The config file, checked against :data:`REGIME`; None when the package has no repository around it."""
    path = config_path()
    if not path.exists():
        return None
    on_disk = tomllib.loads(path.read_text())
    assert on_disk == REGIME, f"{path} differs from memfl.bench.memory_wall.REGIME"
    return path


# ------------------------------------------------------------------------------------ one run


@dataclass
class Job:
    label: str
    seed: int
    argv: list[str]
    out: Path
    rounds: int
    facts: dict[str, Any] | None = None
    wall_seconds: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.label}-s{self.seed}"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def complete(out: Path, rounds: int) -> dict[str, Any] | None:
    """``out/results.json`` when it holds a finished run of ``rounds`` rounds, else None."""
    res = _load(out / "results.json")
    if not res or "summary" not in res or len(res.get("rounds", [])) != rounds:
        return None
    return res


def facts(res: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers for one finished run."""
    accs = [r["accuracy"] for r in res["rounds"] if r.get("accuracy") is not None]
    s = res["summary"]
    full = res.get("full_peak_bytes")
    fit_full = sum(1 for c in res.get("clients", []) if full and c["budget_bytes"] >= full)
    eligible: dict[str, int] = {}
    rounds_per_stage: dict[str, int] = {}
    for r in res["rounds"]:
        st = r.get("strategy") or {}
        if "stage" in st and "eligible" in st:
            k = str(st["stage"])
            eligible[k] = min(eligible.get(k, st["eligible"]), st["eligible"])  # the fewest in a round of t
            rounds_per_stage[k] = rounds_per_stage.get(k, 0) + 1
    evals = [r for r in res["rounds"] if r.get("accuracy") is not None]
    stage_end: dict[str, float] = {}  # ScaleFL: the last evaluation while stage t ran (its exit's accuracy)
    for r in evals:
        st = r.get("strategy") or {}
        if "stage" in st:
            stage_end[str(st["stage"])] = r["accuracy"]
    return {
        "eval_rounds": [r["round"] for r in evals],
        "eval_virtual_seconds": [r.get("virtual_seconds") for r in evals],
        "stage_end_accuracy": stage_end,
        "final_accuracy": s["final_accuracy"],
        "last5_accuracy": statistics.fmean(accs[-5:]) if accs else None,
        "best_accuracy": s["best_accuracy"],
        "accuracy_per_eval": accs,
        "virtual_seconds": s["virtual_seconds"],
        "run_wall_seconds": s["wall_seconds"],
        "clients": len(res.get("clients", [])),
        "fit_full_training": fit_full,
        "eligible_per_stage": eligible,
        "rounds_per_stage": rounds_per_stage,
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def make_jobs(
    out: Path, config: Path | None, flags: list[str], methods: tuple[str, ...], seeds: tuple[int, ...], rounds: int
) -> list[Job]:
    jobs = []
    for seed in seeds:
        for label in methods:
            method, extra = METHODS[label]
            run_out = out / "runs" / f"{label}-s{seed}"
            argv = [sys.executable, "-m", "memfl.cli", "run"]
            if config is not None:
                argv += ["--config", str(config)]
            argv += [*flags, "--method", method, "--seed", str(seed), "--out", str(run_out), "--quiet", *extra]
            jobs.append(Job(label, seed, argv, run_out, rounds))
    return jobs


def schedule(jobs: list[Job], on_done, jobs_at_once: int = JOBS, poll: float = 0.5, tag: str = NAME) -> None:
    """Run ``jobs`` (those not already complete), ``jobs_at_once`` at a time; ``on_done(job)`` after
    each; progress lines start with ``[tag]``."""
    pending = []
    for job in jobs:
        res = complete(job.out, job.rounds)
        if res is not None:
            job.facts = facts(res)
            print(f"[{tag}] {job.key}: complete, skipped", flush=True)
        else:
            pending.append(job)
    running: list[Job] = []
    env = _env()
    try:
        while pending or running:
            while pending and len(running) < jobs_at_once:
                job = pending.pop(0)
                job.out.mkdir(parents=True, exist_ok=True)
                log = open(job.out.parent / f"{job.key}.log", "ab")  # noqa: SIM115 (closed when the job ends)
                job.started = time.perf_counter()
                job.proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                log.close()
                running.append(job)
                print(f"[{tag}] {job.key}: started", flush=True)
            time.sleep(poll)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                running.remove(job)
                job.wall_seconds = time.perf_counter() - job.started
                res = complete(job.out, job.rounds)
                if rc != 0 or res is None:
                    raise RuntimeError(f"{job.key} failed (exit {rc}); see {job.out.parent / (job.key + '.log')}")
                job.facts = facts(res)
                print(
                    f"[{tag}] {job.key}: final {100 * job.facts['final_accuracy']:.2f}% in {job.wall_seconds:.0f} s",
                    flush=True,
                )
                on_done(job)
    finally:
        for job in running:  # interrupted: stop our own children (they resume from their checkpoints)
            if job.proc is not None and job.proc.poll() is None:
                job.proc.terminate()
                job.proc.wait()


# ------------------------------------------------------------------------------------ tables


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarize(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Means over seeds per method (in points for accuracies)."""
    means = {}
    for label, per_seed in runs.items():
        vals = list(per_seed.values())
        means[label] = {
            "seeds": len(vals),
            "final": _mean([100 * v["final_accuracy"] for v in vals]),
            "last5": _mean([100 * v["last5_accuracy"] for v in vals if v["last5_accuracy"] is not None]),
            "best": _mean([100 * v["best_accuracy"] for v in vals]),
            "virtual_seconds": _mean([v["virtual_seconds"] for v in vals]),
            "wall_seconds": _mean([v.get("wall_seconds") for v in vals]),
        }
    return means


def goals(runs: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's goals, from the means over seeds (final accuracy); ``met`` None when a run is missing."""
    m = summarize(runs)

    def fin(label: str) -> float | None:
        return m[label]["final"] if label in m else None

    out = []
    s, e, f, h = fin("scalefl"), fin("exclusive"), fin("fedavg"), fin("heterofl")

    def row(goal: str, value: str, met: bool | None) -> None:
        out.append({"goal": goal, "value": value, "met": met})

    row(
        "scalefl final accuracy vs exclusive >= +10 points",
        f"{s - e:+.2f} points" if None not in (s, e) else "n/a",
        None if None in (s, e) else s - e >= 10,
    )
    row(
        "scalefl within 3 points of fedavg",
        f"{s - f:+.2f} points" if None not in (s, f) else "n/a",
        None if None in (s, f) else f - s <= 3,
    )
    row(
        "scalefl above heterofl",
        f"{s - h:+.2f} points" if None not in (s, h) else "n/a",
        None if None in (s, h) else s > h,
    )
    for part, label in (("mentor", "scalefl-no-mentor"), ("harmonizer", "scalefl-no-harmonizer")):
        base, abl = runs.get("scalefl", {}), runs.get(label, {})
        seeds = sorted(set(base) & set(abl))
        deltas = [100 * (base[k]["final_accuracy"] - abl[k]["final_accuracy"]) for k in seeds]
        if not deltas:
            row(f"{part}: sign of its effect in every seed", "n/a", None)
            continue
        signs = {(d > 0) - (d < 0) for d in deltas}
        verdict = (
            "helps in every seed"
            if signs == {1}
            else "hurts in every seed"
            if signs == {-1}
            else "mixed sign: noise at this number of seeds"
        )
        row(
            f"{part}: sign of its effect in every seed",
            f"{verdict} ({', '.join(f'{d:+.2f}' for d in deltas)} points, scalefl minus without {part})",
            len(signs) == 1 and 0 not in signs,
        )
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _pts(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def mean_curve(per_seed: dict[str, dict[str, Any]], x: str = "eval_rounds") -> tuple[list[float], list[float]]:
    """The mean over seeds of the accuracy (points) at each evaluation the seeds share.

    ``x`` is ``"eval_rounds"`` or ``"eval_virtual_seconds"`` (then the mean virtual time of that
    evaluation). Seeds of one method evaluate at the same rounds; a shorter seed truncates the curve.
    """
    vals = [v for v in per_seed.values() if v.get(x)]
    if not vals:
        return [], []
    n = min(len(v[x]) for v in vals)
    xs = [statistics.fmean(float(v[x][i]) for v in vals) for i in range(n)]
    ys = [statistics.fmean(100 * v["accuracy_per_eval"][i] for v in vals) for i in range(n)]
    return xs, ys


def plot_accuracy(out: Path, runs: dict[str, dict[str, dict[str, Any]]], title: str) -> Path | None:
    """``out/memory-wall-accuracy.png``: mean accuracy over seeds against rounds and against virtual time."""
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    for label, per_seed in runs.items():
        style = "--" if label.startswith("scalefl-") else "-"
        for ax, x in zip(axes, ("eval_rounds", "eval_virtual_seconds")):
            xs, ys = mean_curve(per_seed, x)
            if xs:
                ax.plot(xs, ys, style, lw=1.4, label=f"{label} ({len(per_seed)} seeds)")
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("virtual time (s)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / f"{NAME}-accuracy.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_nhsic(out: Path, seed: int = 0) -> Path | None:
    """``out/memory-wall-nhsic.png``: the nHSIC plane of the ``scalefl`` run of ``seed``, when complete."""
    from memfl.report.nhsic import has_nhsic, plot_nhsic_plane

    res = _load(out / "runs" / f"scalefl-s{seed}" / "results.json")
    if not res or "summary" not in res or not has_nhsic(res):
        return None
    return plot_nhsic_plane(
        res, out / f"{NAME}-nhsic.png", title=f"nHSIC plane, scalefl seed {seed} (memory-wall regime)"
    )


def write_files(out: Path, summary: dict[str, Any]) -> None:
    """``out/memory-wall.json``, ``out/memory-wall.md`` and the two PNGs from the summary so far."""
    (out / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
    r0 = summary["regime"]["run"]
    acc_png = plot_accuracy(
        out,
        summary["runs"],
        f"memory-wall regime: {r0['model']} w{r0['model_width']}, "
        f"{r0['clients']} clients x {r0.get('samples_per_client', 'all')}",
    )
    nhsic_png = plot_nhsic(out)
    runs, command = summary["runs"], summary["command"]
    lines = [f"Command: `{command}` (each run one torch thread, {summary['jobs']} at once)", ""]
    if summary["quick"]:
        lines += [
            "**`--quick`: a smoke test of the benchmark (40 clients, 20 rounds, one seed, three methods), "
            "not the benchmark; its numbers say nothing about the methods.**",
            "",
        ]
    r = summary["regime"]["run"]
    lines += [
        f"Regime: `{r['model']}` width {r['model_width']} on {r['dataset']}, {r['clients']} clients x "
        f"{r.get('samples_per_client', 'all')} samples, `{r['partition']}`, budgets `{r['budgets']}`, "
        f"{r['per_round']} per "
        f"round, {r['rounds']} rounds (evaluation every {r['eval_every']}); extra flags `{' '.join(summary['flags'])}`"
        f"; done {summary['done']} of {summary['planned']} runs.",
        "",
        "| method | seed | final acc. | last-5 mean | best | virtual s | wall s | fit full training "
        "| eligible per stage: fewest in a round (rounds) | run command |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for label, per_seed in runs.items():
        for seed, v in sorted(per_seed.items(), key=lambda kv: int(kv[0])):
            stages = ", ".join(
                f"{k}: {n} ({v['rounds_per_stage'].get(k, 0)})" for k, n in sorted(v["eligible_per_stage"].items())
            )
            wall = v.get("wall_seconds")
            lines.append(
                f"| {label} | {seed} | {_pct(v['final_accuracy'])} | {_pct(v['last5_accuracy'])} | "
                f"{_pct(v['best_accuracy'])} | {v['virtual_seconds']:.0f} | {'—' if wall is None else f'{wall:.0f}'}"
                f" | {v['fit_full_training']} of {v['clients']} | {stages or '—'} | `{v['command']}` |"
            )
    means = summarize(runs)
    lines += [
        "",
        "Means over seeds (points):",
        "",
        "| method | seeds | final acc. | last-5 mean | best | virtual s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, mm in means.items():
        wall = mm["wall_seconds"]
        lines.append(
            f"| {label} | {mm['seeds']} | {_pts(mm['final'])} | {_pts(mm['last5'])} | {_pts(mm['best'])} | "
            f"{mm['virtual_seconds']:.0f} | {'—' if wall is None else f'{wall:.0f}'} |"
        )
    stage_rows = []
    for label, per_seed in runs.items():
        vals = [v for v in per_seed.values() if v["eligible_per_stage"]]
        if not vals:
            continue
        stages = sorted({k for v in vals for k in v["eligible_per_stage"]}, key=int)
        elig = ", ".join(
            f"{k}: {statistics.fmean(v['eligible_per_stage'][k] for v in vals if k in v['eligible_per_stage']):.0f}"
            for k in stages
        )
        ends = ", ".join(
            f"{k}: {statistics.fmean(100 * v['stage_end_accuracy'][k] for v in vals if k in v['stage_end_accuracy']):.1f}"  # noqa: E501
            for k in stages
            if any(k in v.get("stage_end_accuracy", {}) for v in vals)
        )
        rps = ", ".join(f"{k}: {statistics.fmean(v['rounds_per_stage'].get(k, 0) for v in vals):.0f}" for k in stages)
        stage_rows.append(f"| {label} | {elig} | {rps} | {ends or '—'} |")
    if stage_rows:
        fit = [v["fit_full_training"] for per in runs.values() for v in per.values()]
        n_clients = max(v["clients"] for per in runs.values() for v in per.values())
        lines += [
            "",
            f"Clients eligible per stage (means over seeds; ScaleFL's fewest in a round of that stage) against "
            f"the {statistics.fmean(fit):.1f} of {n_clients} clients whose budgets fit full training "
            "(all that `exclusive` can pick from); accuracy of the model evaluated at the end of each stage "
            "(that stage's exit):",
            "",
            "| method | eligible clients per stage | rounds per stage | accuracy at the end of stage t (%) |",
            "|---|---|---|---|",
            *stage_rows,
        ]
    refs = summary.get("references") or {}
    if refs:
        lines += [
            "",
            f"Centralised references (seed 0, the full model, {REFERENCE_STEPS} SGD steps of the same "
            "[train] settings on the pooled data; `python -m memfl.bench.memory_wall reference CONFIG 0 SUBSET OUT`):",
            "",
            "| data pooled | clients | samples | final acc. | best | accuracy every "
            f"{REFERENCE_STEPS // REFERENCE_EVALS} steps |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for subset, ref in refs.items():
            what = "all clients" if subset == "all" else "clients whose budgets fit full training (exclusive's data)"
            lines.append(
                f"| {what} | {ref['clients']} | {ref['samples']} | {_pct(ref['final_accuracy'])} | "
                f"{_pct(ref['best_accuracy'])} | {', '.join(f'{100 * a:.1f}' for a in ref['accuracy_per_eval'])} |"
            )
    static = summary.get("static_bn") or {}
    if static:
        lines += [
            "",
            "The final global model with its aggregated running BatchNorm statistics (what the runs report) and "
            "with statistics recomputed in one forward pass over the federation's training data (HeteroFL's "
            "static BN, as its authors' code does before testing; a diagnosis, not a deployable step):",
            "",
            "| method | seed | running BN | static BN |",
            "|---|---:|---:|---:|",
        ]
        for label, per_seed in static.items():
            for seed, v in sorted(per_seed.items()):
                lines.append(f"| {label} | {seed} | {_pct(v['running_bn'])} | {_pct(v['static_bn'])} |")
    if acc_png is not None:
        lines += ["", f"![accuracy, mean over seeds]({acc_png.name})"]
    if nhsic_png is not None:
        lines += ["", f"![nHSIC plane]({nhsic_png.name})"]
    lines += [
        "",
        "Goals (issue 10, means over seeds of the final accuracy):",
        "",
        "| goal | value | met |",
        "|---|---|---|",
    ]
    for g in summary["goals"]:
        met = "n/a (runs missing)" if g["met"] is None else ("met" if g["met"] else "not met")
        lines.append(f"| {g['goal']} | {g['value']} | {met} |")
    lines += [
        "",
        f"Wall time: {summary['wall_seconds']:.0f} s this invocation, "
        f"{summary.get('wall_seconds_all_invocations', summary['wall_seconds']):.0f} s over every invocation into "
        f"this folder; {summary['run_wall_seconds']:.0f} s summed over the runs.",
    ]
    if summary.get("estimated_full_wall_seconds"):
        lines.append(
            f"Estimated wall time of the full benchmark (rough: the mean wall time of these runs x "
            f"{REGIME['run']['rounds']} / {r['rounds']} rounds x {len(METHODS) * len(SEEDS)} runs / {summary['jobs']} "
            f"at once): {summary['estimated_full_wall_seconds'] / 60:.0f} min."
        )
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ references

#: SGD steps of each centralised reference (batch 32: ~3.2 epochs over the federation's 20,000 images)
REFERENCE_STEPS = 2000
REFERENCE_EVALS = 8


def centralised(config_file: Path, seed: int, subset: str, steps: int = REFERENCE_STEPS) -> dict[str, Any]:
    """What the full model reaches trained centrally on the federation's data, as a reference.

    subset ``"all"``: the union of all clients' samples (what fedavg could learn if data were pooled);
    ``"fit-full"``: only the clients whose budgets fit full training (all the data ``exclusive`` ever
    sees). The same federation as ``memfl run --config config_file --seed seed`` (same draw, partition
    and budgets), the same optimiser settings ([train]), ``steps`` SGD steps on batches drawn with
    replacement-free shuffles, the test accuracy every ``steps / REFERENCE_EVALS`` steps; returns
    ``{"subset", "samples", "clients", "steps", "accuracy_per_eval", "final_accuracy", "best_accuracy"}``.
    """
    import torch

    from memfl.config import load_config, with_overrides
    from memfl.core.protocol import Plan
    from memfl.core.trainer import evaluate
    from memfl.server.setup import build_federation, load_data, make_context, model_builder

    config = with_overrides(load_config(config_file), {"run.seed": seed, "run.method": "fedavg"})
    data = load_data(config)
    build = model_builder(config, data.input_shape, data.num_classes)
    t = config.train
    full_peak = make_context(config, data.input_shape, data.num_classes, build, example=data.example).peak_fn(Plan())
    clients = build_federation(config, data, full_peak)
    chosen = clients if subset == "all" else [c for c in clients if c.info.budget_bytes >= full_peak]
    if not chosen:
        raise ValueError(f"no client's budget fits full training ({full_peak} bytes) at seed {seed}")
    x = torch.cat([c.x for c in chosen])
    y = torch.cat([c.y for c in chosen])
    torch.manual_seed(seed)
    model = build(Plan())
    # a plain loop, not LocalTrainer: the reference runs a fixed number of steps on one pooled set with
    # evaluations in between, none of which an Instruction (one client's epochs) expresses
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order, pos, accs = torch.randperm(len(x), generator=gen), 0, []
    every = max(1, steps // REFERENCE_EVALS)
    for step in range(1, steps + 1):
        if pos + t.batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + t.batch_size]
        pos += t.batch_size
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step % every == 0 or step == steps:
            accs.append(evaluate(model, data.test_x, data.test_y)[0])
    return {
        "subset": subset,
        "seed": seed,
        "samples": len(x),
        "clients": len(chosen),
        "steps": steps,
        "accuracy_per_eval": accs,
        "final_accuracy": accs[-1],
        "best_accuracy": max(accs),
    }


#: methods whose global model is the plain model (its state-dict keys), for :func:`static_bn_accuracy`
STATIC_BN_METHODS = ("fedavg", "exclusive", "heterofl")


def static_bn_accuracy(config_file: Path, run_dir: Path, seed: int, method: str) -> dict[str, float]:
    """A finished run's final global model evaluated two ways: with the running BatchNorm statistics
    the federation aggregated (what the run reports) and with statistics recomputed by one forward
    pass over the federation's training data (HeteroFL's *static BN*, sBN, as its authors' code does
    before testing). A diagnosis: a server that holds no data cannot do the second in a deployment.
    Returns ``{"running_bn": acc, "static_bn": acc}``."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from memfl.config import load_config, with_overrides
    from memfl.core.protocol import Plan
    from memfl.core.trainer import evaluate
    from memfl.server.setup import client_indices, load_data, model_builder

    config = with_overrides(load_config(config_file), {"run.seed": seed, "run.method": method})
    data = load_data(config)
    model = model_builder(config, data.input_shape, data.num_classes)(Plan())
    model.load_state_dict(load_file(str(run_dir / "checkpoint.safetensors")))
    running = evaluate(model, data.test_x, data.test_y)[0]
    idx = torch.as_tensor(np.concatenate(client_indices(config, data.train_y.numpy())), dtype=torch.long)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
    model.train()
    with torch.no_grad():
        for lo in range(0, len(idx), 500):
            model(data.train_x[idx[lo : lo + 500]])
    return {"running_bn": running, "static_bn": evaluate(model, data.test_x, data.test_y)[0]}


def references(out: Path, config: Path, seed: int = 0, subsets: tuple[str, ...] = ("all", "fit-full")) -> dict:
    """:func:`centralised` for each subset, as one-thread subprocesses side by side; cached in
    ``out/references/SUBSET-sSEED.json`` (a finished reference is not run again)."""
    folder = out / "references"
    folder.mkdir(parents=True, exist_ok=True)
    procs = {}
    for subset in subsets:
        path = folder / f"{subset}-s{seed}.json"
        if _load(path) is None:
            argv = [sys.executable, "-m", "memfl.bench.memory_wall", "reference", str(config), str(seed), subset]
            argv.append(str(path))
            print(f"[{NAME}] reference {subset}-s{seed}: started", flush=True)
            procs[subset] = subprocess.Popen(argv, env=_env())
    for subset, proc in procs.items():
        if proc.wait() != 0:
            print(f"[{NAME}] reference {subset}-s{seed} failed (exit {proc.returncode})", flush=True)
    return {s: r for s in subsets if (r := _load(folder / f"{s}-s{seed}.json")) is not None}


# ------------------------------------------------------------------------------------ entry


def _toml(cfg: dict[str, dict[str, Any]]) -> str:
    """A flat two-level TOML (sections of scalars), enough for :data:`REGIME`."""
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def run_bench(
    out: Path,
    *,
    config: Path | None,
    flags: list[str],
    methods: tuple[str, ...],
    seeds: tuple[int, ...],
    regime: dict[str, Any],
    command: str,
    quick: bool = False,
    jobs_at_once: int = JOBS,
    with_references: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """The scheduler and the tables; :func:`run` and the tests call it with their own regime."""
    t0 = time.perf_counter()
    rounds = int(regime["run"]["rounds"])
    jobs = make_jobs(out, config, flags, methods, seeds, rounds)
    before = _load(out / f"{NAME}.json") or {}
    previous = before.get("runs", {})
    earlier_wall = float(before.get("wall_seconds_all_invocations", before.get("wall_seconds", 0.0)))

    def build() -> dict[str, Any]:
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        for job in jobs:
            if job.facts is None:
                continue
            wall = job.wall_seconds
            if wall is None:  # skipped: the wall time a previous invocation measured
                wall = previous.get(job.label, {}).get(str(job.seed), {}).get("wall_seconds")
            if wall is None:  # run outside this folder's scheduler: the run's own wall time
                wall = job.facts.get("run_wall_seconds")
            cmd = " ".join(["memfl", *job.argv[3:]])
            runs.setdefault(job.label, {})[str(job.seed)] = {**job.facts, "wall_seconds": wall, "command": cmd}
        timed = [v["wall_seconds"] for per in runs.values() for v in per.values() if v["wall_seconds"] is not None]
        summary = {
            "command": command,
            "quick": quick,
            "regime": regime,
            "flags": flags,
            "methods": list(methods),
            "seeds": list(seeds),
            "jobs": jobs_at_once,
            "planned": len(jobs),
            "done": sum(j.facts is not None for j in jobs),
            "runs": runs,
            "means": summarize(runs),
            "goals": goals(runs),
            "wall_seconds": time.perf_counter() - t0,
            "wall_seconds_all_invocations": earlier_wall + time.perf_counter() - t0,
            "run_wall_seconds": sum(timed),
        }
        if quick and timed:  # full = 7 methods x 3 seeds, 10x the rounds (same clients per round and test set)
            scale = REGIME["run"]["rounds"] / rounds
            per_run = statistics.fmean(timed) * scale
            summary["estimated_full_wall_seconds"] = per_run * len(METHODS) * len(SEEDS) / jobs_at_once
        return summary

    def on_done(_job: Job) -> None:
        write_files(out, build())

    if report_only:  # the complete runs only
        for job in jobs:
            res = complete(job.out, job.rounds)
            if res is not None:
                job.facts = facts(res)
    else:
        schedule(jobs, on_done, jobs_at_once)
    summary = build()
    if with_references and config is not None:
        summary["references"] = references(out, config)
        static: dict[str, dict[str, dict[str, float]]] = {}
        for job in jobs:
            if job.facts is not None and job.label in STATIC_BN_METHODS:
                print(f"[{NAME}] static BN: {job.key}", flush=True)
                static.setdefault(job.label, {})[str(job.seed)] = static_bn_accuracy(
                    config, job.out, job.seed, METHODS[job.label][0]
                )
        summary["static_bn"] = static
    write_files(out, summary)
    return summary


def run(out: Path, quick: bool, methods: list[str] | None = None, report_only: bool = False) -> dict[str, Any]:
    """The benchmark (``--quick``: the smoke variant); ``methods``: a subset of :data:`METHODS`;
    ``report_only``: start no run, tabulate the complete ones (then the references, unless quick)."""
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise ValueError(f"memory-wall: unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    config = regime_config()
    regime = json.loads(json.dumps(REGIME))
    flags: list[str] = []
    if config is None:  # no repository around the package: the embedded regime as a config file
        config = out / f"{NAME}.toml"
        config.write_text(_toml(REGIME))
    if quick:
        flags += QUICK_FLAGS
        regime["run"].update(clients=40, rounds=20)
    return run_bench(
        out,
        config=config,
        flags=flags,
        methods=tuple(m for m in METHODS if m in methods) if methods else (QUICK_METHODS if quick else tuple(METHODS)),
        seeds=(0,) if quick else SEEDS,
        regime=regime,
        command=f"memfl bench {NAME} --out {out}"
        + (" --quick" if quick else "")
        + (f" --methods {','.join(methods)}" if methods else ""),
        quick=quick,
        with_references=not quick and (report_only or not methods),
        report_only=report_only,
    )


if __name__ == "__main__":  # python -m memfl.bench.memory_wall reference CONFIG SEED SUBSET OUT.json
    if len(sys.argv) != 6 or sys.argv[1] != "reference":
        raise SystemExit("usage: python -m memfl.bench.memory_wall reference CONFIG SEED SUBSET OUT.json")
    t0 = time.perf_counter()
    ref = centralised(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    ref["wall_seconds"] = time.perf_counter() - t0
    Path(sys.argv[5]).write_text(json.dumps(ref, indent=1))
