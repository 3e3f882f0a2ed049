"""``[heterofl]``: the one source of HeteroFL's defaults."""

from __future__ import annotations

from pydantic import Field

from memfl.core.config import Section


class HeteroFLConfig(Section):
    """``method = "heterofl"``: the width fractions a client may train (largest that fits wins)."""

    widths: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125], min_length=1)
