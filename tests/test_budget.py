"""Contention traces and the memory budget predictor (memfl.methods.fedhybrid.budget)."""

import numpy as np
import pytest

from memfl.methods.fedhybrid.budget import (
    CONTENTION,
    TICKS_PER_ROUND,
    WARMUP_TICKS,
    BudgetPredictor,
    FederationBudgets,
    contention_trace,
    evaluate_predictor,
    federation_budgets,
    round_budgets,
    training_traces,
)


def test_traces_are_bounded_deterministic_and_kind_specific():
    a = contention_trace("phone", 2000, np.random.default_rng(1))
    b = contention_trace("phone", 2000, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert a.shape == (2000,) and a.min() >= 0 and a.max() <= CONTENTION["phone"].max_share
    vol = {
        k: np.mean([np.std(np.diff(contention_trace(k, 2000, np.random.default_rng(s)))) for s in range(10)])
        for k in CONTENTION
    }
    assert vol["phone"] > vol["laptop"] > vol["board"]
    with pytest.raises(ValueError, match="device kind"):
        contention_trace("toaster", 10, np.random.default_rng(0))


def test_round_budget_is_the_minimum_over_the_round():
    avail = np.arange(WARMUP_TICKS + 3 * TICKS_PER_ROUND, dtype=float)[::-1]
    r = round_budgets(avail, 3)
    assert r.tolist() == [avail[WARMUP_TICKS + (i + 1) * TICKS_PER_ROUND - 1] for i in range(3)]


def test_predictor_on_held_out_traces_meets_the_goals():
    kinds = list(CONTENTION)
    train = training_traces(kinds, clients=30, rounds=100, seed=1)
    held_out = training_traces(kinds, clients=30, rounds=100, seed=2)
    pred = BudgetPredictor(quantile=0.005).fit(train)
    rep = evaluate_predictor(pred, held_out)
    assert rep["rounds"] > 5000
    assert rep["violation_rate"] <= 0.015  # goal <= 1% (the benchmark uses more traces)
    assert rep["mean_headroom"] <= 0.10
    # a more cautious quantile trades headroom for fewer violations
    cautious = evaluate_predictor(BudgetPredictor(quantile=0.001).fit(train), held_out)
    assert cautious["violation_rate"] <= rep["violation_rate"]
    assert cautious["mean_headroom"] >= rep["mean_headroom"]


def test_federation_budgets_real_and_predicted():
    caps = [100 << 20, 200 << 20, 50 << 20]
    fb = FederationBudgets(caps, ["phone", "board", "laptop"], rounds=20, seed=3)
    for c, cap in enumerate(caps):
        real = [fb.real(c, r) for r in range(1, 21)]
        pred = [fb.predicted(c, r) for r in range(1, 21)]
        assert all(0 < x <= cap for x in real)
        assert all(0 < p <= cap for p in pred)
        # predictions sit a little under the real budget most of the time
        assert np.mean([p <= x for p, x in zip(pred, real)]) >= 0.9
        assert np.mean([(x - p) / x for p, x in zip(pred, real)]) < 0.2


def test_contention_is_off_by_default(small_config):
    cfg = small_config()
    assert federation_budgets(cfg, []) is None


def test_simulator_records_real_and_predicted_budgets(small_config):
    from memfl.config import build_config
    from memfl.runtime.sim import run_experiment

    cfg = small_config(method="fedhybrid", budgets="relative:0.9-1.2", rounds=2)
    data = cfg.to_json()
    data["fedhybrid"] = {"contention": True, "plan_levels": 4}
    cfg = build_config(data)
    res = run_experiment(cfg, progress=False)
    recs = [c for r in res["rounds"] for c in r["clients"]]
    assert recs
    for c in recs:
        assert {"predicted_budget_bytes", "real_budget_bytes", "budget_violation"} <= set(c)
        assert c["predicted_budget_bytes"] <= c["budget_bytes"]
        assert c["predicted_peak_bytes"] <= c["predicted_budget_bytes"]
    assert res["summary"]["budget_violations"] == sum(c["budget_violation"] for c in recs)


@pytest.mark.parametrize("memory", ["aware", "unaware"])
def test_memory_unaware_baselines_send_anyone_and_lose_the_clients_that_do_not_fit(small_config, memory):
    """``baseline_memory``: an aware baseline only sends clients whose predicted budget fits full
    training; an unaware one sends anyone, and those whose real budget is below the peak are OOM."""
    from memfl.config import build_config
    from memfl.runtime.sim import run_experiment

    cfg = small_config(method="random", budgets="relative:0.5-1.3", clients=8, per_round=8, rounds=1)
    data = cfg.to_json()
    data["fedhybrid"] = {"contention": True, "baseline_memory": memory}
    res = run_experiment(build_config(data), progress=False)
    full = res["full_peak_bytes"]
    recs = res["rounds"][0]["clients"]
    assert all(c["plan"] == "full" for c in recs)
    oom = [c for c in recs if c["status"] == "oom"]
    assert all(c["real_budget_bytes"] < c["predicted_peak_bytes"] for c in oom)
    assert all(c["status"] == "ok" for c in recs if c not in oom)
    if memory == "aware":
        assert not oom and all(c["predicted_budget_bytes"] >= full for c in recs)
    else:  # everyone was sent; those below the full-training peak were killed
        assert len(recs) == 8 and oom
        assert {c["id"] for c in oom} == {c["id"] for c in recs if c["real_budget_bytes"] < full}
    assert res["summary"]["budget_violations"] == len(oom)
