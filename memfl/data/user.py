"""Bring your own data: tensors, arrays or ``torch.utils.data.Dataset`` objects -> :class:`Dataset`.

- :func:`as_dataset` checks and converts a ``train`` / ``test`` pair (each ``(x, y)`` tensors or
  arrays, or a map-style dataset of ``(input, label)`` items). Inputs may have any shape of at
  least one dimension per sample (feature vectors ``(N, F)``, images ``(N, C, H, W)`` of any size,
  token ids ``(N, T)``...) and any dtype; labels must be integer class indices.
- :func:`load_user_dataset` calls a ``"package.module:function"`` that returns such a pair (or a
  :class:`Dataset`): how ``run.dataset`` names user data in a config (and so in Flower ClientApps).
- :func:`import_object` resolves ``"package.module:attr"``.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from memfl.data.datasets import Dataset
from memfl.data.idx import DataError

__all__ = ["as_dataset", "import_object", "is_import_path", "load_user_dataset"]


def is_import_path(value: str) -> bool:
    """Whether ``value`` looks like ``"package.module:attr"``."""
    mod, sep, attr = value.partition(":")
    return bool(sep) and bool(mod.strip()) and bool(attr.strip())


def import_object(spec: str, what: str = "object") -> Any:
    """``"package.module:attr"`` (``attr`` may be dotted) -> the object; a callable is required.

    Raises ValueError naming the path when the module cannot be imported, the attribute is missing
    or the object is not callable.
    """
    if not is_import_path(spec):
        raise ValueError(f"{what} import path {spec!r} must look like 'package.module:function'")
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name.strip())
    except Exception as err:  # ImportError, or whatever the module raised while importing
        raise ValueError(
            f"cannot import module {mod_name!r} of {what} {spec!r}: "
            f"{type(err).__name__}: {err} (is it on PYTHONPATH / installed?)"
        ) from None
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (from {what} {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except Exception as err:
        raise DataError(f"{what}: cannot make a tensor of a {type(value).__name__}: {err}") from None


def _split(value: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split: ``(x, y)`` or a map-style dataset of ``(input, label)`` items."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value, torch.utils.data.Dataset):
        x, y = _tensor(value[0], f"{split} inputs"), _tensor(value[1], f"{split} labels")
    elif isinstance(value, torch.utils.data.Dataset) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        try:
            n = len(value)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(
                f"{split}: a dataset needs __len__ (an iterable-style dataset is not supported; give (x, y) tensors)"
            ) from None
        if n == 0:
            raise DataError(f"{split}: the dataset is empty")
        xs, ys = [], []
        for i in range(n):
            item = value[i]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(f"{split}[{i}] must be an (input, label) pair, got {type(item).__name__}")
            xs.append(_tensor(item[0], f"{split}[{i}] input"))
            ys.append(_tensor(item[1], f"{split}[{i}] label"))
        shapes = {tuple(t.shape) for t in xs}
        if len(shapes) > 1:
            raise DataError(
                f"{split}: inputs differ in shape ({', '.join(map(str, sorted(shapes)[:4]))}); "
                f"every input must have the same shape"
            )
        if any(t.numel() != 1 for t in ys):
            raise DataError(f"{split}: every label must be one integer class index")
        x, y = torch.stack(xs), torch.stack([t.reshape(()) for t in ys])
    else:
        raise DataError(
            f"{split} must be an (x, y) pair of tensors/arrays or a torch.utils.data.Dataset "
            f"of (input, label) items, got {type(value).__name__}"
        )
    if x.dim() == 1:
        raise DataError(
            f"{split} inputs have shape {tuple(x.shape)}: need (N, ...) with one sample per row "
            f"(a single feature per sample is (N, 1))"
        )
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise DataError(f"{split} labels have shape {tuple(y.shape)}: need (N,) integer class indices (not one-hot)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{split} labels are {y.dtype}: need integer class indices (e.g. y.long())")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{split}: {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise DataError(f"{split}: no samples")
    if y.min() < 0:
        raise DataError(f"{split} labels must be >= 0, got {int(y.min())}")
    return x.contiguous(), y.long()


def as_dataset(
    train: Any, test: Any, *, num_classes: int | None = None, name: str = "custom", source: str = "user data"
) -> Dataset:
    """Check and convert user data into a :class:`Dataset`.

    train, test: each an ``(x, y)`` pair (tensors or anything ``numpy.asarray`` takes) or a
                 map-style ``torch.utils.data.Dataset`` whose items are ``(input, label)``.
                 Inputs: ``(N, ...)`` of any shape and dtype, the same per-sample shape and dtype
                 in both splits. Labels: ``(N,)`` integers in ``[0, num_classes)``.
    num_classes: default ``max label + 1`` over both splits.

    Raises :class:`~memfl.data.idx.DataError` saying what is wrong (shapes, label dtype, lengths).
    A :class:`Dataset` given as ``train`` (with ``test=None``) is returned as it is.
    """
    if isinstance(train, Dataset) and test is None:
        return train
    if train is None or test is None:
        raise DataError("give both train and test data (each (x, y) or a torch Dataset)")
    tx, ty = _split(train, "train")
    vx, vy = _split(test, "test")
    if tx.shape[1:] != vx.shape[1:]:
        raise DataError(f"train inputs are {tuple(tx.shape[1:])} per sample but test inputs {tuple(vx.shape[1:])}")
    if tx.dtype != vx.dtype:
        raise DataError(f"train inputs are {tx.dtype} but test inputs {vx.dtype}")
    top = int(max(ty.max(), vy.max())) + 1
    if num_classes is None:
        num_classes = max(top, 2)
    elif top > num_classes:
        raise DataError(f"labels go up to {top - 1} but num_classes is {num_classes}")
    return Dataset(name, tx, ty, vx, vy, int(num_classes), source)


def load_user_dataset(spec: str) -> Dataset:
    """Call ``"package.module:function"`` (no arguments) and convert what it returns: a
    :class:`Dataset`, or a ``(train, test)`` pair as :func:`as_dataset` takes."""
    fn = import_object(spec, "run.dataset")
    value = fn()
    if isinstance(value, Dataset):
        return value
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DataError(
            f"run.dataset {spec!r} returned a {type(value).__name__}; expected a "
            f"memfl.data.Dataset or a (train, test) pair"
        )
    return as_dataset(value[0], value[1], name=spec, source=spec)
