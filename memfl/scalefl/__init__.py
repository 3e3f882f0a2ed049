"""ScaleFL: sequential block-wise training with the Curriculum Mentor and the Training Harmonizer.

- :mod:`memfl.scalefl.partition` cuts a model into T blocks (:func:`partition_model`).
- :mod:`memfl.scalefl.stage` holds :class:`ScaleFLModel` (the model plus its persistent output
  modules and projection heads) and the ``"stage"`` engine (:func:`prepare_stage`).
- :mod:`memfl.mentor` is the Curriculum Mentor's nHSIC loss; :mod:`memfl.strategies.scalefl` the
  server side (elastic / cyclic schedule, participation by budget, aggregation).
See docs/SCALEFL.md.
"""

from memfl.scalefl.partition import Partition, PartitionError, memory_balanced_starts, partition_model
from memfl.scalefl.stage import (
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
