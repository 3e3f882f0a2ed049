"""Enforced budgets on a CUDA device: the caching allocator refuses past the client's budget.

``[run] enforce_budgets = true`` with ``run.device = "cuda"`` (the in-process executor, one client
at a time) and on a Flower ClientApp whose ``torch-device`` is ``cuda``: around each client's
training, :class:`cuda_budget_cap` sets :func:`torch.cuda.set_per_process_memory_fraction` so that
the caching allocator may hold at most what is allocated now (the *baseline*: the cached models,
the client's data if it lives on the device) plus the client's budget, and restores the whole
device after. Past it, torch raises ``torch.cuda.OutOfMemoryError`` ("CUDA out of memory. Tried
to allocate ..."), which the executor records as ``oom`` (:func:`memfl.runtime.faults.is_oom_error`);
the process frees its cache and the next client trains.

What it counts, and the caveats:

- The fraction bounds the allocator's *reserved* memory (the blocks it holds, allocated or cached),
  not the bytes of live tensors: the cache is emptied before the cap is set, but the allocator
  rounds requests up (to 512 B, large ones to 2 MiB segments), so a plan can fail somewhat below
  its budget in live bytes. The estimator's CUDA figure is ``torch.cuda.max_memory_allocated``
  (live bytes), which :attr:`Cap.measured_peak_bytes` reports here too.
- The CUDA context, cuDNN / cuBLAS workspaces allocated outside the caching allocator, and other
  processes on the device are not counted.
- The fraction is per process and per device: a process that trains two clients at once on one
  device cannot cap them separately (the in-process executor trains one at a time).

Untested on a GPU in this project's CI (it has none): ``tests/test_cuda_cap.py`` runs where CUDA
is available.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from memfl.runtime.pool import Cap

__all__ = ["cuda_budget_cap"]


class cuda_budget_cap:
    """``with cuda_budget_cap(budget_bytes, device) as cap:`` -- the caching allocator of ``device``
    may reserve at most its allocated bytes on entry plus ``budget_bytes`` inside; the whole device
    again on exit. ``cap`` (a :class:`memfl.runtime.pool.Cap`) holds the baseline, the cap and,
    after the block, the peak of live bytes above the baseline."""

    def __init__(self, budget_bytes: int, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"cuda_budget_cap: device {self.device} is not a CUDA device")
        self.cap = Cap(int(budget_bytes))
        self._total = 0

    def __enter__(self) -> Cap:
        d = self.device
        torch.cuda.synchronize(d)
        torch.cuda.empty_cache()  # cached blocks would count against the fraction
        c = self.cap
        c.baseline_bytes = torch.cuda.memory_allocated(d)
        c.cap_bytes = c.baseline_bytes + c.budget_bytes
        self._total = torch.cuda.get_device_properties(d).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, c.cap_bytes / self._total), d)
        torch.cuda.reset_peak_memory_stats(d)
        c.rss_before = c.baseline_bytes
        return c

    def failed(self, err: BaseException) -> None:
        """Note an allocation failure inside the block: the live bytes above the baseline now plus
        the request that failed ("Tried to allocate ...")."""
        now = torch.cuda.memory_allocated(self.device)
        self.cap.oom_at_bytes = max(0, now - self.cap.baseline_bytes) + _tried(str(err))

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        d = self.device
        c = self.cap
        c.measured_peak_bytes = max(0, torch.cuda.max_memory_allocated(d) - c.baseline_bytes)
        torch.cuda.set_per_process_memory_fraction(1.0, d)
        torch.cuda.empty_cache()  # what the failed or finished client left cached


def _tried(message: str) -> int:
    """The request that failed, from torch's "Tried to allocate 20.00 MiB" (0 if absent)."""
    m = re.search(r"tried to allocate ([\d.]+) (B|KiB|MiB|GiB)", message, re.I)
    if m is None:
        return 0
    scale = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)
