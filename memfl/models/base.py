"""The shape every memfl model has: an ordered list of blocks followed by a head.

Block-wise training (ScaleFL) cuts a model at block boundaries, and the planners (FedHybrid) walk
the blocks in order, so every shipped model is a :class:`BlockModel`.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockModel(nn.Module):
    """``head(blocks[-1](...blocks[0](x)))``.

    blocks: the default cut into (usually 4) blocks, in forward order. For ResNets these are the
            four stages with the stem joined to the first.
    head:   everything after the last block (pooling, flatten, classifier).
    """

    def __init__(self, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)
