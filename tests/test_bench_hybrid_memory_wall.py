"""``memfl bench hybrid-memory-wall``: the jobs, the two clocks, the targets and the tables, on real
tiny runs (the same ``python -m memfl.cli run`` subprocesses as the benchmark, synthetic data, a
small cnn, a few rounds), and the regime file against the embedded one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memfl.bench import BENCHMARKS
from memfl.bench.hybrid import memory_wall as hmw

TINY = {
    "run": {
        "model": "cnn",
        "model_width": 0.25,
        "dataset": "synthetic",
        "clients": 8,
        "per_round": 4,
        "rounds": 3,
        "eval_every": 1,
        "budgets": "relative:0.6-1.3",
        "partition": "iid",
        "round_deadline": "2x",
    },
    "train": {"local_epochs": 1, "batch_size": 16, "max_steps": 2, "lr": 0.05},
    "fedhybrid": {"contention": True},
}


def test_regime_matches_the_config_file_and_the_issue():
    assert BENCHMARKS["hybrid-memory-wall"] == "memfl.bench.hybrid.memory_wall"
    r = hmw.regime_config()  # asserts the file equals REGIME
    assert r["run"]["rounds"] >= 150 and r["run"]["round_deadline"] == "2x" and r["fedhybrid"]["contention"]
    for key in ("model", "model_width", "dataset", "clients", "samples_per_client", "partition", "per_round"):
        assert r["run"][key] == hmw.mw.REGIME["run"][key], key  # the ScaleFL memory-wall regime's
    assert set(hmw.QUICK_METHODS) <= set(hmw.METHODS) and set(hmw.COST_CLASS) == set(hmw.ALL)
    assert hmw.variant_config(r, "fedavg")["fedhybrid"]["contention"] is False
    assert hmw.variant_config(r, "oort-unaware")["fedhybrid"]["baseline_memory"] == "unaware"
    for base in ("random", "oort", "oort+fedprox"):
        assert {base, f"{base}-unaware"} <= set(hmw.METHODS)


def test_targets_follow_the_fixed_rule():
    runs = {"fedavg": {"0": {"last5_accuracy": 0.80}, "1": {"last5_accuracy": 0.84}}}
    tg = hmw.targets(runs)
    assert tg["plateau"] == pytest.approx(82.0) and tg["points"] == [72.0, 76.0, 79.0]
    assert hmw.targets({}) is None


def test_time_to_target_and_censored_means():
    v = {
        "accuracy_per_eval": [0.5, 0.7, 0.8],
        "virtual_per_eval": [10.0, 20.0, 30.0],
        "nodeadline_per_eval": [5.0, 9.0, 12.0],
        "virtual_seconds": 30.0,
        "nodeadline_seconds": 12.0,
    }
    assert hmw.time_to(v, 0.7, "virtual") == 20.0 and hmw.time_to(v, 0.7, "nodeadline") == 9.0
    assert hmw.time_to(v, 0.9, "virtual") is None
    m = hmw.mean_time({"0": v, "1": {**v, "accuracy_per_eval": [0.1, 0.2, 0.3]}}, 70.0, "virtual")
    assert m == {"mean": 25.0, "reached": 1, "seeds": 2, "censored": True}
    means = {
        "fedhybrid": {"time_to": {"70.00": {"virtual": {"mean": 10.0, "censored": False}}}},
        "random-unaware": {"time_to": {"70.00": {"virtual": {"mean": 40.0, "censored": True}}}},
    }
    assert hmw.speedup(means, "random-unaware", "70.00", "virtual") == {"value": 4.0, "bound": ">="}


def test_bench_runs_tables_two_clocks_and_resume(tmp_path: Path, capsys):
    out = tmp_path / "bench"
    kw = dict(regime=TINY, seeds=(0,), command="test", measure=False, jobs_at_once=2, quick=True)
    first = hmw.run_bench(out, methods=("fedavg", "random-unaware"), **kw)
    assert first["done"] == first["planned"] == 2
    on_disk = json.loads((out / f"{hmw.NAME}.json").read_text())
    assert set(on_disk["runs"]) == {"fedavg", "random-unaware"}
    cfg = (out / "configs" / "fedavg.toml").read_text()
    assert 'method = "fedavg"' in cfg and "contention = false" in cfg
    un = on_disk["runs"]["random-unaware"]["0"]
    assert len(un["accuracy_per_eval"]) == 3 and un["statuses"].get("oom", 0) > 0
    # the deadline only lengthens rounds with a killed client: both clocks from one run
    assert un["virtual_seconds"] > un["nodeadline_seconds"] > 0
    assert all(a >= b for a, b in zip(un["virtual_per_eval"], un["nodeadline_per_eval"]))
    tg = on_disk["targets"]
    assert tg["points"] == [round(tg["plateau"] - d, 2) for d in (10, 6, 3)]
    assert "time_to" in on_disk["means"]["fedavg"]
    md = (out / f"{hmw.NAME}.md").read_text()
    assert "| random-unaware | 0 |" in md and "Goals" in md and "n/a (runs missing)" in md
    assert (out / f"{hmw.NAME}.png").stat().st_size > 0
    # started again: the complete runs are skipped (scheduler and resume are memory-wall's, tested
    # there with a new run added), the tables rebuilt from their results with the same numbers
    capsys.readouterr()
    second = hmw.run_bench(out, methods=("fedavg", "random-unaware"), **kw)
    log = capsys.readouterr().out
    assert "fedavg-s0: complete, skipped" in log and "started" not in log
    assert second["done"] == 2 and second["runs"]["fedavg"]["0"]["wall_seconds"] is not None
    assert second["runs"]["random-unaware"]["0"]["virtual_per_eval"] == un["virtual_per_eval"]
    goal = {g["goal"]: g for g in second["goals"]}
    assert goal["final accuracy vs oort+fedprox: >= +3 points"]["met"] is None  # no fedhybrid run


def test_measured_violations_count_measured_plans_only():
    f = {"plan_uses": {"a": [100, 90], "b": [50]}, "plan_peaks": {"a": 80, "b": 49}}
    assert hmw.measured_violations(f, {}) is None
    assert hmw.measured_violations(f, {"a": 95}) == 1 and hmw.measured_uses(f, {"a": 95}) == (2, 3)
    assert hmw.measured_violations(f, {"a": 85, "b": 51}) == 1 and hmw.measured_uses(f, {"a": 1, "b": 1}) == (3, 3)
    assert hmw.tightest([f], 1) == {"b"}  # headroom 1 byte against 10
