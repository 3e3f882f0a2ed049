"""CIFAR-style ResNet-18/34 (3x3 stride-1 stem, no max-pool, BasicBlock).

blocks[0] = Sequential(stem, unit0, unit1, ...)   (stem + layer1)
blocks[i] = Sequential(unit0, unit1, ...)         (layer{i+1}), i = 1..3
head      = Sequential(pool, flatten, fc)
"""

from __future__ import annotations

import torch
from torch import nn

from memfl.models.base import BlockModel, ConvBNReLU, classifier_head, init_conv_weights, scaled

RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
RESNET_CHANNELS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Residual unit: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    ``shortcut`` is a 1x1 conv + BN (children ``0``, ``1``) when the unit changes stride or width,
    else Identity. ``downsample`` is decided by the caller (from the full-width architecture) so
    width-scaled models always have the same state-dict keys.
    """

    def __init__(self, cin: int, cout: int, stride: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if downsample:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))

    def last_layer_names(self) -> list[str]:
        return ["conv2", "bn2"]


def resnet(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0
) -> BlockModel:
    """``resnet18`` or ``resnet34``; channels 64, 128, 256, 512 x width."""
    if name not in RESNET_LAYERS:
        raise ValueError(f"unknown resnet {name!r}; expected one of {tuple(RESNET_LAYERS)}")
    if image_size < 8:
        raise ValueError(f"{name} needs image_size >= 8, got {image_size}")
    chans = [scaled(c, width) for c in RESNET_CHANNELS]
    cin, full_in = scaled(64, width), 64
    blocks = []
    for stage, (n_units, cout, full_out) in enumerate(zip(RESNET_LAYERS[name], chans, RESNET_CHANNELS)):
        block = nn.Sequential()
        if stage == 0:
            block.add_module("stem", ConvBNReLU(in_channels, cin))
        for u in range(n_units):
            stride = 2 if (stage > 0 and u == 0) else 1
            downsample = stride != 1 or full_in != full_out
            block.add_module(f"unit{u}", BasicBlock(cin, cout, stride, downsample))
            cin, full_in = cout, full_out
        blocks.append(block)
    model = BlockModel(blocks, classifier_head(cin, num_classes), arch=dict(kind="conv", block_channels=chans))
    init_conv_weights(model)
    return model
