"""memfl.memory: the estimate's parts, plan hooks, and the estimate against a real measurement."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from memfl.core.engine import ENGINES, TrainStep
from memfl.core.protocol import Plan
from memfl.memory import MeasurementError, estimate, measure, tensor_bytes

F32 = 4


# ---- module-level model builders (picklable for the measuring subprocess) -----------------------


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))


def small_cnn() -> nn.Module:
    """Two conv-BN-ReLU layers on 3x32x32 (about 0.8 MB of activations per sample)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def failing_model() -> nn.Module:
    raise ValueError("model_fn exploded on purpose")


def sleeping_model() -> nn.Module:
    time.sleep(120)
    return small_mlp()


# ---- the parts ----------------------------------------------------------------------------------


def test_parameter_gradient_and_optimizer_bytes_are_exact() -> None:
    model = small_cnn()
    n_params = sum(p.numel() for p in model.parameters())
    n_float_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # num_batches_tracked
    expected_params = (n_params + n_float_buffers) * F32 + n_bn * 8
    assert expected_params == tensor_bytes(list(model.parameters()) + list(model.buffers()))

    sgd = estimate(model, (4, 3, 32, 32), optimizer="sgd")
    assert sgd.parameters == expected_params
    assert sgd.gradients == n_params * F32
    assert sgd.optimizer_state == n_params * F32  # one momentum buffer per parameter

    adam = estimate(model, (4, 3, 32, 32), optimizer="adam")
    n_tensors = len(list(model.parameters()))
    assert adam.optimizer_state == 2 * sgd.optimizer_state + 4 * n_tensors  # + a 4-byte step each
    assert estimate(model, (4, 3, 32, 32), momentum=0.0).optimizer_state == 0

    b = sgd.breakdown()
    assert set(b) == {"parameters", "gradients", "optimizer_state", "activations", "transient", "overhead"}
    assert sgd.peak_bytes == (
        b["parameters"] + b["optimizer_state"] + max(b["activations"], b["gradients"]) + b["transient"] + b["overhead"]
    )
    assert min(b.values()) >= 0


def test_activations_are_the_saved_tensors_of_an_mlp() -> None:
    # saved for backward: the ReLU output (B x 64, also the second Linear's input) and the
    # log-softmax output (B x 10); the input batch, labels and weights are not activations.
    for batch in (3, 40):
        est = estimate(small_mlp(), (batch, 3, 8, 8))
        assert abs(est.activations - batch * (64 + 10) * F32) <= 64


def test_activations_scale_linearly_with_batch() -> None:
    model = small_cnn()
    acts = {b: estimate(model, (b, 3, 32, 32)).activations for b in (8, 16, 32)}
    assert acts[32] == pytest.approx(2 * acts[16], rel=0.02)
    assert acts[32] - acts[16] == pytest.approx(2 * (acts[16] - acts[8]), rel=0.02)
    peaks = [estimate(model, (b, 3, 32, 32)).peak_bytes for b in (8, 32)]
    assert peaks[1] > peaks[0]


def test_estimate_leaves_the_model_untouched() -> None:
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate(model, (8, 3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None for p in model.parameters())


# ---- plans: frozen parameters and saved-tensor hooks --------------------------------------------


def _freeze_all_but_last(model: nn.Module, plan: Plan) -> TrainStep:
    """A ScaleFL-like stage: only the classifier trains; the rest runs without saving."""
    last = model[-1]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in last.parameters():
        p.requires_grad_(True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = model[:-1](x)
        return last(h)

    return TrainStep(module=model, trainable=list(last.named_parameters()), forward=forward)


def test_frozen_parameters_have_no_gradient_or_optimizer_bytes(monkeypatch) -> None:
    monkeypatch.setitem(ENGINES, "stage", _freeze_all_but_last)
    model = small_cnn()
    full = estimate(model, (8, 3, 32, 32))
    stage = estimate(model, (8, 3, 32, 32), plan=Plan(kind="stage", stage=1))
    head = model[-1]
    head_bytes = sum(p.numel() for p in head.parameters()) * F32
    assert stage.parameters == full.parameters  # frozen parameters are still held
    assert stage.gradients == head_bytes
    assert stage.optimizer_state == head_bytes
    assert stage.activations < 8 * 64 * F32 + 8 * 10 * F32 + 64  # only the head's input/output
    assert stage.peak_bytes < full.peak_bytes
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is untouched


class _Packed:
    """What a compressing pack hook returns: the bytes it keeps live in an attribute."""

    def __init__(self, t: torch.Tensor) -> None:
        self.data = t.to(torch.float16)
        self.dtype = t.dtype

    def unpack(self) -> torch.Tensor:
        return self.data.to(self.dtype)


def _half_precision_engine(model: nn.Module, plan: Plan) -> TrainStep:
    """Stores every float32 activation as float16 (one packed copy per storage)."""

    def hooks() -> torch.autograd.graph.saved_tensors_hooks:
        cache: dict[int, _Packed] = {}

        def pack(t: torch.Tensor) -> Any:
            if t.dtype != torch.float32 or t._base is not None:
                return t  # views: the flattened input batch, transposed weights
            key = t.untyped_storage().data_ptr()
            if key not in cache:
                cache[key] = _Packed(t)
            return cache[key]

        def unpack(p: Any) -> torch.Tensor:
            return p.unpack() if isinstance(p, _Packed) else p

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    return TrainStep(module=model, trainable=list(model.named_parameters()), forward=model, saved_tensors=hooks)


def test_plan_hooks_are_counted_by_what_they_store(monkeypatch) -> None:
    monkeypatch.setitem(ENGINES, "hybrid", _half_precision_engine)
    model = small_mlp()
    batch = 64
    full = estimate(model, (batch, 3, 8, 8))
    half = estimate(model, (batch, 3, 8, 8), plan=Plan(kind="hybrid"))
    # the plan keeps the ReLU and log-softmax outputs as float16 (views, i.e. the flattened input
    # batch and the transposed weights, are passed through and are not activations either way)
    assert half.activations == pytest.approx(full.activations / 2, rel=0.02)
    assert half.gradients == full.gradients


# ---- against a real measurement -----------------------------------------------------------------


def test_estimate_matches_measurement_on_a_small_conv_model() -> None:
    shape = (32, 3, 32, 32)
    est = estimate(small_cnn(), shape)
    meas = measure(small_cnn, shape, steps=2)
    assert meas.steps == 2 and meas.device.startswith("cpu") and meas.step_seconds > 0
    assert meas.peak_bytes > est.parameters + est.activations  # at least what must be live
    error = abs(est.peak_bytes - meas.peak_bytes) / meas.peak_bytes
    assert error < 0.15, (est.breakdown(), meas)


def test_measure_reports_the_childs_error() -> None:
    with pytest.raises(MeasurementError, match="model_fn exploded on purpose") as info:
        measure(failing_model, (4, 3, 8, 8), steps=1)
    assert "Traceback" in str(info.value)  # the child's traceback text comes back


def test_measure_times_out_and_kills_the_child() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        measure(sleeping_model, (4, 3, 8, 8), steps=1, timeout=4)
    assert time.monotonic() - start < 30


def test_integer_inputs_example_and_embedding():
    import torch
    from torch import nn

    from memfl.memory import InputSpec, estimate, input_spec

    emb = nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), nn.Linear(5 * 8, 3))
    assert input_spec(emb) == InputSpec("int", torch.long, 0, 30)
    assert estimate(emb, (8, 5)).peak_bytes > 0
    ids = torch.randint(0, 30, (4, 5))
    assert input_spec(None, ids).kind == "int" and input_spec(None, ids).high <= 30
    assert estimate(emb, (8, 5), example=ids).peak_bytes > 0
    assert input_spec(nn.Linear(3, 2)) == InputSpec()  # images / features: the default


def test_measure_unguarded_script_message(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import torch\nfrom memfl.memory import measure\n"
        "def make():\n    return torch.nn.Linear(4, 2)\n"
        "try:\n    measure(make, (2, 4), steps=1, timeout=120)\n"
        "except Exception as err:\n    print('ERR', err)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert '__name__ == "__main__"' in out.stdout, out.stdout + out.stderr
    assert "re-imports the main script" in out.stdout


def test_time_steps_times_plans_interleaved_without_the_mmap_threshold(monkeypatch) -> None:
    """Step timing runs in its own child with the trainer's allocator (no mmap threshold), the
    caller's threads, CPU and wall medians per plan."""
    from memfl.memory import StepTiming, time_steps

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    hybrid = Plan(kind="hybrid", options={"fused_step": True})
    t = time_steps(small_cnn, (8, 3, 32, 32), {"full": Plan(), "plan": hybrid}, steps=5, warmup=1)
    assert isinstance(t, StepTiming)
    assert set(t.cpu_seconds) == set(t.wall_seconds) == {"full", "plan"}
    assert all(v > 0 for v in [*t.cpu_seconds.values(), *t.wall_seconds.values()])
    assert t.steps == 5 and t.warmup == 1 and t.threads == torch.get_num_threads()
    assert t.mmap_threshold is None  # the memory measurement's setting does not leak into timing
    assert t.ratio("plan") == pytest.approx(t.cpu_seconds["plan"] / t.cpu_seconds["full"])
    assert t.to_json()["cpu_seconds"]["full"] == t.cpu_seconds["full"]
    with pytest.raises(ValueError):
        time_steps(small_cnn, (8, 3, 32, 32), {"full": Plan()}, steps=0)
