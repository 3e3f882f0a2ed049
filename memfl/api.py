"""The Python API: ``memfl.run``, ``memfl.estimate``, ``memfl.measure``, ``memfl.plan``.

>>> import memfl, torch
>>> def make_mlp(width: float = 1.0) -> torch.nn.Module:
...     h = max(1, int(64 * width))
...     return torch.nn.Sequential(torch.nn.Linear(20, h), torch.nn.ReLU(), torch.nn.Linear(h, 3))
>>> results = memfl.run(make_mlp, train=(x_train, y_train), test=(x_test, y_test),
...                     method="heterofl", clients=10, per_round=5, rounds=3)
>>> memfl.estimate(make_mlp(), (32, 20)).peak_bytes
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from memfl.config import Config, ConfigError, build_config, load_config
from memfl.core.protocol import Plan
from memfl.data import Dataset
from memfl.data.user import as_dataset
from memfl.memory import InputSpec, MemoryEstimate, MemoryMeasurement, input_spec
from memfl.memory import estimate as _estimate
from memfl.memory import measure as _measure
from memfl.methods.fedhybrid.planner import InfeasibleBudget
from memfl.models.user import accepts_width, call_builder

__all__ = ["InfeasibleBudget", "PlanResult", "estimate", "measure", "plan", "run"]

#: Methods that build width-scaled sub-models (their model_fn must take ``width``).
WIDTH_METHODS = ("heterofl",)


def _import_path(fn: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` when that path finds ``fn`` again (not for ``__main__``/locals)."""
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not mod or not qual or mod == "__main__" or "<" in qual:
        return None
    try:
        import importlib

        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return f"{mod}:{qual}" if obj is fn else None


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        config = load_config(config)
    if isinstance(config, dict):
        return {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    if hasattr(config, "to_json"):
        # the keys it set: an ``out`` the config object never set is no request to write there,
        # and a default memfl's method tells apart from an explicit value stays a default
        return config.to_json(set_only=True)
    raise TypeError(f"config must be a memfl Config, a dict or a TOML path, got {type(config).__name__}")


def run(
    model_fn: Callable[..., nn.Module] | None = None,
    train: Any = None,
    test: Any = None,
    *,
    method: str | None = None,
    config: Any = None,
    out: str | Path | None = None,
    num_classes: int | None = None,
    progress: bool = False,
    console: Any = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    runtime: str = "sim",
    secure: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Run a federated experiment on your own model and data; return the results dict.

    model_fn:    a zero-argument callable returning an ``nn.Module`` (logits ``(batch, classes)``);
                 for ``method="heterofl"`` it must take a ``width`` keyword (``make(width=0.5)``
                 builds the half-width sub-model: every parameter a leading slice of the full
                 model's). None: ``run.model`` of the config (a shipped name or an import path).
    train, test: each ``(x, y)`` (tensors or arrays) or a ``torch.utils.data.Dataset`` of
                 ``(input, label)``; inputs ``(N, ...)`` of any shape and dtype (feature vectors,
                 images of any size, int64 token ids ...), labels integer class indices. Or
                 ``train=`` a :class:`memfl.data.Dataset`. None: ``run.dataset`` of the config.
    method:      ``fedavg``, ``exclusive``, ``heterofl``, ``scalefl``, ``fedhybrid``, ... (``run.method``).
    config:      a base :class:`memfl.config.Config`, a nested dict or a TOML path; the keyword
                 arguments are applied over it.
    out:         the output folder (``results.json``, checkpoint, plot); None: a temporary folder,
                 deleted afterwards (the dict is still returned).
    num_classes: default ``max label + 1``.
    progress, console, on_round: as :func:`memfl.runtime.sim.run_experiment` (simulator only).
    runtime:     ``"sim"`` (the in-process simulator) or ``"flower-local"``: a Flower SuperLink and
                 one SuperNode per client on 127.0.0.1 (:func:`memfl.runtime.flower.local.run_local`);
                 ClientApps are other processes, so the model and the data must then be named by
                 import path (a module-level function, or ``run.model`` / ``run.dataset`` in the
                 config), not passed as tensors.
    secure:      with ``runtime="flower-local"``: TLS and SuperNode authentication with throw-away
                 keys (``memfl flower local --secure``).
    settings:    any ``[run]`` or ``[train]`` key as a keyword (``clients=100, rounds=20,
                 partition="iid", budgets="relative:0.1-1.1", seed=1, lr=0.05, max_steps=10``...;
                 the two sections share no key name) and any section as a dict (``scalefl={...}``,
                 ``fedhybrid={...}``, ``run={...}``; ``train={...}`` only when the data come from
                 the config, since ``train=`` is otherwise the training data).

    Returns the same dict as ``results.json``: ``config``, ``clients``, ``rounds`` (per round
    ``accuracy``, ``loss``, ``clients`` with each one's ``plan``, ...), ``summary``...
    Raises :class:`~memfl.config.ConfigError` naming the key for bad settings,
    :class:`~memfl.data.DataError` for bad data, TypeError for a bad ``model_fn``.
    """
    from memfl.runtime.sim import run_experiment

    data = _config_dict(config)
    if isinstance(train, dict):  # train={...}: the [train] section (data then comes from the config)
        settings = {"train": train, **settings}
        train = None
    sections = set(Config.model_fields)
    run_keys = set(Config.model_fields["run"].annotation.model_fields)
    train_keys = set(Config.model_fields["train"].annotation.model_fields)
    for key, value in settings.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"invalid configuration (memfl.run): {key}: expected a dict of "
                    f"[{key}] keys, got {type(value).__name__}"
                )
            data.setdefault(key, {}).update(value)
        elif key in run_keys:
            data.setdefault("run", {})[key] = value
        elif key in train_keys:
            data.setdefault("train", {})[key] = value
        else:
            raise ConfigError(
                f"invalid configuration (memfl.run): {key}: unknown setting; expected a [run] key "
                f"({', '.join(sorted(run_keys))}), a [train] key ({', '.join(sorted(train_keys))}) or a "
                f"section dict ({', '.join(sorted(sections))}=dict(...))"
            )
    run_section = data.setdefault("run", {})
    if method is not None:
        run_section["method"] = method
    if model_fn is not None:
        if isinstance(model_fn, nn.Module) or not callable(model_fn):
            raise TypeError(
                "model_fn must be a zero-argument callable returning an nn.Module (a "
                "function or class), not a model instance: e.g. memfl.run(lambda: MyNet(), ...)"
            )
        run_section["model"] = _import_path(model_fn) or "custom"
    dataset: Dataset | None = None
    if train is not None or test is not None:
        dataset = as_dataset(train, test, num_classes=num_classes)
        from memfl.data import DATASETS

        run_section["dataset"] = dataset.name if dataset.name in (*DATASETS, "synthetic") else "custom"
    tmp: tempfile.TemporaryDirectory | None = None
    if out is not None:
        run_section["out"] = str(out)
    elif "out" not in run_section:
        tmp = tempfile.TemporaryDirectory(prefix="memfl-run-")
        run_section["out"] = tmp.name
    try:
        chosen = run_section.get("method")
        if model_fn is not None and chosen in WIDTH_METHODS and not accepts_width(model_fn):
            name = getattr(model_fn, "__name__", "model_fn")
            raise TypeError(
                f"method {chosen!r} trains width-scaled sub-models, so model_fn must take a "
                f"`width` keyword: define `def {name}(width=1.0): ...` scaling the hidden sizes by "
                f"width (e.g. nn.Linear(F, int(64 * width))), or choose another method"
            )
        cfg = build_config(data, source="memfl.run")
        build: Callable[[Plan], nn.Module] | None = None
        if model_fn is not None:
            build = _builder(model_fn, cfg, dataset)
        if runtime == "flower-local":
            return _run_on_flower(cfg, model_fn, dataset, secure=secure)
        if runtime != "sim":
            raise ValueError(f"runtime {runtime!r}: expected 'sim' or 'flower-local'")
        if secure:
            raise ValueError("secure=True is for runtime='flower-local' (the simulator sends nothing over a network)")
        return run_experiment(cfg, data=dataset, model_fn=build, console=console, progress=progress, on_round=on_round)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run_on_flower(
    cfg: Config, model_fn: Callable[..., nn.Module] | None, dataset: Dataset | None, *, secure: bool
) -> dict[str, Any]:
    """``runtime="flower-local"``: every client a SuperNode on 127.0.0.1 (other processes, which
    rebuild the model and the data from the config's import paths)."""
    if dataset is not None:
        raise ValueError(
            "runtime='flower-local' runs every client in its own process, which cannot receive "
            "tensors from this one: name the data by import path (config run.dataset = "
            "'package.module:function' returning (train, test)) instead of passing train=/test="
        )
    if cfg.run.model == "custom":
        raise ValueError(
            f"runtime='flower-local': {getattr(model_fn, '__name__', 'model_fn')} cannot be imported "
            "by the ClientApps (a lambda, a local function or one defined in __main__); define it "
            "at module level in an importable module, or set run.model = 'package.module:function'"
        )
    from memfl.runtime.flower.local import run_local

    return run_local(cfg, cfg.run.clients, secure=secure)


def _builder(model_fn: Callable[..., nn.Module], cfg: Config, dataset: Dataset | None) -> Callable[[Plan], nn.Module]:
    """plan -> the user's model (``width`` for width plans), tagged with the input spec."""
    spec = input_spec(None, dataset.example) if dataset is not None and dataset.example is not None else None

    def build(plan: Plan) -> nn.Module:
        width = cfg.run.model_width * (plan.width if plan.kind == "width" else 1.0)
        model = call_builder(model_fn, width)
        if spec is not None:
            model.memfl_input_spec = spec
        return model

    if dataset is not None:
        _check_model(build, dataset)
    return build


def _check_model(build: Callable[[Plan], nn.Module], data: Dataset) -> None:
    """A forward on two training inputs: a clear error now rather than every client failing."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = build(Plan())
        model.eval()
        try:
            logits = model(data.train_x[:2])
        except Exception as err:
            raise ValueError(
                f"model_fn's model fails on the training inputs (a batch of shape "
                f"{tuple(data.train_x[:2].shape)}, {data.train_x.dtype}): "
                f"{type(err).__name__}: {err}"
            ) from err
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != min(2, data.num_train):
        raise ValueError(
            f"model_fn's model must return logits (batch, classes); got "
            f"{getattr(logits, 'shape', type(logits).__name__)} for a batch of 2"
        )
    if logits.shape[1] < data.num_classes:
        raise ValueError(
            f"model_fn's model has {logits.shape[1]} outputs but the labels have {data.num_classes} classes"
        )


def _as_model(model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        return call_builder(model)
    raise TypeError(f"expected an nn.Module or a zero-argument model builder, got {type(model).__name__}")


def estimate(
    model: nn.Module | Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    *,
    optimizer: str = "sgd",
    plan: Plan | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    example: torch.Tensor | InputSpec | None = None,
) -> MemoryEstimate:
    """Predict the peak memory (bytes) of one local training step, without training.

    model:       an ``nn.Module`` (left untouched: a copy is profiled) or a zero-argument builder.
    input_shape: the input *batch* shape, batch first: ``(32, 20)`` for 32 feature vectors,
                 ``(32, 3, 32, 48)`` for images, ``(32, 128)`` for token ids.
    optimizer, momentum, weight_decay: the local optimizer (``"sgd"`` or ``"adam"``).
    plan:        a training plan (default full training; e.g. a FedHybrid plan from :func:`plan`).
    example:     training inputs (or an :class:`~memfl.memory.InputSpec`) the random batch is drawn
                 like: integer inputs give ids in their value range. Default standard normal (or
                 ids when the model starts with an ``nn.Embedding``).

    Returns a :class:`~memfl.memory.MemoryEstimate`: ``peak_bytes`` and ``breakdown()`` (parameters,
    gradients, optimizer state, activations, transient, overhead).
    """
    return _estimate(
        _as_model(model),
        tuple(input_shape),
        optimizer=optimizer,
        plan=plan,
        momentum=momentum,
        weight_decay=weight_decay,
        example=example,
    )


def measure(
    model_fn: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    *,
    optimizer: str = "sgd",
    plan: Plan | None = None,
    steps: int = 3,
    device: str = "cpu",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    example: torch.Tensor | InputSpec | None = None,
    timeout: float = 600,
) -> MemoryMeasurement:
    """Measure the real peak memory of ``steps`` training steps of ``model_fn()`` in a fresh process.

    model_fn:    a *picklable* zero-argument builder (a module-level function or class, or a
                 ``functools.partial`` of one; not a lambda). The measurement runs in a spawned
                 child that imports your script: call this under ``if __name__ == "__main__":``.
    input_shape: the input batch shape, batch first (as :func:`estimate`).
    example:     as :func:`estimate` (only its dtype and value range travel to the child).
    Other arguments: as :func:`memfl.memory.measure`.

    Returns a :class:`~memfl.memory.MemoryMeasurement` (``peak_bytes`` over the baseline,
    ``step_seconds``...); raises :class:`~memfl.memory.MeasurementError` if the child fails.
    """
    spec = input_spec(None, example) if example is not None and not isinstance(example, InputSpec) else example
    return _measure(
        model_fn,
        tuple(input_shape),
        optimizer=optimizer,
        plan=plan,
        steps=steps,
        device=device,
        momentum=momentum,
        timeout=timeout,
        weight_decay=weight_decay,
        example=spec,
    )


@dataclass
class PlanResult:
    """What :func:`plan` found.

    plan:            the :class:`~memfl.core.protocol.Plan` to train under (``full`` when the
                     model fits as it is), e.g. for ``estimate(..., plan=r.plan)``.
    choice:          the planner's :class:`~memfl.methods.fedhybrid.planner.PlanChoice` (per-segment
                     modes, predicted peak, added seconds, budget).
    profile:         the model's :class:`~memfl.methods.fedhybrid.profile.ModelProfile`.
    full_peak_bytes: the estimated peak of plain full training.
    """

    plan: Plan
    choice: Any
    profile: Any
    full_peak_bytes: int

    @property
    def predicted_peak_bytes(self) -> int:
        return int(self.choice.predicted_peak_bytes)


def plan(
    model_fn: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    budget: int | str,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    speed: float = 1.0,
    timing: bool = True,
    auto: bool = False,
    stage: int | None = None,
    **kw: Any,
) -> PlanResult:
    """FedHybrid's planner: the cheapest per-segment plan (recompute / compress / full) whose peak
    fits ``budget``; with ``auto=True`` the combined planner over every plan kind instead (full,
    hybrid, ScaleFL stage, stage+hybrid, micro-batched: :func:`memfl.methods.combined.auto_plan`,
    ``stage`` the federation's current stage, ``kw`` its options such as ``micro_batches``,
    ``blocks``, ``margin``); ``choice`` is then its :class:`~memfl.methods.combined.AutoPlan`
    (chosen plan and every candidate weighed) and ``InfeasibleBudget`` names the smallest budget
    any kind fits.

    model_fn:    a zero-argument model builder.
    input_shape: the input batch shape, batch first (as :func:`estimate`).
    budget:      bytes (an int), ``"300MB"`` / ``"300"`` (MB = 2**20), or ``"0.5x"`` (a fraction of
                 the full-training peak).
    speed:       the device's speed relative to this machine (scales the added seconds).
    timing:      also time the segments (False: memory structure only, faster).
    kw:          passed to :func:`memfl.methods.fedhybrid.solve.solve_for_model` (``margin``,
                 ``min_bits``, ...).

    Returns a :class:`PlanResult`. Raises ValueError for a bad budget text.
    """
    from memfl.methods.fedhybrid.solve import solve_for_model

    if not callable(model_fn) or isinstance(model_fn, nn.Module):
        raise TypeError("plan: model_fn must be a zero-argument model builder, not a model instance")
    if auto:
        from memfl.methods.combined import auto_plan

        result = auto_plan(
            model_fn,
            tuple(input_shape),
            budget,
            stage=stage,
            optimizer=optimizer,
            momentum=momentum,
            speed=speed,
            timing=timing,
            **kw,
        )
        return PlanResult(result.plan, result, result.profile, int(result.full_peak_bytes))
    if stage is not None:
        raise ValueError("plan: stage= needs auto=True (FedHybrid's planner plans the whole model)")
    choice, profile, full_peak = solve_for_model(
        model_fn, tuple(input_shape), budget, optimizer=optimizer, momentum=momentum, speed=speed, timing=timing, **kw
    )
    return PlanResult(choice.plan, choice, profile, int(full_peak))
