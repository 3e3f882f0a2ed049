"""This process's memory as Linux reports it (``/proc/self``), for the runtimes that run clients:
the worker pool and the Flower ClientApp. Every function returns None where ``/proc`` is missing or
refuses (not Linux, a locked-down container), so callers record "unknown" instead of failing.
"""

from __future__ import annotations


def status_bytes(field: str) -> int | None:
    """A ``kB`` line of ``/proc/self/status`` in bytes (``VmRSS``, ``VmHWM``, ``VmData``...)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Reset the RSS high-water mark (``clear_refs`` 5), so ``VmHWM`` measures from now; return the
    current RSS, or None where the reset is not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return status_bytes("VmRSS")
