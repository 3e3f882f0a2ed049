"""What the round loop (:mod:`memfl.server.loop`) needs from a runtime: an :class:`Executor`.

A runtime is only how instructions reach clients and how results come back. It tells the loop
who is available for a round (:meth:`Executor.clients`, one :class:`Candidate` each) and carries
out a round's instructions (:meth:`Executor.run`, one :class:`Outcome` per instruction, in the
same order). Everything else -- selection and planning (the strategy), validation, aggregation,
evaluation, the virtual clock, the records, checkpoints, the summary -- is the loop's, the same on
every runtime.

The executors: :class:`memfl.runtime.sim.InProcessExecutor` (every client in this process) and
:class:`memfl.runtime.flower.server_app.FlowerExecutor` (SuperNodes through a Flower ``Grid``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from memfl.core.protocol import Instruction, Result
from memfl.core.strategy import ClientInfo

#: what became of an instruction: ``ok``; ``failed`` (the client raised or answered with an error);
#: ``oom`` (killed for exceeding its memory budget); ``timeout`` (no answer before the round's
#: deadline); ``rejected`` (answered, but validation refused the result: set by the loop,
#: :mod:`memfl.server.validate`, never by an executor)
Status = Literal["ok", "failed", "oom", "timeout", "rejected"]


@dataclass(frozen=True)
class Candidate:
    """A client available for a round.

    info:                   the client as it is: id, samples, device, speed and its *own* memory
                            budget (configured in the simulator, declared by the node on Flower);
                            the record's ``budget_bytes``.
    planning_budget_bytes:  the budget the strategy should plan with when it is not
                            ``info.budget_bytes`` (the simulator's contention: a prediction of this
                            round's real budget); ``None``: plan with the client's own budget.
    extra:                  runtime-specific fields of the client's entry in the results'
                            ``clients`` list (Flower: node id, declared memory, budget source, machine).
    """

    info: ClientInfo
    planning_budget_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def for_planning(self) -> ClientInfo:
        """What the strategy sees: the client with the budget to plan with."""
        if self.planning_budget_bytes is None:
            return self.info
        return replace(self.info, budget_bytes=self.planning_budget_bytes)


@dataclass
class Outcome:
    """What became of one instruction.

    status:            ``"ok"`` (``result`` holds the trained tensors), ``"failed"`` (the client
                       raised or answered with an error), ``"oom"`` (killed for exceeding its
                       memory budget: the simulator's contention, an injected ``oom`` fault, a
                       worker's enforced cap), ``"timeout"`` (no answer before the deadline) or,
                       set by the loop's validation, ``"rejected"`` (``result`` kept for the record).
    error:             why, when not ok.
    fault:             the kind of fault injected into this client this round
                       (:mod:`memfl.runtime.faults`), else ``None``; recorded as ``fault``.
    real_budget_bytes: the client's real budget this round, where the runtime knows it (the
                       simulator's contention); else ``None``.
    where:             who failed, for the log (Flower: ``"node 123"``); not recorded.
    extra:             runtime-specific record fields (Flower: ``node_id``, ``memory_mb``,
                       ``round_trip_seconds``, ``node`` timings), added to the client's record.
    """

    client_id: int
    status: Status
    result: Result | None = None
    error: str | None = None
    real_budget_bytes: int | None = None
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    fault: str | None = None


class Executor(Protocol):
    """How a runtime reaches clients; driven by :func:`memfl.server.loop.run_rounds`.

    runtime:  the runtime's name, written to ``results.json`` (``"sim"``, ``"flower"``).
    versions: package versions worth recording besides torch (Flower: ``{"flwr": ...}``).
    """

    runtime: str
    versions: dict[str, str]

    def clients(self, round: int) -> list[Candidate]:
        """Who can be planned for in ``round`` (the strategy selects among them)."""
        ...

    def run(self, round: int, instructions: list[Instruction]) -> list[Outcome]:
        """Carry out ``instructions`` (each for a client :meth:`clients` returned this round);
        return one :class:`Outcome` per instruction, in their order. Must not raise for a
        client's failure: that is an outcome."""
        ...

    def timing(self) -> dict[str, float]:
        """Runtime-specific parts (seconds) of the last :meth:`run`, added to the round's
        ``timing`` (Flower: serialize, push, wait, deserialize); ``{}`` if none."""
        ...

    def roster(self) -> list[Candidate]:
        """Every client known so far (the results' ``clients`` list), by id."""
        ...
