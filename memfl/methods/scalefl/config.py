"""``[scalefl]``: the one source of ScaleFL's defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from memfl.core.config import Section


class ScaleFLConfig(Section):
    """``method = "scalefl"``: sequential block-wise training (SPEC 2, docs/SCALEFL.md)."""

    blocks: int = Field(4, ge=1)  # T
    partition: Literal["default", "balanced"] = "default"  # balanced: equalise activation memory
    mentor: bool = True  # the Curriculum Mentor's nHSIC terms
    harmonizer: bool = True  # co-train block t-1's last layer with block t
    schedule: Literal["elastic", "cyclic"] = "elastic"
    r_min: int = Field(3, ge=1)  # elastic: rounds a stage runs at least
    r_max: int | None = Field(None, ge=1)  # elastic: at most (None: run.rounds // blocks)
    plateau: float = Field(0.02, ge=0)  # advance when the loss improves < this fraction per round
    window: int = Field(3, ge=2)  # rounds the plateau slope is fitted over
    # the mentor's nHSIC(X,Z) and nHSIC(Y,P) weights, [first block, last block] (docs/SCALEFL.md)
    beta: list[float] = Field(default_factory=lambda: [0.0, 0.0], min_length=2, max_length=2)
    gamma: list[float] = Field(default_factory=lambda: [1.0, 1.0], min_length=2, max_length=2)
    sigma: float = Field(5.0, gt=0)  # Gaussian kernel width
    # "raw": the kernel on the raw features (the formula; the authors' code). "rms": each input divided
    # by its batch RMS deviation first (memfl's earlier default; scale invariant, near-linear kernel)
    nhsic_scale: Literal["raw", "rms"] = "raw"
    # the authors' form, loss = CE - lambda1_t nHSIC(Z_t, X) - lambda2_t nHSIC(P_t, Y), one value per
    # stage (T each); when set they replace beta/gamma (beta_t = -lambda1_t, gamma_t = lambda2_t).
    # None: memfl's interpolated beta/gamma curriculum. The authors' values are not released.
    lambda1: list[float] | None = None
    lambda2: list[float] | None = None
    # projection heads P_t: "light" (ours: Linear-ReLU-Linear, 128 -> 64) or "authors" (three linear
    # layers, no activations, 2056 -> 1024 -> 512 scaled by the model's width)
    projection: Literal["light", "authors"] = "light"
    # output modules' conv channels: "light" (ours: block t's channels) or "model" (the authors': the
    # model's own stage widths)
    exit_width: Literal["light", "model"] = "light"
    # frozen blocks' BatchNorm: "eval" (ours: running statistics, nothing moves) or "train" (the
    # authors': batch statistics; the client's running statistics drift and are not sent back)
    frozen_bn: Literal["eval", "train"] = "eval"
    # elastic advance rule: "plateau" (the aggregated loss's slope) or "movement" (the authors'
    # effective movement ||sum of the last W block updates||_1 / sum ||update||_1 < movement_threshold)
    advance: Literal["plateau", "movement"] = "plateau"
    movement_window: int = Field(6, ge=2)  # W rounds (the authors': 6)
    movement_threshold: float = Field(0.35, gt=0, le=1)  # ~ a random walk's value at W = 6 (0.33)
    movement_samples: int = Field(10_000, ge=1)  # parameters of the active block sampled (seeded)

    @model_validator(mode="after")
    def _lambdas(self) -> ScaleFLConfig:
        if (self.lambda1 is None) != (self.lambda2 is None):
            raise ValueError("scalefl: give both lambda1 and lambda2 (one value per stage each), or neither")
        for key in ("lambda1", "lambda2"):
            v = getattr(self, key)
            if v is not None and len(v) != self.blocks:
                raise ValueError(f"scalefl.{key}: {len(v)} values, expected one per stage ({self.blocks})")
        return self
