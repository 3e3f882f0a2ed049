"""Validation before aggregation (memfl.server.validate) and the robust aggregation rules
(memfl.core.aggregate): every rejection reason, each rule on hand-made results, and the issue's
"three of six clients send NaN" run."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from memfl.config import ConfigError, build_config, with_overrides
from memfl.core.aggregate import AggregationConfig, aggregate, clip_updates, fedavg, robust_combine, update_norm
from memfl.core.protocol import Instruction, Plan, Result
from memfl.core.strategy import ClientInfo
from memfl.server.validate import Validator


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def tiny_fn(plan: Plan) -> nn.Module:
    return Tiny()


CLIENT = ClientInfo(id=4, num_samples=50, device="phone", speed=1.0, budget_bytes=10**9)


def instruction(trainable=("fc.weight", "fc.bias", "bn.weight", "bn.bias")) -> Instruction:
    torch.manual_seed(0)
    params = {k: v.detach().clone() for k, v in Tiny().state_dict().items()}
    return Instruction(round=1, client_id=4, params=params, trainable=list(trainable))


def good_result(ins: Instruction, **changes) -> Result:
    params = {k: (v + 0.01 if v.dtype.is_floating_point else v + 1) for k, v in ins.params.items()}
    res = Result(client_id=4, params=params, num_samples=50, loss=0.7, sample_losses=[0.5, 0.9], compute_seconds=0.2)
    return replace(res, **changes)


def check(res: Result, ins: Instruction | None = None, **kw) -> str | None:
    ins = ins or instruction()
    return Validator(tiny_fn, **kw).check(ins, CLIENT, res)


# -- validation ---------------------------------------------------------------------------------


def test_a_good_result_and_a_subset_pass():
    ins = instruction()
    assert check(good_result(ins), ins) is None
    sub = {k: v for k, v in good_result(ins).params.items() if k.startswith("fc.")}
    assert check(good_result(ins, params=sub), ins) is None


def test_allowed_names_are_the_trainable_names_plus_the_plans_buffers():
    ins = instruction()
    v = Validator(tiny_fn)
    assert v.sent_buffers(Plan()) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert v.allowed(ins) == set(ins.params)


def test_building_the_plan_model_does_not_touch_the_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Validator(tiny_fn).sent_buffers(Plan())
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda ins, r: replace(r, client_id=5), "names client 5"),
        (lambda ins, r: replace(r, num_samples=51), "num_samples 51 outside [1, 50]"),
        (lambda ins, r: replace(r, num_samples=0), "num_samples 0 outside"),
        (lambda ins, r: replace(r, num_samples=-3), "num_samples -3 outside"),
        (lambda ins, r: replace(r, num_samples=2.5), "not an integer"),
        (lambda ins, r: replace(r, loss=math.nan), "loss nan is not a finite number"),
        (lambda ins, r: replace(r, sample_losses=[0.1, math.inf]), "sample_losses"),
        (lambda ins, r: replace(r, compute_seconds=-1.0), "compute_seconds"),
        (lambda ins, r: replace(r, params={}), "no tensors"),
        (lambda ins, r: replace(r, params={**r.params, "evil": torch.zeros(1)}), "does not send back: evil"),
        (lambda ins, r: replace(r, params={**r.params, "fc.weight": torch.zeros(3, 3)}), "fc.weight: shape (3, 3)"),
        (
            lambda ins, r: replace(r, params={**r.params, "fc.bias": r.params["fc.bias"].double()}),
            "fc.bias: dtype torch.float64",
        ),
        (
            lambda ins, r: replace(r, params={**r.params, "fc.bias": torch.tensor([1.0, math.nan])}),
            "fc.bias: 1 non-finite value",
        ),
        (
            lambda ins, r: replace(r, params={**r.params, "bn.running_var": torch.tensor([math.inf, -math.inf])}),
            "bn.running_var: 2 non-finite values",
        ),
        (lambda ins, r: replace(r, params={**r.params, "fc.bias": [1.0, 2.0]}), "fc.bias: not a tensor"),
    ],
)
def test_each_rejection_reason(mutate, reason):
    ins = instruction()
    got = check(mutate(ins, good_result(ins)), ins)
    assert got is not None and reason in got, got


def test_a_parameter_sent_but_not_marked_trainable_may_not_come_back():
    ins = instruction(trainable=("fc.weight", "fc.bias"))  # bn.weight/bias frozen under this plan
    got = check(good_result(ins), ins)
    assert got is not None and "does not send back: bn.bias, bn.weight" in got


def test_update_norm_bound():
    ins = instruction()
    res = good_result(ins)
    norm = update_norm(ins.params, res.params)
    assert check(res, ins, max_update_norm=norm * 1.01) is None
    got = check(res, ins, max_update_norm=norm / 2)
    assert got is not None and "above max_update_norm" in got


def test_config_keys():
    c = build_config({"aggregation": {"rule": "trimmed-mean", "trim": 0.2, "clip_norm": 5, "max_update_norm": 50}})
    assert c.aggregation.rule == "trimmed-mean" and c.aggregation.clip_norm == 5.0
    for bad, key in [
        ({"rule": "mean"}, "aggregation.rule"),
        ({"trim": 0.5}, "aggregation.trim"),
        ({"clip_norm": 0}, "aggregation.clip_norm"),
        ({"bogus": 1}, "aggregation.bogus"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build_config({"aggregation": bad})


# -- the robust rules ---------------------------------------------------------------------------


def res(cid, samples=10, **tensors):
    return Result(client_id=cid, params=tensors, num_samples=samples, loss=0.0)


HONEST = [1.0, 1.2, 0.8, 1.1, 0.9]


@pytest.mark.parametrize("attack", [1e9, math.nan, -math.inf])
def test_median_and_trimmed_mean_ignore_one_attacker(attack):
    g = {"w": torch.zeros(3)}
    results = [res(i, 10, w=torch.full((3,), v)) for i, v in enumerate(HONEST)]
    results.append(res(9, 10**6, w=torch.full((3,), attack)))  # huge values and a huge weight
    # the attacker sorts to one end (NaN as +inf): the median is the mean of the two middle of
    # six, the trimmed mean (floor(0.2 * 6) = 1 cut per end) the mean of the four middle
    expected = 0.95 if attack < 0 else 1.05
    med = robust_combine(g, results, "median")["w"]
    assert torch.allclose(med, torch.full((3,), expected))
    trimmed = robust_combine(g, results, "trimmed-mean", trim=0.2)["w"]
    assert torch.allclose(trimmed, torch.full((3,), expected))
    assert torch.isfinite(med).all() and torch.isfinite(trimmed).all()
    bad = fedavg(g, results)["w"]  # what FedAvg makes of it
    assert not torch.allclose(bad, torch.full((3,), 1.0), atol=0.5) or not torch.isfinite(bad).all()


def test_median_odd_count_and_trim_zero_is_the_plain_mean():
    g = {"w": torch.zeros(2)}
    results = [res(i, w=torch.tensor([v, -v])) for i, v in enumerate([3.0, 1.0, 2.0])]
    assert torch.equal(robust_combine(g, results, "median")["w"], torch.tensor([2.0, -2.0]))
    assert torch.allclose(robust_combine(g, results, "trimmed-mean", trim=0.0)["w"], torch.tensor([2.0, -2.0]))


def test_robust_rules_over_partial_sends():
    """ScaleFL sends a stage's tensors only: each tensor over the clients that sent it."""
    g = {"a": torch.zeros(1), "b": torch.ones(1), "c": torch.full((1,), 7.0)}
    results = [
        res(0, a=torch.tensor([1.0])),
        res(1, a=torch.tensor([3.0]), b=torch.tensor([5.0])),
        res(2, a=torch.tensor([2.0])),
    ]
    for rule in ("median", "trimmed-mean"):
        out = robust_combine(g, results, rule, trim=0.34)
        assert float(out["a"]) == 2.0 and float(out["b"]) == 5.0 and float(out["c"]) == 7.0


def test_robust_rules_over_nested_slices():
    """HeteroFL: an element is combined over the clients whose leading slice holds it."""
    g = {"w": torch.zeros(4)}
    results = [
        res(0, w=torch.tensor([1.0, 1.0])),
        res(1, w=torch.tensor([2.0, 2.0, 2.0, 2.0])),
        res(2, w=torch.tensor([9.0, 9.0, 9.0])),
    ]
    out = robust_combine(g, results, "median")["w"]
    assert out.tolist() == [2.0, 2.0, 5.5, 2.0]


def test_integer_buffers_take_the_lower_median():
    g = {"n": torch.tensor(0)}
    out = robust_combine(g, [res(i, n=torch.tensor(v)) for i, v in enumerate([3, 10**9, 5, 4])], "median")
    assert int(out["n"]) == 4 and out["n"].dtype == torch.int64


def test_clip_norm_bounds_each_update():
    g = {"w": torch.zeros(2)}
    results = [res(0, w=torch.tensor([3.0, 4.0])), res(1, w=torch.tensor([0.3, 0.4]))]
    clipped = clip_updates(g, results, 1.0)
    assert torch.allclose(clipped[0].params["w"], torch.tensor([0.6, 0.8]))
    assert clipped[1] is results[1]  # within the bound: untouched
    assert torch.equal(results[0].params["w"], torch.tensor([3.0, 4.0]))  # input not modified
    out = aggregate(g, results, AggregationConfig(clip_norm=1.0))
    assert torch.allclose(out["w"], torch.tensor([0.45, 0.6]))


def test_default_aggregation_is_fedavg_bit_for_bit():
    torch.manual_seed(0)
    g = {"w": torch.randn(5, 3), "n": torch.tensor(2)}
    results = [res(i, 7 + i, w=torch.randn(5, 3), n=torch.tensor(i)) for i in (2, 0, 1)]
    ref = fedavg(g, results)
    for settings in (None, AggregationConfig()):
        out = aggregate(g, results, settings)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert aggregate(g, [], AggregationConfig(rule="median")) == g


# -- end to end ---------------------------------------------------------------------------------


def nan_in_three_of_six(monkeypatch):
    """Clients 0, 1 and 2 send NaN in one tensor (the issue's reproduction)."""
    from memfl.core.trainer import LocalTrainer

    fit = LocalTrainer.fit

    def bad_fit(self, ins, x, y):
        r = fit(self, ins, x, y)
        if ins.client_id < 3:
            name = sorted(k for k, t in r.params.items() if t.dtype.is_floating_point)[0]
            r.params[name] = torch.full_like(r.params[name], math.nan)
        return r

    monkeypatch.setattr(LocalTrainer, "fit", bad_fit)


def test_three_of_six_clients_sending_nan_are_rejected(small_config, monkeypatch):
    from safetensors.torch import load_file

    from memfl.runtime.sim import run_experiment

    nan_in_three_of_six(monkeypatch)
    config = small_config(clients=6, per_round=6, rounds=2)
    res_ = run_experiment(config, progress=False)
    for rnd in res_["rounds"]:
        status = {c["id"]: c["status"] for c in rnd["clients"]}
        assert status == {0: "rejected", 1: "rejected", 2: "rejected", 3: "ok", 4: "ok", 5: "ok"}
        assert all("non-finite" in c["error"] for c in rnd["clients"] if c["status"] == "rejected")
    params = load_file(str(config.run.out) + "/checkpoint.safetensors")
    assert all(torch.isfinite(t).all() for t in params.values() if t.dtype.is_floating_point)
    assert res_["summary"]["final_accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert res_["summary"]["statuses"] == {"ok": 6, "rejected": 6}


@pytest.mark.parametrize("method, rule", [("fedavg", "median"), ("heterofl", "trimmed-mean"), ("scalefl", "median")])
def test_robust_rules_run_with_every_kind_of_aggregation(small_config, method, rule):
    """Plain, nested (HeteroFL) and partial-send (ScaleFL) aggregation under a robust rule."""
    from memfl.runtime.sim import run_experiment

    config = with_overrides(
        small_config(method=method, rounds=1), {"aggregation.rule": rule, "aggregation.clip_norm": 50.0}
    )
    res_ = run_experiment(config, progress=False)
    assert res_["summary"]["statuses"].get("ok", 0) >= 1
    assert res_["summary"]["final_accuracy"] is not None
