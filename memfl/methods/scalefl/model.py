"""ScaleFL's global model: the model cut into T blocks with its output modules and projection heads
(SPEC 2.2).

:class:`ScaleFLModel` adopts the original model's modules under their own names (so the state-dict
keys of the blocks and the head are unchanged) and adds the persistent extra parameters ScaleFL
needs:

- ``exits.<t>`` -- the output module ``O_t`` of stage t < T (:class:`~memfl.methods.scalefl.output.OutputModule`,
  shaped by block t's feature: conv maps, tokens or flat features). Stage T uses the model's head.
- ``projs.<t>`` -- the projection head ``P_t`` of the Curriculum Mentor, t = 1..T.
- ``exit_stage`` -- a buffer naming the exit the model answers with: 0 (or T) is the full model,
  s < T is ``[block_1 .. block_s, O_s]``. The server sets it to the deepest stage trained so far, so
  evaluating the global model during stage s measures the model clients are actually building.

Everything lives in the model's state dict, so the server stores, aggregates, checkpoints and
resumes output modules and projection heads exactly like the blocks.

A user's ``nn.Module`` works when its forward is its top-level children in order (checked on a
probe batch; :class:`~memfl.methods.scalefl.partition.PartitionError` otherwise): e.g. an MLP
``nn.Sequential`` on (N, F) features, ``Embedding -> token-wise layers -> mean-pool module -> Linear``
on (N, T) int64 tokens (probed with token ids), a small CNN on non-square images. ``input_shape``
(one sample's shape) must then be given.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from memfl.core.protocol import Plan
from memfl.methods.scalefl.output import OutputModule, exit_channels, pooled_width, projection_head
from memfl.methods.scalefl.partition import Partition, PartitionError, check_sequential, example_input, partition_model


class ScaleFLModel(nn.Module):
    """A model cut into T blocks with its ScaleFL output modules and projection heads.

    model:       the model to train (a :class:`~memfl.models.BlockModel` or a plain ``nn.Module``
                 whose forward is its children in order); its modules are adopted, not copied.
    blocks:      T; ``mode``/``boundaries``/``head``/``batch_size``: how to cut
                 (:func:`partition_model`; ``batch_size`` matters for ``mode="balanced"`` only).
    exit_width:  ``"light"`` (ours) or ``"model"`` (the authors'): the output modules' conv channels
                 (:func:`exit_channels`).
    projection:  ``"light"`` (ours) or ``"authors"``: the projection heads
                 (:func:`~memfl.methods.scalefl.output.projection_head`).
    input_shape: one sample's shape (default: from ``model.arch``; required for other models).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: int = 4,
        *,
        mode: str = "default",
        boundaries: list | None = None,
        head: str | None = None,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        batch_size: int = 32,
        exit_width: str = "light",
        projection: str = "light",
    ) -> None:
        super().__init__()
        self.exit_width, self.projection = exit_width, projection
        arch = dict(getattr(model, "arch", {}) or {})
        if input_shape is None:
            if not {"in_channels", "image_size"} <= arch.keys():
                raise PartitionError(
                    f"ScaleFLModel needs input_shape for {type(model).__name__} "
                    "(one sample's shape; not recorded in model.arch)"
                )
            input_shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
        self.input_shape = tuple(input_shape)
        part = partition_model(
            model,
            blocks,
            mode=mode,
            boundaries=boundaries,
            head=head,
            input_shape=self.input_shape,
            batch_size=batch_size,
            exit_width=exit_width,
        )
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
        probe = example_input(model, self.input_shape, 1, zeros=True)
        if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
            check_sequential(model, part, example_input(model, self.input_shape, 2))
        if num_classes is None:
            with torch.no_grad():
                was = model.training
                model.eval()
                num_classes = int(model(probe).shape[-1])
                model.train(was)
        self.num_classes = num_classes
        ends = self._group_ends()
        scale = pooled_width(shapes[ends[-1]]) / 512.0  # the authors' head is sized for a 512-wide model
        self.exits = nn.ModuleDict()
        self.projs = nn.ModuleDict()
        for t in range(1, part.blocks + 1):
            shape = shapes[ends[t - 1]]
            if t < part.blocks:
                exit_ = OutputModule(shape, exit_channels(shapes, ends[t - 1], num_classes, exit_width), num_classes)
                self.exits[str(t)] = exit_
                width = exit_.width
            else:
                width = pooled_width(shape)
            self.projs[str(t)] = projection_head(projection, width, scale)
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
            h = example_input(self, self.input_shape, 1, zeros=True)
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


# -- building client/global models -----------------------------------------------------------------


def scalefl_model_fn(
    model_fn: Callable[[Plan], nn.Module],
    blocks: int = 4,
    mode: str = "default",
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 32,
    exit_width: str = "light",
    projection: str = "light",
) -> Callable[[Plan], nn.Module]:
    """Wrap a ``plan -> model`` builder so it returns :class:`ScaleFLModel` s (the simulator's global
    and client model for the ``scalefl`` method)."""

    def build(plan: Plan) -> nn.Module:
        return ScaleFLModel(
            model_fn(plan),
            blocks,
            mode=mode,
            input_shape=input_shape,
            batch_size=batch_size,
            exit_width=exit_width,
            projection=projection,
        )

    return build


def stage_client_model(
    base_factory: Callable[[], nn.Module],
    stage: int,
    blocks: int = 4,
    mode: str = "default",
    batch_size: int = 32,
    exit_width: str = "light",
    projection: str = "light",
) -> ScaleFLModel:
    """A stage-``stage`` client's model: a ScaleFLModel whose tensors stage ``stage`` does not use
    (later blocks, other output modules and projection heads, the head before stage T) are freed,
    as on a client that received only what its stage needs. For measuring real memory
    (``functools.partial(stage_client_model, factory, t)`` is picklable)."""
    sm = ScaleFLModel(
        base_factory(), blocks, mode=mode, batch_size=batch_size, exit_width=exit_width, projection=projection
    )
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


def stage_client_factory(
    base_factory: Callable[[], nn.Module],
    stage: int,
    blocks: int = 4,
    mode: str = "default",
    batch_size: int = 32,
    exit_width: str = "light",
    projection: str = "light",
) -> Callable[[], ScaleFLModel]:
    """Picklable zero-argument factory of :func:`stage_client_model`."""
    return functools.partial(stage_client_model, base_factory, stage, blocks, mode, batch_size, exit_width, projection)
