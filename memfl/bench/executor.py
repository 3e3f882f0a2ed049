"""Benchmark ``executor``: round time with 1 and 2 (or more) worker processes on the same clients.

The job: FedAvg, ``cnn`` width 0.5, Fashion-MNIST, 100 clients Dir(0.5), 10 per round,
test-set evaluation every round. Each executor runs the same rounds (the same seed: the same
clients, batches and plans) in a fresh subprocess, one after the other in this one invocation:

- ``1 worker``: today's in-process executor, with all the cores' torch threads;
- ``1 worker, T threads``: the same at the workers' thread count ``T = cores / N`` (the reference
  the pool must match bit for bit, and the bound on what N workers can gain on N x T cores);
- ``N workers`` (``--workers N``): N forked workers with cores / N threads each, the evaluation
  split over them.

Per executor: the median round time (wall, evaluation included), its training part
(``run_seconds``) and evaluation part, the whole job, and the peak memory of all its processes
together (sampled every 0.1 s: the sum of RSS, which counts the shared dataset once per process,
and the sum of PSS, which splits shared pages between them). Also: the largest parameter
difference between the final models (N workers vs each sequential run), what an enforced budget
costs per training step (``RLIMIT_DATA`` alone, and with glibc's mmap threshold fixed at 64 KiB as
:mod:`memfl.runtime.pool` does under a cap), and how many clients survive
an enforced budget of k x their predicted peak (``CAP_MULTIPLES``). The machine's
load average is recorded before and after: other jobs on the machine slow the parallel executor
more than the sequential one.

When Flower's simulation engine is installed (``pip install "flwr[simulation]==1.41.0"``: ray
2.55.1 and six small packages, torch unchanged; not a memfl dependency), a third run does the same
job on it: memfl's own ServerApp and ClientApp (the same trainer, the same clients' data) under
``flwr.simulation.run_simulation`` with one one-CPU actor per core and the driver (the ServerApp's
evaluation, while the actors wait) on every core
(:mod:`memfl.runtime.flower.simulation`); its memory is the same process-tree sum (the driver, Ray's
workers and its raylet / GCS processes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from memfl.core.trainer import EVAL_BATCH_SIZE
from memfl.runtime.pool import CAP_MMAP_THRESHOLD

FMNIST = "/usr/share/datasets/fashion-mnist"
#: budgets of the enforced-cap probe, as multiples of the predicted full-training peak
CAP_MULTIPLES = (1.0, 1.25, 1.5, 2.0, 3.0)

_RUN = r"""
import json, sys, torch
from memfl.config import build_config
from memfl.runtime.sim import run_experiment
cfg = build_config(json.loads(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))
res = run_experiment(cfg, progress=False)
keys = ("round", "accuracy", "loss", "round_seconds", "timing")
json.dump({"rounds": [{k: r[k] for k in keys} for r in res["rounds"]]}, open(sys.argv[3], "w"))
"""

_RUN_FLOWER_SIM = r"""
import json, sys, torch
from memfl.config import build_config
from memfl.runtime.flower.simulation import run
cfg = build_config(json.loads(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))  # the driver (the ServerApp's evaluation): every core
run(cfg, cpus_per_node=1.0)
res = json.load(open(cfg.run.out + "/results.json"))
keys = ("round", "accuracy", "loss", "round_seconds", "timing")
json.dump({"rounds": [{k: r.get(k) for k in keys} for r in res["rounds"]]}, open(sys.argv[3], "w"))
"""

_STEP = r"""
import ctypes, json, resource, sys, time, torch
from torch.nn import functional as F
from memfl.models import build_model
torch.set_num_threads(1)
enforce = sys.argv[1] != "0"
if sys.argv[1] == "2":
    ctypes.CDLL("libc.so.6").mallopt(-3, int(sys.argv[3]))  # M_MMAP_THRESHOLD, as the pool under a cap
model = build_model("cnn", in_channels=1, num_classes=10, image_size=28, width=0.5)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
def step():
    opt.zero_grad(set_to_none=True); F.cross_entropy(model(x), y).backward(); opt.step()
for _ in range(10): step()
if enforce:
    data = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData")][0]
    resource.setrlimit(resource.RLIMIT_DATA, (data + 512 * 2**20, resource.RLIM_INFINITY))
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


_EVAL = r"""
import ctypes, json, statistics, sys, time, torch
from memfl.core.trainer import EVAL_BATCH_SIZE, evaluate
from memfl.data import load_dataset
from memfl.models import build_model
from memfl.runtime.procfs import reset_peak_rss, status_bytes
torch.set_num_threads(int(sys.argv[1]))
test = load_dataset("fashion-mnist", data_dir=sys.argv[2])
x, y = test.test_x, test.test_y
model = build_model("cnn", in_channels=1, num_classes=10, image_size=28, width=0.5)
sizes = (1000, EVAL_BATCH_SIZE)
for b in sizes:
    evaluate(model, x[:b], y[:b], batch_size=b)  # warm-up: first-call kernels and pages
out = {b: {"seconds": [], "peak_bytes": 0} for b in sizes}
for _ in range(int(sys.argv[3])):  # interleaved: drift hits both sizes alike
    for b in sizes:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the other size's freed blocks would hide this peak
        before = reset_peak_rss()
        t = time.perf_counter(); evaluate(model, x, y, batch_size=b); out[b]["seconds"].append(time.perf_counter() - t)
        out[b]["peak_bytes"] = max(out[b]["peak_bytes"], (status_bytes("VmHWM") or 0) - (before or 0))
res = {str(b): {"seconds": statistics.median(v["seconds"]), "peak_bytes": v["peak_bytes"]} for b, v in out.items()}
print(json.dumps(res))
"""


def _eval_cost(threads: int, reps: int) -> dict[str, Any]:
    """The test-set evaluation (10000 images, cnn width 0.5) in batches of 1000 and of
    :data:`memfl.core.trainer.EVAL_BATCH_SIZE`, at ``threads`` threads, in a fresh process:
    median seconds and the RSS peak above the process before it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    text = subprocess.run(
        [sys.executable, "-c", _EVAL, str(threads), FMNIST, str(reps)],
        env=env,
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return json.loads(text.strip().splitlines()[-1])


_CAP = r"""
import json, sys, torch
if len(sys.argv) > 3:  # another fixed mmap threshold under the cap (threshold_sweep)
    import memfl.runtime.pool
    memfl.runtime.pool.CAP_MMAP_THRESHOLD = int(sys.argv[3])
from memfl.config import build_config
from memfl.runtime.sim import run_experiment
cfg = build_config(json.loads(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))
res = run_experiment(cfg, progress=False)
keys = ("id", "status", "budget_bytes", "measured_peak_bytes", "error")
print(json.dumps({"full_peak_bytes": res["full_peak_bytes"],
                  "clients": [{k: c.get(k) for k in keys} for c in res["rounds"][0]["clients"]]}))
"""


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _rollup(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def _run_one(
    config: dict[str, Any], threads: int, work: Path, program: str = _RUN, driver_threads: int | None = None
) -> dict[str, Any]:
    """One executor in a fresh subprocess (``OMP_NUM_THREADS=threads``; its main process then takes
    ``driver_threads``, default ``threads``); its rounds, wall time and peak memory of its processes."""
    out = work / "rounds.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", program, json.dumps(config), str(driver_threads or threads), str(out)],
        env=env,
        stderr=subprocess.PIPE,
    )
    peak = {"rss": 0, "pss": 0, "processes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            pids = _tree(proc.pid)
            vals = [_rollup(p) for p in pids]
            peak["rss"] = max(peak["rss"], sum(v[0] for v in vals))
            peak["pss"] = max(peak["pss"], sum(v[1] for v in vals))
            peak["processes"] = max(peak["processes"], len(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark run failed:\n{err.decode()[-2000:]}")
    rounds = json.loads(out.read_text())["rounds"]
    return {
        "job_seconds": time.perf_counter() - t0,
        "rounds": rounds,
        "peak_rss_sum_bytes": peak["rss"],
        "peak_pss_sum_bytes": peak["pss"],
        "processes": peak["processes"],
    }


def _step_median(flag: str, steps: int, mmap_threshold: int = CAP_MMAP_THRESHOLD) -> float:
    """Median seconds of ``steps`` training steps (cnn 0.5, batch 32, 1 thread) in a fresh process:
    ``flag`` "0" no cap, "1" an RLIMIT_DATA cap, "2" the cap and ``mmap_threshold`` fixed."""
    text = subprocess.run(
        [sys.executable, "-c", _STEP, flag, str(steps), str(mmap_threshold)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return statistics.median(json.loads(text.strip().splitlines()[-1]))


def _step_cost(steps: int) -> dict[str, Any]:
    variants = (
        ("no cap", "0"),
        ("RLIMIT_DATA cap alone", "1"),
        ("cap + mmap threshold fixed at 64 KiB (what enforce_budgets does)", "2"),
    )
    return {name: _step_median(flag, steps) for name, flag in variants}


def _job(rounds: int) -> dict[str, Any]:
    """The benchmark's FedAvg job (cnn 0.5, Fashion-MNIST, 100 clients Dir(0.5), 10 per round,
    evaluation every round) as a config dict, ``rounds`` rounds."""
    return {
        "run": {
            "method": "fedavg",
            "model": "cnn",
            "model_width": 0.5,
            "dataset": "fashion-mnist",
            "data_dir": FMNIST,
            "clients": 100,
            "per_round": 10,
            "rounds": rounds,
            "partition": "dirichlet:0.5",
            "seed": 0,
            "eval_every": 1,
        },
    }


def _cap_needed(
    config: dict[str, Any],
    work: Path,
    workers: int,
    cores: int,
    multiples: tuple[float, ...] = CAP_MULTIPLES,
    mmap_threshold: int | None = None,
) -> dict[str, Any]:
    """Under ``enforce_budgets``, how many of one round's 10 clients finish their full-plan training
    when every client's budget is ``k`` x the predicted full-training peak, for each ``k`` of
    ``multiples``: the pool itself (``workers`` workers), one fresh run per ``k``.
    ``mmap_threshold``: the pool's fixed glibc mmap threshold (None: its own, 64 KiB)."""
    out: dict[str, Any] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
    extra = [] if mmap_threshold is None else [str(mmap_threshold)]
    for k in multiples:
        cfg = json.loads(json.dumps(config))
        cfg["run"].update(
            rounds=1, budgets=f"relative:{k}-{k}", enforce_budgets=True, workers=workers, out=str(work / f"cap-{k}")
        )
        text = subprocess.run(
            [sys.executable, "-c", _CAP, json.dumps(cfg), str(cores), *extra],
            env=env,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        res = json.loads(text.strip().splitlines()[-1])
        clients = res["clients"]
        ok = [c for c in clients if c["status"] == "ok"]
        peaks = [c["measured_peak_bytes"] for c in ok if c.get("measured_peak_bytes")]
        out[str(k)] = {
            "budget_x_predicted": k,
            "predicted_peak_bytes": res["full_peak_bytes"],
            "clients": len(clients),
            "ok": len(ok),
            "oom": sum(c["status"] == "oom" for c in clients),
            "max_measured_rss_x_predicted": max(peaks) / res["full_peak_bytes"] if peaks else None,
            "errors": sorted({(c.get("error") or "")[:70] for c in clients if c["status"] != "ok"}),
        }
    return out


def threshold_sweep(
    thresholds: tuple[int, ...] = (65536, 262144, 1048576, 4194304),
    multiples: tuple[float, ...] = (1.0, 1.1, 1.25, 1.5),
    steps: int = 60,
    reps: int = 3,
    workers: int = 2,
) -> dict[str, Any]:
    """Why the pool fixes glibc's mmap threshold at 64 KiB under enforced budgets: for each fixed
    threshold, the median training step (cnn 0.5, batch 32, 1 thread, under a cap; ``reps`` fresh
    processes interleaved with an uncapped one, ``steps`` steps each) and the clients of one
    round that finish under budgets of ``k`` x the predicted peak (:func:`_cap_needed`).
    Run as ``python -c "from memfl.bench.executor import threshold_sweep; threshold_sweep()"``
    (~9 minutes on 2 cores); prints its table and returns the numbers."""
    cores = len(os.sched_getaffinity(0))
    times: dict[str, list[float]] = {"no cap": [], **{str(t): [] for t in thresholds}}
    for _ in range(reps):  # interleaved: drift hits every variant alike
        for name in times:
            times[name].append(_step_median("0", steps) if name == "no cap" else _step_median("2", steps, int(name)))
    step = {name: statistics.median(v) for name, v in times.items()}
    base = _job(1)
    caps = {}
    with tempfile.TemporaryDirectory(prefix="memfl-bench-threshold-") as tmp:
        for t in thresholds:
            caps[str(t)] = _cap_needed(base, Path(tmp) / str(t), workers, cores, multiples, mmap_threshold=t)
    lines = [
        "| mmap threshold | step ms (x no cap) | " + " | ".join(f"ok at {k}x" for k in multiples) + " |",
        "|---|---|" + "---|" * len(multiples),
    ]
    for t in thresholds:
        c = caps[str(t)]
        oks = " | ".join(f"{c[str(k)]['ok']}/{c[str(k)]['clients']}" for k in multiples)
        kib = f"{t // 1024} KiB" if t < 2**20 else f"{t // 2**20} MiB"
        lines.append(f"| {kib} | {1000 * step[str(t)]:.1f} ({step[str(t)] / step['no cap']:.2f}x) | {oks} |")
    lines.append(f"\nno cap: {1000 * step['no cap']:.1f} ms per step")
    print("\n".join(lines))
    return {"step_seconds": step, "cap_needed": caps, "table": "\n".join(lines)}


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def run(out: Path, quick: bool = False, workers: int = 2, log: Any = print) -> dict[str, Any]:
    from safetensors.torch import load_file

    cores = len(os.sched_getaffinity(0))
    rounds = 2 if quick else 5
    per_worker = max(1, cores // workers)
    base = _job(rounds)
    load_before = os.getloadavg()
    one = "1 worker (in process)"
    matched = f"1 worker, {per_worker} thread{'s' if per_worker > 1 else ''} (in process)"
    pool = f"{workers} workers"
    # (name, [run] workers, threads of the process, threads per worker)
    variants = [(one, 1, cores, cores), (pool, workers, cores, per_worker)]
    if per_worker != cores:  # the sequential run at the pool's per-worker thread count
        variants.insert(1, (matched, 1, per_worker, per_worker))
    results: dict[str, Any] = {}
    finals = {}
    with tempfile.TemporaryDirectory(prefix="memfl-bench-executor-") as tmp:
        for name, w, threads, tpw in variants:
            log(f"executor bench: {name}, {rounds} rounds ...")
            work = Path(tmp) / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            work.mkdir()
            cfg = json.loads(json.dumps(base))
            cfg["run"].update(workers=w, out=str(work / "run"))
            r = _run_one(cfg, threads, work)
            r.update(workers=w, threads_per_worker=tpw)
            results[name] = r
            finals[name] = load_file(str(work / "run" / "checkpoint.safetensors"))
        flower = None
        if importlib.util.find_spec("ray") is not None and importlib.util.find_spec("flwr") is not None:
            log(f"executor bench: Flower simulation engine, {cores} one-CPU actors ...")
            work = Path(tmp) / "flower-sim"
            work.mkdir()
            cfg = json.loads(json.dumps(base))
            cfg["run"].update(workers=1, out=str(work / "run"))
            flower = _run_one(cfg, 1, work, program=_RUN_FLOWER_SIM, driver_threads=cores)
            flower.update(workers=cores, threads_per_worker=1)
            results[f"Flower simulation ({cores} one-CPU actors)"] = flower  # its row: the last
        log("executor bench: the enforced cap a warm worker needs ...")
        cap_cfg = json.loads(json.dumps(base))
        cap_cfg["run"].update(out=str(Path(tmp) / "cap"))
        cap = _cap_needed(cap_cfg, Path(tmp), workers, cores)
    load_after = os.getloadavg()

    def diff(a: str, b: str) -> float:
        pa, pb = finals[a], finals[b]
        return max(float((pa[k].double() - pb[k].double()).abs().max()) for k in pa if pa[k].is_floating_point())

    max_diff = diff(one, pool)
    matched_diff = diff(matched, pool) if matched in finals else None
    max_ref = max(float(t.double().abs().max()) for t in finals[one].values() if t.is_floating_point())
    log("executor bench: step cost of a cap ...")
    step = _step_cost(100 if quick else 300)
    log("executor bench: evaluation batch ...")
    eval_cost = {f"{t} thread{'s' if t > 1 else ''}": _eval_cost(t, 2 if quick else 4) for t in sorted({1, cores})}

    def median(r: dict[str, Any], key: str | None) -> float | None:
        vals = [x["round_seconds"] if key is None else (x.get("timing") or {}).get(key) for x in r["rounds"]]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    rows = {}
    for name, r in results.items():
        rows[name] = {
            "executor": name,
            "workers": r["workers"],
            "threads_per_worker": r["threads_per_worker"],
            "round_seconds": median(r, None),
            "train_seconds": median(r, "run_seconds"),
            "evaluate_seconds": median(r, "evaluate_seconds"),
            "job_seconds": r["job_seconds"],
            "peak_rss_sum_mb": r["peak_rss_sum_bytes"] / 2**20,
            "peak_pss_sum_mb": r["peak_pss_sum_bytes"] / 2**20,
            "accuracy": [x["accuracy"] for x in r["rounds"]],
        }
    par, seq = rows[pool], rows[one]
    ratio = par["round_seconds"] / seq["round_seconds"]
    ratio_matched = par["round_seconds"] / rows[matched]["round_seconds"] if matched in rows else None
    thread_gain = rows[matched]["round_seconds"] / seq["round_seconds"] if matched in rows else None
    vs_flower = None
    if flower is not None:
        fl = list(rows.values())[-1]
        vs_flower = {
            "round": par["round_seconds"] / fl["round_seconds"],
            "job": par["job_seconds"] / fl["job_seconds"],
            "pss": par["peak_pss_sum_mb"] / fl["peak_pss_sum_mb"],
            "rss": par["peak_rss_sum_mb"] / fl["peak_rss_sum_mb"],
        }
    summary = {
        "cores": cores,
        "rounds": rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": list(rows.values()),
        "ratio_round": ratio,
        "ratio_train": par["train_seconds"] / seq["train_seconds"],
        "ratio_round_vs_matched_threads": ratio_matched,
        "sequential_thread_gain": thread_gain,
        "goal": "<= 0.6x the round time with 2 workers",
        "max_abs_param_diff": max_diff,
        "max_abs_param_diff_matched_threads": matched_diff,
        "same_accuracy_matched_threads": rows[matched]["accuracy"] == par["accuracy"] if matched in rows else None,
        "max_abs_param": max_ref,
        "step_seconds": step,
        "eval_batch": eval_cost,
        "cap_needed": cap,
        "flower_simulation": vs_flower
        if vs_flower is not None
        else "not installed (pip install 'flwr[simulation]==1.41.0' adds ray 2.55.1; torch unchanged)",
        "raw": results,
    }
    (out / "executor.json").write_text(json.dumps(summary, indent=1))
    cmd = f"memfl bench executor{' --quick' if quick else ''}"
    lines = [
        "## memfl bench executor",
        "",
        f"`{cmd}`: FedAvg, cnn width 0.5, Fashion-MNIST, 100 clients Dir(0.5), 10 per round, {rounds} "
        f"rounds, evaluation every round; {cores} cores; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (1-min).",
        "",
        "| executor | threads / worker | round s (median) | training s | evaluation s | job s | "
        "peak RSS sum MB | peak PSS sum MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['executor']} | {r['threads_per_worker']} | {r['round_seconds']:.2f} | {_f(r['train_seconds'])} | "
            f"{_f(r['evaluate_seconds'])} | {r['job_seconds']:.1f} | {r['peak_rss_sum_mb']:.0f} | "
            f"{r['peak_pss_sum_mb']:.0f} |"
        )
    lines += [
        "",
        f"Round time {workers} workers / 1 worker with all {cores} threads: **{ratio:.2f}x** (goal <= 0.6x); "
        f"training part {summary['ratio_train']:.2f}x.",
    ]
    if matched in rows:
        lines += [
            f"Against the sequential run at the workers' {per_worker} thread(s): {ratio_matched:.2f}x "
            f"(ideal {1 / workers:.2f}x). The sequential run at {per_worker} thread(s) takes {thread_gain:.2f}x "
            f"the {cores}-thread one, so {workers} workers can at best reach {thread_gain / workers:.2f}x the "
            f"{cores}-thread run on {cores} cores.",
            "",
            f"Final parameters, {workers} workers vs the sequential run at the same thread count: max "
            f"difference **{matched_diff:.1e}**, per-round accuracies "
            f"{'identical' if summary['same_accuracy_matched_threads'] else 'DIFFERENT'}; vs the sequential "
            f"run with {cores} threads: {max_diff:.2e} (largest parameter {max_ref:.2f}: another thread count "
            f"sums conv gradients in another order, and training amplifies it).",
        ]
    lines += [
        "",
        "Per training step (cnn 0.5, batch 32, 1 thread, median): "
        + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in step.items())
        + ".",
        "",
        "Test-set evaluation (10000 images, cnn 0.5, median; batch 1000 against the batch "
        f"{EVAL_BATCH_SIZE} memfl uses): "
        + "; ".join(
            f"{t}: "
            + ", ".join(f"batch {b} {v['seconds']:.2f} s, {v['peak_bytes'] / 2**20:.0f} MiB peak" for b, v in c.items())
            for t, c in eval_cost.items()
        )
        + ".",
        "",
        f"Enforced budgets ({workers} workers, one round of 10 clients, full plans, every client's budget "
        "k x the predicted full-training peak):",
        "",
        "| k | predicted peak MB | ok | oom | largest measured RSS peak of an ok client (x predicted) |",
        "|---|---|---|---|---|",
    ]
    for c in cap.values():
        lines.append(
            f"| {c['budget_x_predicted']:g} | {c['predicted_peak_bytes'] / 2**20:.2f} | {c['ok']}/{c['clients']} | "
            f"{c['oom']} | {_f(c['max_measured_rss_x_predicted'])} |"
        )
    lines += [
        "",
        (
            f"Against Flower's simulation engine (memfl's own ServerApp/ClientApp under run_simulation, {cores} "
            f"one-CPU actors, the driver's evaluation on {cores} threads), {workers} workers take "
            f"**{vs_flower['round']:.2f}x** its median round time (goal <= 0.6x), {vs_flower['job']:.2f}x its "
            f"job time, and **{vs_flower['pss']:.2f}x** its peak PSS sum ({vs_flower['rss']:.2f}x RSS sum; "
            f"goal <= 0.5x)."
            if vs_flower is not None
            else 'Flower\'s simulation engine: not installed (`pip install "flwr[simulation]==1.41.0"` adds '
            "ray 2.55.1 and six packages, torch unchanged); not compared."
        ),
    ]
    (out / "executor.md").write_text("\n".join(lines) + "\n")
    return {k: v for k, v in summary.items() if k != "raw"}
