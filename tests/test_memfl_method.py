"""Issue 12 part 3: the ``memfl`` method -- ScaleFL's stages, FedHybrid's selection, per client per
round the fastest plan of the phase's table that fits, then the end-to-end phase.

One tiny simulator run (synthetic data, a cnn of width 0.25, 7 rounds with ``r_max = 1``, so every
phase is visited) is shared by the tests of what the records say; the checkpoint test builds the
strategy alone.
"""

from __future__ import annotations

import json

import pytest

from memfl.config import ConfigError, build_config


def _config(tmp_path, **memfl):
    return build_config(
        {
            "run": {
                "method": "memfl",
                "model": "cnn",
                "model_width": 0.25,
                "dataset": "synthetic",
                "clients": 8,
                "per_round": 4,
                "rounds": 7,
                "eval_every": 7,
                "partition": "iid",
                "budgets": "relative:0.7-1.2",
                "seed": 3,
                "out": str(tmp_path / "run"),
            },
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "max_steps": 2},
            "scalefl": {"r_max": 1, "r_min": 1},
            "memfl": {"plan_levels": 4, **memfl},
        }
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from memfl.runtime.sim import run_experiment

    tmp = tmp_path_factory.mktemp("memfl")
    run_experiment(_config(tmp), progress=False)
    return tmp


@pytest.fixture(scope="module")
def run(run_dir):
    return json.loads((run_dir / "run" / "results.json").read_text())


def test_every_phase_in_order_then_the_whole_model(run):
    phases = [(r["strategy"]["phase"], r["strategy"]["stage"]) for r in run["rounds"]]
    assert phases[:4] == [("stage", 1), ("stage", 2), ("stage", 3), ("stage", 4)]
    assert set(phases[4:]) == {("end-to-end", 4)}
    for r in run["rounds"][4:]:
        s = r["strategy"]
        # clients with room have a whole-model plan; rest = "last-stage": the others keep stage 4's
        assert 1 <= s["whole_model"] < s["eligible"], s
        kinds = {c["plan"].split("+")[0] for c in r["clients"]}
        assert kinds <= {"full", "hybrid", "stage:4"}, kinds
    assert run["summary"]["final_accuracy"] > 0.2  # 4 synthetic classes: better than chance


def test_plans_fit_their_budgets_and_every_round_counts_the_eligible(run):
    for r in run["rounds"]:
        assert 0 < r["eligible_clients"] <= 8
        assert r["strategy"]["eligible"] >= len(r["clients"])
        for c in r["clients"]:
            assert c["status"] == "ok", c
            assert c["predicted_peak_bytes"] <= c["budget_bytes"], c
            rep = r["strategy"]["clients"][str(c["id"])]
            assert rep["predicted_peak_bytes"] == c["predicted_peak_bytes"]
            assert rep["label"] == c["plan"]


@pytest.mark.slow
def test_sit_out_leaves_the_rest_out_of_the_end_to_end_phase(tmp_path):
    from memfl.runtime.sim import run_experiment

    cfg = _config(tmp_path, rest="sit-out")
    cfg.run.rounds = 6
    res = run_experiment(cfg, progress=False)
    last = res["rounds"][-1]
    assert last["strategy"]["phase"] == "end-to-end"
    assert {c["plan"].split("+")[0] for c in last["clients"]} <= {"full", "hybrid"}
    assert last["eligible_clients"] == last["strategy"]["whole_model"] == last["strategy"]["eligible"]


def test_tables_come_back_from_the_checkpoint_without_a_new_solve(run_dir):
    from memfl.core.strategy import ClientInfo
    from memfl.data import make_synthetic
    from memfl.methods.combined import Memfl
    from memfl.methods.combined.strategy import Entry
    from memfl.server.setup import make_context, model_builder

    state = json.loads((run_dir / "run" / "checkpoint.json").read_text())["strategy"]
    cfg = _config(run_dir)
    data = make_synthetic()
    fn = model_builder(cfg, data.input_shape, data.num_classes)
    b = Memfl(make_context(cfg, data.input_shape, data.num_classes, fn))
    b.load_state_dict(state)
    assert json.loads(b.tables_json()) == state["tables"]
    assert set(state["tables"]) == {"stage:1", "stage:2", "stage:3", "stage:4", "model"}
    # the run ended in the end-to-end phase: a client is planned from the restored tables, no new
    # solve -- room for the whole model: its fastest plan; below the smallest: stage 4's
    assert b.phase_for(8) == 5
    whole = [Entry.from_json(e) for e in state["tables"]["model"]]
    last = [Entry.from_json(e) for e in state["tables"]["stage:4"]]
    rich = ClientInfo(id=0, num_samples=50, device="phone", speed=1.0, budget_bytes=10 * whole[0].peak)
    assert b.plan_for(rich, 8) == whole[0].plan
    poor = ClientInfo(id=1, num_samples=50, device="phone", speed=1.0, budget_bytes=whole[-1].peak)
    assert b.plan_for(poor, 8) in [e.plan for e in last]
    assert b._profile is None
    # each table is a Pareto frontier: faster plans need more memory
    for entries in b._tables.values():
        assert all(x.seconds <= y.seconds and x.peak > y.peak for x, y in zip(entries, entries[1:]))


def test_bad_memfl_settings_name_the_field():
    with pytest.raises(ConfigError, match="memfl.rest"):
        build_config({"run": {"method": "memfl"}, "memfl": {"rest": "nap"}})
    with pytest.raises(ConfigError, match="memfl.plan_levels"):
        build_config({"run": {"method": "memfl"}, "memfl": {"plan_levels": 1}})
