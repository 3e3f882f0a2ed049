"""ScaleFL: sequential block-wise training with the Curriculum Mentor and the Training Harmonizer.

- :mod:`memfl.methods.scalefl.partition` cuts a model into T blocks (:func:`partition_model`).
- :mod:`memfl.methods.scalefl.stage` holds :class:`ScaleFLModel` (the model plus its persistent output
  modules and projection heads) and the ``"stage"`` engine (:func:`prepare_stage`).
- :mod:`memfl.methods.scalefl.mentor` is the Curriculum Mentor's nHSIC loss; :mod:`memfl.methods.scalefl.strategy` the
  server side (elastic / cyclic schedule, participation by budget, aggregation).
See docs/SCALEFL.md.
"""

from memfl.methods.scalefl.partition import Partition, PartitionError, memory_balanced_starts, partition_model
from memfl.methods.scalefl.stage import (
    OutputModule,
    ProjectionHead,
    ScaleFLModel,
    prepare_stage,
    scalefl_model_fn,
    stage_client_factory,
    stage_client_model,
)

__all__ = ["OutputModule", "Partition", "PartitionError", "ProjectionHead", "ScaleFLModel", "memory_balanced_starts",
           "partition_model", "prepare_stage", "scalefl_model_fn", "stage_client_factory", "stage_client_model"]

from memfl.core.engine import register_engine  # noqa: E402
from memfl.core.registry import register_method  # noqa: E402
from memfl.methods.scalefl.config import ScaleFLConfig  # noqa: E402
from memfl.methods.scalefl.strategy import ScaleFL  # noqa: E402

register_engine("stage", prepare_stage)
register_method("scalefl", ScaleFL, section=("scalefl", ScaleFLConfig))
__all__ += ["ScaleFL", "ScaleFLConfig"]
