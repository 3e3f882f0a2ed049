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
    return {
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


def schedule(jobs: list[Job], on_done, jobs_at_once: int = JOBS, poll: float = 0.5) -> None:
    """Run ``jobs`` (those not already complete), ``jobs_at_once`` at a time; ``on_done(job)`` after each."""
    pending = []
    for job in jobs:
        res = complete(job.out, job.rounds)
        if res is not None:
            job.facts = facts(res)
            print(f"[{NAME}] {job.key}: complete, skipped", flush=True)
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
                print(f"[{NAME}] {job.key}: started", flush=True)
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
                    f"[{NAME}] {job.key}: final {100 * job.facts['final_accuracy']:.2f}% in {job.wall_seconds:.0f} s",
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


def write_files(out: Path, summary: dict[str, Any]) -> None:
    """``out/memory-wall.json`` and ``out/memory-wall.md`` from the summary so far."""
    (out / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
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

    schedule(jobs, on_done, jobs_at_once)
    summary = build()
    write_files(out, summary)
    return summary


def run(out: Path, quick: bool) -> dict[str, Any]:
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
        methods=QUICK_METHODS if quick else tuple(METHODS),
        seeds=(0,) if quick else SEEDS,
        regime=regime,
        command=f"memfl bench {NAME} --out {out}" + (" --quick" if quick else ""),
        quick=quick,
    )
