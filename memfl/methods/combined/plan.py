"""The combined plans: what each plan kind trains, what a client under it holds, and building one.

Every plan the combined planner (:mod:`memfl.methods.combined.auto`) weighs is a plain
:class:`~memfl.core.protocol.Plan`:

=================  ================================================================================
``full``           the whole model, nothing special (core's engine)
``hybrid``         the whole model, per-segment keep / recompute / compress (FedHybrid's engine)
``stage``          ScaleFL stage t: blocks before t frozen, block t (+ the harmonized layer) trained
``stage+hybrid``   stage t with its units under per-unit keep / recompute / compress
                   (:mod:`memfl.methods.combined.engine`)
=================  ================================================================================

each optionally with ``micro_batches`` = m (the batch split into m micro-batches, gradients
accumulated; :func:`memfl.core.engine.forward_backward`). A plan's *scope* is what it trains:
``"model"`` for full/hybrid, ``"stage:t"`` for the stage kinds.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from memfl.core.protocol import Plan
from memfl.methods.combined.engine import KIND as STAGE_HYBRID
from memfl.methods.scalefl.model import stage_client_factory

STAGE_KINDS = ("stage", STAGE_HYBRID)
#: the ScaleFL defaults the planner's stage plans name explicitly (the client model is cut the same way)
DEFAULT_BLOCKS = 4
DEFAULT_PARTITION = "default"


def scope(plan: Plan) -> str:
    """``"model"`` (full, hybrid) or ``"stage:t"`` (stage, stage+hybrid): what the plan trains."""
    return f"stage:{plan.stage}" if plan.kind in STAGE_KINDS else "model"


def stage_options(blocks: int = DEFAULT_BLOCKS, partition: str = DEFAULT_PARTITION, batch_size: int = 32) -> dict:
    """The ScaleFL options a planner's stage plan carries (how the model is cut)."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if partition not in ("default", "balanced"):
        raise ValueError(f"partition {partition!r}: expected 'default' or 'balanced'")
    out: dict[str, Any] = {"blocks": int(blocks), "partition": partition}
    if partition == "balanced":
        out["batch_size"] = int(batch_size)
    return out


def stage_hybrid_plan(
    stage: int,
    segments: dict[str, str],
    *,
    options: dict[str, Any] | None = None,
    micro_batches: int | None = None,
) -> Plan:
    """A ``stage+hybrid`` plan: stage ``stage`` with ``segments`` (unit name -> mode) and
    ``options`` (ScaleFL's and the hybrid ones, see :mod:`memfl.methods.combined.engine`)."""
    return Plan(
        kind=STAGE_HYBRID,
        stage=int(stage),
        segments={k: v for k, v in segments.items() if v != "keep"},
        options=dict(options or {}),
        micro_batches=micro_batches if (micro_batches or 1) > 1 else None,
    )


def client_factory(base_factory: Callable[[], nn.Module], plan: Plan) -> Callable[[], nn.Module]:
    """The picklable ``() -> model`` of what a client under ``plan`` holds: the whole model for
    full/hybrid plans, only stage t's tensors for the stage kinds
    (:func:`memfl.methods.scalefl.stage_client_factory`, cut as the plan's options say). This is
    what ``memfl.memory.estimate`` / ``measure`` must be given for the plan's peak."""
    if plan.kind not in STAGE_KINDS:
        return base_factory
    opts = plan.options or {}
    return stage_client_factory(
        base_factory,
        int(plan.stage),
        blocks=int(opts.get("blocks", DEFAULT_BLOCKS)),
        mode=opts.get("partition", DEFAULT_PARTITION),
        batch_size=int(opts.get("batch_size", 32)),
        exit_width=opts.get("exit_width", "light"),
        projection=opts.get("projection", "light"),
    )
