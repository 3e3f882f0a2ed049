"""ScaleFL's Curriculum Mentor: a normalised-HSIC information-bottleneck loss (SPEC 2.3).

The stage-t loss is ``CE(O_t(z_t), y) + beta_t * nHSIC(X, Z_t) - gamma_t * nHSIC(Y, P_t)``:
the ``beta`` term limits how much of the raw input the block's feature ``Z_t`` keeps, the
``gamma`` term rewards how much of the label the projection ``P_t`` carries. The coefficients
depend on the block's depth (:func:`coefficients`): shallow blocks keep input information, deep
blocks compress it toward the label.

:func:`mentor_terms` is what the ``stage`` engine (:mod:`memfl.methods.scalefl.engine`) adds to the
cross-entropy in training; :func:`mentor_loss` is the same loss without the values it reports.

nHSIC is kernel CKA with Gaussian kernels over a minibatch of ``m`` samples::

    K_ij  = exp(-||a_i - a_j||^2 / (2 sigma^2 d))       d = feature dimension
    HSIC(A, B)  = tr(K_A H K_B H) / m^2,                H = I - 11^T / m
    nHSIC(A, B) = HSIC(A, B) / sqrt(HSIC(A, A) HSIC(B, B))

By default (``normalize=False``, ``[scalefl] nhsic_scale = "raw"``) the kernel is applied to the raw
features, exactly the formula and the authors' released code. ``normalize=True``
(``nhsic_scale = "rms"``, memfl's earlier default) first divides each input by its batch RMS
deviation (the root mean square of ``a - mean(a)`` over the batch and the features), so that
``sigma`` is measured in units of the feature's own spread and nHSIC does not change when an input
is scaled; with sigma = 5 that kernel is close to linear. The value lies in [0, 1]; identical
inputs give 1.

The authors write the loss as ``CE - lambda1_t nHSIC(Z_t, X) - lambda2_t nHSIC(P_t, Y)`` with
per-stage coefficients; nHSIC is symmetric, so that is this loss with ``beta_t = -lambda1_t`` and
``gamma_t = lambda2_t`` (:func:`stage_coefficients`).

The work is O(m^2 d) for the Gram matrices and O(m^2) for the rest; ``tr(K_A H K_B H)`` is computed
as the Frobenius product of the two doubly-centred kernels, which is the same number.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: the SPEC's default kernel width
SIGMA = 5.0
_EPS = 1e-12


def _flat(a: torch.Tensor) -> torch.Tensor:
    if a.dim() == 1:
        return a.unsqueeze(1)
    return a.reshape(a.shape[0], -1)


def gaussian_kernel(a: torch.Tensor, sigma: float = SIGMA, normalize: bool = False) -> torch.Tensor:
    """``K_ij = exp(-||a_i - a_j||^2 / (2 sigma^2 d))`` for the rows of ``a`` (m x d); m x m.

    ``normalize`` first divides ``a`` by its batch RMS deviation (scale invariance)."""
    a = _flat(a).float()
    d = a.shape[1]
    if normalize:
        centred = a - a.mean(dim=0, keepdim=True)
        a = a / centred.pow(2).mean().add(_EPS).sqrt()
    sq = a.pow(2).sum(dim=1)
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (a @ a.t())).clamp_min(0.0)
    return torch.exp(-dist / (2.0 * sigma * sigma * d))


def _centre(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` without forming H: subtract row and column means, add back the grand mean."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def hsic(a: torch.Tensor, b: torch.Tensor, sigma: float = SIGMA, normalize: bool = False) -> torch.Tensor:
    """Biased HSIC estimate ``tr(K_A H K_B H) / m^2`` with Gaussian kernels (a scalar tensor)."""
    m = a.shape[0]
    ka = _centre(gaussian_kernel(a, sigma, normalize))
    kb = _centre(gaussian_kernel(b, sigma, normalize))
    return (ka * kb).sum() / (m * m)


def nhsic(a: torch.Tensor, b: torch.Tensor, sigma: float = SIGMA, normalize: bool = False) -> torch.Tensor:
    """Normalised HSIC (kernel CKA) between ``a`` and ``b`` (2-D, one row per sample).

    Returns a scalar tensor in [0, 1] that carries gradients to both inputs. Inputs with more
    than two dimensions are flattened per sample; 1-D inputs are treated as one feature.
    ``normalize``: divide each input by its batch RMS deviation first (``nhsic_scale = "rms"``).
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"nhsic: a and b need the same number of rows (samples), got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError("nhsic needs at least 2 samples")
    ka = _centre(gaussian_kernel(a, sigma, normalize))
    kb = _centre(gaussian_kernel(b, sigma, normalize))
    ab = (ka * kb).sum()
    aa = (ka * ka).sum()
    bb = (kb * kb).sum()
    return ab / (aa * bb).add(_EPS).sqrt()


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot labels (the ``Y`` of the mentor)."""
    return torch.nn.functional.one_hot(y.long(), num_classes).float()


def coefficients(
    block: int, blocks: int, beta: tuple[float, float] | list[float], gamma: tuple[float, float] | list[float]
) -> tuple[float, float]:
    """The curriculum: ``(beta_t, gamma_t)`` for block ``block`` (1-based) of ``blocks``.

    ``beta = (beta_first, beta_last)`` and ``gamma = (gamma_first, gamma_last)`` are interpolated
    linearly in depth, so e.g. ``beta = (0, 0.1)`` leaves the first block free to keep input
    information and asks the deepest block to compress it most.
    """
    if not 1 <= block <= blocks:
        raise ValueError(f"block {block} out of range 1..{blocks}")
    f = 0.0 if blocks == 1 else (block - 1) / (blocks - 1)
    b = float(beta[0]) + (float(beta[1]) - float(beta[0])) * f
    g = float(gamma[0]) + (float(gamma[1]) - float(gamma[0])) * f
    return b, g


def stage_coefficients(
    block: int,
    blocks: int,
    beta: tuple[float, float] | list[float],
    gamma: tuple[float, float] | list[float],
    lambda1: list[float] | None = None,
    lambda2: list[float] | None = None,
) -> tuple[float, float]:
    """``(beta_t, gamma_t)`` of block ``block``: the authors' per-stage ``lambda1``/``lambda2`` (T values
    each, loss ``- lambda1_t nHSIC(Z,X) - lambda2_t nHSIC(P,Y)``) when given, as ``(-lambda1_t,
    lambda2_t)``; else memfl's interpolated curriculum (:func:`coefficients`)."""
    if lambda1 is None and lambda2 is None:
        return coefficients(block, blocks, beta, gamma)
    if lambda1 is None or lambda2 is None or len(lambda1) != blocks or len(lambda2) != blocks:
        raise ValueError(f"scalefl lambda1 and lambda2 need {blocks} values each (one per stage)")
    if not 1 <= block <= blocks:
        raise ValueError(f"block {block} out of range 1..{blocks}")
    return -float(lambda1[block - 1]), float(lambda2[block - 1])


class MentorTerms(NamedTuple):
    """What :func:`mentor_terms` computed: the loss to add to the CE and its two nHSIC values
    (None where the term is off), kept for the round's metrics."""

    loss: torch.Tensor
    nhsic_xz: torch.Tensor | None
    nhsic_yp: torch.Tensor | None


def mentor_terms(
    x: torch.Tensor,
    z: torch.Tensor,
    y_onehot: torch.Tensor,
    p: torch.Tensor | None,
    beta_t: float,
    gamma_t: float,
    sigma: float = SIGMA,
    normalize: bool = False,
) -> MentorTerms:
    """The Curriculum Mentor's part of the stage-t loss, as the ``stage`` engine trains it.

    x: the input batch (any shape; flattened per sample, detached: the mentor does not push on the
    data); z: block t's feature ``Z_t`` (any shape, flattened per sample); y_onehot: (B, classes);
    p: the projection ``P_t`` of the pooled feature, or None (no gamma term). Returns
    ``beta_t * nHSIC(X, Z) - gamma_t * nHSIC(Y, P)`` (a term whose coefficient is 0 is skipped, not
    computed) with the two values; ``normalize`` as :func:`nhsic`. Caveat: for token inputs X is the
    integer ids as numbers."""
    loss = z.new_zeros(())
    xz = yp = None
    if beta_t:
        xz = nhsic(x.detach().reshape(x.shape[0], -1), z.reshape(z.shape[0], -1), sigma, normalize)
        loss = loss + beta_t * xz
    if gamma_t and p is not None:
        yp = nhsic(y_onehot, p, sigma, normalize)
        loss = loss - gamma_t * yp
    return MentorTerms(loss, xz, yp)


def mentor_loss(
    x: torch.Tensor,
    z: torch.Tensor,
    y_onehot: torch.Tensor,
    p: torch.Tensor | None,
    beta_t: float,
    gamma_t: float,
    sigma: float = SIGMA,
    normalize: bool = False,
) -> torch.Tensor:
    """``beta_t * nHSIC(X, Z) - gamma_t * nHSIC(Y, P)`` (the part of L_t added to the CE): the loss
    training adds (:func:`mentor_terms`, without its values)."""
    return mentor_terms(x, z, y_onehot, p, beta_t, gamma_t, sigma, normalize).loss
