"""Tests for memfl.data.devices: the device table, budget specs and budget assignment."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from memfl.data import (
    DEVICE_KINDS,
    DEVICE_TABLE_VERSION,
    DEVICES,
    MB,
    DeviceProfile,
    assign_budgets,
    get_device,
    parse_budget_spec,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEVICES.md"


def _by(kind: str) -> list[DeviceProfile]:
    return [d for d in DEVICES.values() if d.kind == kind]


def test_table_has_the_required_device_classes():
    phone_gb = sorted(d.ram_mb // 1024 for d in _by("phone"))
    assert phone_gb == [3, 4, 6, 8, 12]
    assert get_device("jetson-nano").ram_mb == 4096
    assert get_device("jetson-tx2").ram_mb == 8192
    assert get_device("jetson-xavier-nx").ram_mb == 8192
    assert sorted(d.ram_mb // 1024 for d in DEVICES.values() if d.name.startswith("rpi4")) == [2, 4, 8]
    assert len(_by("laptop")) >= 2
    assert DEVICE_TABLE_VERSION == "2026.11"


def test_table_values_are_sane():
    for d in DEVICES.values():
        assert d.kind in DEVICE_KINDS and d.source
        assert 0 < d.usable_share <= 1 and d.speed > 0
        assert d.usable_bytes == int(d.ram_mb * MB * d.usable_share)
        assert d.usable_bytes < d.ram_mb * MB
    assert get_device("laptop-8gb").speed == 1.0  # the reference machine
    # more RAM never means a smaller budget within a family; phones get faster with RAM class
    phones = sorted(_by("phone"), key=lambda d: d.ram_mb)
    assert [d.usable_bytes for d in phones] == sorted(d.usable_bytes for d in phones)
    assert [d.speed for d in phones] == sorted(d.speed for d in phones)
    assert get_device("jetson-nano").speed < get_device("jetson-tx2").speed < get_device("jetson-xavier-nx").speed


def test_profiles_are_frozen_and_validated():
    d = get_device("phone-4gb")
    with pytest.raises(AttributeError):
        d.ram_mb = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind"):
        DeviceProfile("x", "toaster", 1024, 0.5, 1.0, "-")
    with pytest.raises(ValueError):
        DeviceProfile("x", "phone", 1024, 1.5, 1.0, "-")


def test_get_device_unknown_lists_names():
    assert get_device(" Phone-4GB ") is DEVICES["phone-4gb"]
    with pytest.raises(ValueError) as err:
        get_device("pixel-9")
    for name in ("phone-4gb", "jetson-nano", "rpi4-2gb", "laptop-8gb"):
        assert name in str(err.value)


def test_parse_budget_spec_valid():
    assert parse_budget_spec("profiles") == ("profiles", 0.0, 0.0)
    assert parse_budget_spec("relative:0.1-1.1") == ("relative", 0.1, 1.1)
    assert parse_budget_spec(" MB:100-900 ") == ("mb", 100.0, 900.0)
    assert parse_budget_spec("mb:512") == ("mb", 512.0, 512.0)
    assert parse_budget_spec("mb:100 - 900") == ("mb", 100.0, 900.0)
    assert parse_budget_spec("relative:1e-1-1") == ("relative", 0.1, 1.0)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "profile",
        "relative",
        "relative:",
        "relative:1.1-0.1",
        "mb:0-100",
        "mb:-1-5",
        "mb:a-b",
        "gb:1-2",
        "mb:1-2-3",
        "relative:inf-inf",
    ],
)
def test_parse_budget_spec_errors(bad):
    with pytest.raises(ValueError) as err:
        parse_budget_spec(bad)
    msg = str(err.value)
    assert "profiles" in msg and "relative:LO-HI" in msg and "mb:LO-HI" in msg


def test_assign_profiles():
    out = assign_budgets("profiles", 200, full_peak_bytes=None, seed=0)
    assert len(out) == 200
    assert all(budget == dev.usable_bytes for dev, budget in out)
    counts = Counter(dev.name for dev, _ in out)
    assert len(counts) >= 10  # uniform over 13 classes: nearly all appear in 200 draws


def test_assign_relative_and_mb_ranges():
    peak = 840 * MB
    rel = assign_budgets("relative:0.1-1.1", 500, full_peak_bytes=peak, seed=1)
    budgets = [b for _, b in rel]
    assert all(int(0.1 * peak) <= b <= int(1.1 * peak) for b in budgets)
    assert min(budgets) < 0.2 * peak and max(budgets) > 1.0 * peak  # spread over the range
    assert 0.5 < sum(b < peak for b in budgets) / len(budgets) < 1.0  # most cannot train the full model
    mb = assign_budgets("mb:100-900", 500, full_peak_bytes=None, seed=1)
    assert all(100 * MB <= b <= 900 * MB for _, b in mb)
    fixed = assign_budgets("mb:512", 5, full_peak_bytes=None)
    assert {b for _, b in fixed} == {512 * MB}


def test_assign_is_deterministic_and_devices_independent_of_spec():
    a = assign_budgets("mb:100-900", 50, full_peak_bytes=None, seed=7)
    b = assign_budgets("mb:100-900", 50, full_peak_bytes=None, seed=7)
    c = assign_budgets("mb:100-900", 50, full_peak_bytes=None, seed=8)
    p = assign_budgets("profiles", 50, full_peak_bytes=None, seed=7)
    assert a == b and a != c
    assert [d for d, _ in a] == [d for d, _ in p]


def test_assign_errors_and_device_subset():
    with pytest.raises(ValueError, match="full_peak_bytes"):
        assign_budgets("relative:0.1-1.1", 5, full_peak_bytes=None)
    with pytest.raises(ValueError, match="num_clients"):
        assign_budgets("profiles", 0, full_peak_bytes=None)
    with pytest.raises(ValueError, match="known devices"):
        assign_budgets("profiles", 3, full_peak_bytes=None, devices=["phone-4gb", "nokia-3310"])
    out = assign_budgets("profiles", 30, full_peak_bytes=None, devices=["phone-3gb", "rpi4-2gb"])
    assert {d.name for d, _ in out} == {"phone-3gb", "rpi4-2gb"}


def test_docs_cover_the_table():
    text = DOC.read_text()
    assert DEVICE_TABLE_VERSION in text and "estimate" in text
    for d in DEVICES.values():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{d.name}` |")), None)
        assert row is not None, f"{d.name} missing from docs/DEVICES.md"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == d.kind and float(cells[3]) == d.usable_share and float(cells[5]) == d.speed
        assert cells[4] == f"{d.usable_bytes // MB} MB"
