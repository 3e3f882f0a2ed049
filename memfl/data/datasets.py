"""Image-classification data sets: locate, (download,) decode, normalise.

:func:`load_dataset` returns a :class:`Dataset` of float32 tensors ``(N, C, H, W)`` normalised with
the data set's usual mean/std, and int64 labels. Supported: ``fashion-mnist`` (the default real data
set), ``mnist``, ``cifar10``, ``cifar100``; :func:`make_synthetic` builds a small learnable stand-in
for fast tests.

Where the files are looked for, in order (the first folder with a complete set wins):

1. ``data_dir`` when given (and then *only* there: no complete set is an error naming the folder);
2. ``$MEMFL_DATA`` (a folder, or several joined by ``os.pathsep``): the files directly, or a
   per-data-set subfolder (``fashion-mnist/``, ``mnist/``, ``cifar10/``, ``cifar100/``);
3. the user cache ``$XDG_CACHE_HOME/memfl/<name>`` (default ``~/.cache/memfl/<name>``);
4. the system folder ``/usr/share/datasets/<name>`` -- the Debian package ``dataset-fashion-mnist``
   installs the four gzipped Fashion-MNIST IDX files in ``/usr/share/datasets/fashion-mnist``;
5. with ``download=True``, a download into the user cache from the canonical URL (or the base URL in
   ``$MEMFL_DATA_URL_<NAME>``, e.g. ``MEMFL_DATA_URL_FASHION_MNIST``, for a mirror).

In each folder the MNIST-family IDX files may be gzipped or raw; CIFAR may be the batch folder, its
parent, or a folder holding the ``.tar.gz`` archive (extracted into the user cache).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memfl.data.cifar import (
    CIFAR_LAYOUTS,
    extract_cifar_archive,
    find_cifar_archive,
    find_cifar_folder,
    load_cifar,
)
from memfl.data.idx import DataError, read_idx

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "cache_dir",
    "load_dataset",
    "make_synthetic",
]

#: The real data sets :func:`load_dataset` knows.
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")

#: Roots searched after ``$MEMFL_DATA`` and the user cache (Debian's data-set packages install here).
SYSTEM_DATA_ROOTS: tuple[Path, ...] = (Path("/usr/share/datasets"),)

#: Socket timeout (seconds) for each blocking network operation of a download.
DOWNLOAD_TIMEOUT_S = 60.0

_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "synthetic": "synthetic",
}

# IDX stems in the order train images, train labels, test images, test labels.
_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str  # "idx" | "cifar"
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    base_url: str
    md5: dict[str, str]  # canonical file name -> md5 (checked for canonical downloads)
    subfolders: tuple[str, ...]  # per-data-set subfolder names tried inside a root
    hint: str = ""


_SPECS: dict[str, _Spec] = {
    "fashion-mnist": _Spec(
        "fashion-mnist",
        "idx",
        10,
        (0.2860,),
        (0.3530,),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        "install the Debian package `dataset-fashion-mnist` (apt install dataset-fashion-mnist; "
        "files land in /usr/share/datasets/fashion-mnist), or ",
    ),
    "mnist": _Spec(
        "mnist",
        "idx",
        10,
        (0.1307,),
        (0.3081,),
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        ("mnist", "MNIST/raw"),
    ),
    "cifar10": _Spec(
        "cifar10",
        "cifar",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        ("cifar10", "cifar-10"),
    ),
    "cifar100": _Spec(
        "cifar100",
        "cifar",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        ("cifar100", "cifar-100"),
    ),
}


# --------------------------------------------------------------------------------------------------
# The data set object


@dataclass(eq=False, repr=False)
class Dataset:
    """A train/test split held in memory.

    train_x, test_x: the inputs, ``(N, ...)``: any shape of at least 2 dimensions and any dtype,
                     the same per-sample shape and dtype in both splits. The shipped loaders give
                     float32 ``(N, C, H, W)`` images normalised with ``mean``/``std`` (per
                     channel); user data (:func:`memfl.data.user.as_dataset`) may be feature
                     vectors ``(N, F)``, non-square images, int64 token ids ``(N, T)``...
    train_y, test_y: integer (N,) class indices in ``[0, num_classes)`` (int64 from the loaders).
    source:          the folder the files came from (or a description, for synthetic data).
    mean, std:       the per-channel statistics used to normalise (raw pixel values in [0, 1]);
                     empty for synthetic data.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source: str
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dim() < 2:
                raise ValueError(
                    f"{self.name}: {split}_x must be (N, ...) with at least 2 dimensions "
                    f"(one sample per row), got shape {tuple(x.shape)}"
                )
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: {split}_y has shape {tuple(y.shape)} for {x.shape[0]} inputs")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"{self.name}: {split}_y must hold integer class indices, got {y.dtype}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test inputs differ in shape "
                f"({tuple(self.train_x.shape[1:])} vs {tuple(self.test_x.shape[1:])})"
            )
        if self.train_x.dtype != self.test_x.dtype:
            raise ValueError(
                f"{self.name}: train and test inputs differ in dtype ({self.train_x.dtype} vs {self.test_x.dtype})"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input: ``(C, H, W)`` for the shipped image sets, ``(F,)``, ``(T,)``..."""
        return tuple(int(s) for s in self.train_x.shape[1:])

    @property
    def example(self) -> torch.Tensor | None:
        """What memory estimates should draw inputs like (:mod:`memfl.memory.inputs`): None for
        floating inputs (the default, standard normal), else the training inputs themselves
        (integer ids: their value range is used)."""
        return None if self.train_x.is_floating_point() else self.train_x

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, source={self.source!r})"
        )


# --------------------------------------------------------------------------------------------------
# Locating files


def cache_dir(name: str | None = None) -> Path:
    """The user cache: ``$XDG_CACHE_HOME/memfl[/<name>]``, default ``~/.cache/memfl[/<name>]``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = Path(root) / "memfl"
    return base / name if name else base


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem[.gz]`` (also the ``train-images.idx3-ubyte`` spelling some mirrors use)."""
    for s in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            p = folder / (s + suffix)
            if p.is_file():
                return p
    return None


def _idx_files(folder: Path) -> tuple[list[Path] | None, list[str]]:
    """The four IDX files in ``folder`` (or None) and the names that are missing."""
    found = [_idx_file(folder, s) for s in _IDX_STEMS]
    missing = [s for s, p in zip(_IDX_STEMS, found) if p is None]
    return (None if missing else found), missing  # type: ignore[return-value]


def _candidates(spec: _Spec, root: Path) -> list[Path]:
    """The folders inside a search root that may hold ``spec``'s files."""
    return [root] + [root / s for s in spec.subfolders]


def _find(spec: _Spec, root: Path, notes: list[str]) -> Path | list[Path] | None:
    """Look for a complete set under one search root.

    Returns the four IDX paths (MNIST family), the CIFAR batch folder, or None. Partial sets are
    reported in ``notes`` so the final error can say what is missing where.
    """
    if spec.kind == "cifar" and root.is_file():  # the archive itself
        archive = find_cifar_archive(root, spec.name)
        if archive is None:
            notes.append(f"{root} is a file, not {CIFAR_LAYOUTS[spec.name].archive}")
            return None
        cached = find_cifar_folder(cache_dir(spec.name), spec.name)
        return cached if cached is not None else extract_cifar_archive(archive, cache_dir(spec.name), spec.name)
    for folder in _candidates(spec, root):
        if not folder.is_dir():
            continue
        if spec.kind == "idx":
            files, missing = _idx_files(folder)
            if files is not None:
                return files
            if len(missing) < len(_IDX_STEMS):
                notes.append(f"{folder} has only part of the set (missing {', '.join(missing)}[.gz])")
        else:
            found = find_cifar_folder(folder, spec.name)
            if found is not None:
                return found
            archive = find_cifar_archive(folder, spec.name)
            if archive is not None:
                cached = find_cifar_folder(cache_dir(spec.name), spec.name)
                return cached if cached is not None else extract_cifar_archive(archive, cache_dir(spec.name), spec.name)
    return None


def _env_roots() -> list[Path]:
    value = os.environ.get("MEMFL_DATA", "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def _expected_files(spec: _Spec) -> str:
    if spec.kind == "idx":
        return ", ".join(s + "[.gz]" for s in _IDX_STEMS)
    layout = CIFAR_LAYOUTS[spec.name]
    return f"{layout.folder}/{{{','.join(layout.train + layout.test)}}} or {layout.archive}"


def _how_to_get(spec: _Spec) -> str:
    return (
        f"To get {spec.name}: {spec.hint}put the standard files ({_expected_files(spec)}) in a folder and "
        f"pass --data-dir DIR (or set $MEMFL_DATA=DIR), or go online and let memfl download them into "
        f"{cache_dir(spec.name)} (download=True; mirror via ${_url_env(spec)})."
    )


def _url_env(spec: _Spec) -> str:
    return "MEMFL_DATA_URL_" + spec.name.upper().replace("-", "_")


# --------------------------------------------------------------------------------------------------
# Downloading


def _download_file(url: str, dest: Path, *, md5: str | None = None, progress: bool = False) -> None:
    """Fetch ``url`` to ``dest`` through a temporary file in the same folder, renamed on success.

    Nothing is left behind on failure. Raises DataError on network errors, a short read, or an md5
    mismatch (``md5`` given).
    """
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DataError(f"refusing to download {url!r}: only http(s) and file URLs are supported")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        written = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            bar = _progress_bar(dest.name, total) if progress else None
            try:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if bar is not None:
                        bar[0].update(bar[1], completed=written)
            finally:
                if bar is not None:
                    bar[0].stop()
        if total and written != total:
            raise DataError(f"download of {url} stopped after {written} of {total} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(f"download of {url} has md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # an HTTPError holds the open response; don't leak its socket
        raise DataError(f"could not download {url}: {e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def _progress_bar(label: str, total: int):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True
    )
    task = bar.add_task(f"downloading {label}", total=total or None)
    bar.start()
    return bar, task


def _download(spec: _Spec, *, progress: bool) -> Path:
    """Download ``spec``'s files into the user cache; returns the cache folder."""
    dest = cache_dir(spec.name)
    override = os.environ.get(_url_env(spec))
    base = override or spec.base_url
    if not base.endswith("/"):
        base += "/"
    for fname, md5 in spec.md5.items():
        if spec.kind == "idx" and _idx_file(dest, fname[: -len(".gz")]) is not None:
            continue  # already there from an earlier, partial run
        # Checksums pin the canonical files; a mirror set by the user is trusted (formats are still validated).
        _download_file(base + fname, dest / fname, md5=None if override else md5, progress=progress)
        if spec.kind == "cifar":
            try:
                extract_cifar_archive(dest / fname, dest, spec.name)
            finally:
                (dest / fname).unlink(missing_ok=True)
    return dest


def _locate(spec: _Spec, data_dir: str | os.PathLike | None, download: bool, progress: bool) -> Path | list[Path]:
    notes: list[str] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise DataError(f"data folder {root} does not exist. {_how_to_get(spec)}")
        found = _find(spec, root, notes)
        if found is None:
            extra = f" ({'; '.join(notes)})" if notes else ""
            raise DataError(
                f"no {spec.name} files in {root} or its subfolders {', '.join(spec.subfolders)}{extra}. "
                + _how_to_get(spec)
            )
        return found
    roots = _env_roots() + [cache_dir(spec.name)] + [r / spec.name for r in SYSTEM_DATA_ROOTS]
    for root in roots:
        found = _find(spec, root, notes)
        if found is not None:
            return found
    if download:
        try:
            dest = _download(spec, progress=progress)
        except DataError as e:
            raise DataError(f"{spec.name} not found locally and the download failed: {e}. {_how_to_get(spec)}") from e
        found = _find(spec, dest, notes)
        if found is not None:
            return found
    searched = ", ".join(str(r) for r in roots)
    extra = f" Partial sets: {'; '.join(notes)}." if notes else ""
    no_dl = "" if download else " Downloading was off (download=False)."
    raise DataError(f"{spec.name} not found (searched {searched}).{extra}{no_dl} {_how_to_get(spec)}")


# --------------------------------------------------------------------------------------------------
# Decoding


def _to_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32, scaled to [0, 1] then normalised per channel."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))  # a fresh, writable copy
    c = x.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return x.mul_(1.0 / (255.0 * s)).sub_(m / s)


def _load_idx_set(spec: _Spec, files: list[Path]) -> tuple[np.ndarray, ...]:
    try:
        out = []
        for img_path, lbl_path in ((files[0], files[1]), (files[2], files[3])):
            x = read_idx(img_path, ndim=3)
            y = read_idx(lbl_path, ndim=1)
            if x.shape[0] != y.shape[0]:
                raise DataError(f"{lbl_path}: {y.shape[0]} labels for {x.shape[0]} images in {img_path.name}")
            if y.size and int(y.max()) >= spec.num_classes:
                raise DataError(f"{lbl_path}: label {int(y.max())} outside [0, {spec.num_classes})")
            out += [x[:, None, :, :], y]
    except DataError as e:
        raise DataError(f"{e}. Delete or replace the file; {_how_to_get(spec)}") from e
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(f"{files[0]} and {files[2]}: train and test images differ in size")
    return tuple(out)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = False,
) -> Dataset:
    """Load a data set by name.

    Args:
        name:     one of :data:`DATASETS` (``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``;
                  ``fmnist``/``cifar-10`` style aliases work), or ``synthetic`` for
                  :func:`make_synthetic` with its defaults.
        data_dir: a folder holding the files (or a per-data-set subfolder); when given it is the only
                  place looked at.
        download: allow downloading into the user cache when nothing is found locally.
        progress: show a progress bar while downloading.

    Returns:
        A :class:`Dataset` with normalised float32 images and int64 labels.

    Raises:
        ValueError: unknown name.
        DataError:  files missing, partial or corrupt, or the download failed; the message names the
                    file/folder and says how to get the data.
    """
    key = _ALIASES.get(name.strip().lower().replace("_", "-"))
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)} (or 'synthetic')")
    if key == "synthetic":
        return make_synthetic()
    spec = _SPECS[key]
    found = _locate(spec, data_dir, download, progress)
    if spec.kind == "idx":
        files = found if isinstance(found, list) else None
        assert files is not None
        tr_x, tr_y, te_x, te_y = _load_idx_set(spec, files)
        source = str(files[0].parent)
    else:
        folder = found if isinstance(found, Path) else None
        assert folder is not None
        try:
            tr_x, tr_y, te_x, te_y = load_cifar(folder, spec.name)
        except DataError as e:
            raise DataError(f"{e}. Delete or replace the file; {_how_to_get(spec)}") from e
        source = str(folder)
    return Dataset(
        name=spec.name,
        train_x=_to_tensor(tr_x, spec.mean, spec.std),
        train_y=torch.from_numpy(np.asarray(tr_y, dtype=np.int64)),
        test_x=_to_tensor(te_x, spec.mean, spec.std),
        test_y=torch.from_numpy(np.asarray(te_y, dtype=np.int64)),
        num_classes=spec.num_classes,
        source=source,
        mean=spec.mean,
        std=spec.std,
    )


# --------------------------------------------------------------------------------------------------
# Synthetic data


def make_synthetic(
    num_train: int = 512,
    num_test: int = 128,
    shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """A small synthetic data set with learnable, class-dependent images (for fast tests).

    Each class has a fixed smooth random pattern (low-resolution Gaussian noise upsampled
    bilinearly, so convolutions and pooling see spatial structure); a sample is its class pattern
    plus i.i.d. Gaussian pixel noise of the same scale. Labels are balanced (round-robin, shuffled).
    Train and test share the patterns and differ in noise; everything is deterministic in ``seed``.
    The result is named ``"synthetic"`` and roughly zero-mean, unit-variance.

    Args:
        num_train, num_test: sample counts.
        shape:               ``(C, H, W)`` of an image.
        num_classes:         number of classes (>= 2).
        seed:                the seed.
    """
    if num_classes < 2:
        raise ValueError("make_synthetic needs num_classes >= 2")
    if num_train < 1 or num_test < 1:
        raise ValueError("make_synthetic needs num_train >= 1 and num_test >= 1")
    c, h, w = (int(v) for v in shape)
    g = torch.Generator().manual_seed(int(seed))
    low = torch.randn(num_classes, c, max(2, h // 4), max(2, w // 4), generator=g)
    protos = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = protos[y] + torch.randn(n, c, h, w, generator=g)
        return x, y.to(torch.int64)

    train_x, train_y = split(num_train)
    test_x, test_y = split(num_test)
    scale = float(2.0**0.5)  # pattern and noise both have unit variance
    return Dataset(
        name="synthetic",
        train_x=(train_x / scale).contiguous(),
        train_y=train_y,
        test_x=(test_x / scale).contiguous(),
        test_y=test_y,
        num_classes=num_classes,
        source=f"synthetic (seed={seed})",
    )
