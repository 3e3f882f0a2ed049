"""The optimizer step fused into backward (memfl.core.optim.StepInBackward, plan option fused_step)."""

import pytest
import torch
from torch import nn

from memfl.core.engine import TrainStep, prepare
from memfl.core.optim import StepInBackward, make_step_optimizer
from memfl.core.protocol import HyperParams, Instruction, Plan
from memfl.core.trainer import LocalTrainer
from memfl.methods.fedhybrid.profile import plan_memory, profile_model
from memfl.models.base import ConvBNReLU


def _model(plan=None):
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


SEGMENTS = {"blocks.0.0": "q4", "blocks.1.0": "recompute"}


@pytest.mark.parametrize("optimizer,prox_mu", [("sgd", 0.0), ("sgd", 0.05), ("adam", 0.0)])
def test_fused_step_trains_exactly_like_step_after_backward(optimizer, prox_mu):
    """Same parameters and buffers after 3 local steps (SGD momentum + weight decay, FedProx term,
    Adam), through the trainer, with a plan that also recomputes and compresses."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)
    start = _model().state_dict()
    hp = HyperParams(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, optimizer=optimizer, prox_mu=prox_mu)
    out = {}
    for fused in (False, True):
        opts = {"mixed": True, "min_bits": 2, **({"fused_step": True} if fused else {})}
        plan = Plan(kind="hybrid", segments=SEGMENTS, options=opts)
        ins = Instruction(
            round=1,
            client_id=0,
            params={k: v.clone() for k, v in start.items()},
            trainable=[n for n, _ in _model().named_parameters()],
            plan=plan,
            hparams=hp,
            seed=3,
        )
        trainer = LocalTrainer(_model)
        out[fused] = trainer.fit(ins, x, y)
        # the fused step's hooks are gone from the trainer's cached model after the round
        assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in trainer.model_for(plan).parameters())
    assert out[True].steps == out[False].steps == 3
    for name, want in out[False].params.items():
        got = out[True].params[name]
        assert torch.allclose(got, want, rtol=0, atol=1e-6), name
    # the update is not trivial
    moved = max(float((out[True].params[n] - start[n]).abs().max()) for n in out[True].params if n.endswith("weight"))
    assert moved > 1e-3


def test_fused_step_frees_gradients_during_backward():
    model = _model()
    step = prepare(model, Plan(kind="hybrid", options={"fused_step": True}))
    assert step.step_in_backward
    params = [p for _, p in step.trainable]
    opt = make_step_optimizer(step, params, "sgd", lr=0.1)
    assert isinstance(opt, StepInBackward)
    before = [p.detach().clone() for p in params]
    loss, _ = step.loss(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,)))
    loss.backward()
    assert all(p.grad is None for p in params)  # stepped and dropped inside backward
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    opt.remove()


def test_fused_step_refuses_global_norm_clipping_and_unknown_optimizers():
    model = _model()
    step = TrainStep(module=model, trainable=list(model.named_parameters()), forward=model, step_in_backward=True)
    params = [p for _, p in step.trainable]
    with pytest.raises(ValueError, match="clipping by global norm"):
        make_step_optimizer(step, params, "sgd", lr=0.1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="per-parameter"):
        make_step_optimizer(step, params, "lbfgs", lr=0.1)
    # without fusion clipping is the caller's business: an ordinary optimizer comes back
    plain = TrainStep(module=model, trainable=list(model.named_parameters()), forward=model)
    assert isinstance(make_step_optimizer(plain, params, "sgd", lr=0.1, max_grad_norm=1.0), torch.optim.SGD)


def test_fused_step_memory_model_and_estimate_agree_on_the_saving():
    """The planner's model and the estimator both drop (almost) all gradients from the peak."""
    from memfl.memory import estimate

    shape = (16, 3, 16, 16)
    prof = profile_model(_model(), shape, timing=False)
    plain = plan_memory(prof, SEGMENTS, {"min_bits": 2})
    fused = plan_memory(prof, SEGMENTS, {"min_bits": 2, "fused_step": True})
    saved_model = plain["peak_bytes"] - fused["peak_bytes"]
    assert 0 < saved_model <= prof.grad_bytes
    e_plain = estimate(_model(), shape, plan=Plan(kind="hybrid", segments=SEGMENTS, options={"min_bits": 2}))
    e_fused = estimate(
        _model(), shape, plan=Plan(kind="hybrid", segments=SEGMENTS, options={"min_bits": 2, "fused_step": True})
    )
    saved_est = e_plain.peak_bytes - e_fused.peak_bytes
    assert 0 < saved_est <= prof.grad_bytes
    assert e_fused.gradients < e_plain.gradients
