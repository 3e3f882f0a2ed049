"""The results file's summary of a run (the per-round records are written by the round loop)."""

from __future__ import annotations

from typing import Any


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
