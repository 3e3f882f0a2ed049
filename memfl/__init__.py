"""memfl: federated learning for clients whose memory is too small to train the model the usual way.

``import memfl`` registers the shipped methods (:mod:`memfl.methods`). The public Python API is
``memfl.run``, ``memfl.estimate``, ``memfl.measure`` and ``memfl.plan`` (:mod:`memfl.api`, loaded on
first use); see the README's "Python API" section.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import memfl.methods  # noqa: F401  -- every shipped method registers its strategy, config and engines

try:
    __version__ = version("memfl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_API = ("run", "estimate", "measure", "plan")


def __getattr__(name: str):
    if name in _API:
        from memfl import api

        return getattr(api, name)
    raise AttributeError(f"module 'memfl' has no attribute {name!r}")
