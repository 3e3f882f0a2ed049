"""``fedavg`` (everyone trains the full model: the accuracy upper bound) and ``exclusive`` (only
the clients whose predicted full-training peak fits their budget)."""

from __future__ import annotations

from memfl.core.protocol import Plan
from memfl.core.strategy import ClientInfo, Strategy


class FedAvg(Strategy):
    """FedAvg: every client may train the full model; budgets are ignored (the upper bound)."""

    name = "fedavg"


class Exclusive(FedAvg):
    """FedAvg restricted to the clients whose predicted full-training peak fits their budget."""

    name = "exclusive"

    def plan_for(self, client: ClientInfo, round: int) -> Plan | None:
        plan = Plan()
        return plan if self.ctx.peak_fn(plan) <= client.budget_bytes else None
