"""memfl's Flower apps on Flower's own simulation engine (``flwr[simulation]``, Ray): for comparing
memfl's executors with it (``memfl bench executor``), not a runtime of its own.

``flwr.simulation.run_simulation`` (flwr 1.41) takes a ServerApp, a ClientApp and a number of
SuperNodes but no run config, while memfl's apps read the whole memfl config from
``context.run_config`` (:class:`~memfl.runtime.flower.appconfig.AppSettings`). The two apps here are
memfl's with one step first: the run config travels in the environment variable
:data:`ENV` (set in the driver; Ray's workers inherit it) and is merged into
the context before memfl's handler runs. Each simulated node gets ``partition-id`` /
``num-partitions`` from Flower, which is what memfl's ClientApp reads to pick its partition.

Needs ``pip install "flwr[simulation]==1.41.0"`` (ray 2.55.1; torch unchanged); it is not a
dependency of memfl.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from memfl.config import Config
from memfl.runtime.flower import client_app as memfl_client
from memfl.runtime.flower.appconfig import AppSettings

#: the environment variable holding the flat run config (JSON)
ENV = "MEMFL_FLOWER_SIM_RUN_CONFIG"


class _WithRunConfig:
    """``context`` with ``run_config`` replaced (Flower's Context refuses changes to it)."""

    def __init__(self, context: Context, run_config: dict[str, Any]) -> None:
        self._context, self.run_config = context, run_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _inject(context: Context) -> Any:
    """``context`` whose run config is memfl's (from :data:`ENV`) merged under Flower's own."""
    flat = json.loads(os.environ.get(ENV, "{}"))
    return _WithRunConfig(context, {**flat, **dict(context.run_config)})


server_app = ServerApp()


@server_app.main()
def _server(grid: Grid, context: Context) -> None:
    from memfl.runtime.flower.server_app import FlowerServer

    FlowerServer(grid, AppSettings.from_run_config(_inject(context).run_config)).run()


client_app = ClientApp()


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    return memfl_client._query(message, _inject(context))


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    return memfl_client._train(message, _inject(context))


def run(config: Config, *, cpus_per_node: float = 1.0, **runtime: Any) -> None:
    """Run ``config`` (``run.clients`` SuperNodes) on Flower's simulation engine; ``results.json``
    lands in ``config.run.out`` as for every memfl runtime. ``runtime``: AppSettings' waits."""
    from flwr.simulation import run_simulation

    settings = AppSettings(config=config, min_nodes=config.run.clients, **runtime)
    os.environ[ENV] = json.dumps(settings.to_run_config())
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=config.run.clients,
        backend_config={
            # Ray's workers inherit the driver's environment (Flower sets runtime_env itself)
            "client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0},
        },
    )
