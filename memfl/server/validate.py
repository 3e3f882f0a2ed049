"""Validation before aggregation: every ok result is checked against its instruction.

:func:`memfl.server.loop.run_rounds` runs :meth:`Validator.check` on every ``ok`` outcome between
the executor and ``strategy.aggregate_train``; a result that fails any check becomes ``rejected``
with the reason in its client record and never reaches the strategy, and the round goes on. The
checks, each against what the *server* knows, never against what the result says of itself:

- it answers the instruction's client (``client_id``);
- ``num_samples`` is an integer in ``[1, n]`` where ``n`` is the client's known sample count
  (:class:`~memfl.core.strategy.ClientInfo` ``num_samples``: its partition in the simulator, the
  count the node declared on Flower);
- ``loss``, ``sample_losses`` and ``compute_seconds`` are finite (and the seconds not negative):
  strategies and the virtual clock read them;
- every tensor name is one the plan sends back: the instruction's ``trainable`` names plus the
  buffers the plan's engine returns (``TrainStep.sent_buffers`` of ``prepare(model_fn(plan), plan)``,
  derived here from the plan, once per plan), and one the instruction sent;
- every tensor is a tensor with the shape and dtype of the one sent, and all its values are finite;
- optionally (``[aggregation] max_update_norm``) the L2 norm of the update (received minus sent,
  floating tensors) is at most the bound.

Cost: one pass over each result's tensors (``isfinite``), plus the update norm when bounded; one
model built per distinct plan (under a forked RNG, so the run's random stream is untouched).
"""

from __future__ import annotations

import json
import math
from typing import Callable

import torch

from memfl.core.aggregate import update_norm
from memfl.core.engine import prepare
from memfl.core.protocol import Instruction, Plan, Result
from memfl.core.strategy import ClientInfo


class Validator:
    """Checks results against their instructions (:meth:`check`).

    model_fn:        plan -> the model clients train (the strategy's wrapped builder,
                     ``ServerSetup.model_fn``), to learn which buffers a plan sends back.
    max_update_norm: reject updates with a larger L2 norm (None: no bound).
    """

    def __init__(self, model_fn: Callable[[Plan], torch.nn.Module], max_update_norm: float | None = None) -> None:
        self.model_fn = model_fn
        self.max_update_norm = max_update_norm
        self._buffers: dict[str, frozenset[str]] = {}

    def sent_buffers(self, plan: Plan) -> frozenset[str]:
        """The buffer names a client training ``plan`` sends back (cached per plan)."""
        key = json.dumps(plan.to_json(), sort_keys=True)
        if key not in self._buffers:
            with torch.random.fork_rng(devices=[]):  # building a model draws from the global RNG
                step = prepare(self.model_fn(plan), plan)
            self._buffers[key] = frozenset(step.sent_buffers)
        return self._buffers[key]

    def allowed(self, ins: Instruction) -> frozenset[str]:
        """The tensor names a result for ``ins`` may hold."""
        return (frozenset(ins.trainable) | self.sent_buffers(ins.plan)) & frozenset(ins.params)

    def check(self, ins: Instruction, client: ClientInfo, result: Result | None) -> str | None:
        """Why ``result`` must not be aggregated, or None when it passes every check."""
        if not isinstance(result, Result):
            return "no result"
        if result.client_id != ins.client_id:
            return f"result names client {result.client_id!r}, the instruction was for client {ins.client_id}"
        n = result.num_samples
        if isinstance(n, bool) or not isinstance(n, int):
            return f"num_samples {n!r} is not an integer"
        if not 1 <= n <= client.num_samples:
            return f"num_samples {n} outside [1, {client.num_samples}] (the client's known sample count)"
        if not _finite_number(result.loss):
            return f"loss {result.loss!r} is not a finite number"
        if not isinstance(result.sample_losses, list) or not all(_finite_number(v) for v in result.sample_losses):
            return "sample_losses are not all finite numbers"
        if not _finite_number(result.compute_seconds) or result.compute_seconds < 0:
            return f"compute_seconds {result.compute_seconds!r} is not a finite number >= 0"
        if not isinstance(result.params, dict) or not result.params:
            return "no tensors"
        allowed = self.allowed(ins)
        unexpected = sorted(str(k) for k in result.params if k not in allowed)
        if unexpected:
            more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
            return f"tensors the plan does not send back: {', '.join(unexpected[:3])}{more}"
        for k in sorted(result.params):
            t, sent = result.params[k], ins.params[k]
            if not isinstance(t, torch.Tensor):
                return f"{k}: not a tensor ({type(t).__name__})"
            if t.shape != sent.shape:
                return f"{k}: shape {tuple(t.shape)}, sent {tuple(sent.shape)}"
            if t.dtype != sent.dtype:
                return f"{k}: dtype {t.dtype}, sent {sent.dtype}"
            if (t.dtype.is_floating_point or t.dtype.is_complex) and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                return f"{k}: {bad} non-finite value{'s' if bad > 1 else ''}"
        if self.max_update_norm is not None:
            norm = update_norm(ins.params, result.params)
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} above max_update_norm {self.max_update_norm:g}"
        return None


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
