"""``[memfl]``: the settings of memfl's own method that neither ScaleFL's nor FedHybrid's section has.

The method also reads ``[scalefl]`` (the blocks, the schedule, the mentor, the harmonizer) and
``[fedhybrid]`` (the selector, its exploration, ``margin``, ``slack_mb``, ``bits``, ``min_bits``,
``mixed``, ``recompute``, ``contention``): one source of each default, shared with the method it
comes from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memfl.core.config import Section


class MemflConfig(Section):
    """``method = "memfl"``: ScaleFL's stages, FedHybrid's selection and budgets, and per client
    per round the fastest plan that fits (docs/MEMFL.md)."""

    # after the last stage: a phase in which clients whose budget admits a full or hybrid plan
    # fine-tune the whole model (False: stage T goes on to the end, as ScaleFL)
    end_to_end: bool = True
    # in that phase, the clients whose budget admits no whole-model plan: "last-stage" keeps
    # training stage T (block T + the harmonized layer + the head), "sit-out" leaves them out
    rest: Literal["last-stage", "sit-out"] = "last-stage"
    # budgets each scope's plan table (the whole model; each stage) is solved for
    plan_levels: int = Field(12, ge=2)
