"""User models: zero-argument builders, optionally taking a ``width`` keyword (HeteroFL)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

__all__ = ["accepts_width", "call_builder"]


def accepts_width(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called as ``fn(width=0.5)`` (a ``width`` parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "width" and p.kind is not p.POSITIONAL_ONLY) for p in params)


def call_builder(fn: Callable[..., Any], width: float = 1.0, *, name: str = "model_fn") -> nn.Module:
    """``fn()`` -- or ``fn(width=width)`` when it takes ``width`` -- checked to be an ``nn.Module``.

    A width below 1 (a HeteroFL sub-model) needs a ``width`` keyword: else a TypeError says so.
    """
    if accepts_width(fn):
        model = fn(width=width)
    elif width != 1.0:
        raise TypeError(
            f"{name} must take a `width` keyword to build width-scaled sub-models (HeteroFL asked "
            f"for width {width:g}): define it as `def {getattr(fn, '__name__', 'model_fn')}(width=1.0)` "
            f"and scale the hidden sizes by width (every parameter of a width-w model must be a "
            f"leading slice of the full model's), or choose another method"
        )
    else:
        model = fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must return a torch.nn.Module, got {type(model).__name__}")
    return model
