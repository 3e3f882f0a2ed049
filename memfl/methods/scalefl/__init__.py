"""ScaleFL: sequential block-wise training with the Curriculum Mentor and the Training Harmonizer.

One module per concept of the paper (see docs/SCALEFL.md):

- :mod:`~memfl.methods.scalefl.partition`  cuts a model into T blocks (:func:`partition_model`,
  :class:`Partition`, :class:`PartitionError`).
- :mod:`~memfl.methods.scalefl.output`     the output modules ``O_t`` and projection heads ``P_t``.
- :mod:`~memfl.methods.scalefl.mentor`     the Curriculum Mentor: nHSIC and the loss training adds.
- :mod:`~memfl.methods.scalefl.harmonizer` the Training Harmonizer: block t-1's last layer co-trains.
- :mod:`~memfl.methods.scalefl.schedule`   the elastic / cyclic stage schedule and its plateau rule.
- :mod:`~memfl.methods.scalefl.model`      :class:`ScaleFLModel`, the global model (blocks + O_t + P_t).
- :mod:`~memfl.methods.scalefl.engine`     the ``"stage"`` engine (:func:`prepare_stage`).
- :mod:`~memfl.methods.scalefl.strategy`   the server side (participation by budget, aggregation).
"""

from memfl.core.engine import register_engine
from memfl.core.registry import register_method
from memfl.methods.scalefl.config import ScaleFLConfig
from memfl.methods.scalefl.engine import prepare_stage
from memfl.methods.scalefl.harmonizer import Harmonizer, harmonizer_for
from memfl.methods.scalefl.mentor import mentor_loss, mentor_terms, nhsic
from memfl.methods.scalefl.model import ScaleFLModel, scalefl_model_fn, stage_client_factory, stage_client_model
from memfl.methods.scalefl.output import OutputModule, ProjectionHead
from memfl.methods.scalefl.partition import Partition, PartitionError, memory_balanced_starts, partition_model
from memfl.methods.scalefl.schedule import StageSchedule, plateaued
from memfl.methods.scalefl.strategy import ScaleFL

register_engine("stage", prepare_stage)
register_method("scalefl", ScaleFL, section=("scalefl", ScaleFLConfig))

__all__ = [
    "Harmonizer",
    "OutputModule",
    "Partition",
    "PartitionError",
    "ProjectionHead",
    "ScaleFL",
    "ScaleFLConfig",
    "ScaleFLModel",
    "StageSchedule",
    "harmonizer_for",
    "memory_balanced_starts",
    "mentor_loss",
    "mentor_terms",
    "nhsic",
    "partition_model",
    "plateaued",
    "prepare_stage",
    "scalefl_model_fn",
    "stage_client_factory",
    "stage_client_model",
]
