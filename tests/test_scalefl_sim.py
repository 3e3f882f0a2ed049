"""ScaleFL and HeteroFL end to end in the simulator, the CLI switches and the nHSIC plane."""

import json
from pathlib import Path

import pytest
import torch

from memfl.runtime.sim import run_experiment


def _tensors(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "checkpoint.safetensors"))


@pytest.fixture
def scalefl_config(small_config):
    def make(**run):
        from memfl.config import build_config

        cfg = small_config(
            **{"method": "scalefl", "clients": 8, "per_round": 4, "rounds": 4, "budgets": "relative:0.1-1.1", **run}
        ).to_json()
        cfg["scalefl"].update({"r_min": 1, "r_max": 1, "beta": [0.0, 0.05], "gamma": [0.05, 0.05]})
        return build_config(cfg)

    return make


def test_scalefl_runs_every_stage_within_budgets_and_records_it(scalefl_config):
    cfg = scalefl_config()
    res = run_experiment(cfg, progress=False)
    stages = [r["strategy"]["stage"] for r in res["rounds"]]
    assert stages == [1, 2, 3, 4]  # r_max = 1: one round per stage
    for r in res["rounds"]:
        rep = r["strategy"]
        assert rep["eligible"] == sum(1 for c in res["clients"] if c["budget_bytes"] >= rep["stage_peak_bytes"])
        for c in r["clients"]:
            assert c["plan"] == f"stage:{rep['stage']}"
            assert c["predicted_peak_bytes"] == rep["stage_peak_bytes"] <= c["budget_bytes"]
            assert 0 <= c["metrics"]["nhsic_xz"] <= 1 and c["metrics"]["block"] == rep["stage"]
        if r["clients"]:
            assert {"nhsic_xz", "nhsic_yz", "train_loss"} <= set(rep)
        assert r["accuracy"] is not None
    # deeper stages need less memory, so more clients can join
    peaks = [r["strategy"]["stage_peak_bytes"] for r in res["rounds"]]
    assert peaks[-1] < peaks[0] < res["full_peak_bytes"]
    assert res["rounds"][-1]["strategy"]["eligible"] >= res["rounds"][0]["strategy"]["eligible"]
    # output modules and projection heads are global tensors, stored with the model
    params = _tensors(cfg.run.out)
    assert any(k.startswith("exits.1.") for k in params) and any(k.startswith("projs.4.") for k in params)
    assert int(params["exit_stage"]) == 4
    data = json.loads(Path(cfg.run.out, "results.json").read_text())
    assert data["rounds"][0]["clients"][0]["metrics"]["stage"] == 1


AUTHORS_SWITCHES = {
    "advance": "movement",
    "movement_window": 2,
    "movement_threshold": 0.99,
    "r_max": 3,
    "frozen_bn": "train",
    "projection": "authors",
    "exit_width": "model",
    "lambda1": [0.1, 0.05, 0.0, 0.0],
    "lambda2": [0.1, 0.1, 0.1, 0.1],
}


@pytest.mark.slow
@pytest.mark.parametrize("switches", [{}, AUTHORS_SWITCHES], ids=["ours", "authors"])
def test_scalefl_killed_run_resumes_identically(scalefl_config, tmp_path, switches):
    if switches:  # the authors' choices, the movement rule's window included in the checkpoint
        base = scalefl_config

        def scalefl_config(**run):
            from memfl.config import build_config

            # the authors' heads and model-width exits make early stages heavier than the full cnn
            cfg = base(**{"budgets": "relative:2-3", **run}).to_json()
            cfg["scalefl"].update(switches)
            return build_config(cfg)

    full = run_experiment(scalefl_config(out=str(tmp_path / "full")), progress=False)

    class Kill(Exception):
        pass

    def die(entry):
        if entry["round"] == 2:
            raise Kill

    cfg = scalefl_config(out=str(tmp_path / "resumed"))
    with pytest.raises(Kill):
        run_experiment(cfg, progress=False, on_round=die)
    resumed = run_experiment(cfg, progress=False)
    stages = [r["strategy"]["stage"] for r in full["rounds"]]
    assert [r["strategy"]["stage"] for r in resumed["rounds"]] == stages
    if not switches:
        assert stages == [1, 2, 3, 4]
    else:
        assert [r["strategy"].get("advanced") for r in full["rounds"]][1] == "movement"
        assert "movement" in full["rounds"][1]["strategy"]
    assert resumed["rounds"][-1]["accuracy"] == full["rounds"][-1]["accuracy"]
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "resumed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_heterofl_runs_with_nested_widths(small_config):
    res = run_experiment(
        small_config(method="heterofl", clients=8, per_round=8, rounds=1, budgets="relative:0.1-1.1"), progress=False
    )
    plans = {c["plan"] for c in res["rounds"][0]["clients"]}
    assert len(plans) >= 2 and plans <= {"full", "width:0.5", "width:0.25", "width:0.125"}
    assert all(c["predicted_peak_bytes"] <= c["budget_bytes"] for c in res["rounds"][0]["clients"])
    assert res["rounds"][0]["accuracy"] is not None


def test_cli_switches_and_report_draw_the_nhsic_plane(scalefl_config, tmp_path, capsys):
    from memfl.cli import build_parser, main
    from memfl.cli.common import config_from_args

    args = build_parser().parse_args(
        [
            "run",
            "--method",
            "scalefl",
            "--no-mentor",
            "--no-harmonizer",
            "--schedule",
            "cyclic",
            "--blocks",
            "3",
            "--cut",
            "balanced",
        ]
    )
    cfg = config_from_args(args)
    assert (
        cfg.scalefl.mentor,
        cfg.scalefl.harmonizer,
        cfg.scalefl.schedule,
        cfg.scalefl.blocks,
        cfg.scalefl.partition,
    ) == (False, False, "cyclic", 3, "balanced")
    assert config_from_args(build_parser().parse_args(["run"])).scalefl.mentor is True

    cfg = scalefl_config(rounds=2, out=str(tmp_path / "r"))
    run_experiment(cfg, progress=False)
    assert main(["report", str(tmp_path / "r")]) == 0
    png = tmp_path / "r" / "nhsic_plane.png"
    assert png.exists() and png.stat().st_size > 5000


def test_memory_cli_understands_stage_plans(capsys):
    from memfl.cli import main

    def peak(plan):
        assert main(["memory", "--model", "cnn", "--input", "1x28x28", "--batch", "16", "--plan", plan, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["peak_bytes"]

    full, s1, s4 = peak("full"), peak("stage:1"), peak("stage:4")
    assert s4 < s1 < full
