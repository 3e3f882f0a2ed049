"""Predict the peak memory of one local training step without running the training.

The memory model (SPEC section 1)
---------------------------------
A training step is ``zero_grad(set_to_none=True); loss = step.loss(x, y); loss.backward();
opt.step()``, repeated. What is alive at each moment of a steady-state step (the optimizer state
exists from the first ``opt.step()`` on, gradients are dropped by ``zero_grad`` before the forward):

======================  =====================================================================
forward / backward      parameters + optimizer state + input batch + *the autograd timeline*:
                        saved activations grow during the forward; during the backward they are
                        freed node by node while parameter gradients, in-flight activation
                        gradients and kernel workspaces (oneDNN scratchpads) appear
optimizer step          parameters + optimizer state + gradients + input batch + the optimizer's
                        per-parameter temporaries (Adam: 2 x the largest parameter; SGD: 1 x with
                        weight decay, 0 without)
======================  =====================================================================

plus a runtime constant (``overhead``). The first step's optimizer step creates the state while the
gradients are alive, which is the same as the steady optimizer phase, so the peak over any number
of steps is ``parameters + optimizer_state + overhead + max(timeline peak, optimizer phase)``.

How each part is obtained
-------------------------
Everything goes through :func:`memfl.core.engine.prepare` on a *deep copy* of the model (the caller's
model, its BN statistics and ``.grad`` are never touched), so any plan kind is understood:

- ``parameters``: bytes of every parameter and buffer of ``TrainStep.module`` (frozen ones too),
  deduplicated by storage; ``gradients``: of ``TrainStep.trainable``; ``optimizer_state``: SGD
  with momentum 1 x trainable, without momentum 0, Adam 2 x trainable + one 4-byte step per tensor.
- ``activations``: exact, from ``torch.autograd.graph.saved_tensors_hooks`` during the forward:
  every tensor autograd saves, deduplicated by untyped storage, skipping storages shared with a
  parameter/buffer or with the input batch and labels (counted in ``transient``). When the
  TrainStep carries a ``saved_tensors`` context (compression, offloading...) the counting hook is
  pushed *inside* it and calls the plan's own pack hook, then counts the tensors found in what that
  hook returns (see :func:`stored_tensors`: tensors, tuples/lists/dicts, objects' attributes, or an
  object's ``memfl_stored_tensors()`` method: the documented protocol for packed objects that hold
  their bytes otherwise). Tensors saved inside a ``torch.utils.checkpoint`` region are stored by
  the checkpoint's own hooks (nothing), so recomputed segments count zero, as they should.
- the *timeline*: the same forward + backward is run under ``torch.profiler`` with
  ``profile_memory=True``, which reports every allocation and free of the CPU allocator in order
  (tensors, autograd buffers, oneDNN scratchpads, the recompute of a checkpointed segment, a
  plan's packed and unpacked buffers ...). This is done at two small batch sizes ``a < b``
  (default 2 and 4); the two event sequences are aligned (``difflib`` on ``op name + sign``) and
  every matched event's size is extrapolated linearly to the requested batch (tensor sizes are
  affine in the batch). Events seen only at one batch size (oneDNN picks a different backward
  algorithm with a different scratchpad at some sizes) are kept with their size at ``b``. The
  running sum of the extrapolated sequence gives the timeline's peak at the requested batch; its
  value at the end of the backward (the gradients, plus anything the step leaves behind) feeds the
  optimizer phase. No optimizer step is run and the copy is discarded.
- a step that fuses the optimizer into backward (``TrainStep.step_in_backward``,
  :class:`memfl.core.optim.StepInBackward`): the profiled backward drops every gradient as soon as it
  is accumulated (a post-accumulate-grad hook), as the real step does after updating the
  parameter, so the timeline holds only the gradients in flight; ``gradients`` is then the
  largest parameter's, and the optimizer's per-parameter temporaries are charged at the
  timeline's peak (the update runs inside the backward).
- a step split into micro-batches (``TrainStep.micro_batches`` = m, from ``Plan.micro_batches``):
  the whole input batch stays in memory while each micro-batch of ``ceil(batch / m)`` samples runs
  forward and backward (:func:`memfl.core.engine.forward_backward`); from the second micro-batch on
  every trainable gradient is alive through its forward and backward, and autograd adds each new
  gradient into it in place (the new one is a transient). So the timeline is profiled (and
  extrapolated) at the micro-batch size with every gradient already allocated (``p.grad`` zeros
  before the pass: the accumulation's allocations and frees are in the timeline) on top of the
  gradients' bytes; ``activations`` are one micro-batch's; the input batch is the whole one; and
  ``overhead`` gains :data:`MICRO_BATCH_OVERHEAD_BYTES` (heap the repeated micro-batches keep).
- ``transient`` is what the winning phase holds beyond ``max(activations, gradients)``: input
  batch, logits and loss buffers, the gradients already produced while activations are still
  alive, in-flight activation gradients, workspaces, optimizer temporaries. The parts overlap in
  time, so ``peak_bytes = parameters + optimizer_state + max(activations, gradients) + transient +
  overhead`` (not the plain sum of all parts).
- ``overhead`` = :data:`RUNTIME_OVERHEAD_BYTES` (1 MiB), a constant calibrated once against
  :func:`memfl.memory.measure.measure` (CPU, glibc with ``MALLOC_MMAP_THRESHOLD_=65536``, whose
  child pages in the libraries with a throw-away batch-2 step before its baseline). It stands for
  runtime state the measured steps create that is no tensor and invisible to the profiler:
  oneDNN primitives JIT-compiled for the new (target-batch) shapes, which stay in oneDNN's
  primitive cache (~0.1-0.2 MiB per distinct convolution configuration, so ResNet-18 and ResNet-34
  cost the same), MKL's GEMM buffer pool growing for larger matrices (transformers), glibc heap
  kept by small allocations and the 4 KiB rounding of ``mmap``-ed blocks. Measured minus
  estimated-without-overhead, 2 threads, torch 2.13: batch 32 / 128: cnn 0.4 / 0.6 MiB, VGG-11
  1.0 / 1.2, VGG-16 1.6 / 1.8, ResNet-18 2.4 / 2.4, ResNet-34 2.4 / 2.7, ViT-tiny 3.5 / 3.8;
  ResNet-18 ScaleFL stages and hybrid recompute/compress plans at batch 32: 1.3-3.4; a two-conv
  test model ~0. The constant sits at the small end on purpose: the overhead only matters,
  relatively, for small models (cnn at batch 32 peaks at ~21 MiB), and for the large ones the
  remaining +-3 MiB is < 1%. It means nothing on CUDA, where the measurement counts allocator
  bytes only (set it to 0 there if it matters).

Remaining error sources (all small against the 10% goal on the shipped models): the overhead
constant (-1 to +3 MiB, see above; relatively largest for small models); allocations made on
OpenMP worker threads (not seen by the profiler); oneDNN choosing a different algorithm or
scratchpad at the requested batch than at the profiled ones (bounded by one scratchpad, a few
hundred KiB here); a single-threaded run with 1x1 convolutions below batch 16 uses PyTorch's
native convolution instead of oneDNN; RSS counts untouched pages of a fresh ``mmap`` as zero and
rounds every block up to 4 KiB. If the memory profiler cannot run (another profiler is active)
the timeline is replaced by the conservative ``activations + gradients``.
"""

from __future__ import annotations

import bisect
import copy
import difflib
import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from memfl.core.engine import TrainStep, prepare
from memfl.core.protocol import Plan
from memfl.memory.inputs import InputSpec, input_spec, random_input

MiB = 2**20
#: Runtime state the training steps create that is not a tensor (see the module docstring).
RUNTIME_OVERHEAD_BYTES = 1 * MiB
#: Added to ``overhead`` for a step split into micro-batches: the measured peak (RSS) of such a step
#: sits above its live tensors (which the estimator gets right: a profiled real micro-batched step
#: of a 2.5 MB MLP peaked within 0.03 MB of the estimate) by 1.1-1.6 MiB on small models (cnn at
#: batch 32 / 4 micro-batches: +1.6; an MLP at batch 256 / 4: +1.1), the glibc heap kept by the
#: small allocations each micro-batch repeats. Calibrated like RUNTIME_OVERHEAD_BYTES.
MICRO_BATCH_OVERHEAD_BYTES = 1 * MiB
#: Default small batch sizes profiled and extrapolated from.
PROFILE_BATCHES = (2, 4)

_FORWARD_MARK = "memfl::forward"
_BACKWARD_MARK = "memfl::backward"


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one training step and its parts (bytes).

    peak_bytes:      the predicted peak (== ``parameters + optimizer_state + max(activations,
                     gradients) + transient + overhead``; the parts overlap in time).
    parameters:      all parameters + buffers held in memory (frozen ones too).
    gradients:       gradients of the trainable parameters.
    optimizer_state: SGD with momentum 1 x trainable; Adam 2 x trainable (+ step); SGD without
                     momentum 0.
    activations:     bytes autograd saves for backward in one forward pass (of one micro-batch
                     when the plan splits the batch; deduplicated by
                     storage, parameters and the input batch excluded; what the plan's hooks store).
    transient:       what coexists with the larger of activations/gradients at the peak: input
                     batch, logits/loss buffers, gradients produced so far, in-flight gradients,
                     workspaces, optimizer temporaries.
    overhead:        runtime constant (:data:`RUNTIME_OVERHEAD_BYTES`).
    peak_phase:      where the peak happens: ``forward``, ``backward`` or ``optimizer``.
    batch_size:      the batch size estimated for.
    """

    peak_bytes: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int
    overhead: int
    peak_phase: str = "backward"
    batch_size: int = 0

    def breakdown(self) -> dict[str, int]:
        """The parts, in bytes (they overlap in time: see ``peak_bytes`` for how they combine)."""
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer_state": self.optimizer_state,
            "activations": self.activations,
            "transient": self.transient,
            "overhead": self.overhead,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ byte counting


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta / sparse / exotic subclasses
        return None
    if ptr == 0:
        return None
    return (str(t.device), ptr)


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return int(t.numel() * t.element_size())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[Any, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is None:
            key = ("id", id(t))
        seen[key] = max(seen.get(key, 0), _storage_bytes(t))
    return sum(seen.values())


def stored_tensors(obj: Any, depth: int = 4) -> Iterator[torch.Tensor]:
    """Tensors held by ``obj``, the value a saved-tensors pack hook returned.

    Understands tensors, tuples/lists/sets, dict values, and objects' ``__dict__`` / ``__slots__``
    (to ``depth`` levels). A packed object may instead define ``memfl_stored_tensors()`` returning
    the tensors it keeps (the protocol for plans whose packed form is not found this way).
    """
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth <= 0 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    method = getattr(obj, "memfl_stored_tensors", None)
    if callable(method):
        yield from method()
        return
    if isinstance(obj, (tuple, list, set, frozenset)):
        for item in obj:
            yield from stored_tensors(item, depth - 1)
        return
    if isinstance(obj, dict):
        for item in obj.values():
            yield from stored_tensors(item, depth - 1)
        return
    if isinstance(obj, nn.Module) or callable(obj):
        return
    attrs = getattr(obj, "__dict__", None)
    if attrs:
        for item in attrs.values():
            yield from stored_tensors(item, depth - 1)
    for slot in getattr(type(obj), "__slots__", ()) or ():
        if isinstance(slot, str) and hasattr(obj, slot):
            yield from stored_tensors(getattr(obj, slot), depth - 1)


class _SavedCounter:
    """Counts the distinct storages autograd saves (or the plan's pack hook returns)."""

    def __init__(self, exclude: set[Any]) -> None:
        self.exclude = exclude
        self.seen: dict[Any, int] = {}
        self.opaque = False  # a plan's hooks could not be wrapped: count unknown

    def record(self, packed: Any) -> Any:
        for t in stored_tensors(packed):
            key = _storage_key(t)
            if key is None or key in self.exclude:
                continue
            self.seen[key] = max(self.seen.get(key, 0), _storage_bytes(t))
        return packed  # keep no reference: the graph owns it

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _top_saved_tensors_hooks(cm: Any) -> tuple[bool, tuple[Any, Any] | None]:
    """(known, (pack, unpack) or None) of the saved-tensors hooks active inside ``cm``."""
    if isinstance(cm, torch.autograd.graph.saved_tensors_hooks):
        return True, (cm.pack_hook, cm.unpack_hook)
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False, None
    try:
        return True, top(False)
    except TypeError:
        return True, top()


@contextmanager
def counting_saved_tensors(step: TrainStep, counter: _SavedCounter) -> Iterator[None]:
    """Run the step's ``saved_tensors`` context (if any) with a counting hook pushed inside it.

    Without a plan context the counting hook is a pass-through. With one, the plan's pack hook is
    called by the counting hook and what it returns is counted (:func:`stored_tensors`); the
    plan's unpack hook is used unchanged. (If the hooks a plan's context installs cannot be found,
    ``counter.opaque`` is set and nothing is counted; the estimate then falls back to what the
    forward leaves allocated.)
    """
    with ExitStack() as stack:
        pack = unpack = None
        if step.saved_tensors is not None:
            cm = step.saved_tensors()
            stack.enter_context(cm)
            known, top = _top_saved_tensors_hooks(cm)
            if not known:
                counter.opaque = True
                yield
                return
            if top is not None:
                pack, unpack = top

        if pack is None:

            def hook_pack(t: torch.Tensor) -> Any:
                return counter.record(t)

            def hook_unpack(p: Any) -> torch.Tensor:
                return p
        else:

            def hook_pack(t: torch.Tensor) -> Any:
                return counter.record(pack(t))

            hook_unpack = unpack
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(hook_pack, hook_unpack))
        yield


def _optimizer_state_bytes(trainable: list[nn.Parameter], optimizer: str, momentum: float) -> int:
    size = tensor_bytes(trainable)
    if optimizer == "sgd":
        return size if momentum != 0 else 0
    if optimizer == "adam":
        return 2 * size + 4 * len(trainable)  # exp_avg, exp_avg_sq, a float32 ``step`` each
    raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")


def _optimizer_temp_bytes(trainable: list[nn.Parameter], optimizer: str, weight_decay: float) -> int:
    """Largest temporary of PyTorch's per-parameter (CPU, non-foreach) update loops."""
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    if optimizer == "adam":  # denom = (exp_avg_sq.sqrt() / bc2).add_(eps): two temporaries
        return 2 * largest + (largest if weight_decay else 0)
    return largest if weight_decay else 0  # SGD: grad.add(param, alpha=wd)


# ----------------------------------------------------------------------------- the timeline


@dataclass
class _Pass:
    batch: int
    events: list[tuple[str, int]]  # (op name + sign, bytes) in allocation order
    forward_end: int  # index of the first event after the forward
    backward_end: int  # index of the first event after the backward
    activations: int
    opaque: bool
    profiled: bool = True


def _memory_events(prof: Any) -> tuple[list[tuple[str, int]], int, int]:
    """(key, nbytes) of the CPU allocator events in order, and the forward/backward boundaries."""
    events = list(prof.kineto_results.events())
    items = []
    for e in events:
        is_mem = e.name() == "[memory]"
        if is_mem and e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        items.append((e.start_ns(), 1 if is_mem else 0, -e.duration_ns(), e))
    items.sort(key=lambda it: it[:3])
    stacks: dict[int, list[Any]] = {}  # open ops per thread: a memory event belongs to the top
    out: list[tuple[str, int]] = []
    mark_end: dict[str, int] = {}
    mem_starts: list[int] = []
    for start, is_mem, _, e in items:
        stack = stacks.setdefault(e.start_thread_id(), [])
        while stack and stack[-1].end_ns() < start:
            stack.pop()
        if is_mem:
            op = stack[-1].name() if stack else "-"
            nbytes = int(e.nbytes())
            out.append((f"{op}{'+' if nbytes > 0 else '-'}", nbytes))
            mem_starts.append(start)
        else:
            if e.name() in (_FORWARD_MARK, _BACKWARD_MARK):
                mark_end[e.name()] = e.end_ns()
            stack.append(e)
    # boundaries: the number of memory events before each marked range ends
    fwd_end = bisect.bisect_right(mem_starts, mark_end.get(_FORWARD_MARK, -1))
    bwd_end = bisect.bisect_right(mem_starts, mark_end.get(_BACKWARD_MARK, -1))
    return out, fwd_end, bwd_end


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: kineto prints ``USDT: ... profiler_start`` /
    ``profiler_stop`` lines from C++ on every profiler start and stop, whatever its log level.
    Only the profiler's enter/exit run inside this (nothing of the model)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profile_pass(
    step: TrainStep,
    exclude: set[Any],
    input_shape: tuple[int, ...],
    batch: int,
    num_classes: int,
    dtype: torch.dtype,
    use_profiler: bool = True,
    spec: InputSpec | None = None,
    grads_alive: bool = False,
) -> _Pass:
    """One forward (counting saved tensors) + backward at ``batch``, under the memory profiler.

    grads_alive: every trainable parameter already holds a (zero) gradient, allocated before the
    profiler starts, so the backward accumulates into it (a later micro-batch of a step)."""
    spec = spec if spec is not None else InputSpec()
    from torch.autograd.profiler import profile, record_function

    x = random_input((batch, *input_shape[1:]), spec, dtype)
    y = torch.randint(0, num_classes, (batch,))
    counter = _SavedCounter(exclude | {_storage_key(x), _storage_key(y)})
    for _, p in step.trainable:
        p.grad = torch.zeros_like(p) if grads_alive else None

    def run() -> None:
        with record_function(_FORWARD_MARK):
            with counting_saved_tensors(step, counter):
                loss, per_sample = step.loss(x, y)
        with record_function(_BACKWARD_MARK):
            loss.backward()

    events: list[tuple[str, int]] | None = None
    fwd_end = bwd_end = 0
    if use_profiler:
        try:
            prof = profile(profile_memory=True, use_kineto=True)
            with _quiet_stderr():
                prof.__enter__()
        except (RuntimeError, AssertionError):  # e.g. another profiler is already running
            prof = None
        if prof is not None:
            try:
                run()
            finally:
                with _quiet_stderr():
                    prof.__exit__(None, None, None)
            events, fwd_end, bwd_end = _memory_events(prof)
    if events is None:
        run()
    for _, p in step.trainable:
        p.grad = None
    return _Pass(
        batch,
        events if events is not None else [],
        fwd_end,
        bwd_end,
        counter.total,
        counter.opaque,
        profiled=events is not None,
    )


def _extrapolate(pa: _Pass, pb: _Pass, batch: int) -> tuple[list[int], int, int]:
    """Event sizes at ``batch`` and the forward/backward boundaries in the returned list."""
    if pa.batch == pb.batch:
        return [n for _, n in pb.events], pb.forward_end, pb.backward_end
    ka = [k for k, _ in pa.events]
    kb = [k for k, _ in pb.events]
    scale = (batch - pb.batch) / (pb.batch - pa.batch)
    sizes: list[int] = []
    fwd_end = bwd_end = None
    matcher = difflib.SequenceMatcher(None, ka, kb, autojunk=False)
    for tag, i1, _i2, j1, j2 in matcher.get_opcodes():
        for j in range(j1, j2):
            if j == pb.forward_end and fwd_end is None:
                fwd_end = len(sizes)
            if j == pb.backward_end and bwd_end is None:
                bwd_end = len(sizes)
            nb = pb.events[j][1]
            if tag == "equal":
                na = pa.events[i1 + (j - j1)][1]
                value = nb + (nb - na) * scale
                # never flip an event's sign (a shrinking buffer cannot go below zero)
                value = max(value, 0.0) if nb > 0 else min(value, 0.0)
                sizes.append(int(round(value)))
            else:
                sizes.append(nb)
    n = len(sizes)
    return sizes, (fwd_end if fwd_end is not None else n), (bwd_end if bwd_end is not None else n)


def _running_peak(sizes: list[int]) -> tuple[int, int, int]:
    """(peak of the running sum (>= 0), index where it is reached, final value)."""
    live = peak = 0
    where = 0
    for i, n in enumerate(sizes):
        live += n
        if live > peak:
            peak, where = live, i
    return peak, where, live


# ----------------------------------------------------------------------------------- estimate


def estimate(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    optimizer: str = "sgd",
    plan: Plan | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    profile_batches: tuple[int, int] = PROFILE_BATCHES,
    example: torch.Tensor | InputSpec | None = None,
) -> MemoryEstimate:
    """Predict the peak memory of training ``model`` under ``plan`` at ``input_shape``.

    input_shape:     the input batch shape including the batch, e.g. ``(32, 1, 28, 28)``.
    optimizer:       ``"sgd"`` (with ``momentum``; 0 means plain SGD) or ``"adam"``.
    plan:            the training plan (default full training), via :func:`memfl.core.engine.prepare`.
    weight_decay:    adds the optimizer's weight-decay temporary (one parameter's size).
    profile_batches: the two small batch sizes profiled (requests at or below the larger one are
                     profiled directly at the requested size).
    example:         what the random input batches look like (:mod:`memfl.memory.inputs`): a tensor
                     (e.g. a few training inputs; integer ones give ids in their value range) or an
                     :class:`~memfl.memory.inputs.InputSpec`. Default: standard normal in the
                     model's dtype, or integer ids when the model starts with an ``nn.Embedding``.

    Runs, on a deep copy of the model on the CPU, one no-grad probe forward and a profiled forward
    + backward at each of the two small batch sizes (no optimizer step). See the module docstring
    for the model and its error sources.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    input_shape = tuple(int(s) for s in input_shape)
    batch = input_shape[0]
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")

    work = copy.deepcopy(model).cpu()
    work.train()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        step = prepare(work, plan)
        held = list(step.module.parameters()) + list(step.module.buffers())
        exclude = {k for k in (_storage_key(t) for t in held) if k is not None}
        trainable = [p for _, p in step.trainable]
        param = next((t for t in held if t.is_floating_point()), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        spec = input_spec(work, example)

        with torch.no_grad():
            probe = work(random_input((2 if batch > 1 else 1, *input_shape[1:]), spec, dtype))
        num_classes = int(probe.shape[-1])
        del probe

        a, b = sorted(int(s) for s in profile_batches)
        if not 1 <= a < b:
            raise ValueError(f"profile_batches must be two distinct sizes >= 1, got {profile_batches}")
        # a step split into micro-batches: the timeline of one (the largest) micro-batch, with the
        # gradients of the earlier ones alive (see the module docstring)
        micro = max(1, min(int(step.micro_batches), batch))
        run_batch = -(-batch // micro)
        sizes = [run_batch] if run_batch <= b else [a, b]
        fused = bool(step.step_in_backward)
        handles = []
        if fused:  # the step runs in backward and drops each gradient once it is accumulated

            def drop_grad(p: torch.Tensor) -> None:
                p.grad = None

            handles = [p.register_post_accumulate_grad_hook(drop_grad) for p in trainable]
        try:
            passes = [
                _profile_pass(step, exclude, input_shape, s, num_classes, dtype, spec=spec, grads_alive=micro > 1)
                for s in sizes
            ]
        finally:
            for h in handles:
                h.remove()
    parameters = tensor_bytes(held)
    # a fused step holds one parameter's gradient at a time (the rest is in the timeline)
    gradients = max((tensor_bytes([p]) for p in trainable), default=0) if fused else tensor_bytes(trainable)
    optimizer_state = _optimizer_state_bytes(trainable, optimizer, momentum)
    optimizer_temp = _optimizer_temp_bytes(trainable, optimizer, weight_decay)
    del work, step, held, trainable

    pa, pb = passes[0], passes[-1]
    profiled = pa.profiled and pb.profiled
    events, fwd_end, bwd_end = _extrapolate(pa, pb, run_batch) if profiled else ([], 0, 0)
    timeline_peak, peak_at, _ = _running_peak(events)
    after_backward = sum(events[:bwd_end])  # gradients + whatever the step leaves alive
    if micro > 1:  # the accumulated gradients were allocated before the profiled micro-batch
        timeline_peak += gradients
        after_backward += gradients

    if pa.opaque and profiled:  # the plan's hooks could not be wrapped: what the forward keeps
        act_a, act_b = (sum(n for _, n in p.events[: p.forward_end]) for p in (pa, pb))
    else:
        act_a, act_b = pa.activations, pb.activations
    if pa.batch == pb.batch:
        activations = act_b
    else:
        activations = round(act_b + (act_b - act_a) * (run_batch - pb.batch) / (pb.batch - pa.batch))
    activations = max(int(activations), 0)

    x_dtype = spec.dtype or dtype
    x_bytes = batch * _numel(input_shape[1:]) * torch.empty((), dtype=x_dtype).element_size()
    input_bytes = x_bytes + batch * 8  # int64 labels
    if not profiled:  # no allocator timeline: assume all activations and gradients coexist
        timeline_peak, peak_at, fwd_end = activations + gradients, 1, 0
        after_backward = gradients
    step_phase = input_bytes + timeline_peak
    opt_phase = input_bytes + max(after_backward, 0) + optimizer_temp
    if fused:  # the per-parameter temporaries appear inside the backward (charged at its peak)
        step_phase += optimizer_temp
    if step_phase >= opt_phase:
        phase = "forward" if peak_at < fwd_end else "backward"
        varying = step_phase
    else:
        phase, varying = "optimizer", opt_phase
    overhead = RUNTIME_OVERHEAD_BYTES + (MICRO_BATCH_OVERHEAD_BYTES if micro > 1 else 0)
    # ``varying`` >= max(activations, gradients) by construction (the forward's end holds every
    # saved activation, the optimizer phase every gradient); the max only guards rounding.
    base = max(activations, gradients)
    transient = max(varying - base, 0)
    return MemoryEstimate(
        peak_bytes=int(parameters + optimizer_state + base + transient + overhead),
        parameters=int(parameters),
        gradients=int(gradients),
        optimizer_state=int(optimizer_state),
        activations=activations,
        transient=int(transient),
        overhead=int(overhead),
        peak_phase=phase,
        batch_size=batch,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
