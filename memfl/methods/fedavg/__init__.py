"""FedAvg and its memory-restricted variant ``exclusive`` (the baselines)."""

from memfl.core.registry import register_method
from memfl.methods.fedavg.strategy import Exclusive, FedAvg

register_method("fedavg", FedAvg)
register_method("exclusive", Exclusive)

__all__ = ["Exclusive", "FedAvg"]
