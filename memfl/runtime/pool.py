"""The worker-pool executor: clients in parallel worker processes, budgets enforced by the OS.

``[run] workers = N`` (``--workers N``) trains the round's clients in ``N`` worker processes, each
with ``cores // N`` torch threads. ``"auto"``, the default, is one worker per core, i.e.
:func:`torch.get_num_threads` of the server at start (so ``OMP_NUM_THREADS`` counts); it is the
in-process executor where there is one core, no ``fork`` (not Linux) or a CUDA device.
``workers = 1`` is the in-process executor (:class:`memfl.runtime.sim.InProcessExecutor`), unless
``[run] enforce_budgets`` asks for a cap: a cap is never set on the server process, so it gets a
pool of one worker.

How it works:

- **Fork after loading.** The workers are forked from the server once the data set, the
  federation's shares and the model builder exist (:func:`run_experiment` builds the pool after
  :func:`~memfl.server.setup.build_federation`), so every worker has the data and the model code
  without a copy: the dataset's pages are shared copy-on-write and only read. They live for the
  whole run (no per-round process start). A worker that dies is forked again from the server.
- **Plain protocol data.** An instruction goes to a worker as its JSON meta
  (:meth:`~memfl.core.protocol.Instruction.meta_json`) plus its tensors as safetensors bytes over
  a pipe; the :class:`~memfl.core.protocol.Result` comes back the same way. Nothing is pickled.
- **Scheduling.** Instructions are handed out longest first (by local steps) to whichever worker
  is free, so that the short clients fill the end of the round; the outcomes are returned in
  instruction order and the strategy aggregates in client-id order, so which
  worker trained which client does not matter.
- **The per-client call** is :func:`train_client` (fault injection: :func:`memfl.runtime.faults.fit_with_fault`
  around :meth:`LocalTrainer.fit`, inside the enforced cap).
- **Evaluation split over the workers.** :meth:`WorkerPoolExecutor.evaluate` cuts the test set
  into the batches :func:`memfl.core.trainer.evaluate` uses (``EVAL_BATCH_SIZE``), groups them into
  contiguous chunks (:data:`EVAL_CHUNKS_PER_WORKER` per worker, handed out as workers come free, so
  a slower worker does less), and sums the per-batch loss sums in batch order and the correct counts exactly: the
  same numbers as one process evaluating alone (with the same thread count).

Same results. A client's training is seeded from its instruction and its model is overwritten
with the instruction's tensors, so a worker computes what the server would have computed --
**bit for bit when the worker and the sequential run use the same number of torch threads**
(tested: ``tests/test_pool.py``). With a different thread count (the in-process run with 2 threads
vs two workers with 1) the convolution kernels sum gradients in another order and parameters
differ by float rounding (about 1e-7 relative per step, growing slowly over rounds); this is the
stated tolerance, measured by ``memfl bench executor``.

Enforced budgets (``[run] enforce_budgets = true``). Around each client's training, the worker
sets ``RLIMIT_DATA`` to its current data size (the *baseline*: python + torch + data + the cached
models, measured right before, after ``malloc_trim``, less the free memory glibc keeps in its heap,
``mallinfo2().fordblks``, which training can reuse) plus the client's round budget (the real budget
under the simulated contention, else the client's own), and restores it after. An allocation past
it fails: torch raises ``RuntimeError: ... can't allocate memory`` (Python a ``MemoryError``), the
client's status is ``oom`` with the bytes in use when it failed plus the request that failed
(``measured_peak_bytes``); the worker answers, exits, and a fresh one is forked in its place (an
allocation that failed deep inside torch may leave state behind). The predicted-peak comparison of
the simulated contention is then not applied: the OS decides. Records carry ``enforced_cap_bytes``
(baseline + budget, the RLIMIT_DATA value), ``worker_baseline_bytes`` and ``measured_peak_bytes``
(RSS high-water mark above the RSS before training, or for ``oom`` the data size at the failure
plus the failed request).

The allocator under a cap. ``RLIMIT_DATA`` counts the process's data segment, and with glibc's
default (dynamic) mmap threshold freed tensors stay in the heap, so a warm worker's data segment
grows by about twice what the estimator predicts (cnn width 0.5, batch 32, Fashion-MNIST: every
client needed 1.9-2.05x its predicted peak; a fresh fork per budget, 0.05x steps). With
enforcement on, the pool therefore fixes glibc's mmap threshold at 64 KiB
(:data:`CAP_MMAP_THRESHOLD`, before its warm-up and the fork; the workers inherit it), the setting
the estimator's measurements are made with (:mod:`memfl.memory.measure`): then every block of 64
KiB or more is mapped on its own and returned when freed, and the same clients trained under 0.95x
their predicted peak. The cost is paid per step (page faults on fresh mappings):
``memfl bench executor`` measures it, and
:func:`memfl.bench.executor.threshold_sweep` shows why a larger threshold is no way out (from 1 MiB
up the step is nearly free, but no full plan fits even 1.5x its predicted peak). Tiny models have
little room: the 3.3 MB cnn width 0.25 still needs about 1.1-1.2x (fixed allocator and runtime overhead).

Caveat: the cap counts growth above the worker's baseline. A server process that has already
trained bigger workloads (a notebook calling :func:`memfl.run` again, a test session) hands its
workers runtime buffers (oneDNN scratchpads, MKL pools, freed heap) sized for that work; training
reuses them without growing the data segment, so the cap is looser by that much (measured: full
plans at 0.8x their predicted peak passed in such a process, failed in a fresh one). ``memfl run``
starts fresh.

Limits: CPU only (``run.device = "cuda"`` keeps the in-process executor, which with
``enforce_budgets`` caps the CUDA caching allocator instead, :mod:`memfl.runtime.cuda_cap`).
Linux only (fork, ``/proc``, ``RLIMIT_DATA``). A process whose OpenMP pool already runs more
than one thread cannot fork workers that use more than one (libgomp hangs in the child): then each
worker gets one thread and a note says so.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import multiprocessing as mp
import os
import re
import resource
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from memfl.config import Config, FaultsConfig
from memfl.core.protocol import HyperParams, Instruction, Plan, Result
from memfl.core.trainer import EVAL_BATCH_SIZE, LocalTrainer
from memfl.memory.measure import MMAP_THRESHOLD
from memfl.methods.fedhybrid.budget import FederationBudgets
from memfl.runtime.faults import (
    allocate_past_budget,
    draw_fault,
    fit_with_fault,
    noting_failures,
    simulated_hang,
    simulated_oom,
)
from memfl.runtime.procfs import reset_peak_rss, status_bytes
from memfl.server.executor import Candidate, Outcome
from memfl.server.setup import SimClient

__all__ = [
    "CAP_MMAP_THRESHOLD",
    "WorkerPoolExecutor",
    "budget_cap",
    "fix_mmap_threshold",
    "pool_shape",
    "train_client",
    "warm_up",
]

#: the batch size of :func:`memfl.core.trainer.evaluate` (the split must cut the same batches)
EVAL_BATCH = EVAL_BATCH_SIZE
#: the test set is cut into this many chunks per worker, handed out as workers come free, so a
#: worker that runs slower (a busier core, a noisy neighbour) does less of it. On this project's
#: 2-core VM the gain was 3-5% of the evaluation, inside its noise (docs/BENCHMARKS.md)
EVAL_CHUNKS_PER_WORKER = 4


# ------------------------------------------------------------------------------ how many workers
def pool_shape(config: Config, cores: int | None = None) -> tuple[int, int] | None:
    """``(workers, threads per worker)`` for ``config``, or ``None`` for the in-process executor.

    ``cores``: the torch threads the server has (default :func:`torch.get_num_threads`).
    """
    cores = cores or torch.get_num_threads()
    w = config.run.workers
    if config.run.device != "cpu":
        return None
    if (w == "auto" or config.run.enforce_budgets) and not _can_fork():  # fork and /proc (Linux) or none
        return None
    workers = cores if w == "auto" else int(w)
    if workers <= 1 and not config.run.enforce_budgets:
        return None
    return max(1, workers), max(1, cores // max(1, workers))


def _can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


# ------------------------------------------------------------------------------ /proc and limits


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _trim() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


#: glibc's mallopt parameter number of M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
#: blocks of this size or more get their own mmap, returned to the OS when freed (under an enforced
#: cap): the estimator's measurement allocator, so the cap counts what the estimate predicts
CAP_MMAP_THRESHOLD = MMAP_THRESHOLD


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`CAP_MMAP_THRESHOLD` in this process (and the children
    it forks from now on); False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, CAP_MMAP_THRESHOLD))


def _free_heap() -> int:
    """Bytes glibc holds free inside its heaps (counted in the data size, reusable without asking
    the OS); 0 where ``mallinfo2`` is missing."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return 0
    fn.restype = _MallInfo2
    return int(fn().fordblks)


_TRIED = re.compile(r"tried to allocate (\d+) bytes")
#: failures that are an allocation refused under a cap, besides :func:`memfl.runtime.faults.is_oom_error`'s
_ALLOC_FAILED = re.compile(r"could not create a primitive|can't allocate memory|out of memory", re.I)


@dataclass
class Cap:
    """What :func:`budget_cap` measured: the baseline, the cap, the peak (filled in as it goes)."""

    budget_bytes: int
    baseline_bytes: int = 0
    cap_bytes: int = 0
    rss_before: int | None = None
    measured_peak_bytes: int | None = None
    oom_at_bytes: int | None = None

    def record(self) -> dict[str, Any]:
        return {
            "enforced_budget_bytes": self.budget_bytes,
            "enforced_cap_bytes": self.cap_bytes,
            "worker_baseline_bytes": self.baseline_bytes,
            "measured_peak_bytes": self.oom_at_bytes if self.oom_at_bytes is not None else self.measured_peak_bytes,
        }

    def settle(self, outcome: Outcome, over: str) -> Outcome:
        """Put what the cap measured into ``outcome`` (the client's round under it): the record's cap
        fields, the result's ``measured_peak_bytes``, and for ``oom`` the cap in the error text
        (``[over ...]``, ``over`` saying which cap); a failure that was no ``oom`` keeps no bytes."""
        if outcome.status != "oom":
            self.oom_at_bytes = None  # it failed for another reason, or not at all
        outcome.extra.update(self.record())
        if outcome.status == "oom":
            outcome.error = f"{outcome.error} [over {over}]"
        if outcome.result is not None:
            outcome.result.measured_peak_bytes = self.measured_peak_bytes
        return outcome

    def failed(self, err: BaseException) -> None:
        """Note an allocation failure: the data in use now plus the request that failed."""
        now = status_bytes("VmData") or 0
        m = _TRIED.search(str(err))
        self.oom_at_bytes = max(0, now - self.baseline_bytes) + (int(m.group(1)) if m else 0)


class budget_cap:
    """``with budget_cap(budget) as cap:`` -- RLIMIT_DATA = current data size + ``budget`` inside,
    restored on exit; ``cap`` (a :class:`Cap`) holds the baseline, the cap and the measured peak."""

    def __init__(self, budget_bytes: int) -> None:
        self.cap = Cap(int(budget_bytes))
        self._old: tuple[int, int] | None = None

    def __enter__(self) -> Cap:
        _trim()
        c = self.cap
        # the free heap counts in the data size but is reusable: the budget starts above what is in use
        c.baseline_bytes = (status_bytes("VmData") or 0) - _free_heap()
        c.cap_bytes = c.baseline_bytes + c.budget_bytes
        c.rss_before = reset_peak_rss()
        self._old = resource.getrlimit(resource.RLIMIT_DATA)
        hard = self._old[1]
        limit = c.cap_bytes if hard == resource.RLIM_INFINITY else min(c.cap_bytes, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        return c

    def failed(self, err: BaseException) -> None:
        """Note an allocation failure inside the block (:meth:`Cap.failed`)."""
        self.cap.failed(err)

    def __exit__(self, *exc: Any) -> None:
        assert self._old is not None
        resource.setrlimit(resource.RLIMIT_DATA, self._old)
        c = self.cap
        peak = status_bytes("VmHWM")
        if c.rss_before is not None and peak is not None:
            c.measured_peak_bytes = max(0, peak - c.rss_before)


# ------------------------------------------------------------------------------ the client's call
def train_client(
    trainer: LocalTrainer,
    ins: Instruction,
    client: SimClient,
    fault: str | None,
    budget_bytes: int | None,
    real_budget_bytes: int | None = None,
) -> Outcome:
    """Train one client in this (worker) process: ``fit_with_fault`` around ``trainer.fit``,
    under an OS cap of ``budget_bytes`` above the current data size (``None``: no cap)."""
    if budget_bytes is None:
        return fit_with_fault(
            ins,
            lambda: trainer.fit(ins, client.x, client.y),
            fault,
            real_budget_bytes=real_budget_bytes,
            oom=simulated_oom,
            hang=simulated_hang,
        )
    cap_ctx = budget_cap(budget_bytes)
    fit = noting_failures(lambda: trainer.fit(ins, client.x, client.y), cap_ctx.failed)
    oom = noting_failures(allocate_past_budget, cap_ctx.failed)
    with cap_ctx as cap:
        outcome = fit_with_fault(ins, fit, fault, real_budget_bytes=real_budget_bytes, oom=oom, hang=simulated_hang)
    if outcome.status == "failed" and cap.oom_at_bytes is not None and _ALLOC_FAILED.search(outcome.error or ""):
        outcome.status = "oom"  # oneDNN could not allocate its kernel under the cap
    over = (
        f"the enforced cap: {cap.budget_bytes / 2**20:.1f} MiB budget above a "
        f"{cap.baseline_bytes / 2**20:.1f} MiB baseline"
    )
    return cap.settle(outcome, over)


# ------------------------------------------------------------------------------ messages
def _pack(head: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, body: bytes | None = None) -> bytes:
    """``head`` (JSON) and ``tensors`` (safetensors) as one message; ``body``: tensors already
    serialized by :func:`_tensor_body` (one message body sent many times)."""
    if body is None:
        body = _tensor_body(tensors)
    h = json.dumps(head).encode()
    return struct.pack("<Q", len(h)) + h + body


def _tensor_body(tensors: dict[str, torch.Tensor] | None) -> bytes:
    return st_save({k: v.detach().contiguous() for k, v in tensors.items()}) if tensors else b""


def _unpack(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    (n,) = struct.unpack_from("<Q", data)
    head = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    return head, (st_load(body) if body else {})


def _outcome_message(idx: int, o: Outcome, retire: bool = False) -> bytes:
    head = {
        "idx": idx,
        "retire": retire,
        "client_id": o.client_id,
        "status": o.status,
        "error": o.error,
        "fault": o.fault,
        "real_budget_bytes": o.real_budget_bytes,
        "extra": o.extra,
        "result": o.result.meta_json() if o.result is not None else None,
    }
    return _pack(head, o.result.params if o.result is not None else None)


def _outcome_from(head: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Outcome:
    res = Result.from_parts(tensors, head["result"]) if head["result"] is not None else None
    return Outcome(
        head["client_id"],
        head["status"],
        result=res,
        error=head["error"],
        real_budget_bytes=head["real_budget_bytes"],
        extra=head["extra"],
        fault=head["fault"],
    )


# ------------------------------------------------------------------------------ the worker
@torch.no_grad()
def _eval_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> list[list[float]]:
    """Per batch ``b`` in ``[lo, hi)``: [loss sum, correct], as :func:`memfl.core.trainer.evaluate`."""
    model.eval()
    out = []
    for b in range(lo, hi):
        xb, yb = x[b * EVAL_BATCH : (b + 1) * EVAL_BATCH], y[b * EVAL_BATCH : (b + 1) * EVAL_BATCH]
        logits = model(xb)
        out.append(
            [float(nn.functional.cross_entropy(logits, yb, reduction="sum")), int((logits.argmax(1) == yb).sum())]
        )
    return out


def _worker_main(conn: Connection, pool: "WorkerPoolExecutor", threads: int) -> None:
    torch.set_num_threads(threads)
    if pool.enforce:  # again at this thread count: oneDNN caches its kernels per thread count, and
        # a kernel JIT-compiled under the cap takes the client's budget ("could not create a primitive")
        _warm_up(pool.trainer, pool.federation, pool.warmup_batch)
    _trim()
    conn.send_bytes(_pack({"idle_rss_bytes": status_bytes("VmRSS"), "idle_data_bytes": status_bytes("VmData")}))
    while True:
        try:
            head, tensors = _unpack(conn.recv_bytes())
        except EOFError:
            return
        op = head["op"]
        if op == "stop":
            return
        if op == "fit":
            ins = Instruction.from_parts(tensors, head["meta"])
            outcome = train_client(
                pool.trainer,
                ins,
                pool.by_id[ins.client_id],
                head["fault"],
                head["cap_budget"],
                real_budget_bytes=head["real_budget"],
            )
            outcome.extra["worker_pid"] = os.getpid()
            retire = outcome.status == "oom" and head["cap_budget"] is not None
            del ins, tensors
            conn.send_bytes(_outcome_message(head["idx"], outcome, retire=retire))
            if retire:  # an allocation failed somewhere inside torch or Python: the pool starts a fresh worker
                conn.close()
                os._exit(0)
            del outcome
        elif op == "eval":
            assert pool.eval_model is not None and pool.test_x is not None and pool.test_y is not None
            pool.eval_model.load_state_dict(tensors)
            rows = _eval_batches(pool.eval_model, pool.test_x, pool.test_y, head["lo"], head["hi"])
            conn.send_bytes(_pack({"idx": head["idx"], "rows": rows}))
        elif op == "exec":  # tests and benchmarks: run a registered function in the worker
            fn = _WORKER_CALLS[head["name"]]
            conn.send_bytes(_pack({"idx": head["idx"], "value": fn(pool, **head.get("kwargs", {}))}))


def _self_kill(pool: "WorkerPoolExecutor", signal: int = 9) -> None:
    os.kill(os.getpid(), signal)


def _memory(pool: "WorkerPoolExecutor") -> dict[str, Any]:
    return {
        "rss_bytes": status_bytes("VmRSS"),
        "hwm_bytes": status_bytes("VmHWM"),
        "data_bytes": status_bytes("VmData"),
    }


#: what ``op = "exec"`` may run in a worker (by name: nothing is pickled)
_WORKER_CALLS: dict[str, Callable[..., Any]] = {"kill": _self_kill, "memory": _memory}


@dataclass
class _Worker:
    process: Any
    conn: Connection
    idle: dict[str, Any] = field(default_factory=dict)
    busy: Any = None  # (kind, index) of the task in flight, or None


# ------------------------------------------------------------------------------ the executor
class WorkerPoolExecutor:
    """Runs each instruction in one of ``workers`` forked worker processes (see the module docstring).

    ``federation``, ``trainer``, ``budgets``, ``on_client``, ``faults``, ``seed``: as
    :class:`memfl.runtime.sim.InProcessExecutor`. ``enforce``: the OS cap around each client's
    training. ``eval_model``/``test_x``/``test_y``: what :meth:`evaluate` splits over the workers.
    ``client_timeout``: wall seconds after which a worker still training one client is killed (and
    replaced) and the client recorded ``timeout`` (``None``: wait).
    """

    runtime = "sim"
    versions: dict[str, str] = {}

    def __init__(
        self,
        federation: list[SimClient],
        trainer: LocalTrainer,
        budgets: FederationBudgets | None,
        *,
        workers: int,
        threads: int = 1,
        enforce: bool = False,
        on_client: Callable[[int, int, int], None] | None = None,
        faults: FaultsConfig | None = None,
        seed: int = 0,
        eval_model: nn.Module | None = None,
        test_x: torch.Tensor | None = None,
        test_y: torch.Tensor | None = None,
        client_timeout: float | None = None,
        note: Callable[[str], None] | None = None,
        warmup_batch: int = 32,
    ) -> None:
        self.federation = federation
        self.by_id = {c.info.id: c for c in federation}
        self.trainer = trainer
        self.budgets = budgets
        self.enforce = enforce
        self.on_client = on_client
        self.faults = faults
        self.seed = seed
        self.eval_model = eval_model.cpu() if eval_model is not None else None
        self.test_x, self.test_y = test_x, test_y
        self.client_timeout = client_timeout
        self.note = note or (lambda s: None)
        if threads > 1 and _os_threads() > 1:
            self.note(
                f"workers use 1 torch thread, not {threads}: this process already runs threads, and a "
                f"forked child cannot start an OpenMP pool of its own then"
            )
            threads = 1
        self.threads = threads
        self.warmup_batch = warmup_batch
        if enforce:  # before the warm-up and the fork: the workers inherit it (see the module docstring)
            fix_mmap_threshold()
        self.warmup_seconds = _warm_up(trainer, federation, warmup_batch)
        self._ctx = mp.get_context("fork")
        self._workers: list[_Worker] = []
        self.replaced = 0  # workers that died and were started again
        self.retired = 0  # workers restarted after an enforced oom
        self._timing: dict[str, float] = {}
        for _ in range(max(1, workers)):
            self._workers.append(self._start())

    # -- processes
    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self, self.threads), daemon=True)
        proc.start()
        child.close()
        w = _Worker(proc, parent)
        head, _ = _unpack(parent.recv_bytes())
        w.idle = head
        return w

    def _replace(self, w: _Worker) -> _Worker:
        try:
            w.process.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
        w.process.join(5)
        w.conn.close()
        self.replaced += 1
        new = self._start()
        self._workers[self._workers.index(w)] = new
        return new

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send_bytes(_pack({"op": "stop"}))
            except OSError:
                pass
        for w in self._workers:
            w.process.join(5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
            w.conn.close()
        self._workers = []

    def __enter__(self) -> "WorkerPoolExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def baseline(self) -> dict[str, Any]:
        """Each worker's RSS and data size right after it started, idle (python + torch + data)."""
        return {"workers": len(self._workers), "threads": self.threads, "idle": [w.idle for w in self._workers]}

    # -- the Executor protocol
    def clients(self, round: int) -> list[Candidate]:
        if self.budgets is None:
            return [Candidate(c.info) for c in self.federation]
        return [
            Candidate(c.info, planning_budget_bytes=self.budgets.predicted(c.info.id, round)) for c in self.federation
        ]

    def roster(self) -> list[Candidate]:
        return [Candidate(c.info) for c in self.federation]

    def timing(self) -> dict[str, float]:
        return dict(self._timing)

    def run(self, round: int, instructions: list[Instruction]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(instructions)
        tasks: deque[tuple[int, bytes]] = deque()
        for i, ins in enumerate(instructions):
            real = self.budgets.real(ins.client_id, round) if self.budgets is not None else None
            if real is not None and not self.enforce and (ins.predicted_peak_bytes or 0) > real:
                outcomes[i] = Outcome(
                    ins.client_id, "oom", error="predicted peak above the real budget", real_budget_bytes=real
                )
                continue
            fault = draw_fault(self.faults, self.seed, round, ins.client_id) if self.faults is not None else None
            cap = None
            if self.enforce:
                cap = real if real is not None else self.by_id[ins.client_id].info.budget_bytes
            head = {"op": "fit", "idx": i, "meta": ins.meta_json(), "fault": fault, "cap_budget": cap}
            head["real_budget"] = real
            tasks.append((i, _pack(head, ins.params)))
        # longest first (by local steps): the round ends when the last worker does, so the short
        # clients fill the tail; outcomes still come back in instruction order
        tasks = deque(sorted(tasks, key=lambda t: -self._steps(instructions[t[0]])))
        started = [0]

        def on_start(i: int) -> None:
            if self.on_client:
                self.on_client(round, started[0], len(instructions))
            started[0] += 1

        def on_lost(i: int, why: str, status: str) -> None:
            ins = instructions[i]
            real = self.budgets.real(ins.client_id, round) if self.budgets is not None else None
            fault = draw_fault(self.faults, self.seed, round, ins.client_id) if self.faults is not None else None
            outcomes[i] = Outcome(ins.client_id, status, error=why, real_budget_bytes=real, fault=fault)  # type: ignore[arg-type]

        t0 = time.perf_counter()
        for _kind, i, head, tensors in self._dispatch(tasks, on_start, on_lost):
            outcomes[i] = _outcome_from(head, tensors)
        self._timing = {"pool_seconds": time.perf_counter() - t0}
        missing = [i for i, o in enumerate(outcomes) if o is None]
        if missing:  # pragma: no cover - every path sets one
            raise RuntimeError(f"round {round}: worker-pool tasks {missing} got no outcome")
        return outcomes  # type: ignore[return-value]

    def _steps(self, ins: Instruction) -> int:
        """The local steps ``ins`` asks of its client: the scheduling cost of a task."""
        n = len(self.by_id[ins.client_id].x)
        h = ins.hparams
        steps = h.local_epochs * math.ceil(n / max(1, h.batch_size))
        return min(steps, h.max_steps) if h.max_steps is not None else steps

    def _dispatch(self, tasks: deque, on_start: Callable[[int], None], on_lost: Callable[[int, str, str], None]):
        """Hand ``tasks`` ((index, message) pairs) to free workers; yield ``(kind, index, head,
        tensors)`` per answer. A worker that dies is replaced and ``on_lost(index, why, status)``
        called for its task."""
        started_at: dict[int, float] = {}
        while tasks or any(w.busy is not None for w in self._workers):
            for w in self._workers:
                if w.busy is None and tasks:
                    i, msg = tasks.popleft()
                    try:
                        w.conn.send_bytes(msg)
                    except OSError:
                        w = self._replace(w)
                        w.conn.send_bytes(msg)
                    w.busy = i
                    started_at[id(w)] = time.perf_counter()
                    on_start(i)
            busy = [w for w in self._workers if w.busy is not None]
            if not busy:
                continue
            timeout = None
            if self.client_timeout is not None:
                timeout = max(0.0, min(started_at[id(w)] + self.client_timeout for w in busy) - time.perf_counter())
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=timeout)
            for w in busy:
                i = w.busy
                if w.conn in ready or w.conn.poll():
                    try:
                        data = w.conn.recv_bytes()
                    except (EOFError, OSError):
                        data = None
                    if data is not None:
                        head, tensors = _unpack(data)
                        w.busy = None
                        if head.get("retire"):  # the worker exits after this answer: replace it
                            w.process.join(5)
                            self._replace(w)
                            self.replaced -= 1
                            self.retired += 1
                        yield "answer", i, head, tensors
                        continue
                    w.process.join(5)  # the pipe closed: the worker is gone
                if w.process.sentinel in ready or not w.process.is_alive():
                    w.process.join(1)
                    code = w.process.exitcode
                    why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    self._replace(w)
                    on_lost(i, f"worker process died ({why})", "failed")
                elif self.client_timeout is not None and time.perf_counter() - started_at[id(w)] > self.client_timeout:
                    self._replace(w)
                    on_lost(i, f"no answer within {self.client_timeout:g} s (worker killed)", "timeout")

    # -- evaluation split over the workers
    def evaluate(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float] | None:
        """(accuracy, mean cross-entropy) of the global model with ``params`` on the test set,
        computed by the workers; ``None`` when (x, y) is not the test set the pool was given."""
        if self.eval_model is None or x is not self.test_x or y is not self.test_y or len(x) == 0:
            return None
        n_batches = math.ceil(len(x) / EVAL_BATCH)
        k = min(EVAL_CHUNKS_PER_WORKER * len(self._workers), n_batches)
        bounds = [round(j * n_batches / k) for j in range(k + 1)]
        rows: dict[int, list[list[float]]] = {}
        lost: list[int] = []
        body = _tensor_body(params)  # once: every chunk carries the same parameters
        tasks = deque(
            (j, _pack({"op": "eval", "idx": j, "lo": bounds[j], "hi": bounds[j + 1]}, body=body)) for j in range(k)
        )
        for _, j, head, _t in self._dispatch(tasks, lambda j: None, lambda j, why, status: lost.append(j)):
            rows[j] = head["rows"]
        for j in lost:  # a worker died: this process evaluates its share
            self.eval_model.load_state_dict(params)
            rows[j] = _eval_batches(self.eval_model, x, y, bounds[j], bounds[j + 1])
        correct, loss_sum = 0, 0.0
        for j in range(k):  # batch order: the same float sum as one process
            for loss_b, correct_b in rows[j]:
                loss_sum += loss_b
                correct += int(correct_b)
        return correct / len(x), loss_sum / len(x)

    def call(self, worker: int, name: str, **kwargs: Any) -> Any:
        """Run the registered worker function ``name`` in worker ``worker`` (tests, benchmarks);
        ``None`` if the worker died doing it (it is then replaced)."""
        w = self._workers[worker]
        w.conn.send_bytes(_pack({"op": "exec", "idx": 0, "name": name, "kwargs": kwargs}))
        wait([w.conn, w.process.sentinel])
        try:
            head, _ = _unpack(w.conn.recv_bytes())
        except (EOFError, OSError):
            w.process.join(1)
            self._replace(w)
            return None
        return head["value"]


def _warm_up(trainer: LocalTrainer, federation: list[SimClient], batch: int) -> float:
    """:func:`warm_up` on the largest client's data, before the workers are forked, so that every
    worker inherits what it loaded."""
    client = max(federation, key=lambda c: len(c.x), default=None)
    return warm_up(trainer, client.x, client.y, batch) if client is not None else 0.0


def warm_up(trainer: LocalTrainer, x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> float:
    """One training step of each optimizer on a throw-away trainer (``trainer``'s model builder):
    the first ``fit`` of a process imports ~800 modules lazily (torch's optimizers pull in
    ``torch._dynamo`` and sympy). Done before a cap is set, no import runs under it (an import
    that fails half way leaves a broken module behind). Returns its seconds."""
    t0 = time.perf_counter()
    n = min(len(x), batch)
    if n < 2:
        return 0.0
    try:
        scratch = LocalTrainer(trainer.model_fn, device="cpu")
        model = scratch.model_for(Plan())
        names = [k for k, _ in model.named_parameters()]
        for opt in ("sgd", "adam"):
            ins = Instruction(
                round=0,
                client_id=0,
                params=model.state_dict(),
                trainable=names,
                hparams=HyperParams(batch_size=n, max_steps=1, optimizer=opt),
            )
            scratch.fit(ins, x[:n], y[:n])
    except Exception:  # noqa: BLE001 - a model that cannot train a full plan: the first client warms up
        pass
    return time.perf_counter() - t0


def _os_threads() -> int:
    """OS threads of this process (Python's, an OpenMP pool that already ran, interop threads)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()
