"""Aggregation of client results into the global model."""

from __future__ import annotations

import torch

from memfl.core.protocol import Result


def fedavg(global_params: dict[str, torch.Tensor], results: list[Result]) -> dict[str, torch.Tensor]:
    """Sample-weighted FedAvg, tensor by tensor, over the clients that sent each tensor.

    Clients may send different subsets (a ScaleFL stage, a frozen part): a tensor is averaged over
    the clients that trained it and kept as it was when nobody did. Floating tensors (parameters,
    BN running statistics) are weighted by ``num_samples``; integer buffers (BN's
    ``num_batches_tracked``) take the maximum. Returns a new dict; inputs are not modified.

    The sums run in client-id order whatever the order of ``results`` (the order replies arrived
    in, on Flower), so both runtimes add the same terms in the same order: float64 accumulation
    makes the order matter rarely, but a fixed one makes the result exactly reproducible.
    """
    new = dict(global_params)
    names: dict[str, list[Result]] = {}
    for r in sorted(results, key=lambda r: r.client_id):
        for k in r.params:
            if k not in global_params:
                raise KeyError(f"client {r.client_id} sent unknown tensor {k!r}")
            names.setdefault(k, []).append(r)
    for k, senders in names.items():
        ref = global_params[k]
        if ref.dtype.is_floating_point:
            total = float(sum(r.num_samples for r in senders))
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for r in senders:
                acc += r.params[k].to(torch.float64) * (r.num_samples / total)
            new[k] = acc.to(ref.dtype)
        else:
            new[k] = torch.stack([r.params[k] for r in senders]).max(0).values
    return new
