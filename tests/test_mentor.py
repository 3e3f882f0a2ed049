"""The Curriculum Mentor's nHSIC: against a plain reference, and its known properties."""

import math

import pytest
import torch

from memfl.methods.scalefl.mentor import (
    coefficients,
    gaussian_kernel,
    hsic,
    mentor_loss,
    nhsic,
    one_hot,
    stage_coefficients,
)


def reference_nhsic(a, b, sigma=5.0, normalize=False):
    """Plain O(m^2) nHSIC with explicit loops, an explicit H matrix and traces (float64)."""
    a = a.double().reshape(a.shape[0], -1)
    b = b.double().reshape(b.shape[0], -1)
    m = a.shape[0]

    def kernel(v):
        if normalize:
            mean = [sum(v[i, j] for i in range(m)) / m for j in range(v.shape[1])]
            var = sum((v[i, j] - mean[j]) ** 2 for i in range(m) for j in range(v.shape[1])) / (m * v.shape[1])
            v = v / math.sqrt(var + 1e-12)
        d = v.shape[1]
        k = torch.empty(m, m, dtype=torch.float64)
        for i in range(m):
            for j in range(m):
                dist = float(((v[i] - v[j]) ** 2).sum())
                k[i, j] = math.exp(-dist / (2 * sigma * sigma * d))
        return k

    h = torch.eye(m, dtype=torch.float64) - torch.ones(m, m, dtype=torch.float64) / m
    ka, kb = kernel(a), kernel(b)

    def hs(x, y):
        return float(torch.trace(x @ h @ y @ h)) / (m * m)

    return hs(ka, kb) / math.sqrt(hs(ka, ka) * hs(kb, kb))


@pytest.mark.parametrize("normalize", [True, False])
def test_nhsic_matches_a_plain_reference(normalize):
    torch.manual_seed(0)
    a = torch.randn(12, 5)
    b = a[:, :3] ** 2 + 0.3 * torch.randn(12, 3)
    got = float(nhsic(a, b, sigma=2.0, normalize=normalize))
    want = reference_nhsic(a, b, sigma=2.0, normalize=normalize)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("sigma", [5.0, 1.0])
def test_default_nhsic_is_the_formula_on_raw_features_within_1e5(sigma):
    """The default (``nhsic_scale = "raw"``) is exactly the formula: no rescaling, features of very
    different scales (an image-like input, a wide feature, one-hot labels)."""
    torch.manual_seed(10)
    x = torch.rand(16, 1, 6, 6)  # pixels in [0, 1]
    z = 3.0 * torch.relu(x.reshape(16, -1) @ torch.randn(36, 20)) + 0.5 * torch.randn(16, 20)
    y = one_hot(torch.randint(0, 4, (16,)), 4)
    for a, b in ((x, z), (y, z), (z, z * 0.1 + torch.randn(16, 20))):
        assert abs(float(nhsic(a, b, sigma=sigma)) - reference_nhsic(a, b, sigma=sigma)) < 1e-5
    # the rms option is a different number on such inputs (it rescales before the kernel)
    assert abs(float(nhsic(x, z, normalize=True)) - float(nhsic(x, z))) > 1e-3


def test_hsic_and_kernel_match_their_definitions():
    torch.manual_seed(1)
    a, b = torch.randn(9, 4), torch.randn(9, 6)
    k = gaussian_kernel(a, sigma=5.0, normalize=False).double()
    d2 = torch.cdist(a.double(), a.double()) ** 2
    assert torch.allclose(k, torch.exp(-d2 / (2 * 25 * 4)), atol=1e-6)
    m = 9
    h = torch.eye(m, dtype=torch.float64) - 1 / m
    kb = gaussian_kernel(b, 5.0, normalize=False).double()
    assert float(hsic(a, b, 5.0, normalize=False)) == pytest.approx(float(torch.trace(k @ h @ kb @ h)) / m**2, rel=1e-4)


def test_identical_inputs_give_one():
    torch.manual_seed(2)
    a = torch.randn(64, 30)
    assert float(nhsic(a, a)) == pytest.approx(1.0, abs=1e-5)
    # also for images (flattened per sample) and one-hot labels
    x = torch.randn(32, 1, 8, 8)
    assert float(nhsic(x, x.clone())) == pytest.approx(1.0, abs=1e-5)
    y = one_hot(torch.randint(0, 10, (32,)), 10)
    assert float(nhsic(y, y)) == pytest.approx(1.0, abs=1e-5)


def test_independent_inputs_give_about_zero():
    torch.manual_seed(3)
    a, b = torch.randn(512, 20), torch.randn(512, 30)
    assert float(nhsic(a, b)) < 0.08
    # and dependence is detected: a noisy function of a scores far higher
    assert float(nhsic(a, a[:, :10].tanh() + 0.1 * torch.randn(512, 10))) > 0.5


def test_rms_option_is_invariant_to_scaling_an_input():
    torch.manual_seed(4)
    a = torch.randn(40, 7)
    b = a @ torch.randn(7, 5) + torch.randn(40, 5)
    base = float(nhsic(a, b, normalize=True))
    for c in (1e-3, 0.5, 10.0, 1e3):
        assert float(nhsic(a * c, b, normalize=True)) == pytest.approx(base, rel=1e-4)
        assert float(nhsic(a, b * c, normalize=True)) == pytest.approx(base, rel=1e-4)
    # the raw formula is not: the kernel width is in the features' own units
    assert float(nhsic(a * 10.0, b)) != pytest.approx(float(nhsic(a, b)), rel=1e-2)


def test_symmetric_bounded_and_differentiable():
    torch.manual_seed(5)
    a = torch.randn(16, 6, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    v = nhsic(a, b)
    assert v.dim() == 0 and 0.0 <= float(v.detach()) <= 1.0
    assert float(nhsic(b, a).detach()) == pytest.approx(float(v.detach()), rel=1e-5)
    v.backward()
    assert a.grad is not None and b.grad is not None
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same number of rows"):
        nhsic(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least 2"):
        nhsic(torch.randn(1, 2), torch.randn(1, 2))


def test_curriculum_coefficients_interpolate_in_depth():
    assert coefficients(1, 4, (0.0, 0.3), (0.2, 0.2)) == pytest.approx((0.0, 0.2))
    assert coefficients(4, 4, (0.0, 0.3), (0.2, 0.2)) == pytest.approx((0.3, 0.2))
    assert coefficients(2, 4, (0.0, 0.3), (0.0, 0.6)) == pytest.approx((0.1, 0.2))
    assert coefficients(1, 1, (0.5, 0.9), (0.1, 0.2)) == pytest.approx((0.5, 0.1))
    with pytest.raises(ValueError):
        coefficients(5, 4, (0, 0), (0, 0))


def test_authors_lambdas_per_stage_with_their_sign():
    """``CE - lambda1_t nHSIC(Z,X) - lambda2_t nHSIC(P,Y)``: beta_t = -lambda1_t, gamma_t = lambda2_t;
    without lambdas, memfl's interpolated curriculum."""
    l1, l2 = [0.4, 0.3, 0.2, 0.1], [0.0, 0.1, 0.2, 0.5]
    for t in range(1, 5):
        assert stage_coefficients(t, 4, (0, 1), (1, 0), l1, l2) == pytest.approx((-l1[t - 1], l2[t - 1]))
    assert stage_coefficients(2, 4, (0.0, 0.3), (0.0, 0.6)) == pytest.approx(coefficients(2, 4, (0.0, 0.3), (0.0, 0.6)))
    with pytest.raises(ValueError, match="4 values"):
        stage_coefficients(1, 4, (0, 0), (0, 0), [0.1, 0.2], [0.1, 0.2])
    # a positive lambda1 rewards keeping input information: descent raises nHSIC(X, Z)
    torch.manual_seed(7)
    x = torch.randn(32, 10)
    z = (x @ torch.randn(10, 8) + 2 * torch.randn(32, 8)).requires_grad_(True)
    beta_t, gamma_t = stage_coefficients(1, 4, (0, 0), (0, 0), [1.0, 0, 0, 0], [0.0, 0, 0, 0])
    mentor_loss(x, z, one_hot(torch.randint(0, 3, (32,)), 3), None, beta_t, gamma_t).backward()
    with torch.no_grad():
        assert float(nhsic(x, z - 0.5 * z.grad)) > float(nhsic(x, z))


def test_mentor_loss_pushes_the_right_way():
    torch.manual_seed(6)
    x = torch.randn(32, 10)
    z = (x @ torch.randn(10, 8)).requires_grad_(True)
    y = one_hot(torch.randint(0, 3, (32,)), 3)
    p = torch.randn(32, 4, requires_grad=True)
    loss = mentor_loss(x, z, y, p, beta_t=1.0, gamma_t=1.0)
    assert float(loss.detach()) == pytest.approx(float((nhsic(x, z) - nhsic(y, p)).detach()), rel=1e-5)
    loss.backward()
    # gradient descent on beta*nHSIC(X,Z) lowers it, on -gamma*nHSIC(Y,P) raises nHSIC(Y,P)
    with torch.no_grad():
        z2, p2 = z - 0.5 * z.grad, p - 0.5 * p.grad
    assert float(nhsic(x, z2)) < float(nhsic(x, z.detach()))
    assert float(nhsic(y, p2)) > float(nhsic(y, p.detach()))
    assert float(mentor_loss(x, z, y, p, 0.0, 0.0)) == 0.0


def test_training_adds_exactly_the_mentor_loss(monkeypatch):
    """The stage engine's extra loss is mentor_terms' loss (the function the tests above check)."""
    import memfl.methods.scalefl.engine as engine
    from memfl.core.engine import prepare
    from memfl.core.protocol import Plan
    from memfl.methods.scalefl import ScaleFLModel
    from memfl.models import build_model

    calls = []
    real = engine.mentor_terms

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        x, z, yh, p, beta_t, gamma_t, sigma, normalize = args
        assert normalize is False  # nhsic_scale = "raw" by default
        assert torch.equal(calls[-1].loss, mentor_loss(x, z, yh, p, beta_t, gamma_t, sigma, normalize))
        return calls[-1]

    monkeypatch.setattr(engine, "mentor_terms", spy)
    torch.manual_seed(0)
    sm = ScaleFLModel(build_model("cnn", width=0.25), 4)
    step = prepare(sm, Plan(kind="stage", stage=4, options={"beta": [0.2, 0.2], "gamma": [0.3, 0.3]}))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss, per_sample = step.loss(x, y)
    assert len(calls) == 1 and calls[0].nhsic_xz is not None and calls[0].nhsic_yp is not None
    assert torch.allclose(loss, per_sample.mean() + calls[0].loss)
