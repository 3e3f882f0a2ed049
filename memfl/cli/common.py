"""What the sub-commands share: the console, usage errors, shapes, the run flags, model factories
and the command-line form of plans."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Callable

from rich.console import Console

console = Console(stderr=True)


class UsageError(ValueError):
    """A command-line value is wrong; printed without a traceback."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> ``(3, 32, 32)``."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input {text!r}: expected CxHxW, e.g. 1x28x28 or 3x32x32") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input {text!r}: expected CxHxW with three positive integers, e.g. 3x32x32")
    return shape


def workers_arg(text: str) -> int | str:
    """``--workers N`` or ``--workers auto`` (one per core)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of worker processes or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 worker, got {n}")
    return n


RUN_FLAGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    # flag: (config key, type)
    "method": ("run.method", str),
    "model": ("run.model", str),
    "dataset": ("run.dataset", str),
    "data_dir": ("run.data_dir", str),
    "clients": ("run.clients", int),
    "per_round": ("run.per_round", int),
    "rounds": ("run.rounds", int),
    "eval_every": ("run.eval_every", int),
    "partition": ("run.partition", str),
    "samples_per_client": ("run.samples_per_client", int),
    "budgets": ("run.budgets", str),
    "seed": ("run.seed", int),
    "out": ("run.out", str),
    "device": ("run.device", str),
    "local_epochs": ("train.local_epochs", int),
    "batch_size": ("train.batch_size", int),
    "lr": ("train.lr", float),
    "max_steps": ("train.max_steps", int),
    "model_width": ("run.model_width", float),
    # worker processes (memfl.runtime.pool): N, or auto = one per core; 1 = in this process
    "workers": ("run.workers", workers_arg),
    "round_deadline": ("run.round_deadline", str),
    # [aggregation] (docs/ARCHITECTURE.md, "Untrusted clients")
    "aggregation": ("aggregation.rule", str),
    # method = scalefl (docs/SCALEFL.md)
    "schedule": ("scalefl.schedule", str),
    "blocks": ("scalefl.blocks", int),
    "cut": ("scalefl.partition", str),
    # method = fedhybrid (docs/FEDHYBRID.md)
    "selection": ("fedhybrid.selection", str),
    "rest": ("memfl.rest", str),  # memfl: last-stage | sit-out (the end-to-end phase)
}

#: on/off switches: flag -> (config key, value it sets)
RUN_SWITCHES: dict[str, tuple[str, bool]] = {
    "no_mentor": ("scalefl.mentor", False),
    "no_harmonizer": ("scalefl.harmonizer", False),
    "enforce_budgets": ("run.enforce_budgets", True),
}


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags shared by ``memfl run`` and the other runtimes."""
    p.add_argument("--config", help="TOML config file (flags override it)")
    for flag, (key, typ) in RUN_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None, help=f"overrides {key}")
    for flag, (key, value) in RUN_SWITCHES.items():
        p.add_argument(
            "--" + flag.replace("_", "-"),
            dest=flag,
            action="store_const",
            const=value,
            default=None,
            help=f"sets {key} = {str(value).lower()}",
        )
    p.add_argument(
        "--faults",
        default=None,
        metavar="KIND:P,...",
        help="inject faults, e.g. crash:0.05,nan:0.05,shape:0.05,inflate:0.05,oom:0.05,hang:0.05 "
        "(sets the [faults] section; kinds not named get 0)",
    )


def config_from_args(args: argparse.Namespace):
    from memfl.config import load_config, with_overrides

    config = load_config(args.config)
    overrides = {key: getattr(args, flag, None) for flag, (key, _) in RUN_FLAGS.items()}
    overrides.update({key: getattr(args, flag, None) for flag, (key, _) in RUN_SWITCHES.items()})
    if getattr(args, "faults", None) is not None:
        from memfl.config import FAULT_KINDS, parse_faults

        rates = parse_faults(args.faults)
        overrides.update({f"faults.{kind}": rates.get(kind, 0.0) for kind in FAULT_KINDS})
    return with_overrides(config, overrides)


def model_factory(name: str, shape: tuple[int, ...], classes: int) -> Callable:
    """A picklable ``() -> model`` for the memory measurer."""
    from memfl.models import MODEL_NAMES, build_model

    if name not in MODEL_NAMES:
        raise UsageError(f"--model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return partial(build_model, name, in_channels=shape[0], num_classes=classes, image_size=shape[-1])


def parse_plan(text: str, **context: Any):
    """Plan from its command-line form (``full``, ``stage:T``, ``width:W``).

    ``context`` (model_fn, input_shape, optimizer) is what a budget-driven plan needs to be solved.
    """
    from memfl.core.protocol import Plan

    if text.startswith("budget:"):  # FedHybrid: the fastest hybrid plan under budget X (docs/FEDHYBRID.md)
        from memfl.methods.fedhybrid.planner import InfeasibleBudget
        from memfl.methods.fedhybrid.solve import solve_for_model

        try:
            choice, _, _ = solve_for_model(
                context["model_fn"],
                context["input_shape"],
                text[len("budget:") :],
                optimizer=context.get("optimizer", "sgd"),
                timing=True,
            )
        except (InfeasibleBudget, ValueError) as err:
            raise UsageError(f"--plan {text}: {err}") from None
        return choice.plan
    try:
        return Plan.parse(text)
    except ValueError as err:
        raise UsageError(f"--plan: {err}") from None
