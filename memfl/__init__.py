"""memfl: federated learning for clients whose memory is too small to train the model the usual way.

``import memfl`` registers the shipped methods (:mod:`memfl.methods`). The public Python API is
``memfl.run``, ``memfl.estimate``, ``memfl.measure`` and ``memfl.plan`` (:mod:`memfl.api`, loaded on
first use); see the README's "Python API" section.
"""

from __future__ import annotations

import memfl.methods  # noqa: F401  -- every shipped method registers its strategy, config and engines
from memfl.core.version import __version__

_API = ("run", "estimate", "measure", "plan", "InfeasibleBudget")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from memfl import api

        return getattr(api, name)
    raise AttributeError(f"module 'memfl' has no attribute {name!r}")
