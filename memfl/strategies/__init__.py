"""Server-side strategies, by the name used in configs and on the command line."""

from __future__ import annotations

from memfl.strategies.base import ClientInfo, Exclusive, FederationContext, Strategy, round_seed

#: method name -> strategy class
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": Strategy,
    "exclusive": Exclusive,
}

from memfl.strategies.heterofl import HeteroFL  # noqa: E402
from memfl.strategies.scalefl import ScaleFL  # noqa: E402

STRATEGIES["heterofl"] = HeteroFL
STRATEGIES["scalefl"] = ScaleFL

from memfl.strategies.fedhybrid import FedHybrid, OortBaseline, OortFedProx, RandomBaseline  # noqa: E402

STRATEGIES["fedhybrid"] = FedHybrid
STRATEGIES["random"] = RandomBaseline
STRATEGIES["oort"] = OortBaseline
STRATEGIES["oort+fedprox"] = OortFedProx

__all__ = ["STRATEGIES", "ClientInfo", "Exclusive", "FederationContext", "Strategy", "round_seed"]
