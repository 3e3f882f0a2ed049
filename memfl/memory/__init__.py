"""Peak training memory: predict it (:func:`estimate`) and measure it (:func:`measure`).

Both go through :func:`memfl.core.engine.prepare` and :meth:`memfl.core.engine.TrainStep.loss`, so every plan
kind (full training, ScaleFL stages, hybrid recompute/compress) is estimated and measured the same
way. See :mod:`memfl.memory.estimate` for the memory model and :mod:`memfl.memory.measure` for what
the measurement counts.

>>> from functools import partial
>>> from memfl.models import build_model
>>> est = estimate(build_model("cnn"), (32, 1, 28, 28))
>>> est.peak_bytes, est.breakdown()
>>> meas = measure(partial(build_model, "cnn"), (32, 1, 28, 28))   # fresh subprocess
>>> t = time_steps(partial(build_model, "cnn"), (32, 1, 28, 28), {"full": Plan(), "plan": plan})
>>> t.ratio("plan")   # CPU seconds per step, as training runs (another fresh subprocess)
"""

from memfl.memory.estimate import RUNTIME_OVERHEAD_BYTES, MemoryEstimate, estimate, tensor_bytes
from memfl.memory.inputs import InputSpec, input_spec, random_input
from memfl.memory.measure import MeasurementError, MemoryMeasurement, StepTiming, measure, time_steps

__all__ = [
    "RUNTIME_OVERHEAD_BYTES",
    "InputSpec",
    "MeasurementError",
    "MemoryEstimate",
    "MemoryMeasurement",
    "StepTiming",
    "estimate",
    "input_spec",
    "measure",
    "random_input",
    "time_steps",
    "tensor_bytes",
]
