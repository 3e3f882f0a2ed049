"""Reader for the IDX format used by MNIST and Fashion-MNIST.

An IDX file is a big-endian header followed by the raw array:

    bytes 0-1  zero
    byte  2    element type (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64)
    byte  3    number of dimensions n
    then n big-endian uint32 sizes, then prod(sizes) elements, row-major.

Files may be gzipped (the usual ``*.gz`` distribution) or raw. :func:`read_idx` validates the magic
number, the number of dimensions and the payload length, so a truncated or corrupt file raises a
:class:`DataError` that names the file instead of a reshape error somewhere later.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DataError", "IDX_DTYPES", "read_idx"]


class DataError(Exception):
    """A data set is missing, incomplete or corrupt.

    The message says which file or folder is at fault and how to get the data.
    """


#: IDX element-type byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped when the file starts with the gzip magic (not by suffix)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                    return gz.read()
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def read_idx(path: str | os.PathLike, *, ndim: int | None = None, dtype: int | None = 0x08) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a numpy array.

    Args:
        path:  the file.
        ndim:  the number of dimensions the caller expects (3 for images, 1 for labels), or None for any.
        dtype: the IDX element-type byte expected (0x08 = uint8, the MNIST family's), or None for any.

    Returns:
        A native-endian numpy array with the shape from the header (possibly read-only: copy it
        before writing to it).

    Raises:
        DataError: naming the file, when it cannot be read, has a bad magic number, the wrong
            number of dimensions or element type, or a payload shorter/longer than the header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero, type_byte, nd = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_byte not in IDX_DTYPES or nd == 0:
        raise DataError(
            f"{path}: not an IDX file (magic number 0x{int.from_bytes(raw[:4], 'big'):08X}; expected 0x000008nn)"
        )
    if dtype is not None and type_byte != dtype:
        raise DataError(f"{path}: IDX element type 0x{type_byte:02X}, expected 0x{dtype:02X}")
    if ndim is not None and nd != ndim:
        raise DataError(f"{path}: IDX file has {nd} dimensions, expected {ndim}")
    header_len = 4 + 4 * nd
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{nd}I", raw[4:header_len])
    np_dtype = IDX_DTYPES[type_byte]
    expected = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    payload = len(raw) - header_len
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {kind}: header says shape {tuple(dims)} ({expected} bytes), "
            f"found {payload} bytes of data"
        )
    arr = np.frombuffer(raw, dtype=np_dtype, offset=header_len).reshape(dims)
    if np_dtype.itemsize > 1:
        return arr.astype(np_dtype.newbyteorder("="))
    return arr
