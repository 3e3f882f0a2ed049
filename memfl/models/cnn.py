"""A small 4-block CNN: each block is conv3x3-BN-ReLU-MaxPool2 (32, 64, 128, 256 channels x width)."""

from __future__ import annotations

from torch import nn

from memfl.models.base import BlockModel, ConvBNReLU, classifier_head, init_conv_weights, scaled

CNN_CHANNELS = (32, 64, 128, 256)


def cnn(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0) -> BlockModel:
    """Block i = ``Sequential(layer=ConvBNReLU, pool=MaxPool2d(2))``; head = avgpool-flatten-fc.

    Needs image_size >= 16 (four halvings); 28 -> 1x1 and 32 -> 2x2 at the last block.
    """
    if image_size < 16:
        raise ValueError(f"cnn needs image_size >= 16, got {image_size}")
    blocks = []
    cin = in_channels
    for c in CNN_CHANNELS:
        cout = scaled(c, width)
        block = nn.Sequential()
        block.add_module("layer", ConvBNReLU(cin, cout))
        block.add_module("pool", nn.MaxPool2d(2))
        blocks.append(block)
        cin = cout
    model = BlockModel(
        blocks,
        classifier_head(cin, num_classes),
        arch=dict(kind="conv", block_channels=[scaled(c, width) for c in CNN_CHANNELS]),
    )
    init_conv_weights(model)
    return model
