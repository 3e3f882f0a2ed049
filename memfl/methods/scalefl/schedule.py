"""ScaleFL's stage schedule: which stage the federation trains each round (SPEC 2.5).

- ``elastic`` (default, :class:`StageSchedule`): a stage runs at least ``r_min`` rounds and moves on
  when the aggregated training loss plateaus (:func:`plateaued`: its least-squares slope over the
  last ``window`` rounds, relative to its mean, improves by less than ``plateau`` per round) or
  after ``r_max`` rounds. After stage T the federation keeps training stage T.
- ``cyclic``: stage = ((round - 1) mod T) + 1, as in the authors' released code; no state.

The state (current stage, rounds in it, its losses, transitions) is JSON and checkpointed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def plateaued(losses: list[float], window: int, threshold: float) -> bool:
    """True when the least-squares slope of the last ``window`` losses, divided by their mean,
    shows an improvement of less than ``threshold`` per round (a rising loss counts as a plateau)."""
    if len(losses) < max(2, window):
        return False
    y = np.asarray(losses[-window:], dtype=float)
    x = np.arange(len(y), dtype=float)
    slope = float(np.polyfit(x, y, 1)[0])
    scale = max(abs(float(y.mean())), 1e-12)
    return -slope / scale < threshold


class StageSchedule:
    """The elastic or cyclic schedule over ``blocks`` stages.

    kind: ``"elastic"`` or ``"cyclic"``; r_min / r_max: rounds a stage runs at least / at most
    (elastic; ``r_min`` is capped at ``r_max``); window / plateau: the plateau rule's parameters.
    """

    def __init__(self, kind: str, blocks: int, r_min: int, r_max: int, window: int, plateau: float) -> None:
        if kind not in ("elastic", "cyclic"):
            raise ValueError(f"scalefl.schedule {kind!r}: expected 'elastic' or 'cyclic'")
        self.kind, self.T = kind, blocks
        self.r_max = r_max
        self.r_min = min(r_min, r_max)
        self.window, self.plateau = window, plateau
        self.stage = 1
        self.rounds_in_stage = 0
        self.losses: list[float] = []
        self.transitions: list[dict[str, Any]] = []

    def stage_for(self, round: int) -> int:
        """The stage round ``round`` (1-based) trains."""
        if self.kind == "cyclic":
            return (round - 1) % self.T + 1
        return self.stage

    def advance(self, round: int, loss: float | None) -> str | None:
        """Record round ``round``'s aggregated training loss (None: no results) and move on when the
        rule says so. Returns why it advanced (``"r_max"``/``"plateau"``) or None. Elastic only."""
        if self.kind != "elastic":
            return None
        self.rounds_in_stage += 1
        if loss is not None:
            self.losses.append(float(loss))
        if self.stage >= self.T:
            return None
        reason = None
        if self.rounds_in_stage >= self.r_max:
            reason = "r_max"
        elif self.rounds_in_stage >= self.r_min and plateaued(self.losses, self.window, self.plateau):
            reason = "plateau"
        if reason:
            self.transitions.append(
                {
                    "round": round,
                    "from": self.stage,
                    "to": self.stage + 1,
                    "reason": reason,
                    "rounds": self.rounds_in_stage,
                }
            )
            self.stage += 1
            self.rounds_in_stage = 0
            self.losses = []
        return reason

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "rounds_in_stage": self.rounds_in_stage,
            "losses": list(self.losses),
            "transitions": list(self.transitions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.rounds_in_stage = int(state["rounds_in_stage"])
        self.losses = [float(v) for v in state["losses"]]
        self.transitions = list(state.get("transitions", []))
