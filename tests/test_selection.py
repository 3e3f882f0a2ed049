"""Client selection (memfl.methods.fedhybrid.selection) and the fedhybrid / oort / random strategies."""

import numpy as np
import pytest

from memfl.methods.fedhybrid.selection import Candidate, Selector


def _cands(n=10, seconds=None, mem=None):
    return [
        Candidate(
            id=i,
            num_samples=100,
            speed=1.0,
            seconds=(seconds[i] if seconds else 10.0),
            mem_stat=(mem[i] if mem else 1.0),
        )
        for i in range(n)
    ]


def test_random_picks_k_distinct():
    sel = Selector(name="random")
    ids = sel.select(1, _cands(10), 4, np.random.default_rng(0))
    assert len(ids) == 4 == len(set(ids))
    assert sel.select(1, _cands(3), 4, np.random.default_rng(0)) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown selection"):
        Selector(name="best")


def _explored(sel, losses, rnd=1):
    for i, loss in enumerate(losses):
        sel.update(rnd, i, [loss] * 8, num_samples=100, duration=10.0)


def test_fedhybrid_utility_is_stat_times_memstat_times_compstat():
    sel = Selector(name="fedhybrid", explore=0.0, explore_min=0.0, staleness=0.0)
    _explored(sel, [1.0, 2.0, 2.0, 2.0])
    cands = [
        Candidate(0, 100, 1.0, 10.0, 1.0),  # low loss
        Candidate(1, 100, 1.0, 10.0, 1.0),  # high loss, fast, roomy: the best
        Candidate(2, 100, 1.0, 20.0, 1.0),  # high loss but twice as slow
        Candidate(3, 100, 1.0, 10.0, 0.5),
    ]  # high loss, needs a memory plan
    u = sel.utilities(2, cands)
    assert u[1] == pytest.approx(1.0)
    assert u[0] == pytest.approx(0.25)  # Stat = mean(loss^2): 1 vs 4
    assert u[2] == pytest.approx(0.5) and u[3] == pytest.approx(0.5)
    assert sel.select(2, cands, 1, np.random.default_rng(0)) == [1]


def test_ucb_staleness_bonus_grows_for_clients_left_out():
    sel = Selector(name="fedhybrid", explore=0.0, explore_min=0.0)
    sel.update(1, 0, [1.0] * 8, 100)
    sel.update(9, 1, [1.0] * 8, 100)
    u = sel.utilities(10, _cands(2))
    assert u[0] > u[1]  # same utility, client 0 waited longer


def test_exploration_share_goes_to_unexplored_fast_clients_and_decays():
    sel = Selector(name="fedhybrid", explore=1.0, explore_decay=0.5, explore_min=0.1)
    _explored(sel, [5.0] * 5)  # clients 0-4 explored
    seconds = [10.0] * 5 + [1.0, 1.0, 1.0, 1e6, 1e6]
    ids = sel.select(1, _cands(10, seconds=seconds), 3, np.random.default_rng(0))
    assert set(ids) == {5, 6, 7}  # exploration first, the fast unexplored ones
    assert sel.epsilon(1) == 1.0 and sel.epsilon(10) == pytest.approx(0.1)


def test_oort_penalises_clients_slower_than_the_preferred_duration():
    sel = Selector(name="oort", explore=0.0, explore_min=0.0, staleness=0.0, pacer=50)
    _explored(sel, [2.0] * 4)
    for i, d in enumerate([10.0, 10.0, 40.0, 40.0]):
        sel.stats[i].duration = d
    u = sel.utilities(2, _cands(4, seconds=[10.0, 10.0, 40.0, 40.0]))
    T = sel.preferred_duration(_cands(4, seconds=[10.0, 10.0, 40.0, 40.0]))
    assert u[0] == pytest.approx(1.0) and u[2] == pytest.approx((T / 40.0) ** 2)


def test_selector_state_round_trips():
    sel = Selector(name="oort")
    _explored(sel, [1.0, 2.0])
    other = Selector(name="oort")
    other.load_state_dict(sel.state_dict())
    assert other.stats == sel.stats and other.pacer == sel.pacer


# ----------------------------------------------------------------------------------- strategies


def _levels(cfg, levels=4):
    from memfl.config import build_config

    data = cfg.to_json()
    data["fedhybrid"]["plan_levels"] = levels  # fewer pre-solved budgets: a faster test
    return build_config(data)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("fedhybrid", marks=pytest.mark.slow),
        pytest.param("random", marks=pytest.mark.slow),
        "oort",
        pytest.param("oort+fedprox", marks=pytest.mark.slow),
    ],
)
def test_strategies_run_end_to_end(small_config, method):
    from memfl.runtime.sim import run_experiment

    cfg = small_config(method=method, budgets="relative:0.85-1.3", clients=8, per_round=3, rounds=2)
    cfg = _levels(cfg)
    res = run_experiment(cfg, progress=False)
    full = res["full_peak_bytes"]
    for r in res["rounds"]:
        assert r["strategy"]["selection"] in ("fedhybrid", "oort", "random")
        for c in r["clients"]:
            assert c["status"] == "ok"
            assert c["predicted_peak_bytes"] <= c["budget_bytes"]
            if method != "fedhybrid":
                assert c["plan"] == "full" and c["budget_bytes"] >= full
    assert res["summary"]["final_accuracy"] is not None


def test_fedhybrid_trains_low_budget_clients_with_hybrid_plans(small_config):
    from memfl.runtime.sim import run_experiment

    cfg = _levels(small_config(method="fedhybrid", budgets="relative:0.88-0.97", clients=6, per_round=3, rounds=1))
    res = run_experiment(cfg, progress=False)
    chosen = res["rounds"][0]["clients"]
    assert chosen and all(c["plan"] == "hybrid" for c in chosen)
    report = res["rounds"][0]["strategy"]["clients"]
    assert all(report[str(c["id"])]["step_time_ratio"] >= 1.0 for c in chosen)


def test_oort_fedprox_sends_a_proximal_term(small_config):
    from memfl.methods import STRATEGIES
    from memfl.server.setup import build_federation, load_data, make_context, model_builder

    cfg = small_config(method="oort+fedprox", budgets="relative:2-3")
    data = load_data(cfg)
    model_fn = model_builder(cfg, data.input_shape, data.num_classes)
    ctx = make_context(cfg, data.input_shape, data.num_classes, model_fn)
    strat = STRATEGIES["oort+fedprox"](ctx)
    clients = build_federation(cfg, data, ctx.peak_fn(__import__("memfl.core.protocol").core.protocol.Plan()))
    params = model_fn(__import__("memfl.core.protocol").core.protocol.Plan()).state_dict()
    ins = strat.configure_train(1, params, [c.info for c in clients])
    assert ins and all(i.hparams.prox_mu == pytest.approx(0.01) for i in ins)


@pytest.mark.slow
def test_fedhybrid_killed_run_resumes_with_its_plan_table(small_config, tmp_path, monkeypatch):
    """The plan table is solved from timings measured at start: a resumed run must reuse the saved
    table (not re-profile, which could pick other plans) and end exactly like an uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    import memfl.methods.fedhybrid.strategy as fh
    from memfl.runtime.sim import run_experiment

    def cfg(out):
        return _levels(
            small_config(
                method="fedhybrid", budgets="relative:0.85-1.3", clients=6, per_round=3, rounds=3, out=str(out)
            )
        )

    # two fresh runs time the model separately and may solve different (equally valid) tables: both
    # runs here share one profile, so they differ only by the kill and the resume
    real_profile, profiles = fh.profile_model, []

    def profile_once(*args, **kwargs):
        if not profiles:
            profiles.append(real_profile(*args, **kwargs))
        return profiles[0]

    monkeypatch.setattr(fh, "profile_model", profile_once)
    full = run_experiment(cfg(tmp_path / "full"), progress=False)

    class Kill(Exception):
        pass

    def die(entry):
        if entry["round"] == 2:
            raise Kill

    with pytest.raises(Kill):
        run_experiment(cfg(tmp_path / "resumed"), progress=False, on_round=die)

    def no_profiling(*args, **kwargs):
        raise AssertionError("a resumed fedhybrid run re-profiled the model instead of loading its plan table")

    monkeypatch.setattr(fh, "profile_model", no_profiling)
    resumed = run_experiment(cfg(tmp_path / "resumed"), progress=False)
    assert [[(c["id"], c["plan"]) for c in r["clients"]] for r in resumed["rounds"]] == [
        [(c["id"], c["plan"]) for c in r["clients"]] for r in full["rounds"]
    ]
    a = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fedhybrid_hooks_pass_plans_explicitly():
    """plan_for returns the table's plan and records nothing; select weighs each candidate's time
    under the plan it is handed; the round report describes the chosen clients' plans."""
    from memfl.core.protocol import HyperParams, Plan
    from memfl.core.strategy import ClientInfo, FederationContext
    from memfl.methods.fedhybrid.planner import PlanChoice
    from memfl.methods.fedhybrid.strategy import FedHybrid
    from memfl.models import build_model

    ctx = FederationContext(
        model_fn=lambda plan: build_model("cnn", width=0.25),
        input_shape=(1, 28, 28),
        num_classes=10,
        hparams=HyperParams(batch_size=8, lr=0.05, max_steps=2),
        per_round=1,
        seed=0,
        peak_fn=lambda plan: 100 << 20,
    )
    strat = FedHybrid(ctx)
    hybrid = Plan(kind="hybrid", segments={"blocks.0.layer": "recompute"})
    strat._table = [
        PlanChoice(
            plan=Plan(),
            modes={},
            predicted_peak_bytes=100 << 20,
            model_peak_bytes=0,
            added_seconds=0.0,
            step_seconds=0.1,
            budget_bytes=0,
        ),
        PlanChoice(
            plan=hybrid,
            modes={},
            predicted_peak_bytes=50 << 20,
            model_peak_bytes=0,
            added_seconds=0.5,
            step_seconds=0.1,
            budget_bytes=0,
        ),
    ]
    strat._full_step_seconds = 0.1
    pool = [
        ClientInfo(id=i, num_samples=16, device="x", speed=1.0, budget_bytes=b << 20)
        for i, b in enumerate([200, 80, 10])
    ]
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(strat).items()}
    assert [strat.plan_for(c, 1) for c in pool] == [Plan(), hybrid, None]
    assert {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(strat).items()} == before
    fast = strat.predicted_seconds(pool[0], strat._table[0])
    slow = strat.predicted_seconds(pool[0], strat._table[1])
    assert slow > fast
    chosen = strat.select(1, pool[:2], 2, np.random.default_rng(0), {0: Plan(), 1: hybrid})
    assert [c.id for c in chosen] == [0, 1]
    ins = strat.configure_train(1, ctx.model_fn(Plan()).state_dict(), pool)
    report = strat.round_report(1)
    assert report["eligible"] == 2 and len(ins) == 1
    assert report["clients"][str(ins[0].client_id)]["plan"] == ins[0].plan.to_json()
