"""Device classes for simulated clients: how much memory a training app may use, and how fast it is.

No public data set gives per-device *training* memory, so memfl ships a small, versioned table of
device classes (see ``docs/DEVICES.md`` for where each number comes from). The numbers are
estimates; :data:`DEVICE_TABLE_VERSION` changes whenever one does, and results record it.

- ``usable_share`` x ``ram_mb`` is the memory budget a foreground training app can count on.
- ``speed`` is the relative training throughput; 1.0 is this project's reference machine (a 2-core
  x86 laptop CPU). The virtual clock divides measured compute time by ``speed``.

Budgets for a population of clients come from :func:`assign_budgets` with a spec:

- ``profiles``     each client's budget is its device's :attr:`DeviceProfile.usable_bytes`;
- ``relative:LO-HI`` uniform in ``[LO, HI]`` x the model's full-training peak (ProFL-style 0.1-1.1);
- ``mb:LO-HI``     uniform in ``[LO, HI]`` MB (1 MB = 2**20 bytes), e.g. ProFL's ``mb:100-900``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BUDGET_FORMS",
    "DEVICES",
    "DEVICE_KINDS",
    "DEVICE_TABLE_VERSION",
    "MB",
    "DeviceProfile",
    "assign_budgets",
    "get_device",
    "parse_budget_spec",
]

#: Version of the device table; bump it whenever a number below changes.
DEVICE_TABLE_VERSION = "2026.11"

#: Bytes per MB as used throughout memfl's memory figures (MiB).
MB = 1 << 20

DEVICE_KINDS = ("phone", "board", "laptop")

#: The accepted budget-spec forms, for error messages and help texts.
BUDGET_FORMS = "'profiles', 'relative:LO-HI' (e.g. relative:0.1-1.1) or 'mb:LO-HI' (e.g. mb:100-900), with 0 < LO <= HI"


@dataclass(frozen=True)
class DeviceProfile:
    """One device class.

    name:         identifier, e.g. ``phone-4gb``, ``jetson-nano``, ``rpi4-2gb``, ``laptop-8gb``.
    kind:         ``phone`` | ``board`` | ``laptop``.
    ram_mb:       installed RAM in MB (GB x 1024).
    usable_share: share of RAM a foreground training app may use, in (0, 1].
    speed:        relative training compute speed; 1.0 = the reference machine (2-core x86 laptop CPU).
    source:       where the numbers come from, briefly (details in docs/DEVICES.md).
    """

    name: str
    kind: str
    ram_mb: int
    usable_share: float
    speed: float
    source: str

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"device {self.name}: kind must be one of {DEVICE_KINDS}, got {self.kind!r}")
        if self.ram_mb <= 0 or not 0 < self.usable_share <= 1 or self.speed <= 0:
            raise ValueError(f"device {self.name}: need ram_mb > 0, 0 < usable_share <= 1, speed > 0")

    @property
    def usable_bytes(self) -> int:
        """The memory budget in bytes: ``ram_mb * MB * usable_share``."""
        return int(self.ram_mb * MB * self.usable_share)


_ANDROID = "Android lmkd/availMem (est.)"
_GB5 = "Geekbench 5 multi-core, throttled (est.)"

_TABLE = [
    # name, kind, GB of RAM, usable share, speed, source
    ("phone-3gb", "phone", 3, 0.35, 0.30, f"entry SoC, 8x Cortex-A53 (Helio P35 class); {_GB5}; {_ANDROID}"),
    ("phone-4gb", "phone", 4, 0.40, 0.50, f"Snapdragon 665 / Helio G85 class; {_GB5}; {_ANDROID}"),
    ("phone-6gb", "phone", 6, 0.45, 0.80, f"Snapdragon 750G/778G class; {_GB5}; {_ANDROID}"),
    ("phone-8gb", "phone", 8, 0.50, 1.20, f"Snapdragon 865/888 class; {_GB5}; {_ANDROID}"),
    ("phone-12gb", "phone", 12, 0.50, 1.60, f"Snapdragon 8 Gen 2 class; {_GB5}; {_ANDROID}"),
    (
        "jetson-nano",
        "board",
        4,
        0.55,
        0.90,
        "NVIDIA Jetson Nano datasheet: 128-core Maxwell GPU 236 GFLOPS FP32, 4 GB shared LPDDR4",
    ),
    (
        "jetson-tx2",
        "board",
        8,
        0.70,
        2.00,
        "NVIDIA Jetson TX2 datasheet: 256-core Pascal GPU ~665 GFLOPS FP32, 8 GB shared LPDDR4",
    ),
    (
        "jetson-xavier-nx",
        "board",
        8,
        0.70,
        2.50,
        "NVIDIA Jetson Xavier NX datasheet: 384-core Volta GPU ~845 GFLOPS FP32, 8 GB shared LPDDR4x",
    ),
    ("rpi4-2gb", "board", 2, 0.70, 0.35, "Raspberry Pi 4 B product brief: 4x Cortex-A72 1.5 GHz; headless OS ~0.2 GB"),
    ("rpi4-4gb", "board", 4, 0.80, 0.35, "Raspberry Pi 4 B product brief: 4x Cortex-A72 1.5 GHz; headless OS ~0.2 GB"),
    ("rpi4-8gb", "board", 8, 0.85, 0.35, "Raspberry Pi 4 B product brief: 4x Cortex-A72 1.5 GHz; headless OS ~0.2 GB"),
    (
        "laptop-8gb",
        "laptop",
        8,
        0.45,
        1.00,
        "the reference: 2-core/4-thread x86 (Core i5-7200U class); desktop+browser ~4 GB",
    ),
    ("laptop-16gb", "laptop", 16, 0.55, 2.00, f"4-core/8-thread x86 (Core i5-1135G7 class); {_GB5}; desktop ~6 GB"),
]

#: The device table, by name, in table order.
DEVICES: dict[str, DeviceProfile] = {
    name: DeviceProfile(name, kind, gb * 1024, share, speed, source) for name, kind, gb, share, speed, source in _TABLE
}


def get_device(name: str) -> DeviceProfile:
    """The profile called ``name``; ValueError listing the known names otherwise."""
    try:
        return DEVICES[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}") from None


_NUM = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?"


def parse_budget_spec(spec: str) -> tuple[str, float, float]:
    """Validate a budget spec.

    Returns:
        ``(kind, lo, hi)``: ``("profiles", 0.0, 0.0)``, ``("relative", lo, hi)`` or ``("mb", lo, hi)``.
        A single value (``mb:512``) means LO = HI.

    Raises:
        ValueError: naming the accepted forms, also when LO > HI or a bound is not positive.
    """
    if not isinstance(spec, str):
        raise ValueError(f"budget spec must be a string, got {type(spec).__name__}; expected {BUDGET_FORMS}")
    s = spec.strip().lower()
    if s == "profiles":
        return "profiles", 0.0, 0.0
    m = re.fullmatch(rf"(relative|mb):\s*({_NUM})(?:\s*-\s*({_NUM}))?", s)
    if not m:
        raise ValueError(f"bad budget spec {spec!r}; expected {BUDGET_FORMS}")
    kind, lo = m.group(1), float(m.group(2))
    hi = float(m.group(3)) if m.group(3) is not None else lo
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"bad budget spec {spec!r}: need 0 < LO <= HI; expected {BUDGET_FORMS}")
    return kind, lo, hi


def assign_budgets(
    spec: str,
    num_clients: int,
    *,
    full_peak_bytes: int | None,
    seed: int = 0,
    devices: Sequence[str] | None = None,
) -> list[tuple[DeviceProfile, int]]:
    """Give every client a device and a memory budget.

    Args:
        spec:            a budget spec (see :func:`parse_budget_spec`).
        num_clients:     number of clients (>= 1).
        full_peak_bytes: the model's full-training peak memory; required for ``relative:``.
        seed:            the seed. Devices are drawn from their own stream, so a seed gives the same
                         devices whatever the spec.
        devices:         restrict the draw to these device names (default: the whole table).

    Returns:
        ``num_clients`` pairs ``(device, budget_bytes)``. Devices are drawn uniformly from the table;
        the budget is the device's usable bytes (``profiles``), ``U(LO, HI) * full_peak_bytes``
        (``relative``) or ``U(LO, HI) * MB`` (``mb``). With ``relative``/``mb`` the device still sets
        the client's speed, and the budget may exceed what the device could really offer.

    Raises:
        ValueError: a bad spec, ``num_clients < 1``, an unknown device name, or ``relative:``
            without a positive ``full_peak_bytes``.
    """
    kind, lo, hi = parse_budget_spec(spec)
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if kind == "relative" and (full_peak_bytes is None or full_peak_bytes <= 0):
        raise ValueError(f"budget spec {spec!r} is relative to the full-training peak: pass full_peak_bytes > 0")
    pool = [get_device(d) for d in devices] if devices is not None else list(DEVICES.values())
    if not pool:
        raise ValueError("assign_budgets: empty device list")
    n = int(num_clients)
    dev_rng = np.random.default_rng([int(seed), 0])
    budget_rng = np.random.default_rng([int(seed), 1])
    chosen = [pool[i] for i in dev_rng.integers(len(pool), size=n)]
    if kind == "profiles":
        budgets = [d.usable_bytes for d in chosen]
    else:
        scale = float(full_peak_bytes) if kind == "relative" else float(MB)  # type: ignore[arg-type]
        budgets = [int(u * scale) for u in budget_rng.uniform(lo, hi, size=n)]
    return list(zip(chosen, budgets))
