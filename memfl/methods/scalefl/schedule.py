"""ScaleFL's stage schedule: which stage the federation trains each round (SPEC 2.5).

- ``elastic`` (default, :class:`StageSchedule`): a stage runs at least ``r_min`` rounds and moves on
  when the aggregated training loss plateaus (:func:`plateaued`: its least-squares slope over the
  last ``window`` rounds, relative to its mean, improves by less than ``plateau`` per round) or
  after ``r_max`` rounds. After stage T the federation keeps training stage T.
  With ``rule = "movement"`` the plateau test is the authors' *effective movement* instead
  (:func:`effective_movement`): over the last ``W`` rounds' updates of the active block (sampled
  parameters), ``||sum u||_1 / sum ||u||_1`` below a threshold (updates that cancel out: the block
  oscillates rather than moves).
- ``cyclic``: stage = ((round - 1) mod T) + 1, as in the authors' released code; no state.

The state (current stage, rounds in it, its losses or updates, transitions) is JSON and checkpointed.
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


def effective_movement(updates: list[np.ndarray]) -> float:
    """``||sum_k u_k||_1 / sum_k ||u_k||_1`` over the updates ``u_k`` (1 when they all point the same
    way, near 0 when they cancel; 0 for all-zero updates)."""
    total = sum(float(np.abs(u).sum()) for u in updates)
    if total <= 0.0:
        return 0.0
    return float(np.abs(np.sum(updates, axis=0)).sum()) / total


class StageSchedule:
    """The elastic or cyclic schedule over ``blocks`` stages.

    kind: ``"elastic"`` or ``"cyclic"``; r_min / r_max: rounds a stage runs at least / at most
    (elastic; ``r_min`` is capped at ``r_max``); window / plateau: the plateau rule's parameters;
    rule: ``"plateau"`` or ``"movement"`` (``movement_window`` W updates, ``movement_threshold``).
    """

    def __init__(
        self,
        kind: str,
        blocks: int,
        r_min: int,
        r_max: int,
        window: int,
        plateau: float,
        rule: str = "plateau",
        movement_window: int = 6,
        movement_threshold: float = 0.35,
    ) -> None:
        if kind not in ("elastic", "cyclic"):
            raise ValueError(f"scalefl.schedule {kind!r}: expected 'elastic' or 'cyclic'")
        if rule not in ("plateau", "movement"):
            raise ValueError(f"scalefl.advance {rule!r}: expected 'plateau' or 'movement'")
        self.rule, self.movement_window, self.movement_threshold = rule, movement_window, movement_threshold
        self.updates: list[np.ndarray] = []  # movement: the last W updates of the active block
        self.last_movement: float | None = None  # movement: the value the last advance() saw
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

    def movement(self) -> float | None:
        """The effective movement of the last W updates (None until W are recorded)."""
        if len(self.updates) < self.movement_window:
            return None
        return effective_movement(self.updates[-self.movement_window :])

    def advance(self, round: int, loss: float | None, update: np.ndarray | None = None) -> str | None:
        """Record round ``round``'s aggregated training loss (None: no results) and, for the movement
        rule, the active block's sampled update; move on when the rule says so. Returns why it
        advanced (``"r_max"``/``"plateau"``/``"movement"``) or None. Elastic only."""
        if self.kind != "elastic":
            return None
        self.last_movement = None
        self.rounds_in_stage += 1
        if loss is not None:
            self.losses.append(float(loss))
        if self.rule == "movement" and update is not None:
            self.updates = [*self.updates, np.asarray(update, dtype=np.float32)][-self.movement_window :]
        self.last_movement = self.movement() if self.rule == "movement" else None
        if self.stage >= self.T:
            return None
        reason = None
        if self.rounds_in_stage >= self.r_max:
            reason = "r_max"
        elif self.rounds_in_stage >= self.r_min:
            if self.rule == "plateau" and plateaued(self.losses, self.window, self.plateau):
                reason = "plateau"
            elif self.rule == "movement":
                mv = self.last_movement
                if mv is not None and mv < self.movement_threshold:
                    reason = "movement"
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
            self.updates = []
        return reason

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "stage": self.stage,
            "rounds_in_stage": self.rounds_in_stage,
            "losses": list(self.losses),
            "transitions": list(self.transitions),
        }
        if self.rule == "movement":  # float32 values as Python floats: exact through JSON
            state["updates"] = [[float(v) for v in u] for u in self.updates]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.rounds_in_stage = int(state["rounds_in_stage"])
        self.losses = [float(v) for v in state["losses"]]
        self.transitions = list(state.get("transitions", []))
        self.updates = [np.asarray(u, dtype=np.float32) for u in state.get("updates", [])]
