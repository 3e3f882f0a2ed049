"""Issue 11: FedHybrid's exploration rule (part 4) and the forced-``keep`` plans (part 3).

The exploration tests need no training (the :class:`Selector` alone); the ``keep`` test runs two
tiny simulator runs (synthetic data, a small cnn, 2 rounds) and compares them record by record.
"""

from __future__ import annotations

import numpy as np
import pytest

from memfl.methods.fedhybrid.config import FedHybridConfig
from memfl.methods.fedhybrid.selection import Candidate, Selector


def _cands(n: int, seconds: float = 1.0) -> list[Candidate]:
    return [Candidate(id=i, num_samples=10, speed=1.0, seconds=seconds + 0.01 * i) for i in range(n)]


def _report(sel: Selector, ids, rnd: int = 1, loss: float = 1.0) -> None:
    for i in ids:
        sel.update(rnd, i, [loss] * 4, 10, duration=1.0)


def test_config_defaults_keep_todays_behaviour_and_refuse_unknown_rules():
    s = FedHybridConfig()
    assert s.explore_rule == "decay" and s.plans == "planned"
    assert FedHybridConfig(explore_rule="unexplored", plans="keep").explore_rule == "unexplored"
    with pytest.raises(ValueError):
        FedHybridConfig(explore_rule="pacer")
    with pytest.raises(ValueError):
        FedHybridConfig(plans="full")
    with pytest.raises(ValueError, match="explore_rule"):
        Selector(explore_rule="pacer")


def test_decay_rule_is_unchanged_and_ignores_the_pool():
    sel = Selector(name="fedhybrid", explore=0.9, explore_decay=0.98, explore_min=0.2)
    for rnd in (1, 5, 40, 200):
        want = max(0.2, 0.9 * 0.98 ** (rnd - 1))
        assert sel.epsilon(rnd) == pytest.approx(want)
        assert sel.epsilon(rnd, 0, 100) == sel.epsilon(rnd, 100, 100) == pytest.approx(want)


def test_unexplored_rule_follows_the_unexplored_share_of_the_eligible_pool():
    sel = Selector(name="fedhybrid", explore=0.9, explore_min=0.2, explore_rule="unexplored")
    assert sel.epsilon(1, 100, 100) == pytest.approx(0.9)  # nobody known: the initial share
    assert sel.epsilon(1, 50, 100) == pytest.approx(0.45)
    assert sel.epsilon(90, 50, 100) == pytest.approx(0.45)  # the round number plays no part
    assert sel.epsilon(1, 10, 100) == pytest.approx(0.2)  # the floor drains the tail
    assert sel.epsilon(1, 0, 100) == 0.0  # pool covered: no exploration left
    assert sel.epsilon(3) == pytest.approx(0.9)  # no counts: the share of an unknown pool
    # a doubled pool with the same number explored keeps exploring longer
    assert sel.epsilon(1, 140 - 30, 140) > sel.epsilon(1, 70 - 30, 70)


def test_unexplored_rule_stops_exploring_once_the_pool_is_covered():
    cands = _cands(20)
    rng = np.random.default_rng(0)
    decay = Selector(name="fedhybrid", explore=0.9, explore_decay=0.98, explore_min=0.2, staleness=0.0)
    unexp = Selector(name="fedhybrid", explore=0.9, explore_min=0.2, explore_rule="unexplored", staleness=0.0)
    _report(decay, range(15))
    _report(unexp, range(15))
    # 5 of 20 unexplored: the unexplored rule explores max(0.2, 0.9 * 5/20) = 0.225 -> 1 of 4 picks
    # at round 2; the decay rule 0.9 * 0.98 = 0.882 -> every pick that can explore does (4 of the 5)
    fresh = set(range(15, 20))
    assert len(set(unexp.select(2, cands, 4, rng)) & fresh) == 1
    assert len(set(decay.select(2, cands, 4, rng)) & fresh) == 4
    # every eligible client reported: epsilon 0, all picks exploit
    _report(unexp, range(15, 20), rnd=2)
    assert unexp.epsilon(3, unexp.unexplored(c.id for c in cands), len(cands)) == 0.0
    assert len(unexp.select(3, cands, 4, rng)) == 4


def test_unexplored_rule_covers_a_pool_over_rounds_like_its_formula_says():
    """Simulated rounds (no training): the number of unexplored clients falls by about a factor
    ``1 - explore * k / E`` per round while above the floor, and the pool is covered."""
    E, k = 100, 10
    sel = Selector(name="fedhybrid", explore=0.9, explore_min=0.2, explore_rule="unexplored", staleness=0.0)
    cands = _cands(E)
    rng = np.random.default_rng(1)
    left = [E]
    for rnd in range(1, 60):
        _report(sel, sel.select(rnd, cands, k, rng), rnd=rnd)
        left.append(sel.unexplored(c.id for c in cands))
    assert left[-1] == 0
    # round 1 explores all 10 picks (nobody known), round 2 round(0.9 * 90/100 * 10) = 8, then fewer
    assert left[1] == 90 and left[2] == 82
    covered = next(r for r, u in enumerate(left) if u == 0)
    assert covered < 40  # the floor (2 picks a round) drains the tail


def test_round_report_states_the_rule_s_epsilon(small_config):
    """The strategy reports the epsilon its selector used (with the eligible / unexplored counts)."""
    from memfl.config import build_config
    from memfl.runtime.sim import run_experiment

    cfg = small_config(method="oort", rounds=2, clients=6, per_round=2, budgets="relative:1.5-2")
    data = cfg.to_json()
    data["fedhybrid"] = {"explore_rule": "unexplored", "explore": 0.9, "explore_min": 0.2}
    res = run_experiment(build_config(data), progress=False)
    r1, r2 = (r["strategy"] for r in res["rounds"])
    assert r1["eligible"] == 6 and r1["unexplored"] == 6 and r1["epsilon"] == pytest.approx(0.9)
    assert r2["unexplored"] == 4 and r2["epsilon"] == pytest.approx(max(0.2, 0.9 * 4 / 6), abs=1e-4)


def test_keep_plans_keeps_every_decision_and_trains_in_full(small_config, monkeypatch):
    """``plans = "keep"`` with the random selector: the same clients, statuses, budgets and
    predicted (planned) peaks as the planned run, round by round; only the trained plan differs.
    The plan table is solved from measured times, so two runs could solve different tables: both
    runs here share the first one's (profile and frontier computed once)."""
    from memfl.config import build_config
    from memfl.methods.fedhybrid import strategy as strat
    from memfl.runtime.sim import run_experiment

    memo: dict[str, object] = {}
    for name in ("profile_model", "frontier"):
        real = getattr(strat, name)

        def once(*args, _real=real, _name=name, **kwargs):
            if _name not in memo:
                memo[_name] = _real(*args, **kwargs)
            return memo[_name]

        monkeypatch.setattr(strat, name, once)
    runs = {}
    for mode in ("planned", "keep"):
        cfg = small_config(method="fedhybrid", budgets="relative:0.85-1.15", rounds=2, clients=8, per_round=4)
        data = cfg.to_json()
        data["run"]["out"] = f"{data['run']['out']}-{mode}"
        data["fedhybrid"] = {"contention": True, "plan_levels": 4, "selection": "random", "plans": mode}
        runs[mode] = run_experiment(build_config(data), progress=False)
    hybrid = 0
    for rp, rk in zip(runs["planned"]["rounds"], runs["keep"]["rounds"], strict=True):
        assert [c["id"] for c in rp["clients"]] == [c["id"] for c in rk["clients"]]
        assert rk["strategy"]["plans"] == "keep" and "plans" not in rp["strategy"]
        for cp, ck in zip(rp["clients"], rk["clients"], strict=True):
            for key in ("status", "predicted_peak_bytes", "predicted_budget_bytes", "real_budget_bytes"):
                assert cp[key] == ck[key], key
            assert ck["plan"] == "full"
            hybrid += cp["plan"] != "full"
            rep = rk["strategy"]["clients"][str(ck["id"])]
            assert rep["trained"] == "full" and rep["plan"] == rp["strategy"]["clients"][str(cp["id"])]["plan"]
    assert hybrid > 0  # the comparison is not empty: some planned clients trained hybrid plans
