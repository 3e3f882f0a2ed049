"""HeteroFL (Diao et al., ICLR 2021): width-scaled nested sub-models, the ``width`` plan kind."""

from memfl.core.engine import register_engine
from memfl.core.registry import register_method
from memfl.methods.heterofl.config import HeteroFLConfig
from memfl.methods.heterofl.strategy import HeteroFL, nested_fedavg, prepare_width, slice_to

register_engine("width", prepare_width)
register_method("heterofl", HeteroFL, section=("heterofl", HeteroFLConfig))

__all__ = ["HeteroFL", "HeteroFLConfig", "nested_fedavg", "prepare_width", "slice_to"]
