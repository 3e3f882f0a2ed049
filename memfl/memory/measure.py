"""Measure the real peak memory of a few training steps in a fresh subprocess, and (separately)
time training steps the way training runs.

Step timing (:func:`time_steps`) uses *another* fresh process, not the memory child: the memory
child's ``MALLOC_MMAP_THRESHOLD_`` (below) makes every large allocation fault its pages in again,
which slows a step by about a third and allocation-heavy plans (recompute, pack/unpack) most, so
its ``step_seconds`` is no training speed. The timing child inherits the caller's environment
(glibc's default allocator, as the trainer and the worker pool run) and thread count, builds one
model, runs every plan interleaved round-robin (:func:`interleaved_step_times`, the trainer's
step and optimizer) and reports per plan the median CPU (``time.process_time``, the trainer's
clock on CPU) and wall seconds of ``steps`` steps after a warm-up.

What is measured
----------------
``measure(model_fn, input_shape, ...)`` starts a *fresh* Python process (``multiprocessing`` spawn
context) so nothing allocated by the caller (other models, data, caches, allocator fragmentation)
is counted. In the child:

1. ``import torch``; the thread count is set to the parent's ``torch.get_num_threads()`` so both
   sides (and :func:`memfl.memory.estimate.estimate`, which runs in the parent) see the same
   oneDNN/OpenMP behaviour.
2. Runtime warm-up, not counted: a *throw-away* ``model_fn()`` model: a no-grad forward at batch 2
   (imports done lazily by the builder; the number of classes is read from its output) and one
   training step at batch 2 under the same plan and optimizer, so that the library code of every
   op the step uses is paged in (``libtorch_cpu`` alone pages in several MiB of code on first use
   of the quantisation, pooling, attention... kernels: file-backed RSS, not training memory) and
   the runtime's pools exist; then a tiny conv/BN/linear training step (thread pools, oneDNN and
   MKL initialisation, should the model use none). Everything is deleted and ``gc.collect()``-ed.
3. **Baseline** is recorded here, *before* the measured model is built, so the peak includes the
   parameters and buffers (as :class:`~memfl.memory.estimate.MemoryEstimate` does).
4. Build the model, ``engine.prepare(model, plan)``, the optimizer (``make_step_optimizer``: a
   per-parameter step fused into backward when the plan asks for it; lr 0.01,
   ``weight_decay``), a random input batch of ``input_shape`` and random labels, then ``steps``
   iterations of ``opt.zero_grad(set_to_none=True); forward_backward(step, x, y); opt.step()``
   (:func:`memfl.core.engine.forward_backward`: the forward inside ``step.saved_tensors()`` when
   the step has one, the batch split into the plan's micro-batches; as the trainer does). The
   model returned by ``model_fn`` stays referenced during the steps: a client that holds only
   part of a model (a ScaleFL stage) must be built that way by ``model_fn`` (e.g.
   ``memfl.methods.scalefl.stage_client_factory``).
5. ``peak_bytes`` = high-water mark during 4. minus the baseline.

CPU: resident set size. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every
block of 64 KiB or more with its own ``mmap`` and unmaps it on free: RSS then follows the live
tensors instead of the allocator's high-water mark. The peak is exact: the kernel's RSS high-water
mark is reset with ``/proc/self/clear_refs`` (value 5) right at the baseline and read from
``VmHWM`` in ``/proc/self/status`` at the end. Where ``clear_refs`` is not permitted a sampling
thread polls ``VmRSS`` every 0.5 ms instead (may miss very short peaks; ``device`` then reads
``cpu (sampled)``).

Known differences between RSS and live tensor bytes (about 0-4 MiB in all, see
``memfl.memory.estimate.RUNTIME_OVERHEAD_BYTES``): oneDNN JIT-compiles kernels for every new
convolution shape (the target batch) and keeps them in its primitive cache; MKL's GEMM buffer pool
grows for larger matrices; small (< 64 KiB) allocations come from the glibc heap and can stay
resident after being freed; every ``mmap``-ed block is rounded up to 4 KiB, and pages never
touched are not resident; the Python objects of the model and optimizer.

The parent process must be importable by the spawned child: scripts that call :func:`measure`
at import time need the usual ``if __name__ == "__main__":`` guard. (Without it the child, which
imports the script to unpickle ``model_fn``, would call :func:`measure` again; that call is
detected and the parent's :class:`MeasurementError` says so.)

Inputs are standard normal floats by default; integer inputs (token ids) come from ``example``
or from a leading ``nn.Embedding`` (see :mod:`memfl.memory.inputs`).

CUDA (``device="cuda"``): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
at the baseline, minus ``memory_allocated`` at the baseline (the caching allocator's *allocated*
bytes, i.e. live tensors, not the reserved pool; cuDNN/cuBLAS workspaces obtained through the
caching allocator are included).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

from memfl.core.protocol import Plan
from memfl.memory.inputs import InputSpec, input_spec, random_input

MMAP_THRESHOLD = 65536
#: Set in the measuring child's environment: a file where a re-entrant call (an unguarded script
#: re-imported by the spawned child) leaves a note for the parent.
_REENTRY_ENV = "MEMFL_MEASURE_REENTRY_FILE"


@dataclass
class MemoryMeasurement:
    """Result of :func:`measure`.

    peak_bytes:     peak growth over the baseline during model build + the training steps.
    baseline_bytes: RSS (CPU) or allocated bytes (CUDA) at the baseline, after runtime warm-up.
    steps:          training steps run.
    step_seconds:   mean wall time per step after the first (the first step when ``steps == 1``),
                    in the measuring child: with ``MALLOC_MMAP_THRESHOLD_`` set, which slows steps
                    (ResNet-18, batch 64: +37%), allocation-heavy plans most. Not training speed:
                    use :func:`time_steps`.
    device:         where it ran (``cpu``, ``cpu (sampled)`` or ``cuda:N``).
    """

    peak_bytes: int
    baseline_bytes: int
    steps: int
    step_seconds: float
    device: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MeasurementError(RuntimeError):
    """The measuring child process failed (the child's traceback is in the message)."""


# --------------------------------------------------------------------------------------- child


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


class _CpuPeak:
    """RSS high-water mark since :meth:`reset`, exact via clear_refs or sampled as a fallback."""

    def __init__(self) -> None:
        self.exact = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    def reset(self) -> int:
        """Reset the high-water mark; return the current RSS in bytes (the baseline)."""
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        rss = _status_kib("VmRSS") * 1024
        if not self.exact:
            self._max = rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _status_kib("VmRSS") * 1024)
            time.sleep(0.0005)

    def peak(self) -> int:
        if self.exact:
            return _status_kib("VmHWM") * 1024
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._max, _status_kib("VmRSS") * 1024)


def _warm_up_runtime(torch: Any, device: str) -> None:
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(device)
    bn = torch.nn.BatchNorm2d(8).to(device)
    lin = torch.nn.Linear(8, 4).to(device)
    opt = torch.optim.SGD(
        list(conv.parameters()) + list(bn.parameters()) + list(lin.parameters()), lr=0.01, momentum=0.9
    )
    x = torch.randn(4, 3, 8, 8, device=device)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        out = lin(torch.relu(bn(conv(x))).mean((2, 3)))
        target = torch.zeros(4, dtype=torch.long, device=device)
        torch.nn.functional.cross_entropy(out, target).backward()
        opt.step()


def _train_step(step: Any, opt: Any, x: Any, y: Any) -> None:
    """The trainer's step: forward + backward (:func:`memfl.core.engine.forward_backward`: inside
    the step's saved-tensors context, split into the plan's micro-batches), optimizer step."""
    from memfl.core.engine import forward_backward

    opt.zero_grad(set_to_none=True)
    forward_backward(step, x, y)
    opt.step()


def _warm_up_model(
    torch: Any,
    model_fn: Callable[[], Any],
    input_shape: tuple[int, ...],
    optimizer: str,
    plan: Plan | None,
    device: str,
    momentum: float,
    weight_decay: float,
    spec: InputSpec | None = None,
) -> tuple[int, InputSpec]:
    """One throw-away training step of a throw-away model at batch 2; returns num_classes and
    the input spec (``spec``, or the one :func:`~memfl.memory.inputs.input_spec` reads off the
    model)."""
    from memfl.core.engine import prepare
    from memfl.core.optim import make_step_optimizer

    model = model_fn().to(device)
    model.train()
    spec = spec if spec is not None else input_spec(model)
    small = min(2, input_shape[0])
    with torch.no_grad():
        num_classes = int(model(random_input((small, *input_shape[1:]), spec, device=device)).shape[-1])
    step = prepare(model, plan)
    opt = make_step_optimizer(
        step, [p for _, p in step.trainable], optimizer, lr=0.01, momentum=momentum, weight_decay=weight_decay
    )
    x = random_input((small, *input_shape[1:]), spec, device=device)
    y = torch.randint(0, num_classes, (small,), device=device)
    _train_step(step, opt, x, y)
    return num_classes, spec


def _child_measure(
    model_fn: Callable[[], Any],
    input_shape: tuple[int, ...],
    optimizer: str,
    plan: Plan | None,
    steps: int,
    device: str,
    momentum: float,
    weight_decay: float,
    num_threads: int,
    spec: InputSpec | None = None,
) -> dict[str, Any]:
    import gc

    import torch

    from memfl.core.engine import prepare
    from memfl.core.optim import make_step_optimizer

    torch.set_num_threads(num_threads)
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    # Throw-away model first (a failing model_fn fails fast): lazy imports of the builder, the
    # number of classes, and one training step at batch 2 so the code and pools of every op the
    # step uses are paged in / created before the baseline (library state, not training memory).
    num_classes, spec = _warm_up_model(
        torch, model_fn, input_shape, optimizer, plan, device, momentum, weight_decay, spec
    )
    _warm_up_runtime(torch, device)
    gc.collect()

    tracker = _CpuPeak()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = int(torch.cuda.memory_allocated(device))
    else:
        baseline = tracker.reset()

    model = model_fn().to(device)
    model.train()
    step = prepare(model, plan)
    opt = make_step_optimizer(
        step, [p for _, p in step.trainable], optimizer, lr=0.01, momentum=momentum, weight_decay=weight_decay
    )
    x = random_input(tuple(input_shape), spec, device=device)
    y = torch.randint(0, num_classes, (input_shape[0],), device=device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _train_step(step, opt, x, y)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)

    if cuda:
        peak = int(torch.cuda.max_memory_allocated(device)) - baseline
        where = str(torch.device(device)) if ":" in device else f"cuda:{torch.cuda.current_device()}"
    else:
        peak = tracker.peak() - baseline
        where = "cpu" if tracker.exact else "cpu (sampled)"
    later = times[1:] or times
    return {
        "peak_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "steps": steps,
        "step_seconds": float(sum(later) / len(later)),
        "device": where,
    }


def _child_main(conn: Any, target: Callable[..., dict[str, Any]], args: tuple) -> None:
    try:
        result = ("ok", target(*args))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
    try:
        conn.send(result)
    finally:
        conn.close()


# -------------------------------------------------------------------------------------- parent


def measure(
    model_fn: Callable[[], Any],
    input_shape: tuple[int, ...],
    *,
    optimizer: str = "sgd",
    plan: Plan | None = None,
    steps: int = 3,
    device: str = "cpu",
    momentum: float = 0.9,
    timeout: float = 600,
    weight_decay: float = 0.0,
    example: Any = None,
) -> MemoryMeasurement:
    """Peak memory of ``steps`` real training steps of ``model_fn()`` in a fresh subprocess.

    model_fn:    picklable zero-argument callable returning the model (a module-level function or
                 ``functools.partial(memfl.models.build_model, name, ...)``).
    input_shape: input batch shape including the batch, e.g. ``(32, 1, 28, 28)``; labels are random
                 in ``[0, num_classes)`` with ``num_classes`` read from the model's output.
    optimizer:   ``"sgd"`` (with ``momentum``) or ``"adam"``; lr 0.01, ``weight_decay``.
    plan:        the training plan (default full training); the step comes from
                 :func:`memfl.core.engine.prepare`, and its ``saved_tensors`` context (if any) wraps the
                 forward, as in the trainer.
    timeout:     seconds before the child is killed and :class:`TimeoutError` raised.
    example:     what the random input looks like: a tensor (e.g. a few training inputs; integer
                 ones give ids in their value range) or a :class:`~memfl.memory.inputs.InputSpec`;
                 default standard normal, or integer ids when the model starts with an embedding.

    Raises :class:`MeasurementError` with the child's traceback when the child fails.
    See the module docstring for what exactly is counted.
    """
    import torch

    if getattr(mp.current_process(), "_inheriting", False):
        # We are a spawned child still importing the parent's main module: the script called
        # measure() at import time (no ``if __name__ == "__main__":`` guard).
        note = os.environ.get(_REENTRY_ENV)
        if note:
            try:
                with open(note, "w") as fh:
                    fh.write(getattr(sys.modules.get("__mp_main__"), "__file__", None) or "?")
            except OSError:
                pass
        raise RuntimeError(_UNGUARDED_HINT.format(script="the script"))
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    spec = input_spec(None, example) if example is not None else None
    args = (
        model_fn,
        tuple(int(s) for s in input_shape),
        optimizer,
        plan,
        int(steps),
        device,
        float(momentum),
        float(weight_decay),
        int(torch.get_num_threads()),
        spec,
    )
    payload = _spawn(_child_measure, args, timeout=timeout, mmap_threshold=True, what="memory measurement")
    return MemoryMeasurement(**payload)


# ------------------------------------------------------------------------------ step timing


@dataclass
class StepTiming:
    """Result of :func:`time_steps`: per-step times of several plans, timed the way training runs.

    cpu_seconds:  per plan, the median CPU seconds of one step (``time.process_time``: user + system
                  of the process, all threads -- the trainer's clock on CPU).
    wall_seconds: per plan, the median wall seconds of one step (``time.perf_counter``).
    steps:        timed steps per plan (after ``warmup`` untimed ones each).
    threads:      torch threads in the timing process.
    mmap_threshold: ``MALLOC_MMAP_THRESHOLD_`` in the timing process (None: glibc's default, as
                  the trainer and the worker pool run).
    """

    cpu_seconds: dict[str, float]
    wall_seconds: dict[str, float]
    steps: int
    warmup: int
    threads: int
    mmap_threshold: str | None = None

    def ratio(self, name: str, reference: str = "full", clock: str = "cpu") -> float:
        """Step time of ``name`` over that of ``reference`` on ``clock`` (``cpu`` or ``wall``)."""
        t = self.cpu_seconds if clock == "cpu" else self.wall_seconds
        return t[name] / t[reference] if t[reference] else float("nan")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def interleaved_step_times(
    model: Any,
    x: Any,
    y: Any,
    plans: dict[str, Plan],
    *,
    optimizer: str = "sgd",
    lr: float = 0.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    steps: int = 5,
    warmup: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Time training steps of ``model`` under each plan, in this process, interleaved round-robin
    (``warmup`` untimed steps per plan, then ``steps`` rounds of one step per plan) so that the load
    of a shared machine hits every plan alike. A step is the trainer's: ``zero_grad``, the forward
    (inside ``saved_tensors()`` when the step has one), backward, ``opt.step()``; the optimizer is
    :func:`~memfl.core.optim.make_step_optimizer`'s (a fused plan's hooks are attached only while it
    runs). ``lr`` 0 by default: the parameters do not change. Returns per plan ``{"cpu": [...],
    "wall": [...]}`` (seconds per step)."""
    from memfl.core.engine import prepare
    from memfl.core.optim import make_step_optimizer

    model.train()
    prepared = {name: prepare(model, plan) for name, plan in plans.items()}
    opts = {
        name: make_step_optimizer(
            ts, [p for _, p in ts.trainable], optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        for name, ts in prepared.items()
    }
    for opt in opts.values():
        if hasattr(opt, "remove"):
            opt.remove()

    def one(name: str) -> tuple[float, float]:
        ts, opt = prepared[name], opts[name]
        if hasattr(opt, "attach"):
            opt.attach()
        c0, w0 = time.process_time(), time.perf_counter()
        _train_step(ts, opt, x, y)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if hasattr(opt, "remove"):
            opt.remove()
        return cpu, wall

    for _ in range(warmup):
        for name in prepared:
            one(name)
    out: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in plans}
    for _ in range(steps):
        for name in prepared:
            cpu, wall = one(name)
            out[name]["cpu"].append(cpu)
            out[name]["wall"].append(wall)
    return out


def _child_time(
    model_fn: Callable[[], Any],
    input_shape: tuple[int, ...],
    plans: dict[str, Plan],
    optimizer: str,
    steps: int,
    warmup: int,
    momentum: float,
    weight_decay: float,
    num_threads: int,
    spec: InputSpec | None,
) -> dict[str, Any]:
    import statistics

    import torch

    torch.set_num_threads(num_threads)
    torch.manual_seed(0)
    model = model_fn()
    spec = spec if spec is not None else input_spec(model)
    with torch.no_grad():
        model.eval()
        num_classes = int(model(random_input((min(2, input_shape[0]), *input_shape[1:]), spec)).shape[-1])
    x = random_input(tuple(input_shape), spec)
    y = torch.randint(0, num_classes, (input_shape[0],))
    times = interleaved_step_times(
        model,
        x,
        y,
        plans,
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        steps=steps,
        warmup=warmup,
    )
    return {
        "cpu_seconds": {k: float(statistics.median(v["cpu"])) for k, v in times.items()},
        "wall_seconds": {k: float(statistics.median(v["wall"])) for k, v in times.items()},
        "steps": steps,
        "warmup": warmup,
        "threads": int(torch.get_num_threads()),
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def time_steps(
    model_fn: Callable[[], Any],
    input_shape: tuple[int, ...],
    plans: dict[str, Plan],
    *,
    optimizer: str = "sgd",
    steps: int = 5,
    warmup: int = 1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    timeout: float = 1800,
    example: Any = None,
) -> StepTiming:
    """Step times of ``plans`` (e.g. ``{"full": Plan(), "plan": p}``) measured the way training
    runs: a fresh spawned process with the caller's environment (no ``MALLOC_MMAP_THRESHOLD_``
    of its own: glibc's default allocator, as :class:`~memfl.core.trainer.LocalTrainer` and the
    worker pool run) and the caller's torch thread count; one model, the plans interleaved
    round-robin (:func:`interleaved_step_times`), the median of ``steps`` (>= 5 advised) steps per
    plan after ``warmup`` untimed ones; CPU and wall seconds. CPU only."""
    import torch

    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    spec = input_spec(None, example) if example is not None else None
    args = (
        model_fn,
        tuple(int(s) for s in input_shape),
        dict(plans),
        optimizer,
        int(steps),
        int(warmup),
        float(momentum),
        float(weight_decay),
        int(torch.get_num_threads()),
        spec,
    )
    payload = _spawn(_child_time, args, timeout=timeout, mmap_threshold=False, what="step timing")
    return StepTiming(**payload)


def _spawn(
    target: Callable[..., dict[str, Any]], args: tuple, *, timeout: float, mmap_threshold: bool, what: str
) -> dict:
    """Run ``target(*args)`` in a fresh spawned process; return its dict (errors re-raised here)."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child_conn, target, args), daemon=True, name="memfl-measure")
    # glibc reads MALLOC_MMAP_THRESHOLD_ at process start: set it for the child only (the memory
    # measurement); a timing child inherits the caller's environment, as the trainer does.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    fd, note = tempfile.mkstemp(prefix="memfl-measure-", suffix=".txt")
    os.close(fd)
    saved_note = os.environ.get(_REENTRY_ENV)
    os.environ[_REENTRY_ENV] = note
    try:
        proc.start()
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        parent_conn.close()
        child_conn.close()
        raise TypeError(
            f"measure: model_fn and plan must be picklable (a module-level function "
            f"or a functools.partial of one, not a lambda or local function): "
            f"{err}"
        ) from err
    finally:
        for key, value in (("MALLOC_MMAP_THRESHOLD_", saved), (_REENTRY_ENV, saved_note)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    child_conn.close()
    result = None
    try:
        deadline = time.monotonic() + timeout
        while result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what} did not finish within {timeout:g} s (child killed)")
            if parent_conn.poll(min(remaining, 0.2)):
                try:
                    result = parent_conn.recv()
                except EOFError:
                    result = ("died", None)
            elif not proc.is_alive() and not parent_conn.poll(0):
                result = ("died", None)
    finally:
        if proc.is_alive():
            proc.join(timeout=5 if result is not None else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
        reentered = _read_note(note)
    status, payload = result
    if status == "died":
        if reentered:
            raise MeasurementError(
                f"{what} child died without a result: " + _UNGUARDED_HINT.format(script=f"the script {reentered}")
            )
        hint = "killed for memory?" if proc.exitcode in (-9, 137) else "see its traceback above"
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if proc.exitcode == 1 and main_file:
            hint += "; if it mentions the bootstrapping phase, " + _UNGUARDED_HINT.format(
                script=f"the script {main_file}"
            )
        raise MeasurementError(f"{what} child died without a result (exit code {proc.exitcode}; {hint})")
    if status == "error":
        raise MeasurementError(f"{what} child failed:\n{payload}")
    return payload


_UNGUARDED_HINT = (
    "{script} calls memfl measure() (or memfl.plan/measure) at import time. measure() runs the "
    "training in a fresh *spawned* process, which re-imports the main script to unpickle model_fn "
    "and so ran that call again. Fix: put the script's top-level code under "
    '`if __name__ == "__main__":` (define model_fn at module level, call measure inside the guard).'
)


def _read_note(path: str) -> str:
    """The script path a re-entrant child wrote (empty: none); removes the note file."""
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
