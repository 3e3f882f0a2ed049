"""Reproducible seeds: every random choice in a run is drawn from (experiment seed, round[, client])."""

from __future__ import annotations

import numpy as np


def round_seed(seed: int, round: int, client_id: int = -1) -> int:
    """A reproducible 31-bit seed for (experiment seed, round, client)."""
    return int(np.random.SeedSequence([seed, round, client_id + 1]).generate_state(1)[0] & 0x7FFFFFFF)
