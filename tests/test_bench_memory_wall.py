"""``memfl bench memory-wall``: the scheduler, the resume and the tables, on real tiny runs.

Nothing is mocked: the runs go through the same ``python -m memfl.cli run`` subprocesses as the
benchmark, on synthetic data with a small cnn and a few rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

from memfl.bench import BENCHMARKS
from memfl.bench import memory_wall as mw

TINY = {
    "run": {
        "model": "cnn",
        "model_width": 0.25,
        "dataset": "synthetic",
        "clients": 6,
        "per_round": 3,
        "rounds": 3,
        "eval_every": 1,
        "budgets": "relative:0.1-1.1",
        "partition": "iid",
    },
    "train": {"local_epochs": 1, "batch_size": 16, "max_steps": 2, "lr": 0.05},
}


def _bench(out: Path, config: Path, methods: tuple[str, ...]) -> dict:
    return mw.run_bench(
        out, config=config, flags=[], methods=methods, seeds=(0,), regime=TINY, command="test", jobs_at_once=2
    )


def test_regime_matches_the_config_file():
    assert BENCHMARKS["memory-wall"] == "memfl.bench.memory_wall"
    assert mw.regime_config() == mw.config_path()  # asserts the file equals REGIME
    assert set(mw.QUICK_METHODS) <= set(mw.METHODS)


def test_schedule_tables_and_resume(tmp_path: Path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(mw._toml(TINY))
    out = tmp_path / "bench"

    first = _bench(out, config, ("fedavg", "scalefl"))
    assert first["done"] == first["planned"] == 2
    on_disk = json.loads((out / "memory-wall.json").read_text())
    assert on_disk["done"] == 2 and set(on_disk["runs"]) == {"fedavg", "scalefl"}
    s = on_disk["runs"]["scalefl"]["0"]
    assert len(s["accuracy_per_eval"]) == 3 and s["wall_seconds"] > 0
    assert s["last5_accuracy"] is not None and 0 <= s["final_accuracy"] <= 1
    assert s["eligible_per_stage"] and sum(s["rounds_per_stage"].values()) == 3
    assert "--method scalefl" in s["command"]
    f = on_disk["runs"]["fedavg"]["0"]
    assert f["eligible_per_stage"] == {} and 0 <= f["fit_full_training"] <= 6
    md = (out / "memory-wall.md").read_text()
    assert "| scalefl | 0 |" in md and "Goals" in md and "n/a (runs missing)" in md  # no heterofl here
    walls = {k: v["0"]["wall_seconds"] for k, v in on_disk["runs"].items()}
    # the static-BN diagnosis reloads the final global model: its running-BN accuracy is the run's own
    diag = mw.static_bn_accuracy(config, out / "runs" / "fedavg-s0", 0, "fedavg")
    assert diag["running_bn"] == f["final_accuracy"] and 0 <= diag["static_bn"] <= 1

    # a killed bench started again with one more method: the complete runs are skipped (their wall
    # times kept), only the new one runs
    capsys.readouterr()
    second = _bench(out, config, ("fedavg", "scalefl", "exclusive"))
    log = capsys.readouterr().out
    assert "fedavg-s0: complete, skipped" in log and "scalefl-s0: complete, skipped" in log
    assert "exclusive-s0: started" in log and "fedavg-s0: started" not in log
    assert second["done"] == 3
    assert {k: second["runs"][k]["0"]["wall_seconds"] for k in walls} == walls
    assert second["runs"]["scalefl"]["0"]["final_accuracy"] == first["runs"]["scalefl"]["0"]["final_accuracy"]
    # --report-only: tables from the complete runs, nothing started for a missing one
    capsys.readouterr()
    report = mw.run_bench(
        out,
        config=config,
        flags=[],
        methods=("fedavg", "scalefl", "exclusive", "heterofl"),
        seeds=(0,),
        regime=TINY,
        command="test",
        report_only=True,
    )
    assert "started" not in capsys.readouterr().out
    assert report["done"] == 3 and report["planned"] == 4 and "heterofl" not in report["runs"]
    assert report["runs"]["scalefl"]["0"]["wall_seconds"] == second["runs"]["scalefl"]["0"]["wall_seconds"]
    goal = {g["goal"]: g for g in second["goals"]}
    assert goal["scalefl final accuracy vs exclusive >= +10 points"]["met"] is not None


def test_centralised_reference_pools_the_federations_data(tmp_path: Path):
    config = tmp_path / "tiny.toml"
    config.write_text(mw._toml(TINY))
    everyone = mw.centralised(config, 0, "all", steps=4)
    fit = mw.centralised(config, 0, "fit-full", steps=4)
    assert everyone["clients"] == TINY["run"]["clients"] and everyone["samples"] >= fit["samples"] > 0
    assert 0 < fit["clients"] < everyone["clients"]  # relative:0.1-1.1 leaves most clients below full training
    assert len(everyone["accuracy_per_eval"]) == 4 and 0 <= everyone["final_accuracy"] <= 1
