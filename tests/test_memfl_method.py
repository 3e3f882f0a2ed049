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
def run(tmp_path_factory):
    from memfl.runtime.sim import run_experiment

    return run_experiment(_config(tmp_path_factory.mktemp("memfl")), progress=False)


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


def test_tables_come_back_from_the_checkpoint_without_a_new_solve(tmp_path):
    from memfl.core.protocol import Plan
    from memfl.core.strategy import ClientInfo
    from memfl.data import make_synthetic
    from memfl.methods.combined import Memfl
    from memfl.server.setup import make_context, model_builder

    cfg = _config(tmp_path)
    data = make_synthetic()
    fn = model_builder(cfg, data.input_shape, data.num_classes)
    ctx = make_context(cfg, data.input_shape, data.num_classes, fn)
    a = Memfl(ctx)
    full = ctx.peak_fn(Plan())
    client = ClientInfo(id=0, num_samples=50, device="phone", speed=1.0, budget_bytes=int(0.9 * full))
    plan = a.plan_for(client, 1)
    assert plan is not None and plan.stage == 1
    b = Memfl(ctx)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.tables_json() == a.tables_json()
    assert b.plan_for(client, 1) == plan and b._profile is None  # looked up, not re-solved
    # each table is a Pareto frontier: faster plans need more memory
    for entries in a._tables.values():
        assert all(x.seconds <= y.seconds and x.peak > y.peak for x, y in zip(entries, entries[1:]))


def test_bad_memfl_settings_name_the_field():
    with pytest.raises(ConfigError, match="memfl.rest"):
        build_config({"run": {"method": "memfl"}, "memfl": {"rest": "nap"}})
    with pytest.raises(ConfigError, match="memfl.plan_levels"):
        build_config({"run": {"method": "memfl"}, "memfl": {"plan_levels": 1}})
