"""Typed run configuration, loaded from TOML and/or command-line flags.

A config file has one table per section::

    [run]
    method = "fedavg"          # fedavg | exclusive | ...
    model = "cnn"
    dataset = "fashion-mnist"
    clients = 100
    per_round = 10
    rounds = 5
    partition = "dirichlet:0.5"
    budgets = "profiles"       # profiles | relative:LO-HI | mb:LO-HI
    seed = 0

    [train]
    local_epochs = 1
    batch_size = 32
    lr = 0.01

Unknown keys and wrong types are refused with a :class:`ConfigError` that names the key
(``run.clients``) and says what it expects. Validation is pydantic's (``extra="forbid"``, strict
types); this module only turns its errors into one readable message.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memfl.data.devices import parse_budget_spec
from memfl.data.partition import parse_partition


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class RunConfig(_Section):
    """Who trains what, where, for how long."""

    method: str = "fedavg"
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    clients: int = Field(100, ge=1)
    per_round: int = Field(10, ge=1)
    rounds: int = Field(5, ge=1)
    eval_every: int = Field(1, ge=1)
    partition: str = "dirichlet:0.5"
    budgets: str = "profiles"
    seed: int = 0
    out: str = "results/run"
    device: Literal["cpu", "cuda"] = "cpu"
    model_width: float = Field(1.0, gt=0, le=1)

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        parse_partition(v)
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: str) -> str:
        parse_budget_spec(v)
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from memfl.strategies import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown method {v!r}; expected one of {', '.join(sorted(STRATEGIES))}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        from memfl.models import MODEL_NAMES

        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; expected one of {', '.join(MODEL_NAMES)}")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from memfl.data import DATASETS

        if v not in DATASETS and v != "synthetic":
            raise ValueError(f"unknown dataset {v!r}; expected one of {', '.join(DATASETS)}")
        return v


class TrainConfig(_Section):
    """Local training hyper-parameters (the authors' released settings are the defaults)."""

    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    max_steps: int | None = Field(None, ge=1)
    prox_mu: float = Field(0.0, ge=0)


class ScaleFLConfig(_Section):
    """``method = "scalefl"``: sequential block-wise training (SPEC 2, docs/SCALEFL.md)."""

    blocks: int = Field(4, ge=1)  # T
    partition: Literal["default", "balanced"] = "default"  # balanced: equalise activation memory
    mentor: bool = True  # the Curriculum Mentor's nHSIC terms
    harmonizer: bool = True  # co-train block t-1's last layer with block t
    schedule: Literal["elastic", "cyclic"] = "elastic"
    r_min: int = Field(3, ge=1)  # elastic: rounds a stage runs at least
    r_max: int | None = Field(None, ge=1)  # elastic: at most (None: run.rounds // blocks)
    plateau: float = Field(0.02, ge=0)  # advance when the loss improves < this fraction per round
    window: int = Field(3, ge=2)  # rounds the plateau slope is fitted over
    # the mentor's nHSIC(X,Z) and nHSIC(Y,P) weights, [first block, last block] (docs/SCALEFL.md)
    beta: list[float] = Field(default_factory=lambda: [0.0, 0.1], min_length=2, max_length=2)
    gamma: list[float] = Field(default_factory=lambda: [0.3, 0.1], min_length=2, max_length=2)
    sigma: float = Field(5.0, gt=0)  # Gaussian kernel width


class HeteroFLConfig(_Section):
    """``method = "heterofl"``: the width fractions a client may train (largest that fits wins)."""

    widths: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125], min_length=1)


class FedHybridConfig(_Section):
    """``method = "fedhybrid"`` (and the baselines ``oort``, ``random``, ``oort+fedprox``): SPEC 3,
    docs/FEDHYBRID.md."""

    selection: Literal["fedhybrid", "oort", "random"] = "fedhybrid"  # fedhybrid's selector
    contention: bool = False  # per-round budgets from contention traces + the budget predictor
    predictor_quantile: float = Field(0.005, gt=0, lt=0.5)  # target violation rate of the predictor
    margin: float = Field(0.03, ge=0, lt=0.5)  # plans peak at most budget x (1 - margin)
    bits: list[int] = Field(default_factory=lambda: [8, 4, 2], min_length=1)  # compression widths
    min_bits: int = Field(2, ge=1, le=8)  # accuracy guard: no segment compressed below this
    mixed: bool = True  # channel-wise mixed bits (False: uniform)
    recompute: bool = True  # allow recomputation
    plan_levels: int = Field(16, ge=2)  # budgets the server pre-solves plans for
    prox_mu: float = Field(0.01, ge=0)  # oort+fedprox's proximal term (when train.prox_mu is 0)
    explore: float = Field(0.9, ge=0, le=1)  # initial exploration share of the picks
    explore_decay: float = Field(0.98, gt=0, le=1)
    explore_min: float = Field(0.2, ge=0, le=1)
    # random / oort / oort+fedprox: "aware" sends only clients whose predicted budget fits full
    # training; "unaware" (the paper's memory-unaware baselines) sends any client, and the simulator
    # kills (status "oom") one whose real budget is below the full-training peak -- needs contention
    baseline_memory: Literal["aware", "unaware"] = "aware"

    @model_validator(mode="after")
    def _unaware_needs_contention(self) -> "FedHybridConfig":
        if self.baseline_memory == "unaware" and not self.contention:
            raise ValueError("baseline_memory = \"unaware\" needs contention = true: only with contention "
                             "traces does the simulator kill a client whose real budget is below its peak")
        return self


class Config(_Section):
    """The whole configuration: ``[run]`` and ``[train]`` tables (``[scalefl]``, ``[heterofl]``,
    ``[fedhybrid]`` for those methods)."""

    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scalefl: ScaleFLConfig = Field(default_factory=ScaleFLConfig)
    heterofl: HeteroFLConfig = Field(default_factory=HeteroFLConfig)
    fedhybrid: FedHybridConfig = Field(default_factory=FedHybridConfig)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            allowed = _allowed_keys(section)
            lines.append(f"  {key}: unknown key; expected one of: {', '.join(allowed)}")
        elif kind == "missing":
            lines.append(f"  {key}: required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            lines.append(f"  {key}: {msg} (got {got!r})")
    return "\n".join(lines)


def _allowed_keys(section: Any) -> list[str]:
    model = Config
    if section is not None and section in Config.model_fields:
        model = Config.model_fields[section].annotation  # type: ignore[assignment]
    return list(model.model_fields)  # type: ignore[union-attr]


def build_config(data: dict[str, Any] | None = None, source: str = "defaults") -> Config:
    """Validate a nested dict (as read from TOML) into a :class:`Config`."""
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML file (``None``: the defaults)."""
    if path is None:
        return build_config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return build_config(data, source=str(path))


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy with ``{"run.clients": 10, ...}`` applied and validated."""
    data = config.to_json()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return build_config(data, source="command line")
