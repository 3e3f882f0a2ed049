"""The shape every memfl model has: an ordered list of blocks followed by a head.

Block-wise training (ScaleFL) cuts a model at block boundaries, and the planners (FedHybrid) walk
the blocks in order, so every shipped model is a :class:`BlockModel`.

Besides the contract itself this module holds the small helpers that walk it:

- :func:`units` -- the finer ordered list of sequential units (each residual unit, conv layer,
  pool, transformer layer) with their qualified names; running them in order, then the head,
  reproduces ``forward``. Used to cut a model into T != 4 blocks or to plan per segment.
- :func:`boundary_layers` / :func:`last_layer_names` -- the state-dict prefixes of the last layer of
  a block (last conv + its BN; last transformer layer), which ScaleFL's Training Harmonizer
  co-trains with the next block.
- :meth:`BlockModel.block_output_shapes` -- per-block output shapes (what output modules attach to).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BlockModel(nn.Module):
    """``head(blocks[-1](...blocks[0](x)))``.

    blocks: the default cut into (usually 4) blocks, in forward order. For ResNets these are the
            four stages with the stem joined to the first.
    head:   everything after the last block (pooling, flatten, classifier).
    arch:   optional plain-data description of how the model was built (``build_model`` fills
            ``name, in_channels, num_classes, image_size, width, kind`` where kind is ``"conv"``
            or ``"transformer"``, and ``block_channels``: channels / embedding dim per block
            output). Not part of the state dict.
    """

    def __init__(self, blocks: list[nn.Module], head: nn.Module, *, arch: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.arch: dict[str, Any] = dict(arch or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    # -- helpers (thin wrappers over the module-level functions) --------------------------------

    def units(self, include_head: bool = False) -> list[tuple[str, nn.Module]]:
        """See :func:`units`."""
        return units(self, include_head=include_head)

    def boundary_layers(self, block_index: int) -> list[str]:
        """See :func:`boundary_layers`."""
        return boundary_layers(self, block_index)

    @torch.no_grad()
    def block_output_shapes(self, input_shape: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
        """Output shape (without the batch dim) of each block for one input of ``input_shape``
        (C, H, W); defaults to the shape recorded in ``arch``. Runs one eval-mode forward of
        batch 1 (training mode is restored)."""
        if input_shape is None:
            a = self.arch
            if not {"in_channels", "image_size"} <= a.keys():
                raise ValueError("input_shape not given and not recorded in model.arch")
            input_shape = (a["in_channels"], a["image_size"], a["image_size"])
        p = next(self.parameters(), None)
        x = torch.zeros(
            1, *input_shape, device=p.device if p is not None else None, dtype=p.dtype if p is not None else None
        )
        was_training = self.training
        self.eval()
        try:
            shapes = []
            for block in self.blocks:
                x = block(x)
                shapes.append(tuple(x.shape[1:]))
        finally:
            self.train(was_training)
        return shapes


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    return f"{prefix}.{name}" if name else prefix


def units(model: BlockModel, include_head: bool = False) -> list[tuple[str, nn.Module]]:
    """The model's body as an ordered list of ``(qualified_name, module)`` sequential units.

    A block that is an ``nn.Sequential`` contributes its children (for the shipped models: the
    ResNet stem and each residual unit; each VGG/CNN conv-BN-ReLU and pool; the ViT patch
    embedding and each transformer layer); any other block is one unit. Names are module names
    in ``model.named_modules()`` (so ``name + "."`` prefixes that unit's state-dict keys), and the
    block a unit belongs to is ``int(name.split(".")[1])``. ``include_head`` appends
    ``("head", model.head)``. Running the units in order, then the head, equals ``model(x)``.
    """
    out: list[tuple[str, nn.Module]] = []
    for i, block in enumerate(model.blocks):
        if isinstance(block, nn.Sequential) and len(block) > 0:
            out.extend((f"blocks.{i}.{n}", m) for n, m in block.named_children())
        else:
            out.append((f"blocks.{i}", block))
    if include_head:
        out.append(("head", model.head))
    return out


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def last_layer_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Module names (prefixed by ``prefix``) of the last *layer* of ``module`` in forward order.

    A module that defines ``last_layer_names()`` answers for itself (memfl's conv-BN-ReLU,
    residual unit and transformer layer do: ``[conv, bn]``, ``[conv2, bn2]`` -- never the shortcut
    -- and the whole layer). Otherwise the children are searched from the last one back; in a
    container whose last weighted child is a norm directly after a conv/linear, both are returned.
    A weighted leaf is its own last layer. Empty if nothing has parameters.
    """
    own = getattr(module, "last_layer_names", None)
    if callable(own):
        return [_join(prefix, n) for n in own()]
    children = [(n, c) for n, c in module.named_children()]
    if not children:
        has_params = any(True for _ in module.parameters(recurse=False))
        return [prefix] if has_params else []
    weighted = [(n, c) for n, c in children if any(True for _ in c.parameters())]
    if not weighted:
        return []
    name, child = weighted[-1]
    if isinstance(child, _NORMS) and len(weighted) >= 2 and isinstance(weighted[-2][1], _WEIGHTED):
        return [_join(prefix, weighted[-2][0]), _join(prefix, name)]
    for name, child in reversed(weighted):
        found = last_layer_names(child, _join(prefix, name))
        if found:
            return found
    return []


def boundary_layers(model: BlockModel, block_index: int) -> list[str]:
    """State-dict prefixes (module names) of the last layer of ``model.blocks[block_index]``.

    CNN / VGG: the block's last conv and its BN; ResNet: ``conv2`` and ``bn2`` of the block's last
    residual unit; ViT: the block's last transformer layer. ScaleFL's Training Harmonizer trains
    these together with block ``block_index + 1``. A state-dict key ``k`` belongs to them iff
    ``any(k.startswith(p + ".") for p in boundary_layers(model, i))``. Negative indices count from
    the end.
    """
    n = len(model.blocks)
    if not -n <= block_index < n:
        raise IndexError(f"block_index {block_index} out of range for {n} blocks")
    block_index %= n
    return last_layer_names(model.blocks[block_index], f"blocks.{block_index}")


def scaled(channels: int, width: float, multiple: int = 1) -> int:
    """``channels * width`` rounded to the nearest multiple of ``multiple`` (at least ``multiple``).

    Monotone in ``width`` and equal to ``channels`` at width 1 (for ``channels`` a multiple of
    ``multiple``), so a model built with width w <= 1 nests inside the full one."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    c = int(round(channels * width / multiple)) * multiple
    return max(multiple, c)


class ConvBNReLU(nn.Sequential):
    """conv3x3 (padding 1, no bias) -> BatchNorm2d -> ReLU, children named conv, bn, relu."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def last_layer_names(self) -> list[str]:
        return ["conv", "bn"]


def init_conv_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, unit BN, zero biases; Linear keeps PyTorch's init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def classifier_head(channels: int, num_classes: int) -> nn.Sequential:
    """AdaptiveAvgPool2d(1) -> Flatten -> Linear, children named pool, flatten, fc."""
    head = nn.Sequential()
    head.add_module("pool", nn.AdaptiveAvgPool2d(1))
    head.add_module("flatten", nn.Flatten(1))
    head.add_module("fc", nn.Linear(channels, num_classes))
    return head
