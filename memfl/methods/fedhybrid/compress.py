"""Channel-wise mixed-bit compression of the activations autograd saves for backward.

FedHybrid's client engine (SPEC 3.4, following ActNN/GACT) quantises every activation saved for
backward *per channel*: each channel gets its own min/max, values are mapped to ``2**b - 1`` levels
with **stochastic rounding** (unbiased: ``E[dequantise(quantise(x))] = x``), and the channels with
the largest range get more bits than the rest, so a tensor's *average* bit-width can be any number
between 1 and 8 (``q3.5`` is allowed). The codes are **bit-packed** into ``uint8`` storage, so the
memory is really saved (8 bits -> 4x, 4 bits -> 8x, 2 bits -> 16x smaller than float32), and
restored in backward through :class:`torch.autograd.graph.saved_tensors_hooks`.

Bit allocation (:func:`allocate_bits`)
--------------------------------------
Per-channel bits come from ``BIT_OPTIONS = (1, 2, 4, 8)`` (``8 / b`` codes fill a byte). The
variance stochastic rounding adds to a channel of range ``r`` at ``b`` bits is at most
``r**2 / (4 (2**b - 1)**2)`` per value. Starting from the lowest allowed width for every channel,
upgrades to the next width are taken in order of variance removed per extra bit until
``floor(target * C)`` bits per position are spent -- optimal for this separable problem because a
channel's gain per bit falls as its width grows. So wide-range channels get 8 or 4 bits and
narrow ones 2 or 1; ``target = 8`` gives all 8; ``mixed=False`` gives every channel exactly
``target`` bits (the "uniform" baseline). On ResNet-18 activations this lowers the gradient error
of ``q4``/``q2`` by 10-15% relative to uniform bits at the same memory.

Memory is exact and data-independent: the codes of all bit groups go into *one* buffer of
:func:`packed_nbytes` bytes (the bound ``ceil(positions * floor(target * C) / 8)`` plus one byte per
group of padding), whatever the allocation turns out to be, so a budgeted client is never
surprised by its own compressor and the memory estimator's small-batch profiles extrapolate
(linearly in the batch) to the stored bytes exactly.

Layout
------
The channel dimension is dim 1 of a 4-D/5-D tensor (N, C, H, W) and the last dim otherwise
((N, F) or (N, T, D)). A :class:`Packed` holds the code buffer, per-channel ``min`` and ``step``
(float32) and, for mixed widths, the channel order (int64). The output of a ReLU additionally
keeps its exact sign pattern at 1 bit per value: a ReLU's backward multiplies by ``out > 0``, and
a small positive value rounded down to 0 would silently drop its gradient (ActNN stores ReLU masks
the same way).

Only activations worth it are compressed (:func:`compress_kind`): non-leaf floating tensors with at
least :data:`MIN_SAMPLE_NUMEL` values per sample; the decision does not depend on the batch size.
Mixed widths sort the channels by width and store them channel-major, so every width group is one
contiguous block (channel slices of an NCHW tensor are strided, and ops on them were measured
5-50x slower on CPU).
Integer tensors saved for backward (max-pool indices, int64) are narrowed to int16 losslessly when
their values fit -- 4x smaller, exact.

Stochastic rounding uses 8 random bits per value (``u = (r + 0.5) / 256``, ``r`` uniform in 0..255,
drawn 8 bytes at a time from one int64 ``random_``), so the rounding is unbiased up to 1/512 of a
quantisation step; the error of one value is always below one step.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

#: per-channel bit-widths a channel can get (each divides 8, so codes pack into bytes)
BIT_OPTIONS = (1, 2, 4, 8)
#: activations with fewer values per sample are saved as they are (not worth the bookkeeping)
MIN_SAMPLE_NUMEL = 256


def channel_dim(t: torch.Tensor) -> int:
    """The dimension quantised per channel: 1 for (N, C, H, W[, D]), the last one otherwise."""
    return 1 if t.dim() >= 4 else t.dim() - 1


def compress_kind(t: torch.Tensor) -> str | None:
    """How a tensor saved for backward is compressed: ``"float"`` (quantised), ``"int"``
    (losslessly narrowed to int16, e.g. max-pool indices) or None (saved as it is).

    Only tensors with at least 2 dims and :data:`MIN_SAMPLE_NUMEL` values per sample (dim 0 is the
    batch) -- a decision independent of the batch size. Floating tensors must be non-leaf: leaves
    are parameters, buffers or the caller's input batch, which stay in memory anyway.
    """
    if t.dim() < 2 or t.shape[0] == 0 or t.numel() // t.shape[0] < MIN_SAMPLE_NUMEL:
        return None
    if t.is_floating_point():
        return None if t.is_leaf else "float"
    if t.dtype in (torch.int64, torch.int32):
        return "int"
    return None


def compressible(t: torch.Tensor) -> bool:
    """Whether a tensor saved for backward is compressed (see :func:`compress_kind`)."""
    return compress_kind(t) is not None


class PackedInt:
    """An integer tensor whose values fit in int16, stored as int16 (lossless)."""

    __slots__ = ("data", "dtype", "source", "__weakref__")

    def __init__(self, data: torch.Tensor, dtype: torch.dtype) -> None:
        self.data = data
        self.dtype = dtype
        self.source = None

    def memfl_stored_tensors(self) -> list[torch.Tensor]:
        return [self.data]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * 2

    def unpack(self) -> torch.Tensor:
        return self.data.to(self.dtype)


def narrow_int(t: torch.Tensor) -> PackedInt | None:
    """``t`` as int16 when every value fits (max-pool indices of planes up to 181 x 181 do),
    else None."""
    lo, hi = torch.aminmax(t.detach())
    if int(lo) < -(2**15) or int(hi) >= 2**15:
        return None
    return PackedInt(t.detach().to(torch.int16), t.dtype)


def _check_target(target: float, mixed: bool, min_bits: int) -> None:
    if not 1 <= target <= 8:
        raise ValueError(f"target bits must be in [1, 8], got {target}")
    if not mixed and target not in BIT_OPTIONS:
        raise ValueError(f"uniform compression needs bits in {BIT_OPTIONS}, got {target}")
    if mixed and target < min(b for b in BIT_OPTIONS if b >= min_bits):
        raise ValueError(f"target {target} bits is below the floor min_bits={min_bits}")


def _inv_levels_sq(b: float) -> float:
    return 1.0 / (2.0**b - 1.0) ** 2


def allocate_bits(ranges: torch.Tensor, target: float, *, mixed: bool = True, min_bits: int = 1) -> torch.Tensor:
    """Per-channel bit-widths (int64, len C) with ``sum <= floor(target * C)`` (see module docs).

    ranges:   per-channel max - min.
    target:   average bits per value, 1 <= target <= 8.
    mixed:    False -> every channel gets ``target`` bits (one of BIT_OPTIONS).
    min_bits: no channel gets fewer bits (the accuracy guard's floor).
    """
    _check_target(target, mixed, min_bits)
    C = ranges.numel()
    if not mixed:
        return torch.full((C,), int(target), dtype=torch.int64)
    options = [b for b in BIT_OPTIONS if b >= min_bits]
    base = options[0]
    bits = torch.full((C,), base, dtype=torch.int64)
    budget = int(math.floor(target * C + 1e-9)) - base * C
    if budget <= 0 or len(options) == 1:
        return bits
    r2 = ranges.detach().double().cpu().clamp_min(0) ** 2
    gains, costs = [], []
    for lo, hi in zip(options[:-1], options[1:]):  # step-major order: ties keep per-channel order
        gains.append(r2 * ((_inv_levels_sq(lo) - _inv_levels_sq(hi)) / (hi - lo)))
        costs.append(torch.full((C,), hi - lo, dtype=torch.int64))
    gain, cost = torch.cat(gains), torch.cat(costs)
    chan = torch.arange(C).repeat(len(gains))
    order = torch.sort(gain, descending=True, stable=True).indices
    taken = order[torch.cumsum(cost[order], 0) <= budget]
    bits.scatter_add_(0, chan[taken], cost[taken])
    return bits


def _grouped(shape: tuple[int, ...], cdim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tensor view, per-channel view) shapes for channel-wise arithmetic: ``(outer, C, inner)`` /
    ``(1, C, 1)``, or ``(outer, C)`` / ``(1, C)`` when the channel dim is the last. Broadcasting a
    per-channel vector over a 3-d view with a long contiguous inner dim is several times faster
    than over the original 4-d shape (PyTorch's elementwise loops on CPU: 2 ms instead of 11 ms for
    a 64x64x32x32 addcmul on one thread)."""
    C = shape[cdim]
    outer = math.prod(shape[:cdim])
    inner = math.prod(shape[cdim + 1 :])
    if inner == 1:
        return (outer, C), (1, C)
    return (outer, C, inner), (1, C, 1)


def _shape_for(C: int, cdim: int, ndim: int) -> list[int]:
    shape = [1] * ndim
    shape[cdim] = C
    return shape


_WORD = {1: torch.int64, 2: torch.int32, 4: torch.int16}


def pack_codes(q: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a uint8 tensor of codes < 2**bits, 8/bits codes per byte (little-endian words).

    out: a flat uint8 tensor of ``ceil(numel * bits / 8)`` bytes to write into (else a new one).
    Codes are padded to whole words when the values per row of dim 0 do not fill them.
    """
    flat = q.reshape(-1)
    n = flat.numel()
    nbytes = -(-n * bits // 8)
    if bits == 8:
        if out is None:
            return flat.contiguous()
        out.copy_(flat)
        return out
    k = 8 // bits
    per_sample = n // max(1, q.shape[0]) if q.dim() else n
    if per_sample % k:
        padded = flat.new_zeros(nbytes * k)
        padded[:n] = flat
        flat = padded
    w = flat.contiguous().view(_WORD[bits])  # code i of a word sits at bit 8 i
    # one multiply moves code i from bit 8 i to bit T + b i (the partial products never overlap,
    # the ones above the word are dropped by the wrap-around): then shift and keep one byte
    acc = (w * _MAGIC[bits]).bitwise_right_shift_(_TOP[bits]).bitwise_and_(0xFF)
    if out is None:
        return acc.to(torch.uint8)
    out.copy_(acc)
    return out


def _magic(bits: int, width: int) -> tuple[int, int]:
    k = 8 // bits
    top = (8 - bits) * (k - 1)
    m = sum(1 << (top - (8 - bits) * i) for i in range(k))
    return (m - (1 << width) if m >= 1 << (width - 1) else m), top


_MAGIC, _TOP = {}, {}
for _b, _w in ((1, 64), (2, 32), (4, 16)):
    _MAGIC[_b], _TOP[_b] = _magic(_b, _w)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a flat uint8 tensor of ``numel`` codes."""
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.view(-1)[:numel]


def _code_bytes(positions: int, C: int, target: float) -> int:
    # each width group pads to a whole byte
    bits_total = int(math.floor(target * C + 1e-9))
    return -(-positions * bits_total // 8) + len(BIT_OPTIONS)


def packed_nbytes(
    shape: tuple[int, ...] | torch.Size, target: float, mask: bool = False, *, mixed: bool = True, min_bits: int = 1
) -> int:
    """Bytes a :class:`Packed` of a float tensor of ``shape`` holds at ``target`` average bits:
    the code buffer, the 1-bit sign mask of a ReLU output (``mask``), per-channel min and step
    (float32) and, for mixed widths, the channel order (int64). Exact, whatever the data."""
    _check_target(target, mixed, min_bits)
    shape = tuple(int(s) for s in shape)
    cdim = 1 if len(shape) >= 4 else len(shape) - 1
    C = shape[cdim]
    numel = math.prod(shape)
    total = _code_bytes(numel // max(1, C), C, target) + 8 * C
    if mixed and _mixed_layout(target, min_bits):
        total += 8 * C
    if mask:
        total += -(-numel // 8)
    return total


class Packed:
    """A compressed activation; :meth:`unpack` restores a float tensor of the original shape.

    Uniform widths: the codes in the tensor's own order. Mixed widths: channels sorted by width
    (``order``) and stored channel-major, so every width group is a contiguous block;
    ``groups`` = ``(bits, channels, byte offset)``.
    """

    __slots__ = (
        "shape",
        "dtype",
        "cdim",
        "minimum",
        "step",
        "codes",
        "order",
        "groups",
        "mask",
        "source",
        "__weakref__",
    )

    def __init__(self, shape, dtype, cdim, minimum, step, codes, order, groups, mask=None) -> None:
        self.shape = shape
        self.dtype = dtype
        self.cdim = cdim
        self.minimum = minimum
        self.step = step
        self.codes = codes
        self.order = order  # int64 channel permutation grouping equal widths, or None (uniform)
        self.groups = groups
        self.mask = mask  # 1-bit packed (x > 0) of a ReLU output, or None
        self.source = None

    def memfl_stored_tensors(self) -> list[torch.Tensor]:
        """The tensors this object keeps alive (memfl.memory.estimate's counting protocol)."""
        return [t for t in (self.minimum, self.step, self.codes, self.order, self.mask) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, ReLU mask, per-channel metadata."""
        return sum(t.numel() * t.element_size() for t in self.memfl_stored_tensors())

    @property
    def bits(self) -> list[tuple[int, int]]:
        """``(bits, channels)`` per width group."""
        return [(b, n) for b, n, _ in self.groups]

    def unpack(self) -> torch.Tensor:
        C = self.shape[self.cdim]
        numel = math.prod(self.shape)
        positions = numel // C
        if self.order is None:
            bits = self.groups[0][0]
            flat, view = _grouped(self.shape, self.cdim)
            # one float buffer, updated in place (uint8 operands of addcmul are promoted through
            # an extra copy)
            out = unpack_codes(self.codes, bits, numel).view(flat).to(torch.float32)
            out.mul_(self.step.view(view)).add_(self.minimum.view(view))
            out = out.view(self.shape)
        else:
            vals = torch.empty((C, positions), dtype=torch.float32, device=self.codes.device)
            mn, st = self.minimum[self.order], self.step[self.order]
            start = 0
            for bits, count, offset in self.groups:
                n = positions * count
                codes = unpack_codes(self.codes[offset : offset + -(-n * bits // 8)], bits, n)
                torch.addcmul(
                    mn[start : start + count, None],
                    codes.view(count, positions),
                    st[start : start + count, None],
                    out=vals[start : start + count],
                )
                start += count
                del codes
            major = _channel_major_shape(self.shape, self.cdim)
            out_major = torch.empty(major, dtype=torch.float32, device=vals.device)
            out_major.view(C, positions).index_copy_(0, self.order, vals)
            del vals
            out = _from_channel_major(out_major, self.shape, self.cdim)
        if self.mask is not None:
            # a ReLU's backward reads (out > 0): restore the exact sign pattern (a ReLU output
            # dequantises to values >= its min >= 0)
            positive = unpack_codes(self.mask, 1, numel).view(self.shape)
            out.clamp_min_(torch.finfo(torch.float32).tiny).mul_(positive)
        return out.to(self.dtype)


def _channel_major_shape(shape: tuple[int, ...], cdim: int) -> tuple[int, ...]:
    return (shape[cdim],) + tuple(s for d, s in enumerate(shape) if d != cdim)


def _to_channel_major(x: torch.Tensor, cdim: int, order: torch.Tensor) -> torch.Tensor:
    """(C, positions) contiguous, channels in ``order``."""
    return x.movedim(cdim, 0).index_select(0, order).reshape(x.shape[cdim], -1)


def _from_channel_major(t: torch.Tensor, shape: tuple[int, ...], cdim: int) -> torch.Tensor:
    return t.movedim(0, cdim).contiguous()


def _uniform_noise_bytes(numel: int, device: torch.device) -> torch.Tensor:
    words = (numel + 7) // 8
    r = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None)
    return r.view(torch.uint8)[:numel]


def relu_output(t: torch.Tensor) -> bool:
    """Whether ``t`` is the output of a ReLU (its backward needs the exact sign pattern)."""
    fn = t.grad_fn
    return fn is not None and type(fn).__name__.startswith(("ReluBackward", "ThresholdBackward"))


def _stochastic_codes(x: torch.Tensor, minimum: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``floor((x - min) * inv + u)``, ``u`` uniform in (0, 1) (min/inv broadcast)."""
    v = torch.addcmul(-minimum * inv + 0.5 / 256, x, inv)
    v.add_(_uniform_noise_bytes(v.numel(), v.device).view(v.shape), alpha=1.0 / 256)
    return v.to(torch.uint8)  # truncation == floor for these non-negative values


def quantize(x: torch.Tensor, target: float, *, mixed: bool = True, min_bits: int = 1, mask: bool = False) -> Packed:
    """Compress ``x`` to ``target`` average bits per value (see the module docs).

    mask: also store the exact sign pattern ``x > 0`` at 1 bit per value (for ReLU outputs, whose
          backward multiplies by it: a small positive value rounded to 0 would drop its gradient).
    """
    xd = x.detach()
    if xd.dtype != torch.float32:
        xd = xd.float()
    shape = tuple(xd.shape)
    ndim = xd.dim()
    cdim = channel_dim(xd)
    C = shape[cdim]
    positions = xd.numel() // C
    dims = [d for d in range(ndim) if d != cdim]
    mn = xd.amin(dim=dims)
    rng = xd.amax(dim=dims) - mn
    bits = allocate_bits(rng, target, mixed=mixed, min_bits=min_bits)
    levels = (2.0**bits - 1.0).to(device=xd.device, dtype=torch.float32)
    # step slightly above range/levels so that (x - min) / step stays below `levels`
    step = torch.where(rng > 0, rng / levels * (1.0 + 2.0**-20), torch.ones_like(rng))
    inv = 1.0 / step
    codes = torch.empty(_code_bytes(positions, C, target), dtype=torch.uint8, device=xd.device)
    if not (mixed and _mixed_layout(target, min_bits)):  # one width for every channel
        b = int(bits[0])
        flat, view = _grouped(shape, cdim)
        q = _stochastic_codes(xd.reshape(flat), mn.view(view), inv.view(view))
        pack_codes(q, b, out=codes[: -(-q.numel() * b // 8)])
        order, groups = None, [(b, C, 0)]
    else:  # channels sorted by width, channel-major: every width group is a contiguous block
        order = torch.argsort(bits, descending=True, stable=True).to(xd.device)
        xm = _to_channel_major(xd, cdim, order)
        q = _stochastic_codes(xm, mn[order, None], inv[order, None])
        del xm
        sorted_bits = bits[order.cpu()].tolist()
        groups, offset, start = [], 0, 0
        for b in sorted(set(sorted_bits), reverse=True):
            count = sorted_bits.count(b)
            n = -(-positions * count * b // 8)
            pack_codes(q[start : start + count], b, out=codes[offset : offset + n])
            groups.append((int(b), count, offset))
            offset += n
            start += count
    del q
    signs = pack_codes((xd > 0).view(torch.uint8), 1) if mask else None
    return Packed(shape, x.dtype, cdim, mn.float(), step.float(), codes, order, groups, signs)


def _mixed_layout(target: float, min_bits: int) -> bool:
    """Whether a mixed-width tensor at ``target`` stores a channel order (see packed_nbytes)."""
    return target != 8 and target > min(b for b in BIT_OPTIONS if b >= min_bits)


class Compressor:
    """``saved_tensors_hooks`` pack/unpack pair compressing at ``bits`` average bits.

    A tensor saved several times during one forward (a ReLU output that the next conv saves
    again) is packed once: packed objects are cached by (data pointer, offset, shape, stride,
    version) and reused only while the very same tensor object is alive (checked through a weak
    reference), so a freed and reallocated address can never return stale codes. The cache holds
    packed objects weakly, so it never keeps one alive longer than autograd does.
    """

    def __init__(
        self, bits: float, *, mixed: bool = True, min_bits: int = 1, cache: weakref.WeakValueDictionary | None = None
    ) -> None:
        self.bits = bits
        self.mixed = mixed
        self.min_bits = min_bits
        self.cache = cache if cache is not None else weakref.WeakValueDictionary()

    def pack(self, t: torch.Tensor) -> Any:
        kind = compress_kind(t)
        if kind is None:
            return t
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)
        hit = self.cache.get(key)
        if hit is not None and hit.source is not None and hit.source() is t:
            return hit
        if kind == "int":
            packed = narrow_int(t)
            if packed is None:
                return t
        else:
            packed = quantize(t, self.bits, mixed=self.mixed, min_bits=self.min_bits, mask=relu_output(t))
        packed.source = weakref.ref(t)
        self.cache[key] = packed
        return packed

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        return obj.unpack() if isinstance(obj, (Packed, PackedInt)) else obj

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def parse_mode(mode: str) -> tuple[str, float | None]:
    """``"keep"`` -> ("keep", None); ``"recompute"`` -> ("recompute", None); ``"q4"`` -> ("q", 4.0)."""
    if mode in ("keep", "recompute"):
        return mode, None
    if mode.startswith("q"):
        try:
            bits = float(mode[1:])
        except ValueError:
            bits = -1.0
        if 1 <= bits <= 8:
            return "q", bits
    raise ValueError(
        f"bad segment mode {mode!r}; expected keep, recompute or qB with 1 <= B <= 8 (e.g. q8, q4, q2, q3.5)"
    )
