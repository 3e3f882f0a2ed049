"""memfl's own method: plans that combine ScaleFL's stages with FedHybrid's tensor management,
and one planner over every plan kind (docs/MEMFL.md).

- :mod:`~memfl.methods.combined.engine`  the ``"stage+hybrid"`` engine: a ScaleFL stage whose units
  with grad run under keep / recompute / compress (:func:`prepare_stage_hybrid`).
- :mod:`~memfl.methods.combined.plan`    the plan kinds, their scope, what a client under each holds.
- :mod:`~memfl.methods.combined.profile` a stage profiled as FedHybrid profiles a model (its solver's input).
- :mod:`~memfl.methods.combined.auto`    the planner: the fastest plan of any kind that fits (:func:`auto_plan`).
- :mod:`~memfl.methods.combined.strategy` the ``memfl`` method: ScaleFL's stages, FedHybrid's selection,
  per client per round the fastest plan that fits (:class:`Memfl`; settings ``[memfl]``).

This package may import ScaleFL and FedHybrid; they never import it (an import-linter contract).
"""

from memfl.core.engine import register_engine
from memfl.core.registry import register_method
from memfl.methods.combined.auto import AutoPlan, Candidate, InfeasibleBudget, auto_plan
from memfl.methods.combined.config import MemflConfig
from memfl.methods.combined.engine import KIND, prepare_stage_hybrid
from memfl.methods.combined.plan import client_factory, scope, stage_hybrid_plan
from memfl.methods.combined.strategy import Memfl

register_engine(KIND, prepare_stage_hybrid)
register_method(Memfl.name, Memfl, section=("memfl", MemflConfig))

__all__ = [
    "KIND",
    "AutoPlan",
    "Candidate",
    "InfeasibleBudget",
    "Memfl",
    "MemflConfig",
    "auto_plan",
    "client_factory",
    "prepare_stage_hybrid",
    "scope",
    "stage_hybrid_plan",
]
