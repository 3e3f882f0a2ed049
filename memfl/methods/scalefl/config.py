"""``[scalefl]``: the one source of ScaleFL's defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    beta: list[float] = Field(default_factory=lambda: [0.0, 0.1], min_length=2, max_length=2)
    gamma: list[float] = Field(default_factory=lambda: [0.3, 0.1], min_length=2, max_length=2)
    sigma: float = Field(5.0, gt=0)  # Gaussian kernel width
