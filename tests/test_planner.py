"""FedHybrid's planner (memfl.methods.fedhybrid.planner) and `memfl plan`."""

import itertools
import json
from functools import partial

import pytest
import torch
from torch import nn

from memfl.core.protocol import Plan
from memfl.methods.fedhybrid.planner import (
    InfeasibleBudget,
    allowed_modes,
    min_feasible,
    plan_for_budget,
    solve,
)
from memfl.methods.fedhybrid.profile import ModelProfile, plan_memory, plan_seconds, profile_model
from memfl.models.base import ConvBNReLU


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


@pytest.fixture(scope="module")
def small_profile() -> ModelProfile:
    prof = profile_model(_block_model(), (16, 3, 16, 16), timing=False)
    # deterministic times (the real ones are measured): recompute = forward, compression per byte
    for i, seg in enumerate(prof.segments):
        seg.fwd_seconds = 0.010 * (i + 1)
        saved = sum(t.nbytes for t in prof.tensors if t.savers and t.savers[0] == i)
        seg.pack_seconds = {"q8": saved * 4e-9, "q4": saved * 5e-9, "q2": saved * 6e-9}
    prof.step_seconds = 0.2
    return prof


def test_profile_records_segments_and_saved_tensors(small_profile):
    prof = small_profile
    assert prof.names == ["blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1"]
    # every segment saves activations; a ReLU output saved by two segments is one record
    assert all(any(i in t.savers for t in prof.tensors) for i in range(4))
    assert any(len([s for s in t.savers if s < 4]) == 2 for t in prof.tensors)
    full = plan_memory(prof, {})
    assert full["saved_full"] > 0 and full["peak_bytes"] > prof.fixed_bytes()


@pytest.mark.parametrize("fused", [False, True])
def test_dp_and_ilp_are_exact_against_brute_force(small_profile, fused):
    """The DP's and the ILP's optimum equal the best of all 5**4 plans under the same model
    (with and without the optimizer step fused into backward)."""
    prof = small_profile
    modes = allowed_modes()
    options = {"mixed": True, "min_bits": 2, **({"fused_step": True} if fused else {})}
    plans = []
    for combo in itertools.product(modes, repeat=prof.head):
        seg = dict(zip(prof.names, combo))
        plans.append((plan_seconds(prof, seg), plan_memory(prof, seg, options)["peak_bytes"], combo))
    lo = min(p for _, p, _ in plans)
    hi = max(p for _, p, _ in plans)
    assert min_feasible(prof, fused=fused) == lo
    for frac in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        budget = lo + frac * (hi - lo)
        best = min(t for t, p, _ in plans if p <= budget)
        for method in ("dp", "ilp"):
            choice = solve(prof, budget, method=method, fused=fused)
            assert choice.model_peak_bytes <= budget
            assert choice.added_seconds == pytest.approx(best, abs=1e-9)
            assert bool(choice.plan.options.get("fused_step")) == fused or choice.plan.kind == "full"


def test_fused_step_lowers_the_smallest_feasible_budget(small_profile):
    """Fusing the optimizer step into backward frees the gradients: a lower floor, and the
    planner's default uses it for SGD (per-parameter)."""
    prof = small_profile
    plain, fused = min_feasible(prof, fused=False), min_feasible(prof, fused=True)
    assert fused < plain
    assert plain - fused <= prof.grad_bytes
    assert min_feasible(prof) == fused
    c = solve(prof, fused)
    assert c.plan.options.get("fused_step") is True


def test_min_bits_guard_and_infeasible_budget(small_profile):
    prof = small_profile
    c = solve(prof, min_feasible(prof, min_bits=4), min_bits=4)
    assert not any(m in ("q2", "q1") for m in c.modes.values())
    with pytest.raises(InfeasibleBudget) as err:
        solve(prof, min_feasible(prof) - 1)
    assert err.value.min_feasible_bytes == min_feasible(prof)
    assert "smallest feasible budget" in str(err.value)


def test_speed_scales_time_not_the_plan(small_profile):
    prof = small_profile
    budget = (min_feasible(prof) + plan_memory(prof, {})["peak_bytes"]) / 2
    a, b = solve(prof, budget, speed=1.0), solve(prof, budget, speed=0.5)
    assert a.modes == b.modes
    assert b.added_seconds == pytest.approx(2 * a.added_seconds)


def test_verification_corrects_the_model_with_the_estimator(small_profile):
    """An estimator that reads 10% above the planner's model: the returned plan fits it."""
    prof = small_profile

    def pessimist(plan: Plan) -> int:
        seg = plan.segments or {}
        return int(1.1 * plan_memory(prof, seg, plan.options)["peak_bytes"])

    full = plan_memory(prof, {})["peak_bytes"]
    budget = int((1.1 * min_feasible(prof) / 0.98 + 1.1 * full) / 2)  # between min and full
    c = plan_for_budget(prof, budget, estimate_fn=pessimist, margin=0.02, slack_bytes=0)
    assert c.verified and c.predicted_peak_bytes == pessimist(c.plan)
    assert c.predicted_peak_bytes <= budget * 0.98 and c.plan.kind == "hybrid"
    assert plan_for_budget(prof, 2 * full, estimate_fn=None, slack_bytes=0).plan.kind == "full"
    # the absolute slack (default 2 MiB) comes off the budget as well
    with pytest.raises(InfeasibleBudget) as err:
        plan_for_budget(prof, budget, estimate_fn=pessimist, margin=0.02, slack_bytes=budget)
    assert err.value.min_feasible_bytes > budget


def _deep_net(layers=6, width=16):
    torch.manual_seed(0)
    mods = [ConvBNReLU(3, width)] + [ConvBNReLU(width, width) for _ in range(layers - 1)]
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, 10))


@pytest.mark.slow
def test_plan_measured_peak_fits_its_budget():
    """Plan for 60% of the full-training peak on a small model; the real peak (fresh subprocess)
    fits the budget."""
    from memfl.memory import measure
    from memfl.methods.fedhybrid.solve import solve_for_model

    net = _deep_net()
    factory = partial(nn.Sequential, *net)
    shape = (32, 3, 32, 32)
    choice, prof, full_peak = solve_for_model(factory, shape, "0.6x", timing=False)
    assert choice.plan.kind == "hybrid" and choice.budget_bytes == int(0.6 * full_peak)
    assert choice.predicted_peak_bytes <= choice.budget_bytes
    measured = measure(factory, shape, plan=choice.plan, steps=2).peak_bytes
    assert measured <= choice.budget_bytes


def test_memfl_plan_cli(capsys):
    from memfl.cli import main

    args = ["plan", "--model", "cnn", "--input", "1x28x28", "--batch", "16", "--width", "0.5"]
    assert main(args + ["--budget", "0.95x", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"budget_bytes", "predicted_peak_bytes", "step_time_ratio", "plan", "segments"} <= set(out)
    assert out["predicted_peak_bytes"] <= out["budget_bytes"]
    assert out["step_time_ratio"] >= 1.0
    assert main(args + ["--budget", "1"]) == 2  # 1 MB: below anything feasible
    assert "smallest feasible budget" in capsys.readouterr().err
    assert main(args + ["--budget", "lots"]) == 2


def test_memory_cli_solves_budget_plans(capsys):
    from memfl.cli import main

    assert (
        main(["memory", "--model", "cnn", "--input", "1x28x28", "--batch", "16", "--plan", "budget:0.95x", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["kind"] in ("hybrid", "full")


def test_profile_calibrates_its_times_against_whole_steps():
    """With timing, the isolated forward / pack costs are scaled by whole training steps (the
    trainer's step, interleaved); the factors are kept; old profiles read ``calibration`` None."""
    model = _block_model()
    shape = (8, 3, 16, 16)
    raw = profile_model(model, shape, timing=True, reps=1, calibrate_steps=0)
    assert raw.calibration is None and raw.timed
    prof = profile_model(model, shape, timing=True, reps=1, calibrate_steps=1)
    cal = prof.calibration
    assert cal is not None and {"recompute", "q8", "q4", "q2", "step_cpu_seconds"} <= set(cal)
    assert set(cal["step_cpu_seconds"]) == {"full", "base", "recompute", "q8", "q2"}
    assert all(cal[k] >= 0 for k in ("recompute", "q8", "q4", "q2"))
    assert cal["q4"] == pytest.approx((cal["q8"] + cal["q2"]) / 2)
    assert prof.step_seconds == cal["step_cpu_seconds"]["full"]
    assert prof.fused_seconds >= 0
    # every segment's cost in a mode is scaled by that mode's factor (the fit lines too)
    a, b = prof.pack_fit["q2"]
    assert b >= 0 and a >= 0
    again = ModelProfile.from_json(json.loads(json.dumps(prof.to_json())))
    assert again.calibration["recompute"] == cal["recompute"]
    old = ModelProfile.__new__(ModelProfile)  # a profile pickled before the field existed
    assert old.calibration is None
