"""Every STATE frame a ``RigConnection`` receives, in arrival order, for the control loop to drain and log.

The driver keeps only the latest sample; a loop that reads it once per tick misses the frames that arrive
between two ticks. ``StateFeed`` is the driver's ``on_state`` callback: it queues each frame with

* ``rx_index``: the host's count of STATE frames received (0, 1, 2, ...), so a gap in the logged
  ``rx_index`` is a frame the host had but did not log;
* ``link_lost``: the driver's cumulative count of device frames missing on the serial link
  (``RigStats.frames_missed``), read when the loop drains the queue (once per tick).

``rigfm logs check`` uses both to tell a lossy logger from a lossy link (hardware.log_check.StateLoss).

```python
feed = StateFeed()
conn = RigConnection(port, rig_config=cfg, on_state=feed)
feed.attach(conn)
...
for sample, rx_index, link_lost in feed.drain():   # in the control loop, once per tick
    ...
```
"""

from __future__ import annotations

import collections
from typing import Any


class StateFeed:
    """Bounded FIFO of received STATE frames (see module docstring); ``overflow`` counts frames pushed out
    because the consumer did not drain for ``maxlen`` frames."""

    def __init__(self, maxlen: int = 4096) -> None:
        if maxlen < 1:
            raise ValueError(f"StateFeed maxlen must be >= 1, got {maxlen}")
        self.maxlen = int(maxlen)
        self.received = 0
        self.overflow = 0
        self._dq: collections.deque = collections.deque()
        self._conn: Any = None

    def attach(self, conn: Any) -> None:
        """The connection whose link-loss counter is recorded with each frame."""
        self._conn = conn

    def _link_lost(self) -> int | None:
        conn = self._conn
        if conn is None:
            return None
        try:
            return int(conn.stats().frames_missed)
        except Exception:  # noqa: BLE001 - a counter only; never fail the driver's reader thread
            return None

    def __call__(self, sample: Any) -> None:
        """``on_state`` callback (driver reader thread): queue one frame (kept short: no lock, no copy)."""
        item = (sample, self.received)
        self.received += 1
        if len(self._dq) >= self.maxlen:
            self._dq.popleft()
            self.overflow += 1
        self._dq.append(item)

    def keep_latest(self) -> int:
        """Drop every queued frame but the newest (before a run starts); returns how many were dropped."""
        n = 0
        while len(self._dq) > 1:
            self._dq.popleft()
            n += 1
        return n

    def drain(self) -> list[tuple[Any, int, int | None]]:
        """Every queued ``(sample, rx_index, link_lost)``, oldest first (control-loop thread). The link-loss
        count is read once per drain: frames drained together carry the same value."""
        dq = self._dq
        if not dq:
            return []
        link = self._link_lost()
        out = []
        while dq:
            sample, rx = dq.popleft()
            out.append((sample, rx, link))
        return out
