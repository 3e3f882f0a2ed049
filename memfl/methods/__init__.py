"""The shipped methods. Importing this package registers each one (strategy, config section, plan
engines) with :mod:`memfl.core.registry`; ``import memfl`` does it for you.

- :mod:`memfl.methods.fedavg`    ``fedavg``, ``exclusive``
- :mod:`memfl.methods.heterofl`  ``heterofl`` (width plans)
- :mod:`memfl.methods.scalefl`   ``scalefl`` (stage plans: partition, output modules, mentor,
  harmonizer, schedule)
- :mod:`memfl.methods.fedhybrid` ``fedhybrid`` and the selection baselines ``random``, ``oort``,
  ``oort+fedprox`` (hybrid plans: profile, compression, planner, selection, budget predictor)
- :mod:`memfl.methods.combined`  ``stage+hybrid`` plans and the planner over every plan kind
  (imports scalefl and fedhybrid; neither imports it)
"""

from memfl.core.registry import STRATEGIES
from memfl.methods import combined, fedavg, fedhybrid, heterofl, scalefl  # noqa: F401  -- each registers itself

__all__ = ["STRATEGIES"]
