"""ScaleFL's output modules ``O_t`` and the Curriculum Mentor's projection heads ``P_t`` (SPEC 2.2).

An output module is the light stand-in for the blocks a stage-t client does not hold: it turns
block t's feature into logits, so that block t can be trained (and the global model evaluated)
before the later blocks exist. Its form follows the feature's shape (one sample, no batch dim):

- ``(C, H, W)`` conv maps (images, square or not): one strided 3x3 conv per missing downsampling
  stage (no BN/ReLU; channels from :func:`exit_channels`), global average pooling, a linear
  classifier;
- ``(N, D)`` tokens or sequences (a Transformer, an embedding model): a LayerNorm and a linear head
  on the mean over the N positions;
- ``(F,)`` flat features (an MLP), or any other shape: the feature flattened, a linear head.

A projection head ``P_t`` is Linear -> ReLU -> Linear on the same pooled feature (the mentor's
label-side view, :mod:`memfl.methods.scalefl.mentor`; ``projection = "light"``, ours), or the
authors' three linear layers without activations, ``width -> 2056 s -> 1024 s -> 512 s`` with ``s``
the model's width (its last block's pooled width / 512; ``projection = "authors"``,
:class:`AuthorsProjectionHead`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PROJ_HIDDEN = 128
PROJ_DIM = 64


def pool_features(h: torch.Tensor) -> torch.Tensor:
    """Global average pooling: (B, C, H, W) -> (B, C); tokens (B, N, D) -> (B, D); anything else is
    flattened per sample: (B, F) as is, (B, a, b, c, ...) -> (B, a*b*c*...)."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    if h.dim() == 3:
        return h.mean(dim=1)
    return h.reshape(h.shape[0], -1)


def pooled_width(in_shape: tuple[int, ...]) -> int:
    """Width of :func:`pool_features` for one sample's feature shape ``in_shape``."""
    if len(in_shape) in (2, 3):
        return int(in_shape[0] if len(in_shape) == 3 else in_shape[-1])
    return int(torch.tensor(in_shape).prod()) if in_shape else 1


class OutputModule(nn.Module):
    """``O_t``: the light stand-in for the missing blocks.

    in_shape:      one sample's feature shape at the end of block t: (C, H, W), (N, D) or (F,)
                   (other ranks are flattened, like (F,)).
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


#: the authors' projection head at full width (ResNet, 512-wide pooled feature): 512 -> 2056 -> 1024 -> 512
AUTHORS_PROJ = (2056, 1024, 512)


class AuthorsProjectionHead(nn.Module):
    """``P_t`` as in the authors' released code: three linear layers, no activations.

    width: the pooled feature's width; scale: the model's width (its last block's pooled width over
    512), which scales the hidden and output widths (2056, 1024, 512) x scale, each at least 1."""

    def __init__(self, width: int, scale: float = 1.0) -> None:
        super().__init__()
        dims = [max(1, round(d * scale)) for d in AUTHORS_PROJ]
        self.fc1 = nn.Linear(width, dims[0])
        self.fc2 = nn.Linear(dims[0], dims[1])
        self.fc3 = nn.Linear(dims[1], dims[2])

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(pooled)))


def projection_head(kind: str, width: int, scale: float = 1.0) -> nn.Module:
    """``"light"`` (ours, :class:`ProjectionHead`) or ``"authors"`` (:class:`AuthorsProjectionHead`)."""
    if kind == "light":
        return ProjectionHead(width)
    if kind == "authors":
        return AuthorsProjectionHead(width, scale)
    raise ValueError(f"scalefl projection {kind!r}: expected 'light' or 'authors'")


def exit_channels(shapes: list[tuple[int, ...]], start: int, num_classes: int = 10, width: str = "light") -> list[int]:
    """Channels of O_t's strided convs, one conv per later unit that shrinks the spatial size.

    shapes: one sample's output shape of every unit, in order; start: the index of block t's last
    unit. Empty unless that unit's output is a (C, H, W) conv map. A later unit "shrinks" when it
    makes H or W smaller (non-square images count either side).

    ``"light"`` (default): every conv keeps block t's channel count (at least ``num_classes``).
    Without non-linearities the output module is one linear map of the block's feature, whose
    expressiveness needs no more than ``num_classes`` channels, so wider convs would add memory
    and no capacity. ``"model"``: the channels the model has at each missing stage (ResNet-18
    after block 1: 128, 256, 512 -- ten times block 1's own parameters)."""
    if len(shapes[start]) != 3:
        return []
    if width not in ("light", "model"):
        raise ValueError(f"exit width {width!r}: expected 'light' or 'model'")
    chans, h, w = [], shapes[start][1], shapes[start][2]
    for s in shapes[start + 1 :]:
        if len(s) == 3 and (s[1] < h or s[2] < w):
            chans.append(max(shapes[start][0], num_classes) if width == "light" else s[0])
            h, w = s[1], s[2]
    if chans and width == "model":
        chans[-1] = shapes[-1][0]
    return chans
