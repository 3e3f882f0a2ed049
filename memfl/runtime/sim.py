"""The embedded in-process simulator (the default runtime).

``run_experiment(config)`` builds the federation (:mod:`memfl.server.setup`: data partitions,
device profiles, budgets, the strategy, a resumed checkpoint) and drives the shared round loop
(:func:`memfl.server.loop.run_rounds`) through an :class:`InProcessExecutor`: every selected
client's :class:`~memfl.core.trainer.LocalTrainer` runs in this process, one after the other. In:
a :class:`~memfl.config.Config` (optionally a data set and a model builder instead of the
configured ones). Out: the results dict (:mod:`memfl.server.records`), also written to
``<out>/results.json``, the accuracy plot, and a checkpoint after every round, so a killed run
started again with the same config resumes where it stopped, bit for bit.

A client that raises is recorded as failed and left out of the aggregate. With the simulated memory
contention (``fedhybrid.contention``, :func:`memfl.methods.fedhybrid.budget.federation_budgets`)
the strategy plans with each client's *predicted* budget for the round, and a client whose
predicted peak exceeds its *real* budget is recorded as ``oom`` without training (the OS would
kill it). The virtual clock is :mod:`memfl.server.clock`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from memfl.config import Config, FaultsConfig
from memfl.core.protocol import Instruction, Plan
from memfl.core.trainer import LocalTrainer
from memfl.data import Dataset
from memfl.methods.fedhybrid.budget import FederationBudgets, federation_budgets
from memfl.runtime.faults import draw_fault, fit_with_fault, noting_failures
from memfl.runtime.pool import WorkerPoolExecutor, pool_shape
from memfl.server.checkpoint import Checkpoint
from memfl.server.executor import Candidate, Outcome
from memfl.server.loop import run_rounds
from memfl.server.progress import ConsoleReporter
from memfl.server.setup import SimClient, build_federation, load_data, set_up_server


class InProcessExecutor:
    """Runs each instruction with ``trainer`` on the client's partition, in this process.

    ``budgets`` (the simulated contention, or ``None``): the strategy plans with
    ``budgets.predicted(client, round)``; a client whose predicted peak exceeds
    ``budgets.real(client, round)`` is ``oom`` and does not train. ``on_client(round, i, n)`` is
    called before the i-th of n clients trains (progress). ``faults`` (``[faults]``, or ``None``):
    each client's injected fault is drawn from ``(seed, round, client)`` and applied around its
    training by :func:`memfl.runtime.faults.fit_with_fault` (``oom`` and ``hang`` simulated).
    ``enforce`` (CUDA trainers only; a CPU cap needs the worker pool): each client trains under
    :class:`memfl.runtime.cuda_cap.cuda_budget_cap` of its real (else its own) budget, and the
    device's refusal, not the prediction, makes it ``oom``.
    """

    runtime = "sim"
    versions: dict[str, str] = {}

    def __init__(
        self,
        federation: list[SimClient],
        trainer: LocalTrainer,
        budgets: FederationBudgets | None,
        on_client: Callable[[int, int, int], None] | None = None,
        faults: FaultsConfig | None = None,
        seed: int = 0,
        enforce: bool = False,
    ) -> None:
        if enforce and trainer.device.type != "cuda":
            raise ValueError(
                "InProcessExecutor(enforce=True) caps CUDA devices only; a CPU cap needs the worker pool "
                "(memfl.runtime.pool.WorkerPoolExecutor: an OS cap is never set on the server process)"
            )
        self.enforce = enforce
        self.federation = federation
        self.faults = faults
        self.seed = seed
        self.by_id = {c.info.id: c for c in federation}
        self.trainer = trainer
        self.budgets = budgets
        self.on_client = on_client

    def clients(self, round: int) -> list[Candidate]:
        if self.budgets is None:
            return [Candidate(c.info) for c in self.federation]
        return [
            Candidate(c.info, planning_budget_bytes=self.budgets.predicted(c.info.id, round)) for c in self.federation
        ]

    def run(self, round: int, instructions: list[Instruction]) -> list[Outcome]:
        outcomes = []
        for i, ins in enumerate(instructions):
            if self.on_client:
                self.on_client(round, i, len(instructions))
            outcomes.append(self.run_one(round, ins))
        return outcomes

    def run_one(self, round: int, ins: Instruction) -> Outcome:
        real = None
        if self.budgets is not None:  # the OS kills a client whose peak exceeds its real budget
            real = self.budgets.real(ins.client_id, round)
            if not self.enforce and (ins.predicted_peak_bytes or 0) > real:
                return Outcome(
                    ins.client_id, "oom", error="predicted peak above the real budget", real_budget_bytes=real
                )
        client = self.by_id[ins.client_id]
        fault = draw_fault(self.faults, self.seed, round, ins.client_id) if self.faults is not None else None
        if self.enforce:  # the device decides (the CUDA allocator's cap), not the prediction
            return self._run_capped(ins, client, fault, real if real is not None else client.info.budget_bytes, real)
        # a failing client must not kill the run: fit_with_fault turns its exception into an outcome
        return fit_with_fault(ins, lambda: self.trainer.fit(ins, client.x, client.y), fault, real_budget_bytes=real)

    def _run_capped(
        self, ins: Instruction, client: SimClient, fault: str | None, budget: int, real: int | None
    ) -> Outcome:
        """``run_one`` under :class:`memfl.runtime.cuda_cap.cuda_budget_cap` of ``budget`` bytes; the
        record gets the cap's fields (``enforced_cap_bytes``, ``measured_peak_bytes``...)."""
        from memfl.runtime.cuda_cap import cuda_budget_cap

        ctx = cuda_budget_cap(budget, self.trainer.device)
        fit = noting_failures(lambda: self.trainer.fit(ins, client.x, client.y), ctx.failed)
        with ctx as cap:
            outcome = fit_with_fault(ins, fit, fault, real_budget_bytes=real)
        over = (
            f"the enforced CUDA cap: {budget / 2**20:.1f} MiB budget above "
            f"{cap.baseline_bytes / 2**20:.1f} MiB allocated before"
        )
        return cap.settle(outcome, over)

    def timing(self) -> dict[str, float]:
        return {}

    def roster(self) -> list[Candidate]:
        return [Candidate(c.info) for c in self.federation]


def run_experiment(
    config: Config,
    *,
    data: Dataset | None = None,
    model_fn: Callable[[Plan], torch.nn.Module] | None = None,
    console: Console | None = None,
    progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``config``; return the results dict.

    ``data``/``model_fn``: use these instead of the configured data set / model. ``console``: where
    the progress bar and notes go (default: stderr); ``progress=False``: no bar. ``on_round(entry)``
    after every round's checkpoint. The results dict (also ``<out>/results.json``) is described in
    :mod:`memfl.server.records`.
    """
    console = console or Console(stderr=True)
    out = Path(config.run.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.run.seed)

    data = data if data is not None else load_data(config)
    checkpoint = Checkpoint(out)
    setup = set_up_server(
        config, data.input_shape, data.num_classes, checkpoint, model_fn=model_fn, example=data.example
    )
    clients = build_federation(config, data, setup.full_peak)
    trainer = LocalTrainer(setup.model_fn, device=config.run.device)
    # [fedhybrid] contention: per-round real budgets from traces; strategies see predictions
    budgets = federation_budgets(config, [c.info for c in clients])
    console.print(
        f"memfl: {config.run.method} on {config.run.dataset} ({len(data.train_y)} train / {len(data.test_y)} test), "
        f"model {config.run.model}, {config.run.clients} clients, {config.run.per_round} per round, "
        f"{config.run.rounds} rounds; full-training peak {setup.full_peak / 2**20:.1f} MB at batch "
        f"{config.train.batch_size}"
    )
    reporter = ConsoleReporter(console, progress=progress)
    shape = pool_shape(config)  # [run] workers / enforce_budgets: clients in worker processes
    if shape is None:
        if config.run.enforce_budgets and config.run.device == "cpu":
            raise ValueError(
                "run.enforce_budgets: a CPU cap needs the worker pool, which needs fork and /proc (Linux); "
                "on this platform set run.enforce_budgets = false"
            )
        executor = InProcessExecutor(
            clients,
            trainer,
            budgets,
            on_client=reporter.client,
            faults=config.faults,
            seed=config.run.seed,
            enforce=config.run.enforce_budgets,  # on CUDA: memfl.runtime.cuda_cap
        )
        return run_rounds(config, setup, checkpoint, executor, test=data, reporter=reporter, on_round=on_round)
    with WorkerPoolExecutor(
        clients,
        trainer,
        budgets,
        workers=shape[0],
        threads=shape[1],
        enforce=config.run.enforce_budgets,
        on_client=reporter.client,
        faults=config.faults,
        seed=config.run.seed,
        eval_model=setup.global_model,
        test_x=data.test_x,
        test_y=data.test_y,
        note=reporter.note,
        warmup_batch=config.train.batch_size,
    ) as pool:
        return run_rounds(config, setup, checkpoint, pool, test=data, reporter=reporter, on_round=on_round)
