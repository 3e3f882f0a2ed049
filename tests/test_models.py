"""Model zoo: shapes, the BlockModel contract, width nesting, units and boundary layers."""

from __future__ import annotations

import functools

import pytest
import torch

from memfl.models import MODEL_NAMES, BlockModel, boundary_layers, build_model, units

SHAPES = [(1, 28), (3, 32)]  # (in_channels, image_size)


@functools.cache
def _model(name: str, cin: int, size: int, width: float = 1.0) -> BlockModel:
    torch.manual_seed(0)
    return build_model(name, in_channels=cin, num_classes=7, image_size=size, width=width)


def _fresh(name: str, cin: int, size: int, width: float = 1.0) -> BlockModel:
    torch.manual_seed(0)
    return build_model(name, in_channels=cin, num_classes=7, image_size=size, width=width)


@pytest.mark.parametrize("cin,size", SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_width_logits_and_backward(name, cin, size):
    model = _model(name, cin, size)
    assert isinstance(model, BlockModel) and len(model.blocks) == 4
    assert model.arch["name"] == name and model.arch["in_channels"] == cin
    model.train()
    out = model(torch.randn(2, cin, size, size))
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cin,size", SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_blocks_and_units_reproduce_forward(name, cin, size):
    # width 0.25: same structure as the full model, a fraction of the compute
    model = _fresh(name, cin, size, 0.25)
    x = torch.randn(2, cin, size, size)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (2, 7)
        h = x
        for block in model.blocks:
            h = block(h)
        torch.testing.assert_close(model.head(h), ref)
        h = x
        for _, unit in units(model):
            h = unit(h)
        torch.testing.assert_close(model.head(h), ref)
    # train mode too (BN batch statistics), with gradients through the unit chain
    model.train()
    h = x
    for _, unit in units(model, include_head=True):
        h = unit(h)
    h.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_units_names_and_order(name):
    model = _model(name, 3, 32)
    modules = dict(model.named_modules())
    names = [n for n, _ in units(model)]
    assert len(names) > 4 and len(set(names)) == len(names)
    for n, m in units(model):
        assert modules[n] is m
    blocks = [int(n.split(".")[1]) for n in names]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1, 2, 3}
    assert units(model, include_head=True)[-1] == ("head", model.head)
    assert model.units() == units(model)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_boundary_layers(name):
    model = _model(name, 3, 32)
    keys = list(model.state_dict())
    modules = dict(model.named_modules())
    for i in range(4):
        prefixes = boundary_layers(model, i)
        assert prefixes and prefixes == model.boundary_layers(i)
        for p in prefixes:
            assert p.startswith(f"blocks.{i}.")
            assert any(k.startswith(p + ".") for k in keys), p
        if model.arch["kind"] == "conv":
            conv, bn = (modules[p] for p in prefixes)
            assert isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
            assert conv.out_channels == bn.num_features == model.arch["block_channels"][i]
            assert "shortcut" not in prefixes[0]
        else:
            assert len(prefixes) == 1 and prefixes[0] == f"blocks.{i}.layer{3 * i + 2}"
    # the last unit with parameters of each block holds its boundary layer
    last_unit = {}
    for n, m in units(model):
        if any(True for _ in m.parameters()):
            last_unit[int(n.split(".")[1])] = n
    for i in range(4):
        assert all(p.startswith(last_unit[i]) for p in boundary_layers(model, i))
    assert boundary_layers(model, -1) == boundary_layers(model, 3)
    with pytest.raises(IndexError):
        boundary_layers(model, 4)


@pytest.mark.parametrize("width", [0.5, 0.25])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_width_nests_in_full_model(name, width):
    full = _model(name, 3, 32).state_dict()
    small_model = _fresh(name, 3, 32, width)
    small = small_model.state_dict()
    assert list(small) == list(full)
    shrunk = 0
    for k, t in small.items():
        assert t.dim() == full[k].dim(), k
        assert all(a <= b for a, b in zip(t.shape, full[k].shape)), (k, t.shape, full[k].shape)
        shrunk += t.shape != full[k].shape
    assert shrunk > 0
    n_small = sum(p.numel() for p in small_model.parameters())
    n_full = sum(t.numel() for k, t in full.items() if k in dict(small_model.named_parameters()))
    assert n_small < n_full * (width * 1.5) ** 2 + 5000
    # leading slices of the full weights load into the narrow model and run
    sliced = {k: full[k][tuple(slice(0, s) for s in t.shape)] for k, t in small.items()}
    small_model.load_state_dict(sliced)
    small_model.eval()
    assert small_model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_deterministic_init():
    for name in ("resnet18", "vit-tiny"):
        a, b = _fresh(name, 1, 28).state_dict(), _fresh(name, 1, 28).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_block_output_shapes():
    assert _model("cnn", 1, 28).block_output_shapes() == [(32, 14, 14), (64, 7, 7), (128, 3, 3), (256, 1, 1)]
    assert _model("resnet18", 3, 32).block_output_shapes()[-1] == (512, 4, 4)
    assert _model("vgg11", 1, 28).block_output_shapes()[-1] == (512, 1, 1)
    assert _model("vit-tiny", 1, 28).block_output_shapes() == [(49, 192)] * 4
    m = _fresh("cnn", 1, 28, 0.5)
    assert m.training and m.block_output_shapes()[0] == (16, 14, 14) and m.training


def test_vit_width_keeps_heads_dividing_dim():
    for w in (0.5, 0.25, 0.3, 0.01):
        m = build_model("vit-tiny", width=w)
        attn = m.blocks[0].layer0.attn
        assert attn.q.out_features % 3 == 0 and attn.q.out_features >= 3


def test_errors():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="divisible"):
        build_model("vit-tiny", image_size=30)
    with pytest.raises(ValueError):
        build_model("cnn", width=0)
    assert build_model("VIT_tiny").arch["name"] == "vit-tiny"
