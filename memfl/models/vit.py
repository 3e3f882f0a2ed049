"""ViT-Tiny for small images: patch 4, dim 192, depth 12, 3 heads, MLP 768, pre-norm layers,
learned position embedding, mean-pooled tokens (no class token).

blocks[0] = Sequential(embed, layer0, layer1, layer2); blocks[i] = Sequential(layer{3i}, ...);
head = Sequential(norm, pool (mean over tokens), fc). Blocks map (B, N, dim) -> (B, N, dim).

Width scaling (HeteroFL): dim = 192 x width rounded to a multiple of the 3 heads, MLP = 768 x width,
the number of heads is kept. The q/k/v/proj features are laid out *head-minor* (feature f belongs to
head f % heads, position f // heads within it), so the leading slice of a full-width weight is a
valid narrower model in which every head keeps its first head_dim x width dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memfl.models.base import BlockModel, scaled

VIT_TINY = dict(patch_size=4, dim=192, depth=12, heads=3, mlp_dim=768)
VIT_BLOCK_LAYERS = 3  # transformer layers per block (the first block also holds the embedding)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear projection (a strided conv) -> + learned positions."""

    def __init__(self, in_channels: int, dim: int, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (head-minor feature layout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, D/H)
        b, n, d = t.shape
        return t.view(b, n, d // self.heads, self.heads).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        out = F.scaled_dot_product_attention(self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x)))
        return self.proj(out.permute(0, 2, 3, 1).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)); GELU MLP, no dropout."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def last_layer_names(self) -> list[str]:
        return [""]  # the whole layer


class TokenMean(nn.Module):
    """(B, N, D) -> (B, D): mean over tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _init_vit(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.trunc_normal_(m.pos, std=0.02)


def vit_tiny(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0) -> BlockModel:
    """ViT-Tiny/4; image_size must be divisible by 4 (28 -> 7x7 patches, 32 -> 8x8)."""
    cfg = VIT_TINY
    p, heads = cfg["patch_size"], cfg["heads"]
    if image_size % p:
        raise ValueError(f"vit-tiny: image_size {image_size} not divisible by patch size {p}")
    dim = scaled(cfg["dim"], width, multiple=heads)
    mlp_dim = scaled(cfg["mlp_dim"], width)
    blocks = []
    for b in range(cfg["depth"] // VIT_BLOCK_LAYERS):
        block = nn.Sequential()
        if b == 0:
            block.add_module("embed", PatchEmbed(in_channels, dim, image_size, p))
        for i in range(b * VIT_BLOCK_LAYERS, (b + 1) * VIT_BLOCK_LAYERS):
            block.add_module(f"layer{i}", TransformerLayer(dim, heads, mlp_dim))
        blocks.append(block)
    head = nn.Sequential()
    head.add_module("norm", nn.LayerNorm(dim, eps=1e-6))
    head.add_module("pool", TokenMean())
    head.add_module("fc", nn.Linear(dim, num_classes))
    model = BlockModel(
        blocks, head, arch=dict(kind="transformer", block_channels=[dim] * len(blocks), heads=heads, patch_size=p)
    )
    _init_vit(model)
    return model
