"""FedHybrid: hybrid tensor management for memory-constrained clients (SPEC section 3).

- :mod:`memfl.methods.fedhybrid.compress` -- channel-wise mixed-bit activation compression (pack/unpack hooks).
- :mod:`memfl.methods.fedhybrid.engine`   -- the ``hybrid`` engine: per segment keep / recompute / compress.
- :mod:`memfl.methods.fedhybrid.profile`  -- per-segment saved bytes and times; the plan memory model;
  :func:`~memfl.methods.fedhybrid.profile.segments_of` (a user's model: its ordered children,
  :class:`~memfl.methods.fedhybrid.profile.PartitionError` when its forward is not those in order).
- :mod:`memfl.methods.fedhybrid.planner`  -- the planner: fastest plan under a budget (dynamic program; HiGHS ILP
  as the cross-check).

The memory budget predictor lives in :mod:`memfl.methods.fedhybrid.budget`, client selection in
:mod:`memfl.methods.fedhybrid.selection`, the server strategy in :mod:`memfl.methods.fedhybrid.strategy`.
"""

from memfl.core.engine import register_engine
from memfl.core.registry import register_method
from memfl.methods.fedhybrid.config import FedHybridConfig
from memfl.methods.fedhybrid.engine import prepare_hybrid
from memfl.methods.fedhybrid.profile import PartitionError, segments_of
from memfl.methods.fedhybrid.strategy import FedHybrid, OortBaseline, OortFedProx, RandomBaseline

register_engine("hybrid", prepare_hybrid)
for _strategy in (FedHybrid, RandomBaseline, OortBaseline, OortFedProx):
    register_method(_strategy.name, _strategy, section=("fedhybrid", FedHybridConfig))

__all__ = [
    "FedHybrid",
    "FedHybridConfig",
    "OortBaseline",
    "OortFedProx",
    "PartitionError",
    "RandomBaseline",
    "prepare_hybrid",
    "segments_of",
]
