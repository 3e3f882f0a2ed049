"""The client side: run one :class:`~memfl.core.protocol.Instruction` on one client's data.

A :class:`LocalTrainer` knows nothing of servers or rounds; it receives plain data and returns
plain data, so the simulator and the Flower ClientApp call it the same way.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from memfl.core.engine import forward_backward, prepare
from memfl.core.optim import make_step_optimizer
from memfl.core.protocol import Instruction, Plan, Result

#: how many per-sample losses a client reports (FedHybrid/Oort data utility uses them)
SAMPLE_LOSSES = 64


class LocalTrainer:
    """Trains a model under an instruction's plan on a client's tensors.

    model_fn: ``plan -> nn.Module`` building an untrained model with the structure the plan
              needs (the same architecture for every plan but ``width``). Models are cached per
              structure and overwritten with the instruction's parameters on every call.
    device:   ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, model_fn: Callable[[Plan], nn.Module], device: str = "cpu") -> None:
        self.model_fn = model_fn
        self.device = torch.device(device)
        self._models: dict[tuple, nn.Module] = {}

    def model_for(self, plan: Plan) -> nn.Module:
        key = ("width", plan.width) if plan.kind == "width" else ("global",)
        if key not in self._models:
            self._models[key] = self.model_fn(plan).to(self.device)
        return self._models[key]

    def fit(self, instruction: Instruction, x: torch.Tensor, y: torch.Tensor) -> Result:
        """Train on (x, y) as instructed; return the trained tensors and statistics.

        x, y: the client's whole local dataset (CPU tensors); batches are drawn by a generator
        seeded with ``instruction.seed`` so a round is reproducible.
        """
        hp = instruction.hparams
        model = self.model_for(instruction.plan)
        missing = set(instruction.trainable) - set(instruction.params)
        if missing:
            raise ValueError(f"instruction marks {sorted(missing)[:3]} trainable but does not send them")
        model.load_state_dict(instruction.params, strict=False)
        model.train()
        torch.manual_seed(instruction.seed)
        step = prepare(model, instruction.plan)
        params = [p for _, p in step.trainable]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        anchor = [p.detach().clone() for p in params] if hp.prox_mu > 0 else None
        # a fused step (plan option) updates each parameter inside backward; it then applies the
        # FedProx term itself, so the loss gets it only without fusion
        optimizer = make_step_optimizer(
            step, params, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, prox_mu=hp.prox_mu, anchor=anchor
        )
        prox_in_loss = anchor is not None and not step.step_in_backward

        def prox_term() -> torch.Tensor:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            return 0.5 * hp.prox_mu * prox

        gen = torch.Generator().manual_seed(instruction.seed)
        n = len(x)
        bs = min(hp.batch_size, n)
        total_loss, total_seen, steps = 0.0, 0, 0
        last_losses: list[torch.Tensor] = []
        # The virtual clock's compute time: CPU seconds of this process (user + system) on CPU,
        # so a client's time does not depend on how many other jobs share the machine's cores
        # (wall time on a loaded machine mostly measures the wait for a core); wall time on GPU.
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        start = clock()
        try:
            for epoch in range(hp.local_epochs):
                order = torch.randperm(n, generator=gen)
                last_epoch = epoch == hp.local_epochs - 1
                for lo in range(0, n, bs):
                    idx = order[lo : lo + bs]
                    if len(idx) < 2:  # BatchNorm cannot train on one sample
                        continue
                    xb = x[idx].to(self.device, non_blocking=True)
                    yb = y[idx].to(self.device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    # forward + backward, split into the plan's micro-batches (gradients accumulate)
                    _, per_sample = forward_backward(step, xb, yb, extra=prox_term if prox_in_loss else None)
                    optimizer.step()
                    total_loss += float(per_sample.sum())
                    total_seen += len(idx)
                    steps += 1
                    if last_epoch:
                        last_losses.append(per_sample.cpu())
                    if hp.max_steps is not None and steps >= hp.max_steps:
                        break
                if hp.max_steps is not None and steps >= hp.max_steps:
                    break
        finally:
            if hasattr(optimizer, "remove"):  # a fused step's hooks stay off the cached model
                optimizer.remove()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = clock() - start

        sample = torch.cat(last_losses) if last_losses else torch.zeros(0)
        if len(sample) > SAMPLE_LOSSES:
            sample = sample[torch.randperm(len(sample), generator=gen)[:SAMPLE_LOSSES]]
        state = model.state_dict()
        names = step.trainable_names() + list(step.sent_buffers)
        out = {k: state[k].detach().to("cpu", copy=True) for k in names}
        return Result(
            client_id=instruction.client_id,
            params=out,
            num_samples=n,
            loss=total_loss / max(1, total_seen),
            sample_losses=[round(float(v), 6) for v in sample],
            compute_seconds=seconds,
            steps=steps,
            predicted_peak_bytes=instruction.predicted_peak_bytes,
            metrics={
                "loss_sq_mean": float((sample**2).mean()) if len(sample) else 0.0,
                **(step.metrics() if step.metrics is not None else {}),
            },
        )


#: test-set batch of :func:`evaluate`. Measured (``cnn`` width 0.5, Fashion-MNIST's 10000 test images,
#: 2-core CPU, ``memfl bench executor``): 0.56x the time of batches of 1000 on one thread, 0.58x on
#: two, with ~10-13 MiB of activations instead of ~96 MiB (a 1000-image conv output leaves the caches).
EVAL_BATCH_SIZE = 128


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy) of ``model`` on (x, y), in batches of ``batch_size``."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for lo in range(0, len(x), batch_size):
        xb = x[lo : lo + batch_size].to(device)
        yb = y[lo : lo + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / len(x), loss_sum / len(x)
