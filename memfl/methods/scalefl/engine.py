"""The ``"stage"`` engine: one ScaleFL client's training step for stage t (SPEC 2.2-2.4).

:func:`prepare_stage` is the engine for ``Plan(kind="stage", stage=t)``. Blocks before t are frozen
and run under ``torch.no_grad()`` in eval mode (no saved activations, no BN statistics update;
``frozen_bn = "train"``: train mode, as the authors' code); the
Training Harmonizer (:mod:`memfl.methods.scalefl.harmonizer`) co-trains block t-1's last layer
with block t. The loss is ``CE(O_t(z_t), y)`` plus the Curriculum Mentor's
:func:`~memfl.methods.scalefl.mentor.mentor_terms` (``beta_t nHSIC(X, Z_t) - gamma_t nHSIC(Y, P_t)``).
The trainable set is block t, ``O_t`` (or the head at t = T), ``P_t`` when the mentor's gamma term
is on, and the boundary layer; ``TrainStep.module`` holds only what stage t uses (blocks 1..t,
``O_t``/head, ``P_t``): that is what the memory estimate counts, as a real client that received only
those tensors.

Plan options (``plan.options``; all optional): ``blocks`` (T, default 4), ``partition``
(``"default"``/``"balanced"``) and ``batch_size`` (what ``balanced`` balances for, default 32),
``input_shape`` (one sample's shape, for a model that does not record it in ``arch``), ``mentor``
(bool, default True), ``beta``/``gamma`` (``[first, last]`` curriculum, see
:func:`memfl.methods.scalefl.mentor.coefficients`), ``lambda1``/``lambda2`` (the authors' per-stage
form, replacing beta/gamma: :func:`~memfl.methods.scalefl.mentor.stage_coefficients`), ``sigma``,
``nhsic_scale`` (``"raw"``, default, or ``"rms"``), ``harmonizer`` (bool, default True),
``recompute_tail`` (bool, default True), ``frozen_bn`` (``"eval"``, default: frozen blocks use
running statistics; ``"train"``: batch statistics, as the authors' code), ``exit_width``
(``"light"``/``"model"``) and ``projection`` (``"light"``/``"authors"``) for a model the engine
adopts (a :class:`ScaleFLModel` keeps its own), ``metrics`` (bool, default True: report
nHSIC(X, Z_t), nHSIC(Y, Z_t), nHSIC(Y, P_t)).
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch
from torch import nn

from memfl.core.engine import TrainStep
from memfl.core.protocol import Plan
from memfl.methods.scalefl.harmonizer import HarmonizedTail, harmonizer_for
from memfl.methods.scalefl.mentor import SIGMA, mentor_terms, nhsic, one_hot, stage_coefficients
from memfl.methods.scalefl.model import ScaleFLModel
from memfl.methods.scalefl.output import pool_features

#: mentor defaults (first block, last block), chosen by the search in docs/SCALEFL.md
DEFAULT_BETA = (0.0, 0.0)
DEFAULT_GAMMA = (1.0, 1.0)


class StageModule(nn.Module):
    """What a stage-t client holds: blocks 1..t, O_t (or the head) and P_t (memory accounting)."""

    def __init__(self, units: list[nn.Module], out: nn.Module, proj: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.out = out
        self.proj = proj


def scalefl_options(plan: Plan) -> dict[str, Any]:
    """The stage plan's options with their defaults (see the module docstring)."""
    o = dict(plan.options or {})
    return {
        "blocks": int(o.get("blocks", 4)),
        "partition": o.get("partition", "default"),
        "batch_size": int(o.get("batch_size", 32)),
        "input_shape": tuple(o["input_shape"]) if o.get("input_shape") else None,
        "mentor": bool(o.get("mentor", True)),
        "beta": tuple(o.get("beta", DEFAULT_BETA)),
        "gamma": tuple(o.get("gamma", DEFAULT_GAMMA)),
        "lambda1": [float(v) for v in o["lambda1"]] if o.get("lambda1") is not None else None,
        "lambda2": [float(v) for v in o["lambda2"]] if o.get("lambda2") is not None else None,
        "sigma": float(o.get("sigma", SIGMA)),
        "nhsic_scale": o.get("nhsic_scale", "raw"),
        "harmonizer": bool(o.get("harmonizer", True)),
        "recompute_tail": bool(o.get("recompute_tail", True)),
        "frozen_bn": o.get("frozen_bn", "eval"),
        "exit_width": o.get("exit_width", "light"),
        "projection": o.get("projection", "light"),
        "metrics": bool(o.get("metrics", True)),
    }


def as_scalefl(model: nn.Module, plan: Plan) -> ScaleFLModel:
    """``model`` itself when it is a :class:`ScaleFLModel` (checked against the plan's T), else a
    ScaleFLModel adopting its modules (fresh output modules; for memory accounting and tests),
    cached on ``model``."""
    opts = scalefl_options(plan)
    if isinstance(model, ScaleFLModel):
        if "blocks" in (plan.options or {}) and opts["blocks"] != model.blocks_count:
            raise ValueError(f"plan asks for {opts['blocks']} blocks but the model is cut into {model.blocks_count}")
        for key in ("exit_width", "projection"):  # a ScaleFLModel keeps its own heads: refuse a mismatch
            if key in (plan.options or {}) and opts[key] != getattr(model, key, "light"):
                raise ValueError(
                    f"plan asks for {key} {opts[key]!r} but the model has {getattr(model, key, 'light')!r}"
                )
        return model
    cached = getattr(model, "_scalefl_view", None)
    key = (
        opts["blocks"],
        opts["partition"],
        opts["batch_size"],
        opts["input_shape"],
        opts["exit_width"],
        opts["projection"],
    )
    if cached is not None and cached[0] == key:
        return cached[1]
    view = ScaleFLModel(
        model,
        opts["blocks"],
        mode=opts["partition"],
        batch_size=opts["batch_size"],
        input_shape=opts["input_shape"],
        exit_width=opts["exit_width"],
        projection=opts["projection"],
    )
    object.__setattr__(model, "_scalefl_view", (key, view))  # not a submodule: no state-dict change
    return view


#: ``wrap`` of :func:`prepare_stage`: the stage's ``[(unit name, module)]`` with grad (the harmonized
#: tail's units, then the trained block's) -> (a function running them in order on the frozen
#: prefix's output, an optional saved-tensors context factory for the step)
StageWrap = Callable[
    [list[tuple[str, nn.Module]]], tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], ContextManager] | None]
]


def stage_segments(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module]]:
    """The units of stage ``plan.stage`` that run with grad, in forward order: the harmonized tail
    of block t-1 (when the harmonizer is on) then block t's units, as ``(unit name, module)`` --
    what a ``wrap`` of :func:`prepare_stage` receives (names as in :func:`memfl.models.units`)."""
    sm = as_scalefl(model, plan)
    opts = scalefl_options(plan)
    t = int(plan.stage)
    if not 1 <= t <= sm.blocks_count:
        raise ValueError(f"stage {t} out of range: the model is cut into {sm.blocks_count} blocks")
    harm = harmonizer_for(sm, sm.partition, t, opts["harmonizer"])
    names = list(harm.tail_units) + list(sm.partition.groups[t - 1])
    return [(u, sm.get_submodule(u)) for u in names]


def prepare_stage(model: nn.Module, plan: Plan, *, wrap: StageWrap | None = None) -> TrainStep:
    """The ``"stage"`` engine: train ScaleFL stage ``plan.stage`` of ``model`` (see module doc).

    model: a :class:`ScaleFLModel` (or a model it can adopt, see :func:`as_scalefl`). Returns the
    :class:`TrainStep`; raises ValueError for a stage outside 1..T.

    wrap: how the units with grad run (:data:`StageWrap`; default: the harmonized tail as one
    checkpoint when ``recompute_tail``, then the trained units as they are). Given, it receives
    :func:`stage_segments`' list and its runner replaces both (the tail's train/eval modes are
    still set by the engine); its context becomes ``TrainStep.saved_tensors``. The combined
    engine (:mod:`memfl.methods.combined.engine`) passes one running them under a hybrid plan."""
    sm = as_scalefl(model, plan)
    opts = scalefl_options(plan)
    T, t = sm.blocks_count, int(plan.stage)
    if not 1 <= t <= T:
        raise ValueError(f"stage {t} out of range: the model is cut into {T} blocks")
    part = sm.partition
    names = dict(sm.named_parameters())
    param_name = {id(p): n for n, p in names.items()}

    harm = harmonizer_for(sm, part, t, opts["harmonizer"])
    out_module = sm.get_submodule(part.head) if t == T else sm.exits[str(t)]
    mentor = opts["mentor"]
    if opts["nhsic_scale"] not in ("raw", "rms"):
        raise ValueError(f"scalefl nhsic_scale {opts['nhsic_scale']!r}: expected 'raw' or 'rms'")
    if opts["frozen_bn"] not in ("eval", "train"):
        raise ValueError(f"scalefl frozen_bn {opts['frozen_bn']!r}: expected 'eval' or 'train'")
    rms = opts["nhsic_scale"] == "rms"
    frozen_train = opts["frozen_bn"] == "train"
    beta_t, gamma_t = (
        stage_coefficients(t, T, opts["beta"], opts["gamma"], opts["lambda1"], opts["lambda2"])
        if mentor
        else (0.0, 0.0)
    )
    proj = sm.projs[str(t)] if (mentor and gamma_t != 0.0) else None

    trained_units = list(part.groups[t - 1])
    trainable: list[tuple[str, nn.Parameter]] = []
    for u in trained_units:
        trainable += [(f"{u}.{n}", p) for n, p in sm.get_submodule(u).named_parameters()]
    trainable += [(n, p) for n, p in names.items() if harm.owns(n)]
    for mod in (out_module, proj):
        if mod is not None:
            trainable += [(param_name[id(p)], p) for p in mod.parameters()]
    sent_buffers = [k for k, _ in sm.named_buffers() if part.block_of(k) == t or harm.owns(k)]

    wanted = {id(p) for _, p in trainable}
    for p in sm.parameters():
        p.requires_grad_(id(p) in wanted)

    frozen_mods = [sm.get_submodule(u) for u in harm.frozen_units]
    tail = HarmonizedTail(sm, harm, recompute=opts["recompute_tail"])
    trained_mods = [sm.get_submodule(u) for u in trained_units]
    run_grad, saved_tensors = (None, None)
    if wrap is not None:
        segs = [(u, sm.get_submodule(u)) for u in list(harm.tail_units) + trained_units]
        run_grad, saved_tensors = wrap(segs)
    stash: dict[str, torch.Tensor] = {}
    sums = {"nhsic_xz": 0.0, "nhsic_yz": 0.0, "nhsic_yp": 0.0, "batches": 0}

    def forward(x: torch.Tensor) -> torch.Tensor:
        training = trained_mods[0].training if trained_mods else True
        if training:
            for m in frozen_mods:
                m.train(frozen_train)  # "train": batch statistics, as the authors' code
            tail.set_modes(frozen_train)
        h = x
        with torch.no_grad():
            for m in frozen_mods:
                h = m(h)
        if run_grad is not None:
            h = run_grad(h)
        else:
            if tail:
                h = tail(h)
            for m in trained_mods:
                h = m(h)
        if t == T:
            z, pooled = h, pool_features(h)
            logits = out_module(h)
        else:
            z, pooled = out_module.features(h)
            logits = out_module.fc(pooled)
        stash["z"], stash["pooled"] = z, pooled
        return logits

    def extra_loss(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        z, pooled = stash.pop("z"), stash.pop("pooled")
        if x.shape[0] < 2:
            return logits.new_zeros(())
        yh = one_hot(y, sm.num_classes)
        p = proj(pooled) if proj is not None else None
        terms = mentor_terms(x, z, yh, p, beta_t, gamma_t, opts["sigma"], rms)
        if opts["metrics"]:
            with torch.no_grad():
                xf, zf = x.reshape(x.shape[0], -1), z.reshape(z.shape[0], -1)
                xz = terms.nhsic_xz
                sums["nhsic_xz"] += float(xz.detach() if xz is not None else nhsic(xf, zf, opts["sigma"], rms))
                sums["nhsic_yz"] += float(nhsic(yh, zf, opts["sigma"], rms))
                if terms.nhsic_yp is not None:
                    sums["nhsic_yp"] += float(terms.nhsic_yp.detach())
                sums["batches"] += 1
        return terms.loss

    def metrics() -> dict[str, Any]:
        n = sums["batches"]
        out: dict[str, Any] = {
            "stage": t,
            "block": t,
            "beta_t": beta_t,
            "gamma_t": gamma_t,
            "harmonized": harm.boundary,
        }
        if n:
            out["nhsic_xz"] = sums["nhsic_xz"] / n
            out["nhsic_yz"] = sums["nhsic_yz"] / n
            if proj is not None:
                out["nhsic_yp"] = sums["nhsic_yp"] / n
        return out

    held = StageModule([sm.get_submodule(u) for g in part.groups[:t] for u in g], out_module, proj)
    return TrainStep(
        module=held,
        trainable=trainable,
        forward=forward,
        extra_loss=extra_loss if (mentor or opts["metrics"]) else None,
        sent_buffers=sent_buffers,
        metrics=metrics,
        saved_tensors=saved_tensors,
    )
