"""The embedded in-process simulator (the default runtime).

``run_experiment(config)`` builds the federation (data partitions, device profiles, budgets), then
for each round asks the strategy for instructions, runs each selected client's
:class:`~memfl.engine.trainer.LocalTrainer` in this process, merges the results and evaluates
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
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memfl.config import Config, ConfigError
from memfl.data import Dataset, assign_budgets, load_dataset, make_synthetic, partition
from memfl.engine.trainer import LocalTrainer, evaluate
from memfl.memory import estimate
from memfl.memory.budget import federation_budgets
from memfl.models import build_model
from memfl.protocol import HyperParams, Plan, Result
from memfl.strategies import STRATEGIES, ClientInfo, FederationContext, Strategy

#: assumed uplink/downlink bandwidth for the virtual clock (megabits per second)
BANDWIDTH_MBPS = 20.0
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


@dataclass
class SimClient:
    """One simulated client: its data and its device."""

    info: ClientInfo
    x: torch.Tensor
    y: torch.Tensor


def model_builder(config: Config, input_shape: tuple[int, ...], num_classes: int) -> Callable[[Plan], torch.nn.Module]:
    """plan -> fresh model of the configured architecture (width-scaled for ``width`` plans)."""

    def build(plan: Plan) -> torch.nn.Module:
        width = config.run.model_width * (plan.width if plan.kind == "width" else 1.0)
        return build_model(config.run.model, in_channels=input_shape[0], num_classes=num_classes,
                           image_size=input_shape[-1], width=width)

    return build


def load_data(config: Config) -> Dataset:
    """The configured dataset (``synthetic`` is a small generated set for smoke tests)."""
    if config.run.dataset == "synthetic":
        return make_synthetic(num_train=max(2000, 20 * config.run.clients), num_test=500, seed=config.run.seed)
    return load_dataset(config.run.dataset, config.run.data_dir)


def build_federation(config: Config, data: Dataset, full_peak: int) -> list[SimClient]:
    """Partition the data and give every client a device profile and a memory budget."""
    parts = partition(data.train_y.numpy(), config.run.clients, config.run.partition, seed=config.run.seed)
    devices = assign_budgets(config.run.budgets, config.run.clients, full_peak_bytes=full_peak, seed=config.run.seed)
    clients = []
    for cid, (idx, (device, budget)) in enumerate(zip(parts, devices)):
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        info = ClientInfo(id=cid, num_samples=len(idx), device=device.name, speed=device.speed, budget_bytes=int(budget))
        clients.append(SimClient(info=info, x=data.train_x[idx_t], y=data.train_y[idx_t]))
    return clients


def hyperparams(config: Config) -> HyperParams:
    t = config.train
    return HyperParams(local_epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                       weight_decay=t.weight_decay, optimizer=t.optimizer, prox_mu=t.prox_mu, max_steps=t.max_steps)


def make_context(config: Config, input_shape: tuple[int, ...], num_classes: int,
                 model_fn: Callable[[Plan], torch.nn.Module]) -> FederationContext:
    """The strategy's view of the task; predicted peaks are memoised per plan."""

    @lru_cache(maxsize=256)
    def peak(plan_json: str) -> int:
        plan = Plan.from_json(json.loads(plan_json))
        model = model_fn(plan)
        shape = (config.train.batch_size, *input_shape)
        return estimate(model, shape, optimizer=config.train.optimizer, plan=plan,
                        momentum=config.train.momentum, weight_decay=config.train.weight_decay).peak_bytes

    return FederationContext(
        model_fn=model_fn, input_shape=tuple(input_shape), num_classes=num_classes,
        hparams=hyperparams(config), per_round=config.run.per_round, seed=config.run.seed,
        peak_fn=lambda plan: peak(json.dumps(plan.to_json(), sort_keys=True)),
        options=config.to_json(),
    )


def _transfer_seconds(n_bytes: int) -> float:
    return n_bytes * 8 / (BANDWIDTH_MBPS * 1e6)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _same_experiment(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``current`` continues the run ``saved`` describes: every saved setting but
    ``run.rounds`` is unchanged (settings a newer memfl added, absent from ``saved``, are ignored)."""
    for section, values in saved.items():
        now = current.get(section, {})
        for key, value in values.items():
            if (section, key) != ("run", "rounds") and now.get(key) != value:
                return False
    return True


class Checkpoint:
    """The global model + results so far in ``out``; written atomically after every round.

    Loading checks that the folder holds the same experiment (any setting but ``run.rounds`` may
    not change), so a finished run can also be extended by asking for more rounds.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tensors = out / CHECKPOINT_TENSORS
        self.state = out / CHECKPOINT_STATE

    def load(self, config: Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if not self.state.exists():
            return None
        from safetensors.torch import load_file

        state = json.loads(self.state.read_text())
        if not _same_experiment(state.get("config", {}), config.to_json()):
            raise ConfigError(
                f"{self.out} holds a run with a different configuration; "
                "use another --out folder, or delete that folder to start over")
        if len(state["rounds"]) > config.run.rounds:
            raise ConfigError(
                f"{self.out} already holds {len(state['rounds'])} rounds, more than run.rounds = "
                f"{config.run.rounds}; ask for at least that many rounds or use another --out folder")
        return load_file(str(self.tensors)), state

    def save(self, params: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tmp_t = self.tensors.with_name(self.tensors.name + ".tmp")
        tmp_s = self.state.with_name(self.state.name + ".tmp")
        save_file({k: v.contiguous() for k, v in params.items()}, str(tmp_t))
        tmp_s.write_text(json.dumps(state))
        tmp_t.replace(self.tensors)
        tmp_s.replace(self.state)


@dataclass
class ServerSetup:
    """The server side of an experiment, built the same way by both runtimes."""

    model_fn: Callable[[Plan], torch.nn.Module]  # what clients build (wrapped by the strategy)
    full_peak: int  # estimated full-training peak at the configured batch
    strategy: Strategy
    global_model: torch.nn.Module  # the initial global model (on the CPU)
    params: dict[str, torch.Tensor]  # the global parameters to start the next round from
    rounds: list[dict[str, Any]]  # rounds already done (from the checkpoint), else []


def set_up_server(config: Config, input_shape: tuple[int, ...], num_classes: int,
                  checkpoint: Checkpoint) -> ServerSetup:
    """Model builder, initial global model, context and strategy -- same seeds, same order in the
    simulator and the Flower ServerApp, so both start from the same parameters -- then the
    parameters, rounds and strategy state of ``checkpoint`` when it holds a run to resume."""
    model_fn = model_builder(config, input_shape, num_classes)
    torch.manual_seed(config.run.seed)
    global_model = model_fn(Plan())
    ctx = make_context(config, input_shape, num_classes, model_fn)
    full_peak = ctx.peak_fn(Plan())
    strategy: Strategy = STRATEGIES[config.run.method](ctx)
    wrap = getattr(strategy, "wrap_model_fn", None)
    if wrap is not None:  # the global model holds more than the model (ScaleFL: output modules, heads)
        model_fn = wrap(model_fn, config.to_json())
        torch.manual_seed(config.run.seed)
        global_model = model_fn(Plan())
    params = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    rounds: list[dict[str, Any]] = []
    resumed = checkpoint.load(config)
    if resumed is not None:
        params, state = resumed
        rounds = state["rounds"]
        strategy.load_state_dict(state.get("strategy", {}))
    return ServerSetup(model_fn, full_peak, strategy, global_model, params, rounds)


def run_experiment(config: Config, *, console: Console | None = None, progress: bool = True,
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

    data = load_data(config)
    checkpoint = Checkpoint(out)
    setup = set_up_server(config, data.input_shape, data.num_classes, checkpoint)
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
                down = _nbytes({k: ins.params[k] for k in ins.params})
                rec.update(
                    status="ok", num_samples=res.num_samples, steps=res.steps, train_loss=res.loss,
                    compute_seconds=res.compute_seconds,
                    virtual_seconds=res.compute_seconds / client.info.speed
                    + _transfer_seconds(down + _nbytes(res.params)),
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


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best accuracy, total virtual time and failures over ``rounds``."""
    evaluated = [r for r in rounds if r["accuracy"] is not None]
    return {
        "rounds": len(rounds),
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "virtual_seconds": rounds[-1]["virtual_seconds"] if rounds else 0.0,
        "wall_seconds": sum(r["round_seconds"] for r in rounds),
        "failed_clients": sum(r["failed"] for r in rounds),
        "budget_violations": sum(1 for r in rounds for c in r["clients"] if c.get("budget_violation")),
        "participants": sum(len(r["clients"]) for r in rounds),
    }
