"""FedHybrid's activation compression and the hybrid engine (memfl.methods.fedhybrid.compress / .engine)."""

import copy
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.compress import (
    Compressor,
    allocate_bits,
    narrow_int,
    packed_nbytes,
    quantize,
)
from memfl.methods.fedhybrid.engine import prepare_hybrid
from memfl.methods.fedhybrid.profile import profile_model, segments_of
from memfl.models.base import ConvBNReLU


def _step_view(p, shape):
    view = [1] * len(shape)
    view[1 if len(shape) >= 4 else len(shape) - 1] = -1
    return p.step.view(view)


@pytest.mark.parametrize("shape", [(16, 24, 8, 8), (8, 10, 96), (32, 300)])
@pytest.mark.parametrize("bits,mixed", [(8, True), (4, True), (2, True), (3.5, True), (2, False), (1, True)])
def test_reconstruction_error_within_one_step_and_bytes_exact(shape, bits, mixed):
    torch.manual_seed(0)
    cdim = 1 if len(shape) >= 4 else len(shape) - 1
    scale = torch.rand(shape[cdim]) * 4 + 0.01
    view = [1] * len(shape)
    view[cdim] = -1
    x = torch.randn(*shape) * scale.view(view) + torch.randn(shape[cdim]).view(view)
    p = quantize(x, bits, mixed=mixed)
    y = p.unpack()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((y - x).abs() / _step_view(p, shape)).max() < 1.0  # within one quantisation step
    # the step is range / (2**b - 1) for the channel's bits: 8-bit channels are much finer
    assert p.nbytes == packed_nbytes(shape, bits, mixed=mixed)
    assert p.nbytes < x.numel() * 4 * (bits / 32) * 1.2 + 64 * shape[cdim]


def test_relu_outputs_keep_their_exact_sign_pattern():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 16, 12, 12))
    for bits in (8, 4, 2, 1):
        y = quantize(x, bits, mask=True).unpack()
        assert torch.equal(y > 0, x > 0)


def test_mixed_bits_give_wide_channels_more_bits():
    ranges = torch.tensor([10.0, 0.1, 5.0, 0.2, 8.0, 0.05, 0.3, 0.4])
    bits = allocate_bits(ranges, 4)
    assert bits.sum() <= 4 * len(ranges)
    assert bits[0] >= bits[1] and bits[4] >= bits[5] and bits[2] >= bits[3]
    assert allocate_bits(ranges, 8).tolist() == [8] * 8
    assert allocate_bits(ranges, 2, mixed=False).tolist() == [2] * 8
    assert allocate_bits(ranges, 4, min_bits=4).tolist() == [4] * 8
    assert float(allocate_bits(ranges, 3.5).float().mean()) <= 3.5


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.rand(2, 8, 16, 16) * 3  # values between the 2-bit levels
    n = 300
    acc = torch.zeros_like(x)
    for _ in range(n):
        acc += quantize(x, 2, mixed=False).unpack()
    step = _step_view(quantize(x, 2, mixed=False), x.shape)
    err = (acc / n - x) / step  # in quantisation steps, per element
    # each element: mean of n values in {floor, floor + 1}: standard error <= 0.5 / sqrt(n)
    se = 0.5 / n**0.5
    assert abs(float(err.mean())) < 4 * se / err.numel() ** 0.5 + 1 / 512  # no systematic bias
    assert float(err.abs().max()) < 6 * se  # no element is biased either
    # deterministic rounding to nearest would be biased by up to half a step for some elements
    nearest = torch.round(x / step) * step
    assert float(((nearest - x) / step).abs().max()) > 0.3


def test_integer_saved_tensors_are_narrowed_losslessly():
    idx = torch.randint(0, 784, (4, 8, 14, 14))
    p = narrow_int(idx)
    assert p is not None and p.nbytes == idx.numel() * 2
    assert torch.equal(p.unpack(), idx) and p.unpack().dtype == torch.int64
    assert narrow_int(torch.full((4, 300), 2**20)) is None


def test_a_tensor_saved_twice_is_packed_once():
    comp = Compressor(4)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    y = torch.relu(x * 2)
    a, b = comp.pack(y), comp.pack(y)
    assert a is b
    assert comp.pack(x) is x  # leaves (parameters, the input batch) are never compressed


# ------------------------------------------------------------------------------- the hybrid engine


def _block_model():
    from memfl.models import BlockModel
    from memfl.models.base import classifier_head

    torch.manual_seed(0)
    return BlockModel(
        [
            nn.Sequential(ConvBNReLU(3, 8), ConvBNReLU(8, 8)),
            nn.Sequential(ConvBNReLU(8, 16, stride=2), ConvBNReLU(16, 16)),
        ],
        classifier_head(16, 4),
    )


def _grads(model, plan, x, y):
    m = copy.deepcopy(model)
    out = prepare_hybrid(m, plan).forward(x) if plan is not None else m(x)
    F.cross_entropy(out, y).backward()
    g = torch.cat([p.grad.flatten() for p in m.parameters()])
    b = torch.cat([t.float().flatten() for t in m.buffers()])
    return g, b


def test_keep_and_recompute_give_exact_gradients_and_bn_statistics():
    model = _block_model()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    names = [n for n, _ in segments_of(model)]
    g0, b0 = _grads(model, None, x, y)
    for mode in ("keep", "recompute"):
        g, b = _grads(model, Plan(kind="hybrid", segments={n: mode for n in names}), x, y)
        assert torch.allclose(g, g0, atol=1e-6)
        assert torch.equal(b, b0)  # the recompute does not update BN running stats twice


def test_compressed_gradients_are_close_and_get_closer_with_bits():
    model = _block_model()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    names = [n for n, _ in segments_of(model)]
    g0, _ = _grads(model, None, x, y)
    errs = {}
    for mode in ("q8", "q4", "q2"):
        torch.manual_seed(1)
        g, _ = _grads(model, Plan(kind="hybrid", segments={n: mode for n in names}), x, y)
        errs[mode] = float((g - g0).norm() / g0.norm())
    assert errs["q8"] < 0.05 and errs["q8"] < errs["q4"] < errs["q2"] < 1.5


def test_hybrid_plan_rejects_unknown_segments():
    with pytest.raises(ValueError, match="unknown segments"):
        prepare_hybrid(_block_model(), Plan(kind="hybrid", segments={"nope": "q4"}))
    with pytest.raises(ValueError, match="bad segment mode"):
        prepare_hybrid(_block_model(), Plan(kind="hybrid", segments={"blocks.0.0": "q9"}))


def _deep_net(layers=8, width=16):
    """A stack of equal conv-BN-ReLU layers: stored activations dominate its peak."""
    torch.manual_seed(0)
    mods = [ConvBNReLU(3, width)] + [ConvBNReLU(width, width) for _ in range(layers - 1)]
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, 10))


@pytest.mark.slow
def test_measured_memory_of_a_compressed_step_drops_as_the_bits_say():
    """Real peak RSS (fresh subprocesses) of full training and of every segment at 8/4/2 bits: the
    drop against full training matches what the bits say (float32 -> packed bytes)."""
    from memfl.memory import measure

    net = _deep_net()
    shape = (32, 3, 32, 32)
    factory = partial(nn.Sequential, *net)  # picklable: the measuring child rebuilds the net
    prof = profile_model(net, shape, timing=False)
    measured = {"full": measure(factory, shape, steps=2).peak_bytes}
    for bits in (8, 4, 2):
        plan = Plan(kind="hybrid", segments={n: f"q{bits}" for n in prof.names})
        measured[bits] = measure(factory, shape, plan=plan, steps=2).peak_bytes
    assert measured["full"] > measured[8] > measured[4] > measured[2]
    from memfl.methods.fedhybrid.profile import tensor_cost

    for bits in (8, 4, 2):
        modes = [f"q{bits}"] * prof.head
        full_b = sum(t.nbytes for t in prof.tensors)
        packed_b = sum(sum(tensor_cost(t, modes, prof.head)) for t in prof.tensors)
        expected_drop = full_b - packed_b
        drop = measured["full"] - measured[bits]
        assert abs(drop - expected_drop) < 0.2 * expected_drop + (2 << 20), (bits, drop, expected_drop)


def test_training_with_4bit_activations_converges():
    """A small classifier on a separable synthetic task: q4 everywhere learns like full training."""
    torch.manual_seed(0)
    n, classes = 256, 4
    centers = torch.randn(classes, 3, 8, 8) * 2
    y = torch.randint(0, classes, (n,))
    x = centers[y] + torch.randn(n, 3, 8, 8)

    def train(plan):
        torch.manual_seed(0)
        model = nn.Sequential(
            ConvBNReLU(3, 16),
            ConvBNReLU(16, 16),
            ConvBNReLU(16, 16),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(16, classes),
        )
        step = prepare_hybrid(model, plan)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(60):
            idx = torch.randint(0, n, (32,))
            opt.zero_grad()
            with step.saved_tensors():
                loss, _ = step.loss(x[idx], y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, acc

    names = [str(i) for i in range(3)]
    full = train(Plan(kind="hybrid", segments={}))
    q4 = train(Plan(kind="hybrid", segments={n: "q4" for n in names}))
    assert q4[1] < 0.3 * q4[0]  # the loss falls
    assert q4[2] > 0.9 and q4[2] > full[2] - 0.05  # and it learns the task like full training


# ------------------------------------------------------------------- users' own models (memfl.run)


class _MeanPool(nn.Module):
    def forward(self, h):
        return h.mean(dim=1)


class _TokenNet(nn.Module):  # not an nn.Sequential: its forward is its children in order
    def __init__(self):
        super().__init__()
        self.emb, self.mix, self.act, self.pool, self.fc = (
            nn.Embedding(30, 16),
            nn.Linear(16, 16),
            nn.ReLU(),
            _MeanPool(),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        return self.fc(self.pool(self.act(self.mix(self.emb(x)))))


def _user_models():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mlp = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(16, 3),
    )
    return {
        "mlp": (mlp, torch.randn(8, 12, generator=g)),
        "tokens": (_TokenNet(), torch.randint(0, 30, (8, 7), generator=g)),
        "cnn": (cnn, torch.randn(8, 1, 20, 36, generator=g)),
    }


@pytest.mark.parametrize("kind", ["mlp", "tokens", "cnn"])
def test_user_models_are_profiled_and_trained_segment_by_segment(kind):
    from memfl.core.protocol import Plan
    from memfl.methods.fedhybrid.profile import plan_memory

    model, x = _user_models()[kind]
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    names = [n for n, _ in segments_of(model)]
    assert names == [n for n, _ in model.named_children()]
    prof = profile_model(model, tuple(x.shape), timing=False)
    assert [s.name for s in prof.segments] == names
    weighted = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    plans = {
        "keep": {},
        "recompute": {weighted[0]: "recompute"},
        "q4": {weighted[1] if kind != "tokens" else "mix": "q4"},
    }
    ref = None
    for label, segments in plans.items():
        assert plan_memory(prof, segments)["peak_bytes"] > 0
        m = copy.deepcopy(model)
        step = prepare_hybrid(m, Plan(kind="hybrid", segments=segments))
        assert step.trainable_names() == [n for n, _ in m.named_parameters()]
        with step.saved_tensors():
            loss, _ = step.loss(x, y)
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in m.parameters()])
        assert torch.isfinite(grads).all() and grads.abs().sum() > 0
        if ref is None:
            ref = grads
        elif label == "recompute":
            assert torch.allclose(grads, ref, atol=1e-6)  # recomputing changes nothing


def test_a_user_model_whose_forward_is_not_its_children_is_refused():
    from memfl.core.protocol import Plan
    from memfl.methods.fedhybrid.profile import PartitionError

    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(30, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    x = torch.randint(0, 30, (4, 7))
    with pytest.raises(PartitionError, match="not its children"):
        profile_model(Inline(), tuple(x.shape), timing=False)
    with pytest.raises(PartitionError, match="not its children"):
        prepare_hybrid(Inline(), Plan(kind="hybrid", segments={})).forward(x)
    with pytest.raises(PartitionError, match="no child modules"):
        segments_of(nn.Linear(3, 3))
