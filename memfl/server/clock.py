"""The virtual clock: how long a client's round would take on its device.

A client's round time = its measured compute seconds / its device's relative speed + the transfer
time of the tensors down and up at :data:`BANDWIDTH_MBPS`; a synchronous round lasts as long as
its slowest client. Compute seconds are the training process's CPU seconds on CPU (other jobs on
the machine do not leak in) and wall seconds on GPU (:class:`memfl.core.trainer.LocalTrainer`).
"""

from __future__ import annotations

import torch

#: assumed uplink/downlink bandwidth for the virtual clock (megabits per second)
BANDWIDTH_MBPS = 20.0


def transfer_seconds(n_bytes: int) -> float:
    """Seconds to move ``n_bytes`` at :data:`BANDWIDTH_MBPS`."""
    return n_bytes * 8 / (BANDWIDTH_MBPS * 1e6)


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a dict of tensors (what goes over the wire)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def client_seconds(
    compute_seconds: float, speed: float, down: dict[str, torch.Tensor], up: dict[str, torch.Tensor]
) -> float:
    """A client's virtual round time: compute on its device + the transfer down and up."""
    return compute_seconds / speed + transfer_seconds(nbytes(down) + nbytes(up))
