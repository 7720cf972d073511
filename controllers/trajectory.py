"""Bounded per-tick record of a run: ``(t, u, x)`` rows and the mode, the newest ``capacity`` ticks kept.

``rigfm run`` without ``--duration`` runs until Ctrl-C; a Python list of tuples per tick grew ~130 bytes a
tick (0.5 GB an hour at 500 Hz).  ``TickRecorder`` fills numpy blocks of ``block`` rows (8 bytes per value,
modes as small integer codes) and drops the oldest blocks beyond ``capacity`` rows, so its memory stops
growing at ``capacity * (2 + n) * 8`` bytes (48 MB for the default 2^20 ticks, 35 min at 500 Hz).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class TickRecorder:
    """Append ``(t, u, x, mode)`` per tick; ``arrays()`` -> the newest rows ``(N, 2 + n)`` and their modes."""

    def __init__(self, n: int, capacity: int = 1 << 20, block: int = 4096) -> None:
        if capacity < 1 or block < 1:
            raise ValueError("TickRecorder needs capacity >= 1 and block >= 1")
        self.width = 2 + int(n)
        self.block = int(min(block, capacity))
        self.max_blocks = max(1, -(-int(capacity) // self.block)) + 1
        self.capacity = int(capacity)
        self._rows: deque[np.ndarray] = deque()
        self._modes: deque[np.ndarray] = deque()
        self._fill = self.block  # rows used in the newest block (full: start a new one)
        self._codes: dict[str, int] = {}
        self._names: list[str] = []
        self.ticks = 0

    def append(self, t: float, u: float, x: np.ndarray, mode: str) -> None:
        """Record one tick (cheap: one row copy into a preallocated block)."""
        if self._fill == self.block:
            self._rows.append(np.empty((self.block, self.width)))
            self._modes.append(np.empty(self.block, dtype=np.int32))
            self._fill = 0
            if len(self._rows) > self.max_blocks:
                self._rows.popleft()
                self._modes.popleft()
        code = self._codes.get(mode)
        if code is None:
            code = self._codes[mode] = len(self._names)
            self._names.append(mode)
        row = self._rows[-1][self._fill]
        row[0], row[1] = t, u
        row[2:] = x
        self._modes[-1][self._fill] = code
        self._fill += 1
        self.ticks += 1

    def arrays(self) -> tuple[np.ndarray, list[str]]:
        """The newest ``capacity`` rows (t, u, x...) and their modes, oldest first."""
        if not self._rows:
            return np.zeros((0, self.width)), []
        rows = np.concatenate([*list(self._rows)[:-1], self._rows[-1][: self._fill]])
        codes = np.concatenate([*list(self._modes)[:-1], self._modes[-1][: self._fill]])
        rows, codes = rows[-self.capacity:], codes[-self.capacity:]
        return rows, [self._names[c] for c in codes]
