"""The embedded in-process simulator (the default runtime).

``run_experiment(config)`` builds the federation (data partitions, device profiles, budgets), then
for each round asks the strategy for instructions, runs each selected client's
:class:`~memfl.core.trainer.LocalTrainer` in this process, merges the results and evaluates
the global model. A client that raises is recorded as failed and left out of the aggregate. After
every round the global model and the results so far are checkpointed to the output folder, so a
killed run started again with the same config resumes where it stopped.

Virtual clock: a client's round time = measured compute seconds / device speed + transfer time
(the parameters down and the trained tensors up at ``BANDWIDTH_MBPS``); a synchronous round lasts
as long as its slowest client.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memfl.config import Config
from memfl.core.protocol import Plan, Result
from memfl.data import Dataset
from memfl.core.trainer import LocalTrainer, evaluate
from memfl.methods.fedhybrid.budget import federation_budgets
from memfl.server.checkpoint import Checkpoint
from memfl.server.clock import client_seconds
from memfl.server.records import summarize
from memfl.server.setup import build_federation, load_data, set_up_server


def run_experiment(config: Config, *, data: Dataset | None = None,
                   model_fn: Callable[[Plan], torch.nn.Module] | None = None,
                   console: Console | None = None, progress: bool = True,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``config``; return the results dict.

    The results dict (also written to ``<out>/results.json``) holds ``config``, ``clients`` (the
    federation: device and budget per client), ``rounds`` (a list of ``{round, accuracy, loss,
    round_seconds, virtual_seconds, clients: [...]}``) and ``summary``.
    """
    console = console or Console(stderr=True)
    out = Path(config.run.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.run.seed)

    data = data if data is not None else load_data(config)
    checkpoint = Checkpoint(out)
    setup = set_up_server(config, data.input_shape, data.num_classes, checkpoint, model_fn=model_fn)
    model_fn, full_peak, strategy = setup.model_fn, setup.full_peak, setup.strategy
    params, rounds = setup.params, setup.rounds
    global_model = setup.global_model.to(config.run.device)  # evaluated, loaded with params
    clients = build_federation(config, data, full_peak)
    trainer = LocalTrainer(model_fn, device=config.run.device)
    # [fedhybrid] contention: per-round real budgets from traces; strategies see predictions
    budgets = federation_budgets(config, [c.info for c in clients])
    if rounds:
        console.print(f"[yellow]resuming {out} after round {len(rounds)}[/yellow]")

    console.print(
        f"memfl: {config.run.method} on {config.run.dataset} ({len(data.train_y)} train / {len(data.test_y)} test), "
        f"model {config.run.model}, {config.run.clients} clients, {config.run.per_round} per round, "
        f"{config.run.rounds} rounds; full-training peak {full_peak / 2**20:.1f} MB at batch {config.train.batch_size}")

    by_id = {c.info.id: c for c in clients}
    virtual_total = rounds[-1]["virtual_seconds"] if rounds else 0.0
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=False)
    with bar:
        task = bar.add_task("rounds", total=config.run.rounds, completed=len(rounds))
        for rnd in range(len(rounds) + 1, config.run.rounds + 1):
            t0 = time.perf_counter()
            infos = [c.info if budgets is None else replace(c.info, budget_bytes=budgets.predicted(c.info.id, rnd))
                     for c in clients]
            instructions = strategy.configure_train(rnd, params, infos)
            results: list[Result] = []
            records: list[dict[str, Any]] = []
            for i, ins in enumerate(instructions):
                bar.update(task, description=f"round {rnd}/{config.run.rounds} client {i + 1}/{len(instructions)}")
                client = by_id[ins.client_id]
                rec: dict[str, Any] = {
                    "id": ins.client_id, "device": client.info.device, "budget_bytes": client.info.budget_bytes,
                    "plan": ins.plan.label, "predicted_peak_bytes": ins.predicted_peak_bytes,
                }
                if budgets is not None:  # the OS kills a client whose peak exceeds its real budget
                    real = budgets.real(ins.client_id, rnd)
                    rec.update(predicted_budget_bytes=ins.budget_bytes, real_budget_bytes=real,
                               budget_violation=(ins.predicted_peak_bytes or 0) > real)
                    if rec["budget_violation"]:
                        rec.update(status="oom", error="predicted peak above the real budget")
                        records.append(rec)
                        continue
                try:
                    res = trainer.fit(ins, client.x, client.y)
                except Exception as err:  # a failing client must not kill the run
                    rec.update(status="failed", error=f"{type(err).__name__}: {err}")
                    console.print(f"[red]round {rnd}: client {ins.client_id} failed: {rec['error']}[/red]")
                    records.append(rec)
                    continue
                results.append(res)
                rec.update(
                    status="ok", num_samples=res.num_samples, steps=res.steps, train_loss=res.loss,
                    compute_seconds=res.compute_seconds,
                    virtual_seconds=client_seconds(res.compute_seconds, client.info.speed, ins.params, res.params),
                    metrics=res.metrics,
                )
                records.append(rec)
            params = strategy.aggregate_train(rnd, params, results)
            entry: dict[str, Any] = {"round": rnd, "accuracy": None, "loss": None, "clients": records,
                                     "strategy": strategy.round_report(rnd)}
            if rnd % config.run.eval_every == 0 or rnd == config.run.rounds:
                global_model.load_state_dict(params)
                entry["accuracy"], entry["loss"] = evaluate(global_model, data.test_x, data.test_y,
                                                            device=config.run.device)
            ok = [r for r in records if r["status"] == "ok"]
            entry["round_virtual_seconds"] = max((r["virtual_seconds"] for r in ok), default=0.0)
            virtual_total += entry["round_virtual_seconds"]
            entry["virtual_seconds"] = virtual_total
            entry["round_seconds"] = time.perf_counter() - t0
            entry["failed"] = len(records) - len(ok)
            rounds.append(entry)
            checkpoint.save(params, {"config": config.to_json(), "rounds": rounds, "strategy": strategy.state_dict()})
            acc = f"acc {entry['accuracy']:.4f}" if entry["accuracy"] is not None else ""
            bar.update(task, advance=1, description=f"round {rnd}/{config.run.rounds} {acc}")
            if on_round:
                on_round(entry)

    results = {
        "config": config.to_json(),
        "memfl": {"torch": torch.__version__},
        "full_peak_bytes": full_peak,
        "clients": [{"id": c.info.id, "device": c.info.device, "speed": c.info.speed,
                     "budget_bytes": c.info.budget_bytes, "num_samples": c.info.num_samples} for c in clients],
        "rounds": rounds,
        "summary": summarize(rounds),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from memfl.report import plot_accuracy

    plot_accuracy([results], out / "accuracy.png", labels=[config.run.method])
    return results
