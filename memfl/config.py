"""Typed run configuration, loaded from TOML and/or command-line flags.

A config file has one table per section::

    [run]
    method = "memfl"           # memfl (default) | fedavg | exclusive | scalefl | fedhybrid | ...
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

    [aggregation]              # optional: robust aggregation and the update-norm bound
    rule = "fedavg"            # fedavg | trimmed-mean | median
    trim = 0.1
    clip_norm = 10.0
    max_update_norm = 100.0

    [faults]                   # optional: injected faults, probability per client and round
    crash = 0.05               # also nan, shape, inflate, oom, hang (memfl.runtime.faults)

Unknown keys and wrong types are refused with a :class:`ConfigError` that names the key
(``run.clients``) and says what it expects. Validation is pydantic's (``extra="forbid"``, strict
types); this module only turns its errors into one readable message.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

import memfl.methods  # noqa: F401  -- every shipped method registers its strategy and config section
from memfl.core.aggregate import AggregationConfig
from memfl.core.config import ConfigError, Section
from memfl.core.registry import CONFIG_SECTIONS, STRATEGIES
from memfl.data.devices import parse_budget_spec
from memfl.data.partition import parse_partition

__all__ = [
    "AggregationConfig",
    "Config",
    "ConfigError",
    "FaultsConfig",
    "RunConfig",
    "TrainConfig",
    "build_config",
    "load_config",
    "parse_deadline",
    "parse_faults",
    "with_overrides",
]


def parse_deadline(value: str | float | None) -> tuple[str, float] | None:
    """``[run] round_deadline`` -> ``("factor", 2.0)`` for ``"2x"`` (a multiple of the round's
    expected duration, >= 1), ``("seconds", 30.0)`` for ``30``, ``30.0``, ``"30"`` or ``"30s"``
    (virtual seconds), ``None`` for ``None`` / ``"none"`` (no deadline: a silent client costs
    its round nothing)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, bool):
        raise ValueError("expected '2x' (a multiple of the expected round time), seconds, or 'none'")
    text = str(value).strip().lower()
    kind = "factor" if text.endswith("x") else "seconds"
    try:
        number = float(text.removesuffix("x").removesuffix("s"))
    except ValueError:
        raise ValueError(
            f"round_deadline {value!r}: expected '2x' (a multiple of the expected round time), "
            f"seconds (30 or '30s'), or 'none'"
        ) from None
    if not math.isfinite(number) or number <= 0 or (kind == "factor" and number < 1):
        raise ValueError(f"round_deadline {value!r}: a factor must be >= 1 ('2x'), seconds > 0")
    return kind, number


class RunConfig(Section):
    """Who trains what, where, for how long."""

    method: str = "memfl"
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    clients: int = Field(100, ge=1)
    per_round: int = Field(10, ge=1)
    rounds: int = Field(5, ge=1)
    eval_every: int = Field(1, ge=1)
    partition: str = "dirichlet:0.5"
    #: the federation holds clients x N training images drawn (seeded) from the training set, then
    #: partitioned as configured; None: the whole training set (memfl.server.setup.build_federation)
    samples_per_client: int | None = Field(None, ge=1)
    budgets: str = "profiles"
    seed: int = 0
    out: str = "results/run"
    device: Literal["cpu", "cuda"] = "cpu"
    model_width: float = Field(1.0, gt=0, le=1)
    #: a silent (``timeout``) or killed (``oom``) client costs its round this much on the virtual
    #: clock: "2x" the round's expected duration, seconds, or None/"none" (costs nothing)
    round_deadline: str | float | None = None
    #: clients train in this many worker processes (memfl.runtime.pool), each with cores / workers
    #: torch threads; "auto" (default): one per core (torch.get_num_threads(), so OMP_NUM_THREADS
    #: counts; in this process where fork is missing, on CUDA or with one core); 1: in this
    #: process, one after the other
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    #: each client's training runs under an OS memory cap (RLIMIT_DATA) of its round budget above
    #: the worker's baseline; past it the client is ``oom`` (always in a worker process)
    enforce_budgets: bool = False

    @field_validator("round_deadline")
    @classmethod
    def _deadline(cls, v: str | float | None) -> str | float | None:
        parse_deadline(v)
        return v

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
        if v not in STRATEGIES:
            raise ValueError(f"unknown method {v!r}; expected one of {', '.join(sorted(STRATEGIES))}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        from memfl.data.user import import_object
        from memfl.models import MODEL_NAMES

        if ":" in v:  # "package.module:function", a user model builder
            import_object(v, "run.model")
            return v
        if v not in MODEL_NAMES and v != "custom":
            raise ValueError(
                f"unknown model {v!r}; expected one of {', '.join(MODEL_NAMES)}, "
                f"or 'package.module:function' (a model builder)"
            )
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from memfl.data import DATASETS
        from memfl.data.user import import_object

        if ":" in v:  # "package.module:function" returning (train, test) or a Dataset
            import_object(v, "run.dataset")
            return v
        if v not in DATASETS and v not in ("synthetic", "custom"):
            raise ValueError(
                f"unknown dataset {v!r}; expected one of {', '.join(DATASETS)}, "
                f"synthetic, or 'package.module:function' (returning the data)"
            )
        return v

    @model_validator(mode="after")
    def _width_builder(self) -> "RunConfig":
        """HeteroFL builds width-scaled sub-models: a user builder must take ``width``."""
        if self.method == "heterofl" and ":" in self.model:
            from memfl.data.user import import_object
            from memfl.models.user import accepts_width

            if not accepts_width(import_object(self.model, "run.model")):
                raise ValueError(
                    f"run.model {self.model!r} takes no `width` keyword, which method "
                    f"heterofl needs to build width-scaled sub-models; add a "
                    f"`width=1.0` parameter that scales the hidden sizes"
                )
        return self


class TrainConfig(Section):
    """Local training hyper-parameters (the authors' released settings are the defaults)."""

    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    max_steps: int | None = Field(None, ge=1)
    prox_mu: float = Field(0.0, ge=0)


FAULT_KINDS = ("crash", "nan", "shape", "inflate", "oom", "hang")


class FaultsConfig(Section):
    """``[faults]``: the probability that a client is given each fault in a round (at most one per
    client and round, drawn from (seed, round, client); :mod:`memfl.runtime.faults`). All 0: none.

    crash: the client raises (``failed``); nan: a NaN in one tensor; shape: one tensor of a wrong
    shape; inflate: a huge ``num_samples`` (the three ``rejected`` by validation); oom: allocates
    past its budget (``oom``); hang: never answers (``timeout``, costs the round its deadline).
    """

    crash: float = Field(0.0, ge=0, le=1)
    nan: float = Field(0.0, ge=0, le=1)
    shape: float = Field(0.0, ge=0, le=1)
    inflate: float = Field(0.0, ge=0, le=1)
    oom: float = Field(0.0, ge=0, le=1)
    hang: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _total(self) -> "FaultsConfig":
        if sum(self.rates().values()) > 1 + 1e-9:
            raise ValueError("the fault probabilities add up to more than 1")
        return self

    def rates(self) -> dict[str, float]:
        """kind -> probability, in the fixed order of :data:`FAULT_KINDS`."""
        return {k: getattr(self, k) for k in FAULT_KINDS}

    @property
    def active(self) -> bool:
        return any(v > 0 for v in self.rates().values())


def parse_faults(text: str) -> dict[str, float]:
    """``"crash:0.05,nan:0.05"`` -> ``{"crash": 0.05, "nan": 0.05}`` (the ``--faults`` flag;
    a kind without a rate, ``"hang"``, means 1)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, rate = part.partition(":")
        kind = kind.strip()
        if kind not in FAULT_KINDS:
            raise ConfigError(f"--faults {text!r}: unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        try:
            out[kind] = float(rate) if rate else 1.0
        except ValueError:
            raise ConfigError(f"--faults {text!r}: {part!r} needs a probability, e.g. {kind}:0.05") from None
    return out


class _Config(Section):
    """``[run]``, ``[train]``, ``[aggregation]`` and ``[faults]``; :data:`Config` adds one table per
    registered method section."""

    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)

    def to_json(self, *, set_only: bool = False) -> dict[str, Any]:
        """The configuration as plain JSON data: every key (``results.json``), or with
        ``set_only`` only the keys that were set (what :func:`build_config` needs to rebuild this
        config *with the same set fields*: a default some method tells apart from an explicit
        value, such as ``[scalefl] blocks`` for memfl's method, survives the round trip)."""
        return self.model_dump(mode="json", exclude_unset=set_only)

    def section(self, name: str | None) -> Section | None:
        """The typed table ``name`` (a method's section), or None."""
        return None if name is None else getattr(self, name)


#: The whole configuration: ``[run]``, ``[train]`` and one table per method section that a method
#: registered (``[scalefl]``, ``[heterofl]``, ``[fedhybrid]``; :func:`memfl.core.registry.register_method`).
#: Built once, when this module is imported, after ``memfl.methods`` has registered the shipped methods.
Config = create_model(
    "Config",
    __base__=_Config,
    __module__=__name__,
    **{name: (section, Field(default_factory=section)) for name, section in CONFIG_SECTIONS.items()},
)


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
    data = config.to_json(set_only=True)
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return build_config(data, source="command line")
