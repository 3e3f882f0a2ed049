"""memfl's version (what ``pip`` installed) and where its source lives; imports nothing of memfl."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("memfl")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: the folder that holds the ``memfl`` package (put it on PYTHONPATH to import this memfl)
SOURCE_ROOT = Path(__file__).resolve().parents[2]
