"""The one clock of rigfm run logs: host wall time in ns, taken from the monotonic clock.

``OFFSET_NS`` (wall minus monotonic) is read once per process, at import. Every host time in a log
(``now_ns()``, and the driver's ``time.monotonic_ns()`` receive stamps through ``from_monotonic_ns``) is
``monotonic + OFFSET_NS``: wall time as of process start, advancing with the monotonic clock, so it never
steps within a run (an NTP correction mid-run moves none of the log's times). The offset is written into the
run metadata (``clock_offset_ns``), so the monotonic reading of any logged time is ``t - clock_offset_ns``.

In the files a time is a Foxglove ``Time`` object ``{"sec": int, "nsec": int}`` (both below 2^53: exact in
JavaScript JSON readers, which lose precision on a single int64 nanosecond count)."""

from __future__ import annotations

import time

OFFSET_NS: int = time.time_ns() - time.monotonic_ns()
NS = 1_000_000_000


def now_ns() -> int:
    """Host time now (ns since the Unix epoch, on the run clock described in the module docstring)."""
    return time.monotonic_ns() + OFFSET_NS


def from_monotonic_ns(t_ns: int) -> int:
    """A ``time.monotonic_ns()`` reading of this process on the run clock."""
    return int(t_ns) + OFFSET_NS


def to_time(t_ns: int) -> dict[str, int]:
    """ns -> Foxglove Time ``{"sec", "nsec"}`` (``nsec`` in [0, 1e9))."""
    sec, nsec = divmod(int(t_ns), NS)
    return {"sec": sec, "nsec": nsec}


def from_time(t: dict[str, int]) -> int:
    """Foxglove Time ``{"sec", "nsec"}`` -> ns."""
    return int(t["sec"]) * NS + int(t["nsec"])
