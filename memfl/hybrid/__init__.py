"""FedHybrid: hybrid tensor management for memory-constrained clients (SPEC section 3).

- :mod:`memfl.hybrid.compress` -- channel-wise mixed-bit activation compression (pack/unpack hooks).
- :mod:`memfl.hybrid.engine`   -- the ``hybrid`` engine: per segment keep / recompute / compress.
- :mod:`memfl.hybrid.profile`  -- per-segment saved bytes and times; the plan memory model.
- :mod:`memfl.hybrid.planner`  -- the exact (ILP, HiGHS) planner: fastest plan under a budget.

The memory budget predictor lives in :mod:`memfl.memory.budget`, client selection in
:mod:`memfl.selection`, the server strategy in :mod:`memfl.strategies.fedhybrid`.
"""
