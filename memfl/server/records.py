"""The result records of a run, the same on every runtime (built by :mod:`memfl.server.loop`).

``results.json`` holds:

- ``config``, ``runtime`` (``"sim"`` | ``"flower"``), ``memfl`` (package versions),
  ``full_peak_bytes`` (estimated full-training peak at the configured batch);
- ``clients``: one entry per known client -- ``id``, ``device``, ``speed``, ``budget_bytes`` (its
  own budget, see below), ``num_samples``, plus the runtime's extras (Flower: ``node_id``,
  ``memory_mb``, ``budget_source``, ``machine``);
- ``rounds``: one entry per round (see :func:`round_entry`), each with its client records (see
  :func:`client_record`);
- ``summary`` (:func:`summarize`).

A client record (one per instruction of the round):

=========================  ==========================================================================
``id``, ``device``         the client and its device profile
``budget_bytes``           the client's own memory budget: configured in the simulator, declared by the
                           node on Flower (its ``memory-mb``, a device profile or a measurement)
``predicted_budget_bytes`` the budget the strategy planned with (``Instruction.budget_bytes``): the
                           client's own budget, or under the simulator's contention its prediction of
                           this round's real budget
``real_budget_bytes``      the real budget this round -- only where the runtime knows one (the
                           simulator's contention); absent otherwise
``budget_violation``       predicted peak > real budget; only with ``real_budget_bytes``
``plan``                   the plan's label; ``predicted_peak_bytes``: the planner's peak estimate
``status``                 ``ok`` | ``failed`` | ``oom``; ``error`` when not ok
ok only                    ``num_samples``, ``steps``, ``train_loss``, ``compute_seconds`` (the training
                           process's CPU seconds on CPU, wall seconds on GPU), ``virtual_seconds``
                           (:func:`memfl.server.clock.client_seconds`), ``metrics``
runtime extras             Flower: ``node_id``, ``memory_mb``; when ok ``round_trip_seconds`` and ``node``
                           (the ClientApp's own timings)
=========================  ==========================================================================
"""

from __future__ import annotations

from typing import Any

from memfl.core.protocol import Instruction
from memfl.server.clock import client_seconds
from memfl.server.executor import Candidate, Outcome


def client_record(ins: Instruction, client: Candidate, outcome: Outcome) -> dict[str, Any]:
    """The record of one instruction and what became of it (fields in the module docstring)."""
    rec: dict[str, Any] = {
        "id": ins.client_id,
        "device": client.info.device,
        "budget_bytes": client.info.budget_bytes,
        "plan": ins.plan.label,
        "predicted_peak_bytes": ins.predicted_peak_bytes,
        "predicted_budget_bytes": ins.budget_bytes,
    }
    if outcome.real_budget_bytes is not None:
        rec.update(
            real_budget_bytes=outcome.real_budget_bytes,
            budget_violation=(ins.predicted_peak_bytes or 0) > outcome.real_budget_bytes,
        )
    rec["status"] = outcome.status
    if outcome.status == "ok":
        res = outcome.result
        assert res is not None, "an ok outcome carries its result"
        rec.update(
            num_samples=res.num_samples,
            steps=res.steps,
            train_loss=res.loss,
            compute_seconds=res.compute_seconds,
            virtual_seconds=client_seconds(res.compute_seconds, client.info.speed, ins.params, res.params),
            metrics=res.metrics,
        )
    else:
        rec["error"] = outcome.error
    rec.update(outcome.extra)
    return rec


def client_entry(client: Candidate) -> dict[str, Any]:
    """A client's entry in the results' ``clients`` list."""
    c = client.info
    return {
        "id": c.id,
        "device": c.device,
        "speed": c.speed,
        "budget_bytes": c.budget_bytes,
        "num_samples": c.num_samples,
        **client.extra,
    }


def round_entry(
    rnd: int,
    records: list[dict[str, Any]],
    strategy_report: Any,
    accuracy: float | None,
    loss: float | None,
    virtual_before: float,
) -> dict[str, Any]:
    """A round's entry: ``round``, ``accuracy``/``loss`` (``None`` when not evaluated), ``clients``
    (the records), ``strategy`` (its round report), ``round_virtual_seconds`` (the slowest ok
    client's virtual time: a synchronous round), ``virtual_seconds`` (cumulative) and ``failed``
    (records not ok). The loop adds ``round_seconds`` (wall) and ``timing`` (its parts, plus the
    runtime's)."""
    ok = [r for r in records if r["status"] == "ok"]
    round_virtual = max((r["virtual_seconds"] for r in ok), default=0.0)
    return {
        "round": rnd,
        "accuracy": accuracy,
        "loss": loss,
        "clients": records,
        "strategy": strategy_report,
        "round_virtual_seconds": round_virtual,
        "virtual_seconds": virtual_before + round_virtual,
        "failed": len(records) - len(ok),
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best accuracy, total virtual time and failures over ``rounds``."""
    evaluated = [r for r in rounds if r["accuracy"] is not None]
    return {
        "rounds": len(rounds),
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "virtual_seconds": rounds[-1]["virtual_seconds"] if rounds else 0.0,
        "wall_seconds": sum(r["round_seconds"] for r in rounds),
        "failed_clients": sum(r["failed"] for r in rounds),
        "budget_violations": sum(1 for r in rounds for c in r["clients"] if c.get("budget_violation")),
        "participants": sum(len(r["clients"]) for r in rounds),
    }
