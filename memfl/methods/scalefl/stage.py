"""ScaleFL stage models and the ``"stage"`` engine (SPEC 2.2-2.4).

:class:`ScaleFLModel` is the global model of a ScaleFL federation: the original model's modules,
adopted under their own names (so the state-dict keys of the blocks and the head are unchanged),
plus the persistent extra parameters ScaleFL needs:

- ``exits.<t>`` -- the output module ``O_t`` of stage t < T (:class:`OutputModule`): for a CNN one
  strided 3x3 conv per missing downsampling stage (no BN/ReLU; by default keeping block t's channel
  count, see :func:`_exit_channels`), global average pooling and a linear classifier; for a
  Transformer a LayerNorm and a linear head on mean-pooled tokens. Stage T uses the model's real
  head.
- ``projs.<t>`` -- the projection head ``P_t`` of the Curriculum Mentor (a small MLP on the pooled
  feature), t = 1..T.
- ``exit_stage`` -- a buffer naming the exit the model answers with: 0 (or T) is the full model,
  s < T is ``[block_1 .. block_s, O_s]``. The server sets it to the deepest stage trained so far, so
  evaluating the global model during stage s measures the model clients are actually building.

Everything lives in the model's state dict, so the server stores, aggregates, checkpoints and
resumes output modules and projection heads exactly like the blocks.

:func:`prepare_stage` is the engine for ``Plan(kind="stage", stage=t)``. Blocks before t are frozen
and run under ``torch.no_grad()`` in eval mode (no saved activations, no BN statistics update); with
the Training Harmonizer the last layer of block t-1 (:meth:`Partition.boundary_layers`) trains with
block t: the units of block t-1 before it run without grad, the unit that holds it runs with grad
(only the boundary layer's parameters require it) under a non-reentrant checkpoint, so it keeps
only its input and is recomputed in the backward (``recompute_tail``, default on: co-training the
layer then costs one saved tensor instead of the unit's activations). The trainable set is block t, ``O_t`` (or the
head at t = T), ``P_t`` when the mentor is on, and the boundary layer; ``TrainStep.module`` holds only
what stage t uses (blocks 1..t, ``O_t``/head, ``P_t``): that is what the memory estimate counts, as a
real client that received only those tensors.

Plan options (``plan.options``; all optional): ``blocks`` (T, default 4), ``partition``
(``"default"``/``"balanced"``) and ``batch_size`` (what ``balanced`` balances for, default 32), ``mentor`` (bool, default True), ``beta``/``gamma`` (``[first,
last]`` curriculum, see :func:`memfl.methods.scalefl.mentor.coefficients`), ``sigma``, ``harmonizer`` (bool, default
True), ``recompute_tail`` (bool, default True), ``metrics`` (bool, default True: report nHSIC(X, Z_t), nHSIC(Y, Z_t), nHSIC(Y, P_t)).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from memfl.core.engine import TrainStep
from memfl.methods.scalefl.mentor import SIGMA, coefficients, nhsic, one_hot
from memfl.core.protocol import Plan
from memfl.methods.scalefl.partition import Partition, PartitionError, check_sequential, partition_model

#: mentor defaults (first block, last block), chosen by the search in docs/SCALEFL.md
DEFAULT_BETA = (0.0, 0.1)
DEFAULT_GAMMA = (0.3, 0.1)
PROJ_HIDDEN = 128
PROJ_DIM = 64


def _pool(h: torch.Tensor) -> torch.Tensor:
    """Global average pooling: (B, C, H, W) -> (B, C); tokens (B, N, D) -> (B, D); (B, F) as is."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    if h.dim() == 3:
        return h.mean(dim=1)
    return h.reshape(h.shape[0], -1)


class OutputModule(nn.Module):
    """``O_t``: the light stand-in for the missing blocks.

    in_shape:      one sample's feature shape at the end of block t: (C, H, W), (N, D) or (F,).
    conv_channels: output channels of the strided 3x3 convs, one per missing downsampling stage
                   (conv features only; may be empty).
    """

    def __init__(self, in_shape: tuple[int, ...], conv_channels: list[int], num_classes: int) -> None:
        super().__init__()
        self.kind = {3: "conv", 2: "tokens"}.get(len(in_shape), "flat")
        if self.kind == "conv":
            convs, cin = [], in_shape[0]
            for c in conv_channels:
                convs.append(nn.Conv2d(cin, c, 3, stride=2, padding=1))
                cin = c
            self.convs = nn.Sequential(*convs)
            width = cin
        elif self.kind == "tokens":
            self.norm = nn.LayerNorm(in_shape[-1], eps=1e-6)
            width = in_shape[-1]
        else:
            width = int(torch.tensor(in_shape).prod()) if in_shape else 1
        self.fc = nn.Linear(width, num_classes)
        self.width = width

    def features(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z_t, pooled feature): Z_t is the feature after the convs (SPEC 2.3)."""
        if self.kind == "conv":
            z = self.convs(h)
            return z, z.mean(dim=(2, 3))
        if self.kind == "tokens":
            return h, self.norm(h).mean(dim=1)
        return h, h.reshape(h.shape[0], -1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(h)[1])


class ProjectionHead(nn.Module):
    """``P_t``: Linear -> ReLU -> Linear on the pooled feature (the mentor's label-side view)."""

    def __init__(self, width: int, hidden: int = PROJ_HIDDEN, out: int = PROJ_DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(pooled)))


def _exit_channels(shapes: list[tuple[int, ...]], start: int, num_classes: int = 10,
                   width: str = "light") -> list[int]:
    """Channels of O_t's strided convs, one conv per later unit that shrinks the spatial size.

    ``"light"`` (default): every conv keeps block t's channel count (at least ``num_classes``).
    Without non-linearities the output module is one linear map of the block's feature, whose
    expressiveness needs no more than ``num_classes`` channels, so wider convs would add memory
    and no capacity. ``"model"``: the channels the model has at each missing stage (ResNet-18
    after block 1: 128, 256, 512 -- ten times block 1's own parameters)."""
    if len(shapes[start]) != 3:
        return []
    if width not in ("light", "model"):
        raise ValueError(f"exit width {width!r}: expected 'light' or 'model'")
    chans, h = [], shapes[start][1]
    for s in shapes[start + 1:]:
        if len(s) == 3 and s[1] < h:
            chans.append(max(shapes[start][0], num_classes) if width == "light" else s[0])
            h = s[1]
    if chans and width == "model":
        chans[-1] = shapes[-1][0]
    return chans


class ScaleFLModel(nn.Module):
    """A model cut into T blocks with its ScaleFL output modules and projection heads.

    model:       the model to train (a :class:`~memfl.models.BlockModel` or a plain ``nn.Module``
                 whose forward is its children in order); its modules are adopted, not copied.
    blocks:      T; ``mode``/``boundaries``/``head``/``batch_size``: how to cut
                 (:func:`partition_model`; ``batch_size`` matters for ``mode="balanced"`` only).
    exit_width:  ``"light"`` or ``"model"``: the output modules' conv channels (:func:`_exit_channels`).
    input_shape: one sample's shape (default: from ``model.arch``).
    """

    def __init__(self, model: nn.Module, blocks: int = 4, *, mode: str = "default",
                 boundaries: list | None = None, head: str | None = None,
                 input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 batch_size: int = 32, exit_width: str = "light") -> None:
        super().__init__()
        arch = dict(getattr(model, "arch", {}) or {})
        if input_shape is None:
            if not {"in_channels", "image_size"} <= arch.keys():
                raise PartitionError("ScaleFLModel needs input_shape (not recorded in model.arch)")
            input_shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
        self.input_shape = tuple(input_shape)
        part = partition_model(model, blocks, mode=mode, boundaries=boundaries, head=head,
                               input_shape=self.input_shape, batch_size=batch_size, exit_width=exit_width)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.arch = arch
        self.partition: Partition = part
        self.blocks_count = part.blocks

        shapes = self._unit_shapes()
        probe = torch.zeros(1, *self.input_shape)
        if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
            check_sequential(model, part, torch.randn(2, *self.input_shape))
        if num_classes is None:
            with torch.no_grad():
                was = model.training
                model.eval()
                num_classes = int(model(probe).shape[-1])
                model.train(was)
        self.num_classes = num_classes
        ends = self._group_ends()
        self.exits = nn.ModuleDict()
        self.projs = nn.ModuleDict()
        for t in range(1, part.blocks + 1):
            shape = shapes[ends[t - 1]]
            if t < part.blocks:
                exit_ = OutputModule(shape, _exit_channels(shapes, ends[t - 1], num_classes, exit_width),
                                     num_classes)
                self.exits[str(t)] = exit_
                width = exit_.width
            else:
                width = shape[0] if len(shape) == 3 else shape[-1]
            self.projs[str(t)] = ProjectionHead(width)
        self.register_buffer("exit_stage", torch.tensor(0, dtype=torch.long))

    # -- structure -----------------------------------------------------------------------------
    def _group_ends(self) -> list[int]:
        ends, n = [], -1
        for g in self.partition.groups:
            n += len(g)
            ends.append(n)
        return ends

    @torch.no_grad()
    def _unit_shapes(self) -> list[tuple[int, ...]]:
        was = self.training
        self.eval()
        try:
            h = torch.zeros(1, *self.input_shape)
            shapes = []
            for name in self.partition.unit_names():
                h = self.get_submodule(name)(h)
                shapes.append(tuple(h.shape[1:]))
        finally:
            self.train(was)
        return shapes

    def group_modules(self, block: int) -> list[nn.Module]:
        return [self.get_submodule(n) for n in self.partition.groups[block - 1]]

    def block_keys(self, block: int) -> list[str]:
        """State-dict keys of block ``block`` (1-based)."""
        return [k for k in self.state_dict() if self.partition.block_of(k) == block]

    # -- inference -------------------------------------------------------------------------------
    def stage_logits(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits of ``[block_1 .. block_stage, O_stage]`` (the real head at stage T)."""
        h = x
        for t in range(1, stage + 1):
            for m in self.group_modules(t):
                h = m(h)
        if stage >= self.blocks_count:
            return self.get_submodule(self.partition.head)(h)
        return self.exits[str(stage)](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = int(self.exit_stage)
        return self.stage_logits(x, self.blocks_count if s <= 0 else min(s, self.blocks_count))


class _StageModule(nn.Module):
    """What a stage-t client holds: blocks 1..t, O_t (or the head) and P_t (memory accounting)."""

    def __init__(self, units: list[nn.Module], out: nn.Module, proj: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.out = out
        self.proj = proj


def _no_bn_update_on_recompute(modules: list[nn.Module]):
    """``context_fn`` for the checkpointed harmonizer tail: during the backward's recompute the
    BatchNorms use the same batch statistics but leave their running statistics alone."""
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextlib.contextmanager
    def frozen_stats() -> Iterator[None]:
        saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum, n in saved:
                m.momentum = momentum
                if n is not None:
                    m.num_batches_tracked.copy_(n)

    return lambda: (contextlib.nullcontext(), frozen_stats())


def scalefl_options(plan: Plan) -> dict[str, Any]:
    o = dict(plan.options or {})
    return {
        "blocks": int(o.get("blocks", 4)),
        "partition": o.get("partition", "default"),
        "batch_size": int(o.get("batch_size", 32)),
        "mentor": bool(o.get("mentor", True)),
        "beta": tuple(o.get("beta", DEFAULT_BETA)),
        "gamma": tuple(o.get("gamma", DEFAULT_GAMMA)),
        "sigma": float(o.get("sigma", SIGMA)),
        "harmonizer": bool(o.get("harmonizer", True)),
        "recompute_tail": bool(o.get("recompute_tail", True)),
        "metrics": bool(o.get("metrics", True)),
    }


def as_scalefl(model: nn.Module, plan: Plan) -> ScaleFLModel:
    """``model`` itself when it is a :class:`ScaleFLModel` (checked against the plan's T), else a
    ScaleFLModel adopting its modules (fresh output modules; for memory accounting and tests)."""
    opts = scalefl_options(plan)
    if isinstance(model, ScaleFLModel):
        if "blocks" in (plan.options or {}) and opts["blocks"] != model.blocks_count:
            raise ValueError(f"plan asks for {opts['blocks']} blocks but the model is cut into {model.blocks_count}")
        return model
    cached = getattr(model, "_scalefl_view", None)
    key = (opts["blocks"], opts["partition"], opts["batch_size"])
    if cached is not None and cached[0] == key:
        return cached[1]
    view = ScaleFLModel(model, opts["blocks"], mode=opts["partition"], batch_size=opts["batch_size"])
    object.__setattr__(model, "_scalefl_view", (key, view))  # not a submodule: no state-dict change
    return view


def prepare_stage(model: nn.Module, plan: Plan) -> TrainStep:
    """The ``"stage"`` engine: train ScaleFL stage ``plan.stage`` of ``model`` (see module doc)."""
    sm = as_scalefl(model, plan)
    opts = scalefl_options(plan)
    T, t = sm.blocks_count, int(plan.stage)
    if not 1 <= t <= T:
        raise ValueError(f"stage {t} out of range: the model is cut into {T} blocks")
    part = sm.partition
    names = dict(sm.named_parameters())
    param_name = {id(p): n for n, p in names.items()}

    # the Training Harmonizer: block t-1's last layer trains with block t
    boundary: list[str] = part.boundary_layers(sm, t - 1) if (opts["harmonizer"] and t > 1) else []
    tail_units: list[str] = []
    frozen_units: list[str] = [u for g in part.groups[:t - 1] for u in g]
    if boundary:
        prev = list(part.groups[t - 2])
        first = next(i for i, u in enumerate(prev)
                     if any(b == u or b.startswith(u + ".") for b in boundary))
        tail_units = prev[first:]
        frozen_units = frozen_units[:len(frozen_units) - len(prev) + first]

    def in_boundary(key: str) -> bool:
        return any(key.startswith(b + ".") for b in boundary)

    out_module = sm.get_submodule(part.head) if t == T else sm.exits[str(t)]
    mentor = opts["mentor"]
    beta_t, gamma_t = coefficients(t, T, opts["beta"], opts["gamma"]) if mentor else (0.0, 0.0)
    proj = sm.projs[str(t)] if (mentor and gamma_t != 0.0) else None

    trained_units = list(part.groups[t - 1])
    trainable: list[tuple[str, nn.Parameter]] = []
    for u in trained_units:
        trainable += [(f"{u}.{n}", p) for n, p in sm.get_submodule(u).named_parameters()]
    trainable += [(n, p) for n, p in names.items() if in_boundary(n)]
    for mod in (out_module, proj):
        if mod is not None:
            trainable += [(param_name[id(p)], p) for p in mod.parameters()]
    sent_buffers = [k for k, _ in sm.named_buffers()
                    if part.block_of(k) == t or in_boundary(k)]

    wanted = {id(p) for _, p in trainable}
    for p in sm.parameters():
        p.requires_grad_(id(p) in wanted)

    frozen_mods = [sm.get_submodule(u) for u in frozen_units]
    tail_mods = [sm.get_submodule(u) for u in tail_units]
    trained_mods = [sm.get_submodule(u) for u in trained_units]
    # in the harmonized tail only the boundary layer trains (its BN updates its statistics)
    tail_all = [m for u in tail_mods for m in u.modules()]
    tail_train = {id(m) for b in boundary for m in sm.get_submodule(b).modules()}
    stash: dict[str, torch.Tensor] = {}
    sums = {"nhsic_xz": 0.0, "nhsic_yz": 0.0, "nhsic_yp": 0.0, "batches": 0}

    def set_modes() -> None:
        for m in frozen_mods:
            m.eval()
        for m in tail_all:
            m.training = id(m) in tail_train

    def run_tail(h: torch.Tensor) -> torch.Tensor:
        for m in tail_mods:
            h = m(h)
        return h

    def forward(x: torch.Tensor) -> torch.Tensor:
        training = trained_mods[0].training if trained_mods else True
        if training:
            set_modes()
        h = x
        with torch.no_grad():
            for m in frozen_mods:
                h = m(h)
        if tail_mods and opts["recompute_tail"] and torch.is_grad_enabled():
            # keep only the tail's input; its activations are recomputed in the backward (BN
            # statistics are not updated a second time during the recompute)
            h = checkpoint(run_tail, h, use_reentrant=False, context_fn=_no_bn_update_on_recompute(tail_all))
        elif tail_mods:
            h = run_tail(h)
        for m in trained_mods:
            h = m(h)
        if t == T:
            z, pooled = h, _pool(h)
            logits = out_module(h)
        else:
            z, pooled = out_module.features(h)
            logits = out_module.fc(pooled)
        stash["z"], stash["pooled"] = z, pooled
        return logits

    def extra_loss(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        z, pooled = stash.pop("z"), stash.pop("pooled")
        loss = logits.new_zeros(())
        if x.shape[0] < 2:
            return loss
        yh = one_hot(y, sm.num_classes)
        xf = x.reshape(x.shape[0], -1)
        zf = z.reshape(z.shape[0], -1)
        p = proj(pooled) if proj is not None else None
        xz = yp = None
        if beta_t:
            xz = nhsic(xf, zf, opts["sigma"])
            loss = loss + beta_t * xz
        if p is not None:
            yp = nhsic(yh, p, opts["sigma"])
            loss = loss - gamma_t * yp
        if opts["metrics"]:
            with torch.no_grad():
                sums["nhsic_xz"] += float(xz.detach() if xz is not None else nhsic(xf, zf, opts["sigma"]))
                sums["nhsic_yz"] += float(nhsic(yh, zf, opts["sigma"]))
                if yp is not None:
                    sums["nhsic_yp"] += float(yp.detach())
                sums["batches"] += 1
        return loss

    def metrics() -> dict[str, Any]:
        n = sums["batches"]
        out: dict[str, Any] = {"stage": t, "block": t, "beta_t": beta_t, "gamma_t": gamma_t,
                               "harmonized": boundary}
        if n:
            out["nhsic_xz"] = sums["nhsic_xz"] / n
            out["nhsic_yz"] = sums["nhsic_yz"] / n
            if proj is not None:
                out["nhsic_yp"] = sums["nhsic_yp"] / n
        return out

    held = _StageModule([sm.get_submodule(u) for g in part.groups[:t] for u in g], out_module, proj)
    return TrainStep(module=held, trainable=trainable, forward=forward,
                     extra_loss=extra_loss if (mentor or opts["metrics"]) else None,
                     sent_buffers=sent_buffers, metrics=metrics)


# -- building client/global models -----------------------------------------------------------------

def scalefl_model_fn(model_fn: Callable[[Plan], nn.Module], blocks: int = 4, mode: str = "default",
                     input_shape: tuple[int, ...] | None = None, batch_size: int = 32) -> Callable[[Plan], nn.Module]:
    """Wrap a ``plan -> model`` builder so it returns :class:`ScaleFLModel` s (the simulator's global
    and client model for the ``scalefl`` method)."""

    def build(plan: Plan) -> nn.Module:
        return ScaleFLModel(model_fn(plan), blocks, mode=mode, input_shape=input_shape, batch_size=batch_size)

    return build


def stage_client_model(base_factory: Callable[[], nn.Module], stage: int, blocks: int = 4,
                       mode: str = "default", batch_size: int = 32) -> ScaleFLModel:
    """A stage-``stage`` client's model: a ScaleFLModel whose tensors stage ``stage`` does not use
    (later blocks, other output modules and projection heads, the head before stage T) are freed,
    as on a client that received only what its stage needs. For measuring real memory
    (``functools.partial(stage_client_model, factory, t)`` is picklable)."""
    sm = ScaleFLModel(base_factory(), blocks, mode=mode, batch_size=batch_size)
    keep: set[str] = set()
    for g in sm.partition.groups[:stage]:
        keep.update(g)
    keep.update({f"exits.{stage}", f"projs.{stage}"})
    if stage >= sm.blocks_count:
        keep.add(sm.partition.head)
    for name, t in [*sm.named_parameters(), *sm.named_buffers()]:
        if name == "exit_stage" or any(name.startswith(k + ".") for k in keep):
            continue
        t.data = torch.empty(0, dtype=t.dtype)
    sm.exit_stage.fill_(stage)  # its forward is [block_1 .. block_stage, O_stage]
    return sm


def stage_client_factory(base_factory: Callable[[], nn.Module], stage: int, blocks: int = 4,
                         mode: str = "default", batch_size: int = 32) -> Callable[[], ScaleFLModel]:
    """Picklable zero-argument factory of :func:`stage_client_model`."""
    return functools.partial(stage_client_model, base_factory, stage, blocks, mode, batch_size)
