"""Reader for the CIFAR-10 / CIFAR-100 "python version" files.

Layout, as published at https://www.cs.toronto.edu/~kriz/cifar.html:

- CIFAR-10:  ``cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch`` (10 000 images each),
  each a pickled dict with ``b'data'`` (uint8, N x 3072, channel-major 3x32x32) and ``b'labels'``.
- CIFAR-100: ``cifar-100-python/train`` (50 000) and ``test`` (10 000), with ``b'fine_labels'``
  (100 classes) and ``b'coarse_labels'`` (20 superclasses; not used).

The files are Python pickles: that is the data set's own format, so there is no way around
unpickling them. We do it with a restricted unpickler that only resolves the handful of numpy
reconstruction helpers a CIFAR batch needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memfl.data.idx import DataError

__all__ = [
    "CIFAR_LAYOUTS",
    "CifarLayout",
    "find_cifar_folder",
    "find_cifar_archive",
    "extract_cifar_archive",
    "load_cifar",
    "read_cifar_batch",
]


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant's files live and how its batches are keyed."""

    folder: str  # the folder inside the archive
    archive: str  # the canonical archive name
    train: tuple[str, ...]  # batch files making up the training set
    test: tuple[str, ...]  # batch files making up the test set
    label_key: bytes  # the dict key holding the labels
    num_classes: int


CIFAR_LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}


def _numpy_core(attr_module: str):
    import importlib

    try:  # numpy >= 2 keeps the implementation in numpy._core; numpy.core is a deprecated alias
        return importlib.import_module(attr_module.replace("numpy.core", "numpy._core"))
    except ImportError:
        return importlib.import_module(attr_module)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves what a CIFAR batch (numpy arrays, bytes, lists) needs."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell a bytes object
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        return getattr(_numpy_core(module), name)


def read_cifar_batch(path: str | os.PathLike, label_key: bytes = b"labels") -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file.

    Args:
        path: a batch file (``data_batch_1``, ``test_batch``, ``train``, ...).
        label_key: ``b'labels'`` for CIFAR-10, ``b'fine_labels'`` for CIFAR-100.

    Returns:
        ``(x, y)``: uint8 images of shape (N, 3, 32, 32) and int64 labels of shape (N,).

    Raises:
        DataError: naming the file when it is unreadable, not a CIFAR pickle, or inconsistent.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # The CIFAR "python version" is, by its own definition, a pickle written by Python 2:
            # this is the only place memfl unpickles anything, and only through _CifarUnpickler,
            # i.e. pickle.load(f, encoding="bytes") restricted to numpy arrays and plain containers.
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    except Exception as e:  # truncated/corrupt pickles raise a zoo of exception types
        raise DataError(f"{path}: corrupt or truncated CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: not a CIFAR batch (expected keys b'data' and {label_key!r}; found {keys})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' has dtype {data.dtype} and shape {data.shape}; expected uint8 (N, 3072)")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def find_cifar_folder(base: str | os.PathLike, name: str) -> Path | None:
    """The folder holding all of ``name``'s batch files: ``base`` itself or ``base/<layout.folder>``.

    Returns None when neither has the complete set.
    """
    layout = CIFAR_LAYOUTS[name]
    base = Path(base)
    for cand in (base, base / layout.folder):
        if all((cand / f).is_file() for f in layout.train + layout.test):
            return cand
    return None


def find_cifar_archive(base: str | os.PathLike, name: str) -> Path | None:
    """``base/<canonical archive name>`` if it exists (or ``base`` when it is that archive), else None."""
    layout = CIFAR_LAYOUTS[name]
    base = Path(base)
    if base.is_file() and base.name == layout.archive:
        return base
    cand = base / layout.archive
    return cand if cand.is_file() else None


def extract_cifar_archive(archive: str | os.PathLike, dest: str | os.PathLike, name: str) -> Path:
    """Extract a CIFAR ``.tar.gz`` into ``dest`` and return the batch folder.

    Only regular files under the archive's top folder are extracted (``filter="data"``), first into a
    temporary folder next to the target, then moved into place, so an interrupted extraction never
    leaves a half-filled batch folder behind.
    """
    layout = CIFAR_LAYOUTS[name]
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / layout.folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{layout.folder}.", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = [
                    m for m in tar.getmembers() if m.name == layout.folder or m.name.startswith(layout.folder + "/")
                ]
                if not members:
                    raise DataError(f"{archive}: archive has no '{layout.folder}/' folder")
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{archive}: corrupt or truncated archive ({e})") from e
        found = find_cifar_folder(tmp / layout.folder, name)
        if found is None:
            raise DataError(f"{archive}: archive lacks some of {', '.join(layout.train + layout.test)}")
        if find_cifar_folder(target, name) is None:  # else a concurrent extraction won: keep theirs
            if target.exists():  # an incomplete folder from elsewhere: replace it
                shutil.rmtree(target)
            os.replace(found, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_cifar(folder: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load CIFAR-10 or CIFAR-100 from its batch folder (or the folder's parent).

    Returns:
        ``(train_x, train_y, test_x, test_y)`` with uint8 images (N, 3, 32, 32) and int64 labels.

    Raises:
        DataError: when files are missing, corrupt, or labels fall outside ``[0, num_classes)``.
    """
    layout = CIFAR_LAYOUTS[name]
    found = find_cifar_folder(folder, name)
    if found is None:
        raise DataError(f"{folder}: no complete {name} batch set ({', '.join(layout.train + layout.test)})")
    out = []
    for files in (layout.train, layout.test):
        parts = [read_cifar_batch(found / f, layout.label_key) for f in files]
        x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if y.size and (y.min() < 0 or y.max() >= layout.num_classes):
            raise DataError(f"{found}: {name} labels outside [0, {layout.num_classes})")
        out += [x, y]
    return out[0], out[1], out[2], out[3]
