"""The ClientApp: one SuperNode is one memfl client, training with memfl's LocalTrainer.

A SuperNode says who it is with ``--node-config`` (values are TOML-typed)::

    flower-supernode ... --node-config 'partition-id=3 num-partitions=10 memory-mb=512 device="rpi4-4gb"'

========================  =================================================================
``partition-id``          which client it is: its share of the data set (required)
``num-partitions``        how many shares the data set is cut into (default: ``memfl.run.clients``)
``memory-mb``             its training memory budget in MiB (float allowed)
``device``                its device profile name (``memfl.data.DEVICES``; unknown names keep speed 1)
``speed``                 relative compute speed, overriding the profile's
``data-dir``              where the data set lies on this machine (default: ``memfl.run.data_dir``)
``torch-device``          ``cpu`` or ``cuda`` (default: ``memfl.run.device``)
``enforce-budget``        ``true``: refuse a plan whose predicted peak exceeds ``memory-mb``
========================  =================================================================

With ``[run] enforce_budgets = true`` the training runs under an OS cap (``RLIMIT_DATA``, as in the
worker pool, :func:`memfl.runtime.pool.budget_cap`, with the pool's fixed mmap threshold) of
``memory-mb`` above the ClientApp's data size before training; an allocation past it ends the round
for this node with a ``MemoryError`` (the server records ``oom``). On a node whose
``torch-device`` is ``cuda`` the cap is the CUDA caching allocator's memory fraction instead
(:class:`memfl.runtime.cuda_cap.cuda_budget_cap`; untested here, no GPU).

A node with no ``memory-mb`` takes its device profile's usable memory, or, with no known device,
the memory the OS reports available now (``MemAvailable``). The node cuts its share with
:func:`memfl.server.setup.client_indices` (the ``run.samples_per_client`` draw, then the
partition, from the run's seed), so it trains on exactly the samples the simulator gives client
``partition-id``; it keeps that share in a file for the rest of the run
(``~/.cache/memfl/flower/run-ID/``), as every message starts a fresh ClientApp process.

Two handlers:

- ``query``: the node describes itself (partition, sample count, budget, device, input shape).
  The ServerApp asks before it plans: Flower tells the server nothing but random node ids.
- ``train``: one :class:`~memfl.core.protocol.Instruction` in, one :class:`~memfl.core.protocol.Result` out,
  plus what the node measured (its timings, its peak RSS during training).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, Mapping

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from memfl.config import Config, build_config
from memfl.runtime.faults import (
    ClientHang,
    InjectedCrash,
    allocate_past_budget,
    corrupt,
    draw_fault,
    simulated_oom,
)
from memfl.runtime.flower.appconfig import AppSettings
from memfl.runtime.flower.serde import (
    METRICS,
    content_to_instruction,
    info_to_content,
    result_to_content,
)
from memfl.runtime.procfs import reset_peak_rss, status_bytes

MB = 1 << 20
#: a ``hang`` fault sleeps this many seconds past the round timeout
HANG_MARGIN = 5.0


@dataclass(frozen=True)
class NodeSpec:
    """What one SuperNode declares (or is given) about itself."""

    partition_id: int
    num_partitions: int
    device: str
    speed: float
    budget_bytes: int
    budget_source: str  # "declared" | "profile" | "measured"
    data_dir: str | None = None
    torch_device: str = "cpu"
    enforce_budget: bool = False


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _flag(value: Any) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else bool(value)


def node_spec(node_config: Mapping[str, Any], config: Config) -> NodeSpec:
    """Read ``--node-config`` against the run's config; a clear ValueError for bad values."""
    from memfl.data import DEVICES

    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode declares no partition-id: start it with --node-config 'partition-id=I num-partitions=N ...'"
        )
    try:
        pid = int(node_config["partition-id"])
        parts = int(node_config.get("num-partitions", config.run.clients))
    except (TypeError, ValueError):
        raise ValueError(
            f"node-config partition-id / num-partitions must be integers, got {dict(node_config)}"
        ) from None
    if not 0 <= pid < parts:
        raise ValueError(f"node-config partition-id={pid} is outside 0..{parts - 1} (num-partitions={parts})")
    device = str(node_config.get("device", "unknown"))
    profile = DEVICES.get(device.strip().lower())
    speed = float(node_config.get("speed", profile.speed if profile else 1.0))
    if "memory-mb" in node_config:
        mb = float(node_config["memory-mb"])
        if mb <= 0:
            raise ValueError(f"node-config memory-mb must be positive, got {mb}")
        budget, source = int(round(mb * MB)), "declared"
    elif profile is not None:
        budget, source = int(profile.usable_bytes), "profile"
    else:
        avail = _mem_available()
        if avail is not None:
            budget, source = avail, "measured"
        else:
            budget, source = int(DEVICES["laptop-8gb"].usable_bytes), "profile"
    data_dir = node_config.get("data-dir")
    return NodeSpec(
        partition_id=pid,
        num_partitions=parts,
        device=device,
        speed=speed,
        budget_bytes=budget,
        budget_source=source,
        data_dir=str(data_dir) if data_dir else None,
        torch_device=str(node_config.get("torch-device", config.run.device)),
        enforce_budget=_flag(node_config.get("enforce-budget", False)),
    )  # other keys are ignored: a node may carry settings for other apps


# ----------------------------------------------------------------------------------- data
@lru_cache(maxsize=2)
def _dataset(config_json: str):
    from memfl.server.setup import load_data

    return load_data(build_config(json.loads(config_json)))


@lru_cache(maxsize=8)
def _indices(config_json: str, num_partitions: int):
    from memfl.server.setup import client_indices

    config = build_config(json.loads(config_json))
    data = _dataset(config_json)
    return client_indices(config, data.train_y.numpy(), num_partitions)


def client_data(
    config: Config, spec: NodeSpec, run_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]:
    """This node's training share ``(x, y)``, the input shape and the number of classes.

    With a ``run_id`` the share is kept in a file for the rest of the run: every Flower message
    starts a fresh ClientApp process, which would otherwise load and cut the whole data set again
    (seconds, and the whole set in memory, on a small device).
    """
    cfg = config.to_json()
    if spec.data_dir:
        cfg["run"]["data_dir"] = spec.data_dir
    key = json.dumps(cfg, sort_keys=True)
    path = _share_path(run_id, spec, key) if run_id is not None else None
    if path is not None and path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata()
                x, y = fh.get_tensor("x"), fh.get_tensor("y")
            return x, y, tuple(json.loads(meta["input_shape"])), int(meta["num_classes"])
        except Exception:  # noqa: BLE001 - a damaged cache file: cut the share again
            pass
    data = _dataset(key)
    idx = torch.as_tensor(_indices(key, spec.num_partitions)[spec.partition_id], dtype=torch.long)
    x, y = data.train_x[idx].contiguous(), data.train_y[idx].contiguous()
    if path is not None:
        _save_share(path, x, y, tuple(data.input_shape), int(data.num_classes))
    return x, y, tuple(data.input_shape), int(data.num_classes)


#: node shares of runs older than this are deleted when a new run starts
SHARE_MAX_AGE_SECONDS = 24 * 3600


def _share_path(run_id: int, spec: NodeSpec, config_key: str):
    import hashlib

    from memfl.data import cache_dir

    digest = hashlib.sha256(config_key.encode()).hexdigest()[:12]
    name = f"share-{spec.partition_id}-of-{spec.num_partitions}-{digest}.safetensors"
    return cache_dir("flower") / f"run-{run_id}" / name


def _save_share(path, x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...], classes: int) -> None:
    """Write the share atomically; drop the shares of old runs. Best effort: a read-only disk is fine."""
    try:
        from safetensors.torch import save_file

        if not path.parent.exists():
            for old in path.parent.parent.glob("run-*"):
                if time.time() - old.stat().st_mtime > SHARE_MAX_AGE_SECONDS:
                    for f in old.iterdir():
                        f.unlink(missing_ok=True)
                    old.rmdir()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(
            {"x": x, "y": y}, str(tmp), metadata={"input_shape": json.dumps(list(shape)), "num_classes": str(classes)}
        )
        tmp.replace(path)
    except OSError:
        pass


@lru_cache(maxsize=2)
def _trainer(config_json: str, input_shape: tuple[int, ...], num_classes: int, device: str):
    from memfl.core.registry import STRATEGIES
    from memfl.core.trainer import LocalTrainer
    from memfl.server.setup import make_context, model_builder

    config = build_config(json.loads(config_json))
    model_fn = model_builder(config, input_shape, num_classes)
    # as the server does: the strategy's model around the plain one (ScaleFL's output modules)
    ctx = make_context(config, input_shape, num_classes, model_fn)
    model_fn = STRATEGIES[config.run.method].wrap_model_fn(model_fn, ctx)
    return LocalTrainer(model_fn, device=device)


# -------------------------------------------------------------------------------- measuring
def process_age() -> float | None:
    """Seconds since this process started (Linux), to see what a fresh ClientApp costs."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


# -------------------------------------------------------------------------------- handlers
def settings_of(context: Context) -> AppSettings:
    return AppSettings.from_run_config(context.run_config)


def describe(context: Context) -> dict[str, Any]:
    """The node's answer to the server's query."""
    import flwr

    from memfl.core.version import __version__

    config = settings_of(context).config
    spec = node_spec(context.node_config, config)
    x, _, shape, classes = client_data(config, spec, context.run_id)
    return {
        **asdict(spec),
        "num_samples": len(x),
        "input_shape": list(shape),
        "num_classes": classes,
        "memory_mb": spec.budget_bytes / MB,
        "machine": platform.machine(),
        "versions": {"memfl": __version__, "torch": torch.__version__, "flwr": flwr.__version__},
    }


def train(message: Message, context: Context) -> Message:
    """Run the instruction in ``message`` with memfl's LocalTrainer; reply with the result.

    With ``[faults]`` in the run config the node injects the fault drawn for ``(seed, round,
    client)`` (:func:`memfl.runtime.faults.draw_fault`, the simulator's draw; the ServerApp draws the
    same one to record it): ``crash`` raises; ``nan``/``shape``/``inflate`` corrupt the reply (the
    server's validation rejects it); ``oom`` allocates past the budget (under the enforced cap a real
    allocation failure, otherwise a ``MemoryError`` raised at once); ``hang`` sleeps past the round
    timeout before raising, so the server times it out and the node then answers again."""
    t_enter = time.perf_counter()
    age = process_age()
    settings = settings_of(context)
    config = settings.config
    spec = node_spec(context.node_config, config)
    x, y, shape, classes = client_data(config, spec, context.run_id)
    t_data = time.perf_counter()
    ins = content_to_instruction(message.content)
    t_deser = time.perf_counter()
    if ins.client_id != spec.partition_id:
        raise ValueError(f"instruction for client {ins.client_id} reached the node of partition {spec.partition_id}")
    if spec.enforce_budget and ins.predicted_peak_bytes and ins.predicted_peak_bytes > spec.budget_bytes:
        raise MemoryError(
            f"plan {ins.plan.label} needs {ins.predicted_peak_bytes / MB:.1f} MiB, more than this "
            f"node's budget of {spec.budget_bytes / MB:.1f} MiB (enforce-budget=true)"
        )
    fault = draw_fault(config.faults, config.run.seed, ins.round, ins.client_id)
    if fault == "crash":
        raise InjectedCrash("injected crash")
    if fault == "hang":  # past the server's deadline, then free the node for the next message
        time.sleep(settings.round_timeout + HANG_MARGIN)
        raise ClientHang(f"injected hang: slept {settings.round_timeout + HANG_MARGIN:g} s")
    key = json.dumps(config.to_json(set_only=True), sort_keys=True)  # set keys: the server's defaults stay defaults
    trainer = _trainer(key, shape, classes, spec.torch_device)
    cap = None
    if config.run.enforce_budgets:  # the cap: memory-mb above this process's baseline (memfl.runtime.pool)
        from memfl.runtime.pool import budget_cap, fix_mmap_threshold, warm_up

        on_cuda = torch.device(spec.torch_device).type == "cuda"
        if on_cuda:  # the caching allocator's fraction (memfl.runtime.cuda_cap)
            from memfl.runtime.cuda_cap import cuda_budget_cap

            ctx: Any = cuda_budget_cap(spec.budget_bytes, spec.torch_device)
        else:  # RLIMIT_DATA, with the allocator the estimate is made for (memfl.runtime.pool)
            fix_mmap_threshold()
            ctx = budget_cap(spec.budget_bytes)
        warm_up(trainer, x, y, ins.hparams.batch_size)  # lazy imports and kernels, outside the cap
        with ctx as cap:
            try:
                if fault == "oom" and on_cuda:  # a host allocation would not meet the device's cap
                    simulated_oom(ins)
                elif fault == "oom":
                    allocate_past_budget(replace(ins, budget_bytes=spec.budget_bytes))
                res = trainer.fit(ins, x, y)
            except (MemoryError, RuntimeError) as err:
                ctx.failed(err)
                raise MemoryError(
                    f"out of memory under the enforced cap ({spec.budget_bytes / MB:.1f} MiB above a "
                    f"{cap.baseline_bytes / MB:.1f} MiB baseline; about {(cap.oom_at_bytes or 0) / MB:.1f} MiB "
                    f"needed): {err}"
                ) from None
        rss0, peak = cap.rss_before, (cap.rss_before or 0) + (cap.measured_peak_bytes or 0)
        res.measured_peak_bytes = cap.measured_peak_bytes
    else:
        if fault == "oom":  # no cap to stop a real allocation: the simulator's simulated oom
            simulated_oom(ins)
        rss0 = reset_peak_rss()
        res = trainer.fit(ins, x, y)
        peak = status_bytes("VmHWM") if rss0 is not None else None
    if fault is not None:
        res = corrupt(fault, res, ins.seed)
    t_fit = time.perf_counter()
    extra = {
        "partition_id": spec.partition_id,
        "device": spec.device,
        "budget_bytes": spec.budget_bytes,
        "budget_source": spec.budget_source,
        "instruction_budget_bytes": ins.budget_bytes,
        "rss_before_bytes": rss0,
        "rss_peak_bytes": peak,
        "process_age_seconds": age,
        "data_seconds": t_data - t_enter,
        "deserialize_seconds": t_deser - t_data,
        "fit_seconds": t_fit - t_deser,
        **(cap.record() if cap is not None else {}),
    }
    content = result_to_content(res, extra)
    content[METRICS]["serialize-seconds"] = time.perf_counter() - t_fit  # type: ignore[index]
    content[METRICS]["handler-seconds"] = time.perf_counter() - t_enter  # type: ignore[index]
    return Message(content, reply_to=message)


app = ClientApp()


@app.query()
def _query(message: Message, context: Context) -> Message:
    return Message(info_to_content(describe(context)), reply_to=message)


@app.train()
def _train(message: Message, context: Context) -> Message:
    return train(message, context)
