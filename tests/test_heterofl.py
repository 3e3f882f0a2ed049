"""HeteroFL baseline: width per budget, leading-slice sub-models, nested-width aggregation."""

import pytest
import torch

from memfl.core.protocol import HyperParams, Plan, Result
from memfl.core.strategy import ClientInfo, FederationContext
from memfl.core.trainer import LocalTrainer
from memfl.methods import STRATEGIES
from memfl.methods.heterofl.strategy import HeteroFL, nested_fedavg, slice_to
from memfl.models import build_model


def model_fn(plan):
    return build_model("cnn", width=0.25 * (plan.width if plan.kind == "width" else 1.0))


def make_ctx():
    peaks = {1.0: 800, 0.5: 400, 0.25: 200, 0.125: 100}

    def peak_fn(plan):
        return peaks[plan.width if plan.kind == "width" else 1.0]

    return FederationContext(
        model_fn=model_fn,
        input_shape=(1, 28, 28),
        num_classes=10,
        hparams=HyperParams(batch_size=8, lr=0.05, max_steps=2),
        per_round=10,
        seed=0,
        peak_fn=peak_fn,
    )


def test_slice_to_takes_leading_slices():
    t = torch.arange(24.0).reshape(4, 3, 2)
    assert torch.equal(slice_to(t, (2, 3, 1)), t[:2, :, :1])
    with pytest.raises(ValueError):
        slice_to(t, (5, 3, 2))


def test_nested_aggregation_averages_each_element_over_its_holders():
    g = {"w": torch.zeros(4, 2), "n": torch.tensor(3)}
    full = Result(client_id=0, params={"w": torch.ones(4, 2), "n": torch.tensor(5)}, num_samples=1, loss=0.0)
    half = Result(client_id=1, params={"w": torch.full((2, 1), 4.0), "n": torch.tensor(7)}, num_samples=3, loss=0.0)
    new = nested_fedavg(g, [full, half])
    want = torch.ones(4, 2)
    want[:2, :1] = (1 * 1 + 3 * 4) / 4  # both hold the leading 2x1 slice
    assert torch.allclose(new["w"], want) and int(new["n"]) == 7
    untouched = nested_fedavg(g, [Result(client_id=2, params={"w": torch.ones(1, 1)}, num_samples=2, loss=0.0)])
    assert untouched["w"][0, 0] == 1 and untouched["w"].sum() == 1  # the rest keeps its value
    with pytest.raises(ValueError, match="leading slice"):
        nested_fedavg(g, [Result(client_id=3, params={"w": torch.ones(5, 2)}, num_samples=1, loss=0.0)])


def test_width_is_the_largest_that_fits_the_budget():
    strat = HeteroFL(make_ctx())
    info = lambda b: ClientInfo(id=0, num_samples=10, device="x", speed=1.0, budget_bytes=b)  # noqa: E731
    assert strat.plan_for(info(1000), 1) == Plan()
    assert strat.plan_for(info(450), 1) == Plan(kind="width", width=0.5)
    assert strat.plan_for(info(150), 1) == Plan(kind="width", width=0.125)
    assert strat.plan_for(info(50), 1) is None
    assert STRATEGIES["heterofl"] is HeteroFL


def test_clients_get_sliced_tensors_train_them_and_the_server_merges_them():
    torch.manual_seed(0)
    strat = HeteroFL(make_ctx())
    glob = {k: v.clone() for k, v in model_fn(Plan()).state_dict().items()}
    pool = [
        ClientInfo(id=i, num_samples=16, device="x", speed=1.0, budget_bytes=b) for i, b in enumerate([1000, 450, 150])
    ]
    ins = strat.configure_train(1, glob, pool)
    assert [i.plan.label for i in ins] == ["full", "width:0.5", "width:0.125"]
    trainer = LocalTrainer(model_fn)
    results = []
    for k, i in enumerate(ins):
        sub = model_fn(i.plan).state_dict()
        assert {n: t.shape for n, t in i.params.items()} == {n: t.shape for n, t in sub.items()}
        for n, t in i.params.items():  # the leading slice of the global tensor
            assert torch.equal(t, slice_to(glob[n], t.shape))
        g = torch.Generator().manual_seed(k)
        results.append(
            trainer.fit(i, torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
        )
    new = strat.aggregate_train(1, glob, results)
    w = new["blocks.0.layer.conv.weight"]
    c8 = results[2].params["blocks.0.layer.conv.weight"].shape[0]  # channels all three clients hold
    want = sum(r.params["blocks.0.layer.conv.weight"][:c8] for r in results) / 3
    assert torch.allclose(w[:c8], want, atol=1e-6)
    c4 = results[1].params["blocks.0.layer.conv.weight"].shape[0]
    assert torch.allclose(
        w[c8:c4],
        (
            results[0].params["blocks.0.layer.conv.weight"][c8:c4]
            + results[1].params["blocks.0.layer.conv.weight"][c8:c4]
        )
        / 2,
        atol=1e-6,
    )
    assert torch.allclose(w[c4:], results[0].params["blocks.0.layer.conv.weight"][c4:])


def test_hooks_return_what_they_compute_and_select_is_handed_the_plans():
    """plan_for is pure (same answer twice, nothing recorded); configure_train hands select the
    plans plan_for gave the eligible clients, and instructs each chosen client with its own."""
    seen = {}

    class Spy(HeteroFL):
        def select(self, round, candidates, k, rng, plans):
            seen.update(plans)
            return super().select(round, candidates, k, rng, plans)

    strat = Spy(make_ctx())
    pool = [
        ClientInfo(id=i, num_samples=10, device="x", speed=1.0, budget_bytes=b) for i, b in enumerate([1000, 450, 50])
    ]
    before = dict(vars(strat))
    assert [strat.plan_for(c, 1) for c in pool] == [strat.plan_for(c, 1) for c in pool]
    assert vars(strat).keys() == before.keys()
    ins = strat.configure_train(1, model_fn(Plan()).state_dict(), pool)
    assert seen == {0: Plan(), 1: Plan(kind="width", width=0.5)}  # client 2 fits no width: not a candidate
    assert {i.client_id: i.plan for i in ins} == seen
