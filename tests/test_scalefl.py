"""ScaleFL mechanisms: partition, stage engine (frozen blocks, harmonizer), schedule, eligibility."""

import numpy as np
import pytest
import torch
from torch import nn

from memfl.core.engine import prepare
from memfl.core.protocol import HyperParams, Plan, Result
from memfl.core.strategy import ClientInfo, FederationContext
from memfl.core.trainer import LocalTrainer
from memfl.methods import STRATEGIES
from memfl.methods.scalefl import PartitionError, ScaleFLModel, partition_model, scalefl_model_fn, stage_client_model
from memfl.methods.scalefl.config import ScaleFLConfig
from memfl.methods.scalefl.strategy import ScaleFL, plateaued
from memfl.models import build_model


def cnn(plan=None):
    return build_model("cnn", width=0.25)


def resnet(plan=None):
    return build_model("resnet18", in_channels=3, image_size=32, width=0.125)


def stage_plan(t, **options):
    return Plan(kind="stage", stage=t, options=options)


# ------------------------------------------------------------------------------------ partition


def test_shipped_models_cut_into_their_four_blocks():
    torch.manual_seed(0)
    part = partition_model(resnet(), 4)
    assert part.blocks == 4 and part.head == "head"
    assert part.groups[0] == ("blocks.0.stem", "blocks.0.unit0", "blocks.0.unit1")  # stem joins block 1
    assert part.groups[3] == ("blocks.3.unit0", "blocks.3.unit1")
    part = partition_model(cnn(), 4)
    assert part.groups == tuple((f"blocks.{i}.layer", f"blocks.{i}.pool") for i in range(4))
    assert part.block_of("blocks.2.layer.conv.weight") == 3 and part.block_of("head.fc.weight") is None


@pytest.mark.parametrize("blocks", [2, 3, 6])
def test_other_block_counts_are_balanced_cuts_in_order(blocks):
    torch.manual_seed(0)
    model = resnet()
    part = partition_model(model, blocks)
    units = [n for n, _ in model.units()]
    assert part.unit_names() == units  # every unit once, in order
    assert part.blocks == blocks
    for g in part.groups:  # every block has something to train
        assert any(True for u in g for _ in model.get_submodule(u).parameters())


def test_balanced_cut_splits_the_heavy_first_resnet_stage():
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=3, image_size=32, width=0.25)
    default = partition_model(model, 4)
    balanced = partition_model(model, 4, mode="balanced", batch_size=64)
    assert balanced != default
    # the first ResNet stage (32x32 activations) is split: block 1 ends inside stage 1
    assert all(u.startswith("blocks.0.") for u in balanced.groups[1])


def test_explicit_boundaries_and_a_plain_sequential_module():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    part = partition_model(mlp, 2, boundaries=["3"], input_shape=(1, 4, 4))
    assert part.groups == (("0", "1", "2"), ("3", "4")) and part.head == "5"
    assert partition_model(mlp, 2, boundaries=[3]).groups == part.groups
    sm = ScaleFLModel(mlp, 2, boundaries=["3"], input_shape=(1, 4, 4))
    assert set(sm.state_dict()) >= set(mlp.state_dict())  # the model's own keys are kept
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
    for t in (1, 2):
        step = prepare(sm, stage_plan(t, blocks=2))
        loss, _ = step.loss(x, y)
        loss.backward()
    sm.exit_stage.fill_(0)
    assert torch.allclose(sm.eval()(x), mlp.eval()(x))


def test_models_that_cannot_be_cut_as_asked_are_refused_clearly():
    with pytest.raises(PartitionError, match="only 8 sequential units"):
        partition_model(cnn(), 9)
    with pytest.raises(PartitionError, match="not a unit"):
        partition_model(cnn(), 2, boundaries=["blocks.9.layer"])
    with pytest.raises(PartitionError, match="strictly increasing"):
        partition_model(cnn(), 3, boundaries=[4, 2])
    with pytest.raises(PartitionError, match="need 2 boundaries"):
        partition_model(cnn(), 3, boundaries=[2])

    class Branchy(nn.Module):  # forward is not its children in order
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    with pytest.raises(PartitionError, match="not its units in order"):
        ScaleFLModel(Branchy(), 2, input_shape=(4,))
    with pytest.raises(PartitionError, match="at least one unit and a head"):
        partition_model(nn.Sequential(nn.Linear(3, 3)), 1, input_shape=(3,))


# --------------------------------------------------------------------------------- stage engine


def _saved_by_module(step, sm, x, y):
    """Bytes autograd saves while each unit runs (keyed by unit name), plus in the output part."""
    active = ["<out>"]
    hooks = []
    for name in sm.partition.unit_names():
        m = sm.get_submodule(name)
        hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: active.append(n)))
        hooks.append(m.register_forward_hook(lambda mod, inp, out: active.pop() and None))
    saved: dict[str, int] = {}
    params = {p.untyped_storage().data_ptr() for p in sm.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[active[-1]] = saved.get(active[-1], 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = step.loss(x, y)
    for h in hooks:
        h.remove()
    return saved, loss


@pytest.mark.parametrize("harmonizer,recompute", [(False, False), (True, False), (True, True)])
def test_frozen_blocks_save_no_activations_and_get_no_gradients(harmonizer, recompute):
    torch.manual_seed(0)
    sm = ScaleFLModel(resnet(), 4)
    sm.train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    stats = {k: v.clone() for k, v in sm.state_dict().items() if "running_mean" in k}
    step = prepare(sm, stage_plan(3, harmonizer=harmonizer, mentor=False, recompute_tail=recompute))
    saved, loss = _saved_by_module(step, sm, x, y)
    loss.backward()
    frozen = [u for g in sm.partition.groups[:2] for u in g]
    tail = "blocks.1.unit1"  # holds block 2's last layer (conv2 + bn2), the harmonized one
    for u in frozen:
        if harmonizer and not recompute and u == tail:
            assert saved.get(u, 0) > 0  # the co-trained layer's unit (recomputed: keeps its input only)
        else:
            assert saved.get(u, 0) == 0, f"frozen unit {u} saved activations"
    assert all(saved.get(u, 0) > 0 for u in sm.partition.groups[2])
    trained = set(step.trainable_names())
    for name, p in sm.named_parameters():
        block = sm.partition.block_of(name)
        if block is not None and block < 3:
            boundary = harmonizer and name.startswith(("blocks.1.unit1.conv2.", "blocks.1.unit1.bn2."))
            assert (name in trained) == boundary
            assert (p.grad is not None) == boundary, name
    # frozen BatchNorms run in eval mode: their statistics do not move
    after = sm.state_dict()
    for k, v in stats.items():
        block = sm.partition.block_of(k)
        if block is not None and block < 3 and not (harmonizer and k.startswith("blocks.1.unit1.bn2.")):
            assert torch.equal(after[k], v), k


def test_stage_t_trains_block_t_its_output_module_and_projection_head():
    sm = ScaleFLModel(cnn(), 4)
    step = prepare(sm, stage_plan(2, harmonizer=False, gamma=[0.1, 0.1]))
    names = set(step.trainable_names())
    assert {"blocks.1.layer.conv.weight", "exits.2.fc.weight", "exits.2.convs.0.weight", "projs.2.fc1.weight"} <= names
    assert not any(n.startswith(("blocks.0.", "blocks.2.", "head.", "exits.1.", "projs.1.")) for n in names)
    assert set(step.sent_buffers) == {k for k, _ in sm.named_buffers() if k.startswith("blocks.1.")}
    last = prepare(sm, stage_plan(4, mentor=False))  # the real head at stage T, no projection head
    assert "head.fc.weight" in last.trainable_names()
    assert not any(n.startswith(("exits.", "projs.")) for n in last.trainable_names())
    # the stage module holds only what stage t uses
    held = {id(p) for p in step.module.parameters()}
    assert all(id(p) not in held for p in sm.blocks[2].parameters())
    assert all(id(p) not in held for p in sm.head.parameters())


def test_exit_stage_selects_the_inference_path():
    torch.manual_seed(0)
    base = cnn()
    sm = ScaleFLModel(base, 4).eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(sm(x), base.eval()(x))  # exit_stage 0: the full model
    sm.exit_stage.fill_(2)
    assert torch.allclose(sm(x), sm.stage_logits(x, 2))
    client = stage_client_model(cnn, 2)  # a stage-2 client holds blocks 1..2, O_2 and P_2 only
    assert client.blocks[2].layer.conv.weight.numel() == 0 and client.head.fc.weight.numel() == 0
    assert client.exits["2"].fc.weight.numel() > 0 and client(x).shape == (3, 10)


def test_nhsic_metrics_are_reported():
    sm = ScaleFLModel(cnn(), 4)
    step = prepare(sm, stage_plan(2, beta=[0.1, 0.1], gamma=[0.1, 0.1]))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(2):
        step.loss(x, y)[0].backward()
    m = step.metrics()
    assert m["stage"] == 2 and m["block"] == 2 and m["beta_t"] == pytest.approx(0.1)
    assert 0 <= m["nhsic_xz"] <= 1 and 0 <= m["nhsic_yz"] <= 1 and 0 <= m["nhsic_yp"] <= 1


# ------------------------------------------------------------------------------------ strategy


def make_ctx(peaks=None, **scalefl):
    peaks = peaks or {}

    def peak_fn(plan):
        return peaks.get(plan.stage if plan.kind == "stage" else 0, 1000)

    return FederationContext(
        model_fn=cnn,
        input_shape=(1, 28, 28),
        num_classes=10,
        hparams=HyperParams(batch_size=8, lr=0.05, max_steps=3),
        per_round=10,
        seed=0,
        peak_fn=peak_fn,
        rounds=8,
        settings=ScaleFLConfig(**scalefl),
    )


def clients(*budgets):
    return [ClientInfo(id=i, num_samples=20 + i, device="x", speed=1.0, budget_bytes=b) for i, b in enumerate(budgets)]


def test_eligibility_follows_the_predicted_stage_peak():
    peaks = {1: 500, 2: 300, 3: 200, 4: 100}
    strat = ScaleFL(make_ctx(peaks))
    pool = clients(50, 150, 250, 350, 600)
    model = strat.wrap_model_fn(cnn, strat.ctx)(Plan())
    params = model.state_dict()
    for stage, fits in [(1, {4}), (2, {3, 4}), (3, {2, 3, 4}), (4, {1, 2, 3, 4})]:
        strat.stage = stage
        ins = strat.configure_train(stage, params, pool)
        assert {i.client_id for i in ins} == fits
        assert all(i.plan.stage == stage and i.predicted_peak_bytes == peaks[stage] <= i.budget_bytes for i in ins)
        assert strat.round_report(stage)["eligible"] == len(fits)
        # a stage-t client is sent blocks 1..t, O_t, P_t only
        sent = set(ins[0].params)
        assert any(k.startswith(f"blocks.{stage - 1}.") for k in sent)
        assert not any(k.startswith(f"blocks.{stage}.") for k in sent)
        assert {k for k in sent if k.startswith("exits.")} == {k for k in params if k.startswith(f"exits.{stage}.")}


def _fit(strat, model_fn, ins, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return LocalTrainer(model_fn).fit(ins, x, y)


@pytest.mark.parametrize("harmonizer", [True, False])
def test_co_adapted_layer_is_trained_and_merged(harmonizer):
    torch.manual_seed(0)
    strat = ScaleFL(make_ctx(harmonizer=harmonizer))
    model_fn = strat.wrap_model_fn(cnn, strat.ctx)
    params = {k: v.clone() for k, v in model_fn(Plan()).state_dict().items()}
    strat.stage = 2
    ins = strat.configure_train(1, params, clients(10**9, 10**9))
    results = [_fit(strat, model_fn, i, seed=k) for k, i in enumerate(ins)]
    boundary = ["blocks.0.layer.conv.weight", "blocks.0.layer.bn.weight", "blocks.0.layer.bn.running_mean"]
    for r in results:
        assert all((k in r.params) == harmonizer for k in boundary)
        assert "blocks.1.layer.conv.weight" in r.params and "exits.2.fc.weight" in r.params
        assert not any(k.startswith(("blocks.2.", "blocks.3.", "head.")) for k in r.params)
        if harmonizer:
            assert not torch.equal(r.params["blocks.0.layer.conv.weight"], params["blocks.0.layer.conv.weight"])
    new = strat.aggregate_train(1, params, results)
    w = [r.num_samples for r in results]
    for k in (boundary if harmonizer else []) + ["blocks.1.layer.conv.weight", "exits.2.fc.weight"]:
        want = sum(r.params[k].double() * n for r, n in zip(results, w)) / sum(w)
        assert torch.allclose(new[k].double(), want, atol=1e-6), k  # merged into the global model
    if not harmonizer:
        assert torch.equal(new["blocks.0.layer.conv.weight"], params["blocks.0.layer.conv.weight"])
    assert int(new["exit_stage"]) == 2


def _result(cid, loss, n=10):
    return Result(client_id=cid, params={}, num_samples=n, loss=loss)


def test_elastic_schedule_advances_on_plateau_or_after_r_max():
    strat = ScaleFL(make_ctx(r_min=2, r_max=4, plateau=0.05, window=2))
    empty: dict = {}
    stages = []
    losses = [2.0, 1.0, 0.99, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0499, 0.03]  # stage 1 plateaus at round 3
    for rnd, loss in enumerate(losses, 1):
        stages.append(strat.stage_for(rnd))
        strat.configure_train(rnd, empty, [])
        strat.aggregate_train(rnd, empty, [_result(0, loss)])
        strat.round_report(rnd)
    # 1: plateau after 3 rounds; 2: never plateaus -> r_max = 4; 3: plateau after 2
    assert stages == [1, 1, 1, 2, 2, 2, 2, 3, 3, 4]
    assert [t["reason"] for t in strat.transitions] == ["plateau", "r_max", "plateau"]
    state = strat.state_dict()
    other = ScaleFL(make_ctx())
    other.load_state_dict(state)
    assert other.state_dict() == state and other.stage == 4


def test_default_r_max_fits_every_stage_in_the_run_and_cyclic_schedule():
    assert ScaleFL(make_ctx()).r_max == 2  # 8 rounds / 4 blocks
    cyc = ScaleFL(make_ctx(schedule="cyclic"))
    assert [cyc.stage_for(r) for r in range(1, 10)] == [1, 2, 3, 4, 1, 2, 3, 4, 1]
    assert plateaued([1.0, 1.0, 1.0], 3, 0.01) and not plateaued([3.0, 2.0, 1.0], 3, 0.01)
    assert plateaued([1.0, 1.1], 2, 0.0)  # a rising loss is a plateau


def test_registered_everywhere():
    from memfl.core.engine import ENGINES

    assert STRATEGIES["scalefl"] is ScaleFL and "stage" in ENGINES and "width" in ENGINES
    fn = scalefl_model_fn(cnn, 4)
    assert isinstance(fn(Plan()), ScaleFLModel)


# ------------------------------------------------------------------- users' own models (memfl.run)


class MeanPool(nn.Module):
    def forward(self, h):
        return h.mean(dim=1)


def user_mlp(features=12, classes=3):
    return nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))


def user_tokens(vocab=30, classes=3):  # (N, T) int64 -> Embedding -> token layer -> mean pool -> Linear
    return nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, 16), nn.ReLU(), MeanPool(), nn.Linear(16, classes))


def user_cnn(classes=3):  # non-square 1x20x36 images
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(16, classes),
    )


USER_MODELS = {  # name: (factory, one sample's shape, blocks, batch)
    "mlp": (user_mlp, (12,), 2, lambda g: torch.randn(8, 12, generator=g)),
    "tokens": (user_tokens, (7,), 2, lambda g: torch.randint(0, 30, (8, 7), generator=g)),
    "cnn": (user_cnn, (1, 20, 36), 3, lambda g: torch.randn(8, 1, 20, 36, generator=g)),
}


@pytest.mark.parametrize("harmonizer", [True, False])
@pytest.mark.parametrize("kind", sorted(USER_MODELS))
def test_user_models_train_every_stage_with_a_frozen_prefix(kind, harmonizer):
    factory, shape, blocks, batch = USER_MODELS[kind]
    torch.manual_seed(0)
    sm = ScaleFLModel(factory(), blocks, input_shape=shape)
    g = torch.Generator().manual_seed(1)
    x, y = batch(g), torch.randint(0, 3, (8,), generator=g)
    assert sm.blocks_count == blocks and sm(x).shape == (8, 3)
    for t in range(1, blocks + 1):
        sm.zero_grad(set_to_none=True)
        sm.train()
        step = prepare(sm, stage_plan(t, blocks=blocks, harmonizer=harmonizer))
        names = set(step.trainable_names())
        block_t = {k for k, _ in sm.named_parameters() if sm.partition.block_of(k) == t}
        assert block_t <= names
        assert {k for k in names if k.startswith("exits.")} == {
            k for k, _ in sm.named_parameters() if k.startswith(f"exits.{t}.")
        }
        harmonized = step.metrics()["harmonized"]
        assert bool(harmonized) == (harmonizer and t > 1)  # every block here ends in a weighted layer
        loss, per_sample = step.loss(x, y)
        loss.backward()
        assert torch.isfinite(loss) and per_sample.shape == (8,)
        for k, p in sm.named_parameters():
            if k in names:
                assert p.grad is not None, k
            else:
                assert p.grad is None, k  # the frozen prefix (and everything else) gets no gradient
        frozen = {k for k, _ in sm.named_parameters() if (sm.partition.block_of(k) or blocks + 1) < t}
        assert frozen - names == {k for k in frozen if not any(k.startswith(b + ".") for b in harmonized)}
        if t > 1 and not harmonizer:
            assert frozen and not frozen & names  # the whole prefix stays frozen
        assert step.metrics()["nhsic_yz"] >= 0


def test_a_user_model_trains_through_the_strategy_and_local_trainer():
    ctx = FederationContext(
        model_fn=lambda plan: user_mlp(),
        input_shape=(12,),
        num_classes=3,
        hparams=HyperParams(batch_size=8, lr=0.05, max_steps=2),
        per_round=2,
        seed=0,
        peak_fn=lambda plan: 100,
        rounds=4,
        settings=ScaleFLConfig(blocks=2, r_min=1, r_max=1),
    )
    strat = ScaleFL(ctx)
    model_fn = strat.wrap_model_fn(ctx.model_fn, ctx)
    params = {k: v.clone() for k, v in model_fn(Plan()).state_dict().items()}
    pool = [ClientInfo(id=i, num_samples=16, device="x", speed=1.0, budget_bytes=1000) for i in range(2)]
    for rnd in (1, 2):
        ins = strat.configure_train(rnd, params, pool)
        assert ins and all(i.plan.stage == rnd and i.plan.options["input_shape"] == [12] for i in ins)
        g = torch.Generator().manual_seed(rnd)
        results = [
            LocalTrainer(model_fn).fit(i, torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g))
            for i in ins
        ]
        assert all(set(r.params) >= set(i.trainable) for r, i in zip(results, ins))
        params = strat.aggregate_train(rnd, params, results)
    assert int(params["exit_stage"]) == 2


def test_user_models_that_cannot_be_cut_are_refused_with_the_reason():
    class InlinePool(nn.Module):  # the pooling is not a child: its forward is not its children in order
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(30, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    with pytest.raises(PartitionError, match="not its units in order"):
        ScaleFLModel(InlinePool(), 1, input_shape=(7,))
    tiny = nn.Sequential(nn.Embedding(30, 16), MeanPool(), nn.Linear(16, 3))
    with pytest.raises(PartitionError, match="only 1 units with parameters"):
        ScaleFLModel(tiny, 2, input_shape=(7,))
    assert ScaleFLModel(tiny, 1, input_shape=(7,))(torch.randint(0, 30, (4, 7))).shape == (4, 3)
    with pytest.raises(PartitionError, match="needs input_shape"):
        ScaleFLModel(user_mlp(), 2)


# ------------------------------------------------------------------- fidelity switches (issue 10)


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_frozen_bn_eval_keeps_statistics_train_uses_batch_statistics(frozen_bn):
    torch.manual_seed(0)
    sm = ScaleFLModel(resnet(), 4)
    sm.train()
    x, y = torch.randn(6, 3, 32, 32) * 3 + 1, torch.randint(0, 10, (6,))
    stats = {k: v.clone() for k, v in sm.state_dict().items() if "running_mean" in k and sm.partition.block_of(k) == 1}
    step = prepare(sm, stage_plan(3, mentor=False, harmonizer=False, frozen_bn=frozen_bn))
    assert "blocks.0.unit0.bn1" not in step.trainable_names()
    loss, _ = step.loss(x, y)
    loss.backward()
    after = sm.state_dict()
    moved = [k for k, v in stats.items() if not torch.equal(after[k], v)]
    assert (moved == []) == (frozen_bn == "eval")  # train: the authors' code, running statistics drift
    assert sm.get_submodule("blocks.0.unit0.bn1").training == (frozen_bn == "train")
    # frozen blocks still get no gradients under either mode
    assert all(p.grad is None for n, p in sm.named_parameters() if sm.partition.block_of(n) == 1)


def test_authors_projection_head_and_model_width_exits():
    from memfl.methods.scalefl.output import AuthorsProjectionHead, ProjectionHead

    light = ScaleFLModel(resnet(), 4)
    authors = ScaleFLModel(resnet(), 4, projection="authors", exit_width="model")
    assert isinstance(light.projs["1"], ProjectionHead)
    # 512 -> 2056 -> 1024 -> 512 scaled by the width (0.125: the last block is 64 wide), no activations
    head = authors.projs["4"]
    assert isinstance(head, AuthorsProjectionHead)
    assert [(m.in_features, m.out_features) for m in head.children()] == [(64, 257), (257, 128), (128, 64)]
    assert all(isinstance(m, nn.Linear) for m in head.children())
    p = torch.randn(5, 64)
    assert torch.allclose(head(p), head.fc3(head.fc2(head.fc1(p))))  # linear: no non-linearity between
    # exits: light keeps block 1's 8 channels, model follows the model's widths 16, 32, 64
    assert [c.out_channels for c in light.exits["1"].convs] == [10, 10, 10]
    assert [c.out_channels for c in authors.exits["1"].convs] == [16, 32, 64]
    assert authors.projs["1"].fc1.in_features == 64 and light.projs["1"].fc1.in_features == 10
    # the memory estimate of a stage plan understands both (the engine adopts a plain model with them)
    from memfl.memory import estimate

    def est(**o):
        return estimate(resnet(), (8, 3, 32, 32), plan=stage_plan(1, **o)).peak_bytes

    assert est(exit_width="model", projection="authors") > est(exit_width="model") > est()
    sc = stage_client_model(resnet, 1, exit_width="model", projection="authors")
    assert sc.exit_width == "model" and sc.projection == "authors"
    assert estimate(sc, (8, 3, 32, 32), plan=stage_plan(1)).peak_bytes == est(exit_width="model", projection="authors")


def test_strategy_carries_the_switches_in_plans_and_model():
    strat = ScaleFL(make_ctx(projection="authors", exit_width="model", frozen_bn="train", nhsic_scale="rms"))
    opts = strat.plan(2).options
    assert opts["projection"] == "authors" and opts["exit_width"] == "model"
    assert opts["frozen_bn"] == "train" and opts["nhsic_scale"] == "rms"
    model = strat.wrap_model_fn(cnn, strat.ctx)(Plan())
    assert model.projection == "authors" and model.exit_width == "model"
    # defaults add nothing to the plan (the plans of earlier runs are unchanged)
    plain = ScaleFL(make_ctx()).plan(2).options
    assert not {"projection", "exit_width", "frozen_bn", "nhsic_scale", "lambda1"} & set(plain)
    lam = ScaleFL(make_ctx(lambda1=[0.1, 0.2, 0.3, 0.4], lambda2=[0.5, 0.5, 0.5, 0.5]))
    step = prepare(lam.wrap_model_fn(cnn, lam.ctx)(Plan()), lam.plan(2))
    assert step.metrics()["beta_t"] == pytest.approx(-0.2) and step.metrics()["gamma_t"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one per stage"):
        ScaleFLConfig(lambda1=[0.1], lambda2=[0.1])
    with pytest.raises(ValueError, match="both"):
        ScaleFLConfig(lambda1=[0.1] * 4)


def test_effective_movement_and_the_movement_advance_rule():
    from memfl.methods.scalefl.schedule import StageSchedule, effective_movement

    u = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    assert effective_movement([u] * 6) == pytest.approx(1.0)
    assert effective_movement([u, -u] * 3) == pytest.approx(0.0)
    assert effective_movement([u, -u, u]) == pytest.approx(1 / 3)
    sched = StageSchedule("elastic", 4, 1, 20, 3, 0.02, rule="movement", movement_window=3, movement_threshold=0.5)
    rounds, r = [], 0
    for sign in [1, 1, 1, 1]:  # a block still moving one way: no advance
        r += 1
        assert sched.advance(r, 1.0, sign * u) is None
    assert sched.last_movement == pytest.approx(1.0)
    for sign in [-1, 1]:  # turning back: |u + u - u| / 3|u| = 1/3 < 0.5, then the new stage starts afresh
        r += 1
        rounds.append(sched.advance(r, 1.0, sign * u))
    assert rounds == ["movement", None] and sched.stage == 2 and len(sched.updates) == 1
    assert sched.transitions[-1]["reason"] == "movement"


def test_strategy_movement_rule_samples_the_active_block_and_checkpoints_exactly():
    import json

    torch.manual_seed(0)
    strat = ScaleFL(make_ctx(advance="movement", movement_window=2, movement_threshold=0.9, r_min=1, r_max=5))
    model_fn = strat.wrap_model_fn(cnn, strat.ctx)
    params = {k: v.clone() for k, v in model_fn(Plan()).state_dict().items()}
    stages, reasons = [], []
    for rnd in range(1, 4):
        stages.append(strat.stage_for(rnd))
        ins = strat.configure_train(rnd, params, clients(10**9, 10**9))
        results = [_fit(strat, model_fn, i, seed=rnd * 10 + k) for k, i in enumerate(ins)]
        params = strat.aggregate_train(rnd, params, results)
        rep = strat.round_report(rnd)
        reasons.append(rep.get("advanced"))
        if rnd == 1:
            assert "movement" not in rep  # fewer than W updates yet
            state = json.loads(json.dumps(strat.state_dict()))
            assert len(state["updates"]) == 1
            n_block1 = sum(p.numel() for n, p in model_fn(Plan()).named_parameters() if n.startswith("blocks.0."))
            assert len(state["updates"][0]) == min(10_000, n_block1)
            other = ScaleFL(make_ctx(advance="movement", movement_window=2, movement_threshold=0.9))
            other.load_state_dict(state)
            assert all(np.array_equal(a, b) for a, b in zip(other.scheduler.updates, strat.scheduler.updates))
        elif rnd == 2:  # W = 2 updates of block 1: the rule's value is reported and decides
            assert 0.0 <= rep["movement"] <= 1.0
            assert (rep.get("advanced") == "movement") == (rep["movement"] < 0.9)
    assert stages[:2] == [1, 1]
