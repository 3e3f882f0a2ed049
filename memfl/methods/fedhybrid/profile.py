"""Profile a model's training graph per segment: what autograd saves, and how long things take.

Segments
--------
A *segment* is one sequential unit of :func:`memfl.models.units` (the ResNet stem and each residual
unit; each CNN/VGG conv-BN-ReLU layer and pool; the ViT patch embedding and each transformer
layer), or for a model that is not a BlockModel one of its ordered top-level children
(:func:`segments_of`: an MLP's layers, an embedding model's embedding / pooling / linear modules, a
small CNN's layers; :class:`PartitionError` when its forward is not its children in order). The head (pooling +
classifier + loss) is a pseudo-segment that always keeps its tensors.
Segments are what a hybrid plan decides about: keep, recompute or compress at b bits.

What is recorded
----------------
One real training forward at the real batch size runs with a recording
``saved_tensors_hooks`` context around each segment. Every distinct tensor autograd saves becomes
a :class:`SavedTensor` with its bytes, shape, how it would be compressed
(:func:`memfl.methods.fedhybrid.compress.compress_kind`: quantised, narrowed to int16, or not at all), whether
it is a ReLU output, the segments that save it (*savers*, in forward order) and the segments whose
*input* it is (a recomputed segment keeps its input alive). Parameters, buffers and the input batch
are not activations: they are counted in the fixed part. A tensor saved twice (a ReLU output the
next conv saves again) is one record; two views of one storage count the storage once at full
precision.

Times (this machine's CPU seconds -- ``time.process_time``, immune to waiting for a shared CPU --
divided by a device's ``speed`` by the planner):

- ``fwd_seconds`` per segment: a forward with grad enabled (what a recompute costs), the median of
  a few runs;
- compression: every compressible tensor is packed and unpacked at 8, 4 and 2 bits, a line
  ``seconds = a + b * numel`` is fitted per bit-width (robust to the noise of one timing), and a
  segment's cost at b bits is the sum of that line over the tensors it packs first;
- ``step_seconds``: one full training step (forward, backward, optimizer), the reference that
  step-time ratios are relative to.

:func:`plan_memory` turns a profile and a per-segment plan into the predicted peak with a breakdown;
the planner (:mod:`memfl.methods.fedhybrid.planner`) optimises exactly the same model.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from memfl.memory.inputs import input_spec, random_input
from memfl.methods.fedhybrid.compress import compress_kind, narrow_int, packed_nbytes, parse_mode, quantize, relu_output
from memfl.models import units as model_units

#: bit-widths whose pack/unpack cost is profiled (others interpolate linearly in bits)
PROFILED_BITS = (8, 4, 2)

#: transient bytes, as multiples of the segment's largest activation, while a segment in a mode
#: runs its backward (gradient buffers; for compression also the decompressed copy and codes) --
#: set against memfl.memory.estimate on ResNet-18 (the planner verifies every plan with it
#: anyway); a recomputed segment adds its recomputed activations on top (counted exactly).
TRANSIENT_FACTOR = {"keep": 2.0, "recompute": 2.0, "q": 4.0}
#: runtime bytes not in any tensor count (oneDNN primitive cache, Python objects, allocator slack):
#: the memory estimator's constant, so that the planner's model and the estimator that verifies
#: its plans count the same fixed part (the estimator's own under-count against a measured peak is
#: covered by the planner's margin and slack, memfl.methods.fedhybrid.planner.ESTIMATOR_SLACK_BYTES)
from memfl.memory.estimate import RUNTIME_OVERHEAD_BYTES  # noqa: E402


@dataclass
class SavedTensor:
    """One distinct activation autograd saves for backward."""

    nbytes: int
    shape: tuple[int, ...]
    kind: str | None  # compression: "float" (quantised), "int" (narrowed to int16), None
    relu: bool = False  # a ReLU output: compressed with a 1-bit sign mask
    savers: list[int] = field(default_factory=list)
    inputs_of: list[int] = field(default_factory=list)

    def involved(self) -> list[int]:
        return sorted(set(self.savers) | set(self.inputs_of))


@dataclass
class SegmentProfile:
    """One segment: name, forward time, compression cost per bit-width, largest activation."""

    name: str
    fwd_seconds: float = 0.0
    pack_seconds: dict[str, float] = field(default_factory=dict)  # "q8" -> seconds
    largest_bytes: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    param_bytes: int = 0  # trainable parameters (their gradients appear during its backward)
    #: the largest trainable-parameter bytes of one module of the segment (with the optimizer step
    #: fused into backward, the gradients alive at once are those of the op whose backward just ran)
    max_module_param_bytes: int = 0


@dataclass
class ModelProfile:
    """Everything the planner and the estimator need about (model, input shape, optimizer)."""

    input_shape: tuple[int, ...]
    optimizer: str
    momentum: float
    segments: list[SegmentProfile]
    tensors: list[SavedTensor]
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    buffer_bytes: int
    input_bytes: int
    step_seconds: float = 0.0
    pack_fit: dict[str, tuple[float, float]] = field(default_factory=dict)
    timed: bool = False
    head_max_module_param_bytes: int = 0  # as SegmentProfile.max_module_param_bytes, for the head
    #: seconds a step fused into backward adds: one optimizer call per parameter instead of one
    #: for all (Python and dispatch overhead; measured with the timings)
    fused_seconds: float = 0.0
    #: how the isolated timings were calibrated against whole training steps (:func:`calibrate`):
    #: ``{"recompute": k, "q8": k, "q4": k, "q2": k, ...}`` (None: not calibrated). A class-level
    #: default, so profiles pickled before the field existed read None.
    calibration: dict[str, Any] | None = None

    @property
    def head(self) -> int:
        """Index of the head pseudo-segment (always kept)."""
        return len(self.segments)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def fixed_bytes(self) -> int:
        """Parameters, optimizer state, buffers, the batch and the runtime overhead (gradients
        come and go: :meth:`grads_alive`)."""
        return self.param_bytes + self.optimizer_bytes + self.buffer_bytes + self.input_bytes + RUNTIME_OVERHEAD_BYTES

    def grads_alive(self, index: int, fused: bool = False) -> int:
        """Gradient bytes alive while segment ``index`` runs its backward (``head``: the head's):
        those of the segments after it, the head's, and its own. With the optimizer step fused
        into backward (``fused``) each gradient is freed once its parameter is updated: only the
        gradients of one module (the op whose backward just produced them) are alive."""
        if fused:
            if index >= len(self.segments):
                return self.head_max_module_param_bytes
            return self.segments[index].max_module_param_bytes
        body = sum(s.param_bytes for s in self.segments[index:])
        return body + max(0, self.grad_bytes - sum(s.param_bytes for s in self.segments))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelProfile":
        data = dict(data)
        data["segments"] = [SegmentProfile(**s) for s in data["segments"]]
        data["tensors"] = [SavedTensor(**{**t, "shape": tuple(t["shape"])}) for t in data["tensors"]]
        data["input_shape"] = tuple(data["input_shape"])
        data["pack_fit"] = {k: tuple(v) for k, v in data.get("pack_fit", {}).items()}
        return cls(**data)

    # -- costs of one segment in one mode -------------------------------------------------------
    def added_seconds(self, index: int, mode: str, speed: float = 1.0) -> float:
        """Seconds ``mode`` adds to one training step for segment ``index`` on a device of ``speed``."""
        kind, bits = parse_mode(mode)
        seg = self.segments[index]
        if kind == "keep":
            return 0.0
        if kind == "recompute":
            return seg.fwd_seconds / speed
        return self._pack_seconds(index, bits) / speed

    def _pack_seconds(self, index: int, bits: float) -> float:
        key = f"q{bits:g}"
        seg = self.segments[index]
        if key in seg.pack_seconds:
            return seg.pack_seconds[key]
        # interpolate linearly in bits between profiled widths
        have = sorted((float(k[1:]), v) for k, v in seg.pack_seconds.items())
        if not have:
            return 0.0
        lo = max((h for h in have if h[0] <= bits), default=have[0])
        hi = min((h for h in have if h[0] >= bits), default=have[-1])
        if hi[0] == lo[0]:
            return lo[1]
        w = (bits - lo[0]) / (hi[0] - lo[0])
        return lo[1] + w * (hi[1] - lo[1])


class PartitionError(ValueError):
    """The model cannot be cut into planning segments (the message says why). FedHybrid's own
    class: the methods do not import each other (ScaleFL has one of the same name)."""


def _is_block_model(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "head") and isinstance(model.blocks, nn.ModuleList)


def segments_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's planning segments, in forward order.

    - a memfl BlockModel: :func:`memfl.models.units` (its head is handled separately);
    - an ``nn.Sequential``: its children;
    - any other ``nn.Module`` (a user's model): its top-level children in registration order, all
      of them segments (no separate head). Its forward must be exactly those children in order:
      :func:`check_segments` (run by :func:`profile_model` and on a hybrid step's first forward)
      raises :class:`PartitionError` when it is not (e.g. ``self.fc(self.emb(x).mean(1))``: the
      pooling is not a child); wrap such code in modules, or in an ``nn.Sequential``.

    Raises :class:`PartitionError` for a model without children."""
    if _is_block_model(model) or (hasattr(model, "blocks") and hasattr(model, "head")):
        return model_units(model)
    segs = list(model.named_children())
    if not segs:
        raise PartitionError(
            f"cannot cut {type(model).__name__} into segments: it has no child modules "
            "(give a memfl BlockModel, an nn.Sequential or a module whose forward runs "
            "its children in order)"
        )
    return segs


def _head_forward(model: nn.Module):
    if hasattr(model, "blocks") and hasattr(model, "head"):
        return model.head
    return None


def example_batch(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """A random batch of ``input_shape`` (with the batch dim), drawn as the memory estimator draws
    its input (:func:`memfl.memory.inputs.input_spec`: token ids in range for a model whose first
    layer is an ``nn.Embedding`` or that carries a ``memfl_input_spec``; else ``torch.randn``)."""
    return random_input(tuple(input_shape), input_spec(model), device=device)


@torch.no_grad()
def check_segments(model: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Raise :class:`PartitionError` unless running :func:`segments_of` in order (then the head)
    on ``x`` reproduces ``model(x)`` (eval mode, restored after). BlockModels and ``nn.Sequential``
    are so by construction and are not run."""
    if _is_block_model(model) or isinstance(model, nn.Sequential):
        return
    segs, head = segments_of(model), _head_forward(model)
    was = model.training
    model.eval()
    try:
        ref = model(x)
        h = x
        for _, mod in segs:
            h = mod(h)
        out = head(h) if head is not None else h
    except Exception as err:  # noqa: BLE001
        raise PartitionError(
            f"running the children of {type(model).__name__} in order fails "
            f"({type(err).__name__}: {err}); its forward must be its children in order"
        ) from None
    finally:
        model.train(was)
    if out.shape != ref.shape or not torch.allclose(out, ref, atol=atol, rtol=1e-4):
        raise PartitionError(
            f"{type(model).__name__}'s forward is not its children "
            f"({', '.join(n for n, _ in segs)}) in order; write the steps between them as "
            "modules (or use an nn.Sequential) to plan it segment by segment"
        )


def _optimizer_bytes(param_bytes: int, optimizer: str, momentum: float) -> int:
    if optimizer == "adam":
        return 2 * param_bytes
    if optimizer == "sgd":
        return param_bytes if momentum > 0 else 0
    raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")


def _max_module_param_bytes(module: nn.Module) -> int:
    """The largest trainable-parameter bytes held directly by one module of ``module``."""
    return max(
        (
            sum(p.numel() * p.element_size() for p in m.parameters(recurse=False) if p.requires_grad)
            for m in module.modules()
        ),
        default=0,
    )


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def _clock() -> float:
    """CPU seconds of this process (all its threads, user + system): on a machine shared with
    other jobs the wall clock measures the queue for the CPU as much as the work (the same
    ResNet-18 step took 3.6-8.1 s wall, 2.4-2.6 s CPU, on the loaded 2-core reference machine)."""
    return time.process_time()


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = _clock()
        fn()
        times.append(_clock() - t0)
    return statistics.median(times)


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` with a, b >= 0 (falls back to a proportional fit)."""
    n = len(xs)
    if n == 0:
        return (0.0, 0.0)
    if n == 1 or max(xs) == min(xs):
        return (0.0, sum(ys) / max(sum(xs), 1e-12))
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    if a < 0 or b < 0:
        return (0.0, sum(x * y for x, y in zip(xs, ys)) / max(sum(x * x for x in xs), 1e-12))
    return (a, b)


def profile_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    timing: bool = True,
    reps: int = 3,
    num_classes: int | None = None,
    calibrate_steps: int = 3,
) -> ModelProfile:
    """Profile ``model`` (left untouched: a copy is profiled) at ``input_shape`` (with the batch).

    timing: also measure forward, compression and full-step times (a few seconds for ResNet-18 at
            batch 64 on 2 cores); False gives the memory structure only (what the estimator needs).
    calibrate_steps: with ``timing``, :func:`calibrate` the isolated timings against this many
            whole training steps per calibration plan (0: no calibration; ResNet-18 at batch 64,
            one thread: about 20 steps, a minute or two).
    """
    model = copy.deepcopy(model)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    segs = segments_of(model)
    head = _head_forward(model)
    S = len(segs)
    x = example_batch(model, input_shape, device)
    check_segments(model, x[:2] if input_shape[0] >= 2 else x)
    with torch.no_grad():
        out_probe = model(x[:2] if input_shape[0] >= 2 else x)
    classes = num_classes or int(out_probe.shape[-1])
    y = torch.randint(0, classes, (input_shape[0],), device=device)

    held = {_storage_key(t) for t in [x, *model.parameters(), *model.buffers()]}
    records: dict[int, SavedTensor] = {}
    alive: dict[int, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()
    seg_profiles = [SegmentProfile(name=n) for n, _ in segs]

    def new_record(t: torch.Tensor) -> SavedTensor:
        skey = _storage_key(t)
        nbytes = 0 if skey in storages else skey[1]
        storages.add(skey)
        kind = compress_kind(t)
        if kind == "int" and narrow_int(t) is None:
            kind = None
        rec = SavedTensor(nbytes=nbytes, shape=tuple(t.shape), kind=kind, relu=relu_output(t))
        records[id(t)] = rec
        alive[id(t)] = t
        return rec

    def recorder(index: int):
        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.is_leaf and (t.requires_grad or _storage_key(t) in held):
                return t  # parameters, buffers, the input batch: not activations
            rec = records.get(id(t)) or new_record(t)
            if index not in rec.savers:
                rec.savers.append(index)
            if index < S and t.is_floating_point():
                seg_profiles[index].largest_bytes = max(seg_profiles[index].largest_bytes, t.numel() * t.element_size())
            return t

        return pack

    h = x
    for i, (_, mod) in enumerate(segs):
        if not h.is_leaf:
            rec = records.get(id(h)) or new_record(h)
            rec.inputs_of.append(i)
        seg_profiles[i].input_bytes = h.numel() * h.element_size()
        seg_profiles[i].param_bytes = sum(p.numel() * p.element_size() for p in mod.parameters() if p.requires_grad)
        seg_profiles[i].max_module_param_bytes = _max_module_param_bytes(mod)
        with torch.autograd.graph.saved_tensors_hooks(recorder(i), lambda t: t):
            h = mod(h)
        seg_profiles[i].output_bytes = h.numel() * h.element_size()
        seg_profiles[i].largest_bytes = max(seg_profiles[i].largest_bytes, seg_profiles[i].output_bytes)
    with torch.autograd.graph.saved_tensors_hooks(recorder(S), lambda t: t):
        logits = head(h) if head is not None else h
        loss = F.cross_entropy(logits, y)

    trainable = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    prof = ModelProfile(
        input_shape=tuple(input_shape),
        optimizer=optimizer,
        momentum=momentum,
        segments=seg_profiles,
        tensors=list(records.values()),
        param_bytes=param_bytes,
        grad_bytes=param_bytes,
        optimizer_bytes=_optimizer_bytes(param_bytes, optimizer, momentum),
        buffer_bytes=buffer_bytes,
        input_bytes=x.numel() * x.element_size() + y.numel() * y.element_size(),
        head_max_module_param_bytes=_max_module_param_bytes(head) if head is not None else 0,
    )
    if not timing:
        return prof

    # -- compression cost: pack + unpack every compressible tensor, fit a line per bit-width ----
    packed_first: dict[int, list[int]] = {}
    by_id = list(records.items())
    for bits in PROFILED_BITS:
        xs, ys = [], []
        for tid, rec in by_id:
            if rec.kind != "float" or not rec.savers:
                continue
            t = alive[tid]
            quantize(t, bits, mask=rec.relu).unpack()  # warm
            t0 = _clock()
            quantize(t, bits, mask=rec.relu).unpack()
            xs.append(float(t.numel()))
            ys.append(_clock() - t0)
        prof.pack_fit[f"q{bits}"] = _fit_line(xs, ys)
    for rec in prof.tensors:
        if rec.kind == "float" and rec.savers and rec.savers[0] < S:
            packed_first.setdefault(rec.savers[0], []).append(math.prod(rec.shape))
    for i, seg in enumerate(seg_profiles):
        for bits in PROFILED_BITS:
            a, b = prof.pack_fit[f"q{bits}"]
            seg.pack_seconds[f"q{bits}"] = sum(a + b * n for n in packed_first.get(i, []))
    del loss, logits, h
    alive.clear()
    records.clear()

    # -- forward time per segment (what a recompute costs) and the full step time --------------
    opt = torch.optim.SGD(trainable, lr=0.0)  # lr 0: timing must not change anything that matters

    def full_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    full_step()  # warm-up (oneDNN primitive creation)
    prof.step_seconds = _median_time(full_step, reps)
    # the fused step's overhead: one optimizer step per parameter against one for all of them
    one = torch.optim.SGD(trainable, lr=0.0, momentum=momentum or 0.0)
    per = [torch.optim.SGD([p], lr=0.0, momentum=momentum or 0.0) for p in trainable]
    for p in trainable:
        p.grad = torch.zeros_like(p)

    def per_param() -> None:
        for o in per:  # noqa: F821 -- a closure over `per`, deleted below to free its momentum buffers
            o.step()

    one.step()
    per_param()
    prof.fused_seconds = max(0.0, _median_time(per_param, reps) - _median_time(one.step, reps))
    del one, per
    fwd = [[] for _ in segs]
    for _ in range(reps):
        h = x
        for i, (_, mod) in enumerate(segs):
            t0 = _clock()
            h = mod(h)
            fwd[i].append(_clock() - t0)
        del h
    for i, seg in enumerate(seg_profiles):
        seg.fwd_seconds = statistics.median(fwd[i])
    opt.zero_grad(set_to_none=True)
    prof.timed = True
    if calibrate_steps > 0:
        calibrate(prof, model, x, y, steps=calibrate_steps)
    return prof


#: plan options of the calibration plans: the planner's (mixed widths, at least 2 bits a channel)
CALIBRATION_OPTIONS = {"mixed": True, "min_bits": 2}


def calibrate(prof: ModelProfile, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 3) -> None:
    """Scale the profile's isolated timings (a segment's forward alone, pack + unpack of one tensor
    alone) to what they cost inside whole training steps, measured the way training runs.

    Whole steps of ``model`` -- the trainer's step (:func:`memfl.memory.measure.interleaved_step_times`:
    :func:`~memfl.core.engine.prepare`, ``make_step_optimizer``, CPU time, interleaved round-robin,
    median of ``steps`` after one warm-up, this process's allocator and threads) -- under: full
    training; the optimizer step fused into backward alone (``base``; the planner fuses every hybrid
    plan when the optimizer allows); and ``base`` with every segment recomputed, q8 and q2. Then

    - ``step_seconds`` = the full step (the reference of every step-time ratio);
    - ``fused_seconds`` = max(0, base - full);
    - per mode, ``k = (step(mode everywhere) - base) / sum over segments of the isolated cost``,
      and every segment's cost in that mode is multiplied by ``k`` (q4: the mean of the q8 and q2
      factors). Inside a step the cost is not the isolated one: a recompute reuses warm caches and
      oneDNN primitives, the packed codes replace the float tensor (freeing it early saves what
      the allocator would have spent), and a fused step frees gradients as it goes.

    The factors are kept in ``prof.calibration``; the relative costs of segments stay those of the
    isolated timings."""
    from memfl.core.protocol import Plan
    from memfl.memory.measure import interleaved_step_times

    names = prof.names
    fused = prof.optimizer in ("sgd", "adam")  # memfl.methods.fedhybrid.planner.fusable
    options = dict(CALIBRATION_OPTIONS, **({"fused_step": True} if fused else {}))

    def uniform(mode: str) -> Plan:
        return Plan(kind="hybrid", segments={n: mode for n in names}, options=dict(options))

    plans = {"full": Plan()}
    if fused:
        plans["base"] = Plan(kind="hybrid", options=dict(options))
    plans.update(recompute=uniform("recompute"), q8=uniform("q8"), q2=uniform("q2"))
    times = interleaved_step_times(
        model, x, y, plans, optimizer=prof.optimizer, lr=0.0, momentum=prof.momentum, steps=steps, warmup=1
    )
    med = {k: statistics.median(v["cpu"]) for k, v in times.items()}
    full = med["full"]
    base = med.get("base", full)
    cal: dict[str, Any] = {
        "steps": steps,
        "clock": "process_time",
        "step_cpu_seconds": med,
        "isolated_step_seconds": prof.step_seconds,
        "isolated_fused_seconds": prof.fused_seconds,
    }
    prof.step_seconds = full
    if fused:
        prof.fused_seconds = max(0.0, base - full)

    def factor(extra: float, isolated: float) -> float:
        return max(0.0, extra) / isolated if isolated > 0 else 1.0

    k = {
        "recompute": factor(med["recompute"] - base, sum(sg.fwd_seconds for sg in prof.segments)),
        "q8": factor(med["q8"] - base, sum(sg.pack_seconds.get("q8", 0.0) for sg in prof.segments)),
        "q2": factor(med["q2"] - base, sum(sg.pack_seconds.get("q2", 0.0) for sg in prof.segments)),
    }
    k["q4"] = (k["q8"] + k["q2"]) / 2
    for sg in prof.segments:
        sg.fwd_seconds *= k["recompute"]
        for key in list(sg.pack_seconds):
            sg.pack_seconds[key] *= k.get(key, 1.0)
    for key, (a, b) in list(prof.pack_fit.items()):
        prof.pack_fit[key] = (a * k.get(key, 1.0), b * k.get(key, 1.0))
    cal.update(k)
    prof.calibration = cal


# ------------------------------------------------------------------------------- the memory model


def modes_list(prof: ModelProfile, segments: dict[str, str] | None) -> list[str]:
    """Per-segment modes in segment order (missing names: keep); unknown names are refused."""
    segments = dict(segments or {})
    unknown = set(segments) - set(prof.names)
    if unknown:
        raise ValueError(f"plan names unknown segments {sorted(unknown)[:3]}; segments are {', '.join(prof.names)}")
    out = []
    for name in prof.names:
        mode = segments.get(name, "keep")
        parse_mode(mode)
        out.append(mode)
    return out


def tensor_cost(
    rec: SavedTensor, modes: list[str], head: int, *, mixed: bool = True, min_bits: int = 1
) -> tuple[int, int]:
    """(full bytes, packed bytes) ``rec`` occupies after the forward under ``modes``.

    Full precision if any saver keeps it (the head always keeps), a compressing saver cannot
    compress it (not compressible), or it is the input of a recomputed segment (the checkpoint
    holds it). Packed at the bits of its first compressing saver when one exists (the cache packs
    a tensor once per forward).
    """
    full = False
    packed = 0
    for s in rec.savers:
        mode = "keep" if s >= head else modes[s]
        kind, bits = parse_mode(mode)
        if kind == "keep" or (kind == "q" and rec.kind is None):
            full = True
        elif kind == "q" and packed == 0:
            if rec.kind == "int":
                packed = math.prod(rec.shape) * 2
            else:
                packed = packed_nbytes(rec.shape, bits, rec.relu, mixed=mixed, min_bits=min_bits)
    for s in rec.inputs_of:
        if s < head and modes[s] == "recompute":
            full = True
    return (rec.nbytes if full else 0), packed


def recompute_bytes(prof: ModelProfile, index: int) -> int:
    """Bytes a recomputed segment materialises again during its backward (everything it saves,
    except its input, which the checkpoint already holds)."""
    total = 0
    for rec in prof.tensors:
        if index in rec.savers and index not in rec.inputs_of:
            total += rec.nbytes
    return total


def transient_bytes(prof: ModelProfile, index: int, mode: str) -> int:
    kind, _ = parse_mode(mode)
    return int(TRANSIENT_FACTOR[kind] * prof.segments[index].largest_bytes)


def plan_memory(
    prof: ModelProfile, segments: dict[str, str] | None, options: dict[str, Any] | None = None
) -> dict[str, int]:
    """Predicted peak of a training step under a per-segment plan, with its breakdown.

    peak = fixed (parameters, optimizer state, buffers, batch, runtime) + max over segments s
    (the head -- the end of the forward -- included) of [ gradients alive while s runs its backward
    (``options["fused_step"]``: the optimizer step runs in backward, one module's gradients)
    + activations still alive (tensors involving a segment <= s) + the recomputed activations of
    s if it is recomputed + the transient of s in its mode ]. Returns a dict with ``peak_bytes``,
    ``parameters``, ``gradients`` (alive at the peak), ``optimizer_state``, ``buffers``,
    ``batch``, ``runtime``, ``saved_full``, ``saved_packed``, ``recompute`` and ``transient``.
    """
    modes = modes_list(prof, segments)
    opts = options or {}
    mixed, min_bits = bool(opts.get("mixed", True)), int(opts.get("min_bits", 1))
    fused = bool(opts.get("fused_step", False))
    S = prof.head
    live_full = [0] * (S + 1)
    live_packed = [0] * (S + 1)
    for rec in prof.tensors:
        inv = rec.involved()
        first = min(inv) if inv else S
        full, packed = tensor_cost(rec, modes, S, mixed=mixed, min_bits=min_bits)
        live_full[first] += full
        live_packed[first] += packed
    worst, parts = -1, (0, 0, 0, 0, 0)
    run_f = run_p = 0
    for s in range(S + 1):  # while s runs its backward, tensors first involved at <= s are alive
        run_f += live_full[s]
        run_p += live_packed[s]
        rec_b = recompute_bytes(prof, s) if s < S and modes[s] == "recompute" else 0
        trans = transient_bytes(prof, s, modes[s]) if s < S else 0
        grads = prof.grads_alive(s, fused)
        total = grads + run_f + run_p + rec_b + trans
        if total > worst:
            worst, parts = total, (grads, run_f, run_p, rec_b, trans)
    return {
        "peak_bytes": int(prof.fixed_bytes() + worst),
        "parameters": prof.param_bytes,
        "gradients": int(parts[0]),
        "optimizer_state": prof.optimizer_bytes,
        "buffers": prof.buffer_bytes,
        "batch": prof.input_bytes,
        "runtime": RUNTIME_OVERHEAD_BYTES,
        "saved_full": int(parts[1]),
        "saved_packed": int(parts[2]),
        "recompute": int(parts[3]),
        "transient": int(parts[4]),
    }


def plan_seconds(prof: ModelProfile, segments: dict[str, str] | None, speed: float = 1.0) -> float:
    """Seconds a plan adds to one training step on a device of ``speed``."""
    modes = modes_list(prof, segments)
    return sum(prof.added_seconds(i, m, speed) for i, m in enumerate(modes))
