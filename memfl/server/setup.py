"""The server side of an experiment, built the same way by every runtime: the data, the model
builder, the federation (partitions, devices, budgets), the strategy and a resumed checkpoint.

The same seeds in the same order on every runtime, so the simulator and the Flower ServerApp
start from the same parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from memfl.config import Config
from memfl.core.protocol import HyperParams, Plan
from memfl.core.registry import CONFIG_SECTIONS, METHOD_SECTIONS, STRATEGIES
from memfl.core.strategy import ClientInfo, FederationContext, Strategy
from memfl.data import Dataset, assign_budgets, load_dataset, make_synthetic, partition
from memfl.data.user import import_object, load_user_dataset
from memfl.memory import estimate, input_spec
from memfl.models import build_model
from memfl.models.user import call_builder
from memfl.server.checkpoint import Checkpoint


@dataclass
class SimClient:
    """One simulated client: its data and its device."""

    info: ClientInfo
    x: torch.Tensor
    y: torch.Tensor


def model_builder(config: Config, input_shape: tuple[int, ...], num_classes: int) -> Callable[[Plan], torch.nn.Module]:
    """plan -> fresh model of the configured architecture (width-scaled for ``width`` plans).

    ``run.model`` is a shipped model name (built for ``(C, H, W)`` images of ``input_shape``) or
    ``"package.module:function"``: a user builder called with no argument, or with
    ``width=model_width * plan width`` when it takes a ``width`` keyword (HeteroFL sub-models).
    """
    name = config.run.model
    if name == "custom":
        raise ValueError(
            "run.model 'custom' stands for a model_fn given to memfl.run(); to build the "
            "model from a config set run.model to 'package.module:function'"
        )
    if ":" in name:
        fn = import_object(name, "run.model")

        def build_user(plan: Plan) -> torch.nn.Module:
            width = config.run.model_width * (plan.width if plan.kind == "width" else 1.0)
            return call_builder(fn, width, name=f"run.model {name!r}")

        return build_user
    if len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} is built for (C, H, W) images; the data has inputs of shape "
            f"{tuple(input_shape)} (bring a model for them: run.model = 'package.module:function' "
            f"or memfl.run(model_fn, ...))"
        )

    def build(plan: Plan) -> torch.nn.Module:
        width = config.run.model_width * (plan.width if plan.kind == "width" else 1.0)
        return build_model(
            config.run.model,
            in_channels=input_shape[0],
            num_classes=num_classes,
            image_size=input_shape[-1],
            width=width,
        )

    return build


def load_data(config: Config) -> Dataset:
    """The configured dataset (``synthetic`` is a small generated set for smoke tests;
    ``"package.module:function"`` is user data: :func:`memfl.data.load_user_dataset`)."""
    if config.run.dataset == "synthetic":
        return make_synthetic(num_train=max(2000, 20 * config.run.clients), num_test=500, seed=config.run.seed)
    if ":" in config.run.dataset:
        return load_user_dataset(config.run.dataset)
    if config.run.dataset == "custom":
        raise ValueError(
            "run.dataset 'custom' stands for data given to memfl.run(); to load it from a "
            "config set run.dataset to 'package.module:function'"
        )
    return load_dataset(config.run.dataset, config.run.data_dir)


def client_indices(config: Config, labels: np.ndarray, num_clients: int | None = None) -> list[np.ndarray]:
    """Each client's training-set indices, the same in every runtime (the simulator, Flower nodes).

    ``labels``: the whole training set's labels; ``num_clients``: how many shares (default
    ``run.clients``). ``run.samples_per_client = N``: first draw ``clients x N`` training samples
    (seeded by ``run.seed``, without replacement), then partition those; None partitions the whole
    training set. ValueError when the training set is too small for ``clients x N``."""
    clients = config.run.clients if num_clients is None else num_clients
    pool = None
    n_per = config.run.samples_per_client
    if n_per is not None:
        want = clients * n_per
        if want > len(labels):
            raise ValueError(
                f"run.samples_per_client = {n_per}: {clients} clients x {n_per} = {want} samples, "
                f"but the training set has {len(labels)}"
            )
        pool = np.sort(np.random.default_rng([config.run.seed, 0x5A3C]).permutation(len(labels))[:want])
        labels = labels[pool]
    parts = partition(labels, clients, config.run.partition, seed=config.run.seed)
    if pool is not None:
        parts = [pool[p] for p in parts]
    return parts


def build_federation(config: Config, data: Dataset, full_peak: int) -> list[SimClient]:
    """Partition the data (:func:`client_indices`) and give every client a device profile and a memory budget."""
    parts = client_indices(config, data.train_y.numpy())
    devices = assign_budgets(config.run.budgets, config.run.clients, full_peak_bytes=full_peak, seed=config.run.seed)
    clients = []
    for cid, (idx, (device, budget)) in enumerate(zip(parts, devices)):
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        info = ClientInfo(
            id=cid, num_samples=len(idx), device=device.name, speed=device.speed, budget_bytes=int(budget)
        )
        clients.append(SimClient(info=info, x=data.train_x[idx_t], y=data.train_y[idx_t]))
    return clients


def hyperparams(config: Config) -> HyperParams:
    t = config.train
    return HyperParams(
        local_epochs=t.local_epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        prox_mu=t.prox_mu,
        max_steps=t.max_steps,
    )


def make_context(
    config: Config,
    input_shape: tuple[int, ...],
    num_classes: int,
    model_fn: Callable[[Plan], torch.nn.Module],
    *,
    example: torch.Tensor | None = None,
) -> FederationContext:
    """The strategy's view of the task; predicted peaks are memoised per plan.

    ``example``: training inputs the estimates draw their random inputs like (integer token ids:
    their value range; :mod:`memfl.memory.inputs`); None (float inputs) keeps the default.
    """
    spec = input_spec(None, example) if example is not None else None

    @lru_cache(maxsize=256)
    def peak(plan_json: str) -> int:
        plan = Plan.from_json(json.loads(plan_json))
        model = model_fn(plan)
        shape = (config.train.batch_size, *input_shape)
        return estimate(
            model,
            shape,
            optimizer=config.train.optimizer,
            plan=plan,
            momentum=config.train.momentum,
            weight_decay=config.train.weight_decay,
            example=spec,
        ).peak_bytes

    return FederationContext(
        model_fn=model_fn,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        hparams=hyperparams(config),
        per_round=config.run.per_round,
        seed=config.run.seed,
        peak_fn=lambda plan: peak(json.dumps(plan.to_json(), sort_keys=True)),
        rounds=config.run.rounds,
        settings=config.section(METHOD_SECTIONS[config.run.method]),
        aggregation=config.aggregation,
        sections={name: config.section(name) for name in CONFIG_SECTIONS},
    )


@dataclass
class ServerSetup:
    """The server side of an experiment, built the same way by both runtimes."""

    model_fn: Callable[[Plan], torch.nn.Module]  # what clients build (wrapped by the strategy)
    full_peak: int  # estimated full-training peak at the configured batch
    strategy: Strategy
    global_model: torch.nn.Module  # the initial global model (on the CPU)
    params: dict[str, torch.Tensor]  # the global parameters to start the next round from
    rounds: list[dict[str, Any]]  # rounds already done (from the checkpoint), else []


def set_up_server(
    config: Config,
    input_shape: tuple[int, ...],
    num_classes: int,
    checkpoint: Checkpoint,
    *,
    model_fn: Callable[[Plan], torch.nn.Module] | None = None,
    example: torch.Tensor | None = None,
) -> ServerSetup:
    """Model builder, initial global model, context and strategy -- same seeds, same order in the
    simulator and the Flower ServerApp, so both start from the same parameters -- then the
    parameters, rounds and strategy state of ``checkpoint`` when it holds a run to resume.
    ``example``: as :func:`make_context` (e.g. ``data.example``)."""
    model_fn = model_fn or model_builder(config, input_shape, num_classes)
    torch.manual_seed(config.run.seed)
    global_model = model_fn(Plan())
    ctx = make_context(config, input_shape, num_classes, model_fn, example=example)
    full_peak = ctx.peak_fn(Plan())
    strategy: Strategy = STRATEGIES[config.run.method](ctx)
    wrapped = strategy.wrap_model_fn(model_fn, ctx)
    if wrapped is not model_fn:  # the global model holds more than the model (ScaleFL: output modules, heads)
        model_fn = wrapped
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
