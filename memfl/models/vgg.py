"""VGG-11 / VGG-16 with BatchNorm, for small images.

The five conv stages are grouped into four blocks: [s1], [s2], [s3], [s4, s5]. Each block is a
``Sequential`` of units named ``conv{stage}_{j}`` (ConvBNReLU: conv, bn, relu) and ``pool{stage}``
(MaxPool2d(2)). A stage's pool is left out when it would shrink the map below 1x1 (28x28 input:
the last pool is skipped), so both 28x28 and 32x32 work. Head: avgpool-flatten-fc(512 x width).
"""

from __future__ import annotations

from torch import nn

from memfl.models.base import BlockModel, ConvBNReLU, classifier_head, init_conv_weights, scaled

# conv channels per stage
VGG_STAGES = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}
VGG_BLOCK_STAGES = ((0,), (1,), (2,), (3, 4))


def vgg(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0
) -> BlockModel:
    """``vgg11`` or ``vgg16`` (BN variants)."""
    if name not in VGG_STAGES:
        raise ValueError(f"unknown vgg {name!r}; expected one of {tuple(VGG_STAGES)}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    stages = VGG_STAGES[name]
    cin, size = in_channels, image_size
    blocks, block_channels = [], []
    for stage_ids in VGG_BLOCK_STAGES:
        block = nn.Sequential()
        for s in stage_ids:
            for j, c in enumerate(stages[s]):
                cout = scaled(c, width)
                block.add_module(f"conv{s + 1}_{j + 1}", ConvBNReLU(cin, cout))
                cin = cout
            if size // 2 >= 1:
                block.add_module(f"pool{s + 1}", nn.MaxPool2d(2))
                size //= 2
        blocks.append(block)
        block_channels.append(cin)
    model = BlockModel(blocks, classifier_head(cin, num_classes), arch=dict(kind="conv", block_channels=block_channels))
    init_conv_weights(model)
    return model
