"""Tests for memfl.data: IDX/CIFAR loading, search order, downloads (loopback only), partitions."""

from __future__ import annotations

import functools
import gzip
import http.server
import importlib
import math
import os
import pickle
import shutil
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from memfl.data import (
    DATASETS,
    DataError,
    Dataset,
    label_histogram,
    load_dataset,
    make_synthetic,
    parse_partition,
    partition,
)
from memfl.data import datasets as ds_mod
from memfl.data.idx import read_idx

# memfl.data.partition (the module) is shadowed by the re-exported function of the same name
part_mod = importlib.import_module("memfl.data.partition")

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------
# Writers (independent of the code under test)


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist_set(folder: Path, *, n_train=24, n_test=12, gz=True, seed=0, hw=28):
    """Write the four IDX files; returns (train_images, train_labels, test_images, test_labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, hw, hw), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, hw, hw), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )
    for stem, arr in zip(IDX_STEMS, arrays):
        write_idx(folder / stem, arr, gz)
    return arrays


def cifar_batch_bytes(data: np.ndarray, labels, key: bytes) -> bytes:
    return pickle.dumps(
        {b"batch_label": b"test", key: list(map(int, labels)), b"data": data, b"filenames": [b"x.png"] * len(labels)},
        protocol=2,
    )


def write_cifar10(folder: Path, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        (folder / name).write_bytes(cifar_batch_bytes(x, y, b"labels"))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def write_cifar100(folder: Path, n_train=10, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 100, n)
        blob = pickle.loads(cifar_batch_bytes(x, y, b"fine_labels"))
        blob[b"coarse_labels"] = [int(v) // 5 for v in y]
        (folder / name).write_bytes(pickle.dumps(blob, protocol=2))
        out += [x, y]
    return out


# ------------------------------------------------------------------------------------------------
# Isolation: never the real network, the real cache or (unless asked) the system folders


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("MEMFL_DATA", raising=False)
    for name in DATASETS:  # any download that a test did not set up goes to a closed loopback port
        monkeypatch.setenv("MEMFL_DATA_URL_" + name.upper().replace("-", "_"), "http://127.0.0.1:9/")
    monkeypatch.setattr(ds_mod, "SYSTEM_DATA_ROOTS", ())
    monkeypatch.setattr(ds_mod, "DOWNLOAD_TIMEOUT_S", 5.0)
    return cache


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


class _Truncating(_Quiet):
    """Announces the full length of a file, then sends only half of it."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve():
    """serve(folder, handler=_Quiet) -> base URL of a loopback HTTP server for ``folder``."""
    servers = []

    def start(folder: Path, handler=_Quiet) -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST / MNIST)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_gz_and_raw(tmp_path, gz):
    folder = tmp_path / "fm"
    tr_x, tr_y, te_x, te_y = write_mnist_set(folder, gz=gz)
    ds = load_dataset("fashion-mnist", data_dir=folder, download=False)
    assert isinstance(ds, Dataset) and ds.name == "fashion-mnist"
    assert ds.train_x.shape == (24, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.equal(ds.train_y, torch.from_numpy(tr_y.astype(np.int64)))
    assert torch.equal(ds.test_y, torch.from_numpy(te_y.astype(np.int64)))
    expected = (torch.from_numpy(tr_x.astype(np.float32)) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(ds.train_x[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert ds.source == str(folder)


def test_mnist_subfolder_mixed_compression_and_own_stats(tmp_path):
    folder = tmp_path / "root" / "mnist"
    tr_x, *_ = write_mnist_set(folder, gz=True)
    # replace one file by its raw version: mixed gz/raw sets are fine
    (folder / "t10k-labels-idx1-ubyte.gz").rename(folder / "tmp.gz")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress((folder / "tmp.gz").read_bytes()))
    (folder / "tmp.gz").unlink()
    ds = load_dataset("MNIST", data_dir=tmp_path / "root", download=False)  # name is case-insensitive
    assert ds.name == "mnist" and ds.source == str(folder)
    expected = (torch.from_numpy(tr_x.astype(np.float32)) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(ds.train_x[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_read_idx_rejects_wrong_ndim(tmp_path):
    p = write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8), gz=False)
    assert read_idx(p, ndim=1).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="1 dimensions, expected 3"):
        read_idx(p, ndim=3)


@pytest.mark.parametrize("damage", ["truncate-raw", "truncate-gz", "bad-magic", "trailing", "empty"])
def test_corrupt_idx_is_a_data_error_naming_the_file(tmp_path, damage):
    folder = tmp_path / "fm"
    write_mnist_set(folder, gz=damage == "truncate-gz")
    name = "train-images-idx3-ubyte" + (".gz" if damage == "truncate-gz" else "")
    target = folder / name
    data = target.read_bytes()
    if damage.startswith("truncate"):
        target.write_bytes(data[: len(data) - 100])
    elif damage == "bad-magic":
        target.write_bytes(b"\x00\x00\x07\x03" + data[4:])
    elif damage == "trailing":
        target.write_bytes(data + b"\x00" * 7)
    else:
        target.write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=folder, download=False)
    msg = str(err.value)
    assert name in msg
    assert "dataset-fashion-mnist" in msg  # says how to get good data


def test_label_count_mismatch(tmp_path):
    folder = tmp_path / "fm"
    write_mnist_set(folder, gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=False)
    with pytest.raises(DataError, match="11 labels for 12 images"):
        load_dataset("fashion-mnist", data_dir=folder, download=False)


def test_missing_data_dir_is_an_error_naming_the_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=missing)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    for hint in ("dataset-fashion-mnist", "--data-dir", "$MEMFL_DATA", "download"):
        assert hint in msg


def test_explicit_empty_data_dir_does_not_fall_back(tmp_path, monkeypatch):
    good = tmp_path / "good"
    write_mnist_set(good)
    monkeypatch.setenv("MEMFL_DATA", str(good))  # would work, but data_dir wins and has nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no fashion-mnist files in {empty}"):
        load_dataset("fashion-mnist", data_dir=empty)


def test_partial_set_is_reported(tmp_path):
    folder = tmp_path / "fm"
    write_mnist_set(folder)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", data_dir=folder, download=False)


def test_memfl_data_env_is_honoured(tmp_path, monkeypatch):
    root = tmp_path / "shared-data"
    write_mnist_set(root / "fashion-mnist", seed=3)
    write_mnist_set(root, seed=4, n_train=7)  # files directly in the root: used for any IDX data set
    monkeypatch.setenv("MEMFL_DATA", str(root))
    fm = load_dataset("fashion-mnist", download=False)
    assert fm.source == str(root) and fm.num_train == 7  # the root itself comes before subfolders
    (root / "train-images-idx3-ubyte.gz").unlink()
    fm = load_dataset("fashion-mnist", download=False)
    assert fm.source == str(root / "fashion-mnist") and fm.num_train == 24


def test_system_folder_is_searched(tmp_path, monkeypatch):
    write_mnist_set(tmp_path / "usr-share" / "mnist")
    monkeypatch.setattr(ds_mod, "SYSTEM_DATA_ROOTS", (tmp_path / "usr-share",))
    assert load_dataset("mnist", download=False).source == str(tmp_path / "usr-share" / "mnist")


def test_not_found_without_download(isolated):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", download=False)
    msg = str(err.value)
    assert "mnist not found" in msg and "download=False" in msg and str(isolated / "memfl" / "mnist") in msg


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("imagenet")


@pytest.mark.skipif(
    not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed (/usr/share/datasets/fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(ds_mod, "SYSTEM_DATA_ROOTS", (REAL_FMNIST.parent,))
    ds = load_dataset("fashion-mnist", download=False)  # found through the system folder
    assert ds.source == str(REAL_FMNIST)
    assert ds.num_train == 60000 and ds.num_test == 10000 and ds.num_classes == 10
    assert ds.input_shape == (1, 28, 28)
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))
    assert abs(ds.train_x.mean().item()) < 0.01 and abs(ds.train_x.std().item() - 1) < 0.01


# ------------------------------------------------------------------------------------------------
# Downloads (loopback only)


def test_download_into_cache(tmp_path, isolated, serve, monkeypatch):
    served = tmp_path / "mirror"
    tr_x, tr_y, *_ = write_mnist_set(served, gz=True, seed=7)
    monkeypatch.setenv("MEMFL_DATA_URL_FASHION_MNIST", serve(served))
    ds = load_dataset("fashion-mnist")
    cache = isolated / "memfl" / "fashion-mnist"
    assert ds.source == str(cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(s + ".gz" for s in IDX_STEMS)
    assert torch.equal(ds.train_y, torch.from_numpy(tr_y.astype(np.int64)))
    # second load comes from the cache, with the server gone
    monkeypatch.setenv("MEMFL_DATA_URL_FASHION_MNIST", "http://127.0.0.1:9/")
    assert load_dataset("fashion-mnist").source == str(cache)


def test_failed_download_leaves_no_partial_file(tmp_path, isolated, serve, monkeypatch):
    served = tmp_path / "mirror"
    write_mnist_set(served, gz=True, n_train=200)
    (served / "t10k-labels-idx1-ubyte.gz").unlink()  # 404 for the last file
    monkeypatch.setenv("MEMFL_DATA_URL_MNIST", serve(served))
    with pytest.raises(DataError, match="download failed") as err:
        load_dataset("mnist")
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value)
    cache = isolated / "memfl" / "mnist"
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted(s + ".gz" for s in IDX_STEMS[:3])  # complete files only, no *.part

    # a server that cuts the transfer short: nothing half-written is left behind
    for p in cache.iterdir():
        p.unlink()
    monkeypatch.setenv("MEMFL_DATA_URL_MNIST", serve(served, _Truncating))
    with pytest.raises(DataError, match="stopped after"):
        load_dataset("mnist")
    assert list(cache.iterdir()) == []


def test_download_checksum_mismatch(tmp_path, serve):
    served = tmp_path / "mirror"
    served.mkdir()
    (served / "f.bin").write_bytes(b"hello")
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(DataError, match="md5"):
        ds_mod._download_file(serve(served) + "f.bin", dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    ds_mod._download_file(serve(served) + "f.bin", dest, md5="5d41402abc4b2a76b9719d911017c592")
    assert dest.read_bytes() == b"hello"


def test_download_refuses_odd_schemes(tmp_path):
    with pytest.raises(DataError, match="only http"):
        ds_mod._download_file("ftp://127.0.0.1/x", tmp_path / "x")


# ------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_folder_and_parent(tmp_path):
    tr_x, tr_y, te_x, te_y = write_cifar10(tmp_path / "c" / "cifar-10-batches-py")
    for where in (tmp_path / "c", tmp_path / "c" / "cifar-10-batches-py"):
        ds = load_dataset("cifar10", data_dir=where, download=False)
        assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
        assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
        assert ds.train_y.tolist() == tr_y.tolist() and ds.test_y.tolist() == te_y.tolist()
        # channel-major rows: data[i, c*1024 + h*32 + w] is pixel (c, h, w); green channel stats
        raw = tr_x[3, 1024 + 5 * 32 + 7]
        assert ds.train_x[3, 1, 5, 7].item() == pytest.approx((raw / 255 - 0.4822) / 0.2435, abs=1e-5)
        assert ds.source == str(tmp_path / "c" / "cifar-10-batches-py")


def test_cifar100_from_archive_extracts_to_cache(tmp_path, isolated):
    src = tmp_path / "build"
    tr_x, tr_y, te_x, te_y = write_cifar100(src / "cifar-100-python")
    user = tmp_path / "user"
    user.mkdir()
    with tarfile.open(user / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    ds = load_dataset("cifar100", data_dir=user, download=False)
    assert ds.num_classes == 100 and ds.train_x.shape == (10, 3, 32, 32)
    assert ds.train_y.tolist() == tr_y.tolist()  # fine labels, not coarse
    assert ds.source == str(isolated / "memfl" / "cifar100" / "cifar-100-python")
    assert sorted(p.name for p in user.iterdir()) == ["cifar-100-python.tar.gz"]  # user folder untouched
    # the archive itself may be given as data_dir
    shutil.rmtree(isolated / "memfl" / "cifar100")
    again = load_dataset("cifar100", data_dir=user / "cifar-100-python.tar.gz", download=False)
    assert again.test_y.tolist() == te_y.tolist()


def test_cifar_download_archive(tmp_path, isolated, serve, monkeypatch):
    src = tmp_path / "build"
    write_cifar10(src / "cifar-10-batches-py")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setenv("MEMFL_DATA_URL_CIFAR10", serve(mirror))
    ds = load_dataset("cifar10")
    cache = isolated / "memfl" / "cifar10"
    assert ds.source == str(cache / "cifar-10-batches-py") and ds.num_train == 20
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-batches-py"]  # archive removed after extraction


def test_cifar_batches_written_by_old_numpy(tmp_path):
    """The published files reference numpy.core.multiarray (numpy 1.x); numpy 2 moved it to numpy._core."""
    folder = tmp_path / "cifar-10-batches-py"
    tr_x, tr_y, *_ = write_cifar10(folder)
    for f in folder.iterdir():
        blob = f.read_bytes()
        old = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert old != blob or b"numpy.core.multiarray\n" in blob
        f.write_bytes(old)
    ds = load_dataset("cifar10", data_dir=folder, download=False)
    assert ds.train_y.tolist() == tr_y.tolist()


def test_cifar_corrupt_and_malicious_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", data_dir=folder, download=False)

    # a pickle that would call a function on load is refused, not executed
    (folder / "data_batch_2").write_bytes(pickle.dumps(os.getcwd, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", data_dir=folder, download=False)

    # wrong shape of b'data'
    (folder / "data_batch_2").write_bytes(cifar_batch_bytes(np.zeros((4, 100), np.uint8), [0] * 4, b"labels"))
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", data_dir=folder, download=False)


# ------------------------------------------------------------------------------------------------
# Synthetic data


def test_make_synthetic_is_deterministic_and_learnable():
    a = make_synthetic(seed=1)
    b = make_synthetic(seed=1)
    c = make_synthetic(seed=2)
    assert a.name == "synthetic" and "synthetic" in a.source
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (512, 1, 28, 28) and a.test_x.shape == (128, 1, 28, 28)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert torch.bincount(a.train_y, minlength=10).tolist() == [52] * 2 + [51] * 8
    assert abs(a.train_x.std().item() - 1) < 0.1
    # nearest class centroid: learnable from the training split
    centroids = torch.stack([a.train_x[a.train_y == k].mean(0).flatten() for k in range(10)])
    pred = torch.cdist(a.test_x.flatten(1), centroids).argmin(1)
    assert (pred == a.test_y).float().mean().item() > 0.9
    rgb = make_synthetic(num_train=30, num_test=10, shape=(3, 16, 16), num_classes=3)
    assert rgb.input_shape == (3, 16, 16) and rgb.num_classes == 3 and int(rgb.train_y.max()) == 2


def test_load_synthetic_by_name():
    assert load_dataset("synthetic").name == "synthetic"


# ------------------------------------------------------------------------------------------------
# Partitions


def _labels(n=3000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def _mean_entropy(labels, parts, classes=10):
    h = label_histogram(labels, parts, classes).astype(float)
    p = h / h.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(ent.mean())


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "dirichlet:100", "classes:1", "classes:2", "classes:3"])
def test_partition_covers_every_sample_once(spec):
    y = _labels()
    parts = partition(y, 20, spec, seed=5)
    assert len(parts) == 20
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and np.array_equal(np.sort(allidx), np.arange(len(y)))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "classes:2"])
def test_partition_is_deterministic(spec):
    y = _labels()
    a = partition(y, 10, spec, seed=1)
    b = partition(torch.from_numpy(y), 10, spec, seed=1)  # torch labels work too
    c = partition(y, 10, spec, seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_iid_sizes_balanced():
    sizes = [len(p) for p in partition(_labels(n=1003), 10, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_min_size_and_skew():
    y = _labels(n=5000)
    skewed = partition(y, 20, "dirichlet:0.1", seed=0, min_size=50)
    assert min(len(p) for p in skewed) >= 50
    iid = partition(y, 20, "iid", seed=0)
    near_iid = partition(y, 20, "dirichlet:1000", seed=0)
    h_iid, h_skew, h_near = (_mean_entropy(y, p) for p in (iid, skewed, near_iid))
    assert h_skew < 0.6 * h_iid  # label skew: far fewer effective classes per client
    assert h_near > 0.95 * h_iid  # huge alpha is ~IID
    assert h_iid > 0.9 * math.log(10)


def test_dirichlet_gives_up_clearly(monkeypatch):
    y = _labels(n=1000)
    with pytest.raises(ValueError, match="lower min_size or num_clients"):
        partition(y, 50, "dirichlet:0.5", min_size=21)  # 50 x 21 > 1000: impossible upfront
    monkeypatch.setattr(part_mod, "MAX_DIRICHLET_ATTEMPTS", 3)
    with pytest.raises(ValueError, match="in 3 draws some client always had fewer"):
        partition(y, 50, "dirichlet:0.01", min_size=19)


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_classes_k_gives_k_classes_per_client(k):
    y = _labels(n=4000)
    parts = partition(y, 20, f"classes:{k}", seed=3)
    h = label_histogram(y, parts, 10)
    assert ((h > 0).sum(1) == k).all()
    holders = (h > 0).sum(0)  # every class is held by floor/ceil(20k/10) clients
    assert holders.max() - holders.min() <= 1 and holders.sum() == 20 * k


def test_classes_errors():
    y = _labels(n=500)
    with pytest.raises(ValueError, match="only 10 classes"):
        partition(y, 5, "classes:11")
    with pytest.raises(ValueError, match="cannot cover all 10 classes"):
        partition(y, 3, "classes:2")


def test_too_few_samples():
    with pytest.raises(ValueError, match="cannot split 5 samples among 6 clients"):
        partition(np.arange(5) % 2, 6, "iid")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "IID2",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:abc",
        "classes:0",
        "classes:1.5",
        "shards:2",
        "classes:-2",
    ],
)
def test_bad_partition_spec(bad):
    with pytest.raises(ValueError) as err:
        partition(_labels(n=100), 2, bad)
    assert "iid" in str(err.value) and "dirichlet:ALPHA" in str(err.value) and "classes:K" in str(err.value)


def test_parse_partition():
    assert parse_partition("iid") == ("iid", None)
    assert parse_partition(" Dirichlet:0.5 ") == ("dirichlet", 0.5)
    assert parse_partition("dirichlet:1e-1") == ("dirichlet", 0.1)
    assert parse_partition("classes:2") == ("classes", 2)
    with pytest.raises(ValueError):
        parse_partition(None)  # type: ignore[arg-type]


def test_user_dataset_any_shape_and_checks():
    import torch

    from memfl.data import DataError, Dataset, as_dataset

    x = torch.randn(10, 3, 5, 7)  # non-square images
    ds = as_dataset((x[:8], torch.arange(8) % 3), (x[8:], torch.tensor([0, 1])))
    assert ds.input_shape == (3, 5, 7) and ds.num_classes == 3 and ds.example is None
    tok = as_dataset(
        (torch.randint(0, 9, (6, 4)), torch.zeros(6, dtype=torch.int32)),
        (torch.randint(0, 9, (2, 4)), torch.ones(2, dtype=torch.int32)),
    )
    assert tok.input_shape == (4,) and tok.train_y.dtype == torch.long and tok.example is not None
    with pytest.raises(DataError, match="integer"):
        as_dataset((x, torch.zeros(10)), (x, torch.zeros(10)))
    with pytest.raises(DataError, match="inputs but"):
        as_dataset((x, torch.zeros(9, dtype=torch.long)), (x, torch.zeros(10, dtype=torch.long)))
    with pytest.raises(ValueError, match="at least 2"):
        Dataset(
            "d",
            torch.randn(4),
            torch.zeros(4, dtype=torch.long),
            torch.randn(4),
            torch.zeros(4, dtype=torch.long),
            2,
            "test",
        )


# ---------------------------------------------------- fixed-size Dirichlet, samples_per_client (SPEC 8)


def test_dirichlet_fixed_gives_every_client_exactly_n_with_label_skew():
    """200 clients x 100 of a 20,000 pool at alpha 0.1 (what dirichlet:0.1 cannot do with >= 10 each)."""
    y = _labels(n=20_000)
    parts = partition(y, 200, "dirichlet-fixed:0.1", seed=0)
    assert [len(p) for p in parts] == [100] * 200
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(y)))  # every sample exactly once
    h_iid = _mean_entropy(y, partition(y, 200, "iid", seed=0))
    assert _mean_entropy(y, parts) < 0.4 * h_iid  # strong label skew
    with pytest.raises(ValueError, match="min_size"):
        partition(y, 200, "dirichlet:0.1", seed=0, min_size=10)  # the variable-size split gives up
    # uneven totals: the first N mod clients of the seeded order get one more; deterministic
    odd = partition(_labels(n=1003), 10, "dirichlet-fixed:0.5", seed=3)
    assert sorted(len(p) for p in odd) == [100] * 7 + [101] * 3
    again = partition(_labels(n=1003), 10, "dirichlet-fixed:0.5", seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(odd, again))
    assert parse_partition("dirichlet-fixed:0.1") == ("dirichlet-fixed", 0.1)
    # a large alpha is ~IID
    assert _mean_entropy(y, partition(y, 200, "dirichlet-fixed:1000", seed=0)) > 0.9 * h_iid


def test_samples_per_client_draws_the_pool_then_partitions(small_config):
    from memfl.data import make_synthetic
    from memfl.server.setup import build_federation

    data = make_synthetic(num_train=2000, num_test=100, seed=0)
    cfg = small_config(clients=10, samples_per_client=30, partition="dirichlet-fixed:0.1")
    fed = build_federation(cfg, data, full_peak=1000)
    assert [c.info.num_samples for c in fed] == [30] * 10
    xs = torch.cat([c.x for c in fed])
    assert len({tuple(r.flatten()[:8].tolist()) for r in xs}) == 300  # 300 distinct images of the 2000
    again = build_federation(cfg, data, full_peak=1000)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(fed, again))
    other = build_federation(small_config(clients=10, samples_per_client=30, seed=2), data, full_peak=1000)
    assert not torch.equal(torch.cat([c.y for c in other]), torch.cat([c.y for c in fed]))
    # Dirichlet sizes vary around N; None (default) keeps the whole training set, as before
    dirichlet = build_federation(small_config(clients=10, samples_per_client=30), data, full_peak=1000)
    assert sum(c.info.num_samples for c in dirichlet) == 300
    whole = build_federation(small_config(clients=10), data, full_peak=1000)
    assert sum(c.info.num_samples for c in whole) == 2000
    assert small_config().run.samples_per_client is None
    with pytest.raises(ValueError, match="training set has 2000"):
        build_federation(small_config(clients=10, samples_per_client=300), data, full_peak=1000)
    # the flag
    import argparse

    from memfl.cli.common import add_run_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    args = parser.parse_args(["--samples-per-client", "100", "--partition", "dirichlet-fixed:0.1"])
    run = config_from_args(args).run
    assert run.samples_per_client == 100 and run.partition == "dirichlet-fixed:0.1"


def test_a_flower_node_cuts_the_same_share_as_the_simulator_with_samples_per_client(small_config):
    """A Flower ClientApp's share (``partition-id``) is the simulator's client: the pool draw of
    ``run.samples_per_client`` first, then the partition."""
    from memfl.runtime.flower.client_app import NodeSpec, client_data
    from memfl.server.setup import build_federation, load_data

    cfg = small_config(clients=8, samples_per_client=40, partition="dirichlet-fixed:0.5")
    fed = build_federation(cfg, load_data(cfg), full_peak=1000)
    for pid in (0, 5):
        spec = NodeSpec(pid, 8, device="laptop", speed=1.0, budget_bytes=10**9, budget_source="declared")
        x, y, _, _ = client_data(cfg, spec)
        assert len(y) == 40 and torch.equal(x, fed[pid].x) and torch.equal(y, fed[pid].y)
