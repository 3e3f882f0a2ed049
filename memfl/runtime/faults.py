"""Built-in fault injection, for tests and benchmarks (``[faults]``, ``memfl run --faults``).

Each round every selected client is given at most one fault, drawn from ``(seed, round, client)``
(:func:`draw_fault`; :func:`memfl.core.seeding.round_seed`), so a run and its resume inject the same
faults. The kinds, and what the server records:

=========  =====================================================================  ===============
kind       what the client does                                                    status
=========  =====================================================================  ===============
crash      raises before training                                                  ``failed``
nan        trains, then sends NaN in one floating tensor                           ``rejected``
shape      trains, then sends one floating tensor with a wrong shape               ``rejected``
inflate    trains, then claims 1000x its ``num_samples``                           ``rejected``
oom        allocates past its memory budget                                        ``oom``
hang       never answers; the round's deadline ends it                             ``timeout``
=========  =====================================================================  ===============

Every executor runs a client through :func:`fit_with_fault` (the seam): it takes the fault and
a ``fit()`` callable (``LocalTrainer.fit`` on the client's data) and returns the
:class:`~memfl.server.executor.Outcome`, with ``fault`` set. What ``oom`` and ``hang`` *do* is the
executor's: in this process (:class:`memfl.runtime.sim.InProcessExecutor`) they are simulated --
:func:`simulated_oom` raises :class:`InjectedOOM` and :func:`simulated_hang` raises
:class:`ClientHang`, since a real allocation would take this process's memory and a real hang
would stop the run. A worker process under an OS-enforced cap passes ``oom=allocate_past_budget``
(a real allocation, which the cap turns into torch's "can't allocate memory" ``RuntimeError``,
recognised by :func:`is_oom_error`) and ``hang=sleep_forever`` (its pool's deadline kills it).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from memfl.config import FAULT_KINDS, FaultsConfig
from memfl.core.protocol import Instruction, Result
from memfl.core.seeding import round_seed
from memfl.server.executor import Outcome

T = TypeVar("T")

__all__ = [
    "FAULT_KINDS",
    "ClientHang",
    "InjectedCrash",
    "InjectedOOM",
    "allocate_past_budget",
    "corrupt",
    "draw_fault",
    "fit_with_fault",
    "is_oom_error",
    "noting_failures",
    "simulated_hang",
    "simulated_oom",
    "sleep_forever",
]

#: mixed into the seed so that the fault draw is independent of the client's training seed
_SALT = 0x0FA17
#: an inflated result claims this many times its real sample count
INFLATE_FACTOR = 1000


class InjectedCrash(RuntimeError):
    """The ``crash`` fault: the client raises."""


class InjectedOOM(MemoryError):
    """The simulated ``oom`` fault: the client would have been killed for its memory."""


class ClientHang(Exception):
    """The simulated ``hang`` fault: the client never answers."""


def draw_fault(faults: FaultsConfig, seed: int, round: int, client_id: int) -> str | None:
    """The fault client ``client_id`` is given in ``round`` (None: none), drawn from
    ``(seed, round, client)``: one uniform number against the cumulative rates in the order of
    :data:`FAULT_KINDS`."""
    if not faults.active:
        return None
    u = np.random.default_rng([round_seed(seed, round, client_id), _SALT]).random()
    edge = 0.0
    for kind, rate in faults.rates().items():
        edge += rate
        if u < edge:
            return kind
    return None


def corrupt(fault: str, result: Result, seed: int) -> Result:
    """``result`` as a ``nan``, ``shape`` or ``inflate`` fault sends it (a copy; ``seed`` picks the
    tensor). Other kinds: unchanged."""
    if fault == "inflate":
        return replace(result, num_samples=max(1, result.num_samples) * INFLATE_FACTOR)
    if fault not in ("nan", "shape"):
        return result
    floats = sorted(k for k, t in result.params.items() if t.dtype.is_floating_point and t.numel() > 0)
    if not floats:
        return result
    name = floats[int(np.random.default_rng([seed, _SALT, 1]).integers(len(floats)))]
    t = result.params[name]
    if fault == "nan":
        bad = t.clone()
        bad.view(-1)[0] = float("nan")
    else:  # one more row (a 0-d tensor becomes a vector of two)
        bad = torch.cat([t.reshape(1) if t.dim() == 0 else t, (t.reshape(1) if t.dim() == 0 else t)[:1]])
    return replace(result, params={**result.params, name: bad})


def simulated_oom(ins: Instruction) -> None:
    raise InjectedOOM(f"injected oom: allocation past the {ins.budget_bytes or 0} B budget")


def simulated_hang(ins: Instruction) -> None:
    raise ClientHang("injected hang: no answer")


def allocate_past_budget(ins: Instruction, margin: float = 1.5) -> None:
    """Really allocate (and touch) ``margin x`` the instruction's budget: under an OS cap this
    raises torch's "can't allocate memory" ``RuntimeError``. Never call it without a cap."""
    n = int((ins.budget_bytes or 2**28) * margin)
    buf = torch.empty(n, dtype=torch.uint8)
    buf.fill_(1)
    raise InjectedOOM(f"injected oom: {n} B allocated past the budget without a cap")


def sleep_forever(ins: Instruction) -> None:
    while True:
        time.sleep(3600)


def is_oom_error(err: BaseException) -> bool:
    """An allocation failure: :class:`MemoryError` (ours included) or torch's CPU/CUDA out-of-memory."""
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def noting_failures(fn: Callable[..., T], failed: Callable[[BaseException], None]) -> Callable[..., T]:
    """``fn`` that first hands any exception it raises to ``failed`` (a budget cap noting the bytes in
    use at an allocation failure), then re-raises it for :func:`fit_with_fault` to classify."""

    def call(*args: Any) -> T:
        try:
            return fn(*args)
        except BaseException as err:
            failed(err)
            raise

    return call


def fit_with_fault(
    ins: Instruction,
    fit: Callable[[], Result],
    fault: str | None,
    *,
    real_budget_bytes: int | None = None,
    oom: Callable[[Instruction], None] = simulated_oom,
    hang: Callable[[Instruction], None] = simulated_hang,
) -> Outcome:
    """Run ``fit()`` for ``ins`` with ``fault`` injected (None: just run it) and return the outcome:
    ``ok``; ``failed`` when it raised; ``oom`` for an allocation failure (:func:`is_oom_error`);
    ``timeout`` for :class:`ClientHang`. The outcome's ``fault`` is the injected kind.
    ``oom``/``hang``: what those faults do (simulated here; see the module docstring)."""

    def outcome(status: str, **kw) -> Outcome:
        return Outcome(ins.client_id, status, real_budget_bytes=real_budget_bytes, fault=fault, **kw)  # type: ignore[arg-type]

    try:
        if fault == "crash":
            raise InjectedCrash("injected crash")
        if fault == "oom":
            oom(ins)
        if fault == "hang":
            hang(ins)
        res = fit()
    except ClientHang as err:
        return outcome("timeout", error=f"no answer before the round deadline ({err})")
    except Exception as err:  # a failing client must not kill the run
        status = "oom" if is_oom_error(err) else "failed"
        return outcome(status, error=f"{type(err).__name__}: {err}")
    if fault is not None:
        res = corrupt(fault, res, ins.seed)
    return outcome("ok", result=res)
