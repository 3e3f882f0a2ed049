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

The round deadline (``[run] round_deadline``, :func:`resolve_deadline`): a synchronous round lasts
as long as its slowest *answering* client (``ok`` or ``rejected``); when a client is silent
(``timeout``) or killed (``oom``) the server learns it only when the deadline passes, so with a
deadline the round lasts at least that long. ``"2x"``: twice the round's expected duration, taken
as its slowest answering client's time (the previous round's when none answered); seconds: a
fixed deadline, and an ok client slower than it is ``timeout`` too (left out of the aggregate).
Without one (the default) a silent client costs nothing. Each round records both accountings.

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
``status``                 ``ok`` | ``failed`` (raised, or answered with an error) | ``oom`` (killed
                           for its memory) | ``timeout`` (no answer before the deadline, or with a
                           deadline in seconds an answer after it) | ``rejected`` (validation refused
                           the result, :mod:`memfl.server.validate`); ``error`` when not ok (the
                           reason, for ``rejected``)
``fault``                  the injected fault's kind (``crash``, ``nan``, ``shape``, ``inflate``,
                           ``oom``, ``hang``; :mod:`memfl.runtime.faults`); only when one was injected
ok only                    ``num_samples``, ``steps``, ``train_loss``, ``compute_seconds`` (the training
                           process's CPU seconds on CPU, wall seconds on GPU), ``virtual_seconds``
                           (:func:`memfl.server.clock.client_seconds`), ``metrics``
rejected                   ``num_samples`` (as claimed) and ``virtual_seconds`` when its numbers allow
runtime extras             Flower: ``node_id``, ``memory_mb``; when ok ``round_trip_seconds`` and ``node``
                           (the ClientApp's own timings)
=========================  ==========================================================================
"""

from __future__ import annotations

import math
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
    if outcome.fault is not None:
        rec["fault"] = outcome.fault
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
        if outcome.status == "rejected" and outcome.result is not None:
            rec.update(_rejected_fields(ins, client, outcome))
    rec.update(outcome.extra)
    return rec


def _rejected_fields(ins: Instruction, client: Candidate, outcome: Outcome) -> dict[str, Any]:
    """What a rejected result claimed, where it is plain data: its ``num_samples`` and the
    virtual time it took (it answered, so the round waited for it)."""
    res, out = outcome.result, {}
    if isinstance(res.num_samples, int):
        out["num_samples"] = res.num_samples
    try:
        seconds = client_seconds(float(res.compute_seconds), client.info.speed, ins.params, res.params)
    except (TypeError, ValueError, AttributeError):
        return out
    if math.isfinite(seconds) and seconds >= 0:
        out["virtual_seconds"] = seconds
    return out


#: statuses of a client that answered (the round waited for it); the others are silent or killed
#: (``timeout``, ``oom``: the server learns of them at the deadline) or raised (``failed``: at once)
ANSWERED = ("ok", "rejected")
SILENT = ("timeout", "oom")


def answered_seconds(records: list[dict[str, Any]]) -> float | None:
    """The slowest answering client's virtual seconds (None: nobody answered)."""
    times = [r["virtual_seconds"] for r in records if r["status"] in ANSWERED and "virtual_seconds" in r]
    return max(times) if times else None


def resolve_deadline(
    records: list[dict[str, Any]], deadline: tuple[str, float] | None, previous_expected: float | None
) -> float | None:
    """The round's deadline in virtual seconds for ``deadline`` (:func:`memfl.config.parse_deadline`:
    ``("factor", f)`` or ``("seconds", s)``; None: no deadline). A factor multiplies the round's
    expected duration (:func:`answered_seconds`, else ``previous_expected``, else 0). With fixed
    seconds, ok records slower than the deadline become ``timeout`` here (modified in place): the
    server stopped waiting for them, so the loop leaves them out of the aggregate."""
    if deadline is None:
        return None
    kind, value = deadline
    if kind == "factor":
        expected = answered_seconds(records)
        return value * (expected if expected is not None else previous_expected or 0.0)
    for r in records:
        if r["status"] == "ok" and r["virtual_seconds"] > value:
            r.update(status="timeout", error=f"answered after the {value:g} s deadline")
    return value


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
    deadline_seconds: float | None = None,
) -> dict[str, Any]:
    """A round's entry: ``round``, ``accuracy``/``loss`` (``None`` when not evaluated), ``clients``
    (the records), ``strategy`` (its round report), ``round_virtual_seconds`` (a synchronous
    round: the slowest answering client's virtual time, or the deadline when a client was silent
    or killed and a deadline is set), ``answered_virtual_seconds`` (the slowest answering client's:
    silent clients cost nothing), ``deadline_seconds`` (None: no deadline), ``virtual_seconds``
    (cumulative), ``failed`` (records not ok) and ``statuses`` (count per status). The loop adds
    ``round_seconds`` (wall), ``timing`` (its parts, plus the runtime's) and ``eligible_clients``
    (how many of the round's candidates had a plan whose predicted peak fits the budget they were
    planned for: every method, so they compare; None for a strategy that bypasses
    :meth:`~memfl.core.strategy.Strategy.plan_and_select`)."""
    ok = [r for r in records if r["status"] == "ok"]
    answered = answered_seconds(records) or 0.0
    silent = any(r["status"] in SILENT for r in records)
    round_virtual = max(answered, deadline_seconds) if deadline_seconds is not None and silent else answered
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "round": rnd,
        "accuracy": accuracy,
        "loss": loss,
        "clients": records,
        "strategy": strategy_report,
        "round_virtual_seconds": round_virtual,
        "answered_virtual_seconds": answered,
        "deadline_seconds": deadline_seconds,
        "virtual_seconds": virtual_before + round_virtual,
        "failed": len(records) - len(ok),
        "statuses": statuses,
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best accuracy, total virtual time (with the deadline, and ``virtual_seconds_no_deadline``
    where silent clients cost nothing), failures, clients per status and injected faults per kind
    over ``rounds``."""
    evaluated = [r for r in rounds if r["accuracy"] is not None]
    statuses: dict[str, int] = {}
    faults: dict[str, int] = {}
    for r in rounds:
        for c in r["clients"]:
            statuses[c["status"]] = statuses.get(c["status"], 0) + 1
            if "fault" in c:
                faults[c["fault"]] = faults.get(c["fault"], 0) + 1
    return {
        "rounds": len(rounds),
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "virtual_seconds": rounds[-1]["virtual_seconds"] if rounds else 0.0,
        "wall_seconds": sum(r["round_seconds"] for r in rounds),
        "failed_clients": sum(r["failed"] for r in rounds),
        "budget_violations": sum(1 for r in rounds for c in r["clients"] if c.get("budget_violation")),
        "participants": sum(len(r["clients"]) for r in rounds),
        "virtual_seconds_no_deadline": sum(
            r.get("answered_virtual_seconds", r["round_virtual_seconds"]) for r in rounds
        ),
        "statuses": statuses,
        "faults": faults,
    }
