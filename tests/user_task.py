"""A user model and data set named by import path (tests/test_api.py: memfl.run on Flower)."""

import torch
from torch import nn

F, C = 16, 3


def make_mlp(width: float = 1.0) -> nn.Module:
    h = max(2, int(64 * width))
    return nn.Sequential(nn.Linear(F, h), nn.ReLU(), nn.Linear(h, C))


def load():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(F, C, generator=g)
    x = torch.randn(900, F, generator=g)
    y = (x @ w).argmax(1)
    return (x[:600], y[:600]), (x[600:], y[600:])
