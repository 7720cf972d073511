"""Byte-stream fault injection for the virtual rig (device → host direction), with exact accounting.

Faults: independent bit flips (bit error rate), dropped bytes, garbage bursts (line noise between
frames) and added latency (a delay line). Frames are zero-delimited (COBS), so the injector tracks
the stream the way the host's decoder will see it:

* a frame is *delivered* iff its bytes are unmodified and it starts on a frame boundary (the previous
  frame's delimiter survived, or the frame starts with its own delimiter);
* every non-empty zero-delimited segment that is not a delivered frame is a *bad segment*: exactly one
  CRC or framing error at the host (barring a 1-in-65536 CRC false accept).

So ``bad_segments`` must equal the driver's crc+framing errors and ``lost_frames`` its missed frames.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FaultConfig:
    """Fault-injection settings (all off by default)."""

    ber: float = 0.0  # probability that any transmitted bit is flipped
    drop_rate: float = 0.0  # probability that any transmitted byte is dropped
    garbage_rate_hz: float = 0.0  # mean garbage bursts per second
    garbage_max_bytes: int = 32
    latency_s: float = 0.0  # added one-way latency

    def __post_init__(self) -> None:
        for name in ("ber", "drop_rate"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"fault setting {name}={v!r} must be in [0, 1)")
        for name in ("garbage_rate_hz", "latency_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"fault setting {name}={getattr(self, name)!r} must be >= 0")
        if self.garbage_max_bytes < 1:
            raise ValueError(f"garbage_max_bytes={self.garbage_max_bytes!r} must be >= 1")

    @property
    def active(self) -> bool:
        """Whether any fault is injected."""
        return bool(self.ber or self.drop_rate or self.garbage_rate_hz or self.latency_s)


@dataclass
class FaultStats:
    """What the injector did (cumulative since the last reset)."""

    frames: int = 0
    frames_modified: int = 0
    lost_frames: int = 0
    bad_segments: int = 0
    bits_flipped: int = 0
    bytes_dropped: int = 0
    garbage_bursts: int = 0
    garbage_bytes: int = 0
    lost_seqs: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-friendly copy (the seq list is capped)."""
        d = dict(self.__dict__)
        d["lost_seqs"] = list(self.lost_seqs[-10000:])
        return d


class ByteFaultInjector:
    """Corrupts outgoing frames and keeps the accounting described in the module docstring."""

    def __init__(self, config: FaultConfig | None = None, seed: int = 0) -> None:
        self.config = config or FaultConfig()
        self.rng = np.random.default_rng(seed)
        self.stats = FaultStats()
        self._seg_len = 0  # bytes in the current (unterminated) segment of the emitted stream
        self._seg_clean = True  # the current segment so far is part of one delivered frame
        self._delay: collections.deque[tuple[float, bytes]] = collections.deque()
        self._next_garbage: float | None = None  # drawn at the first frame

    def reset_stats(self) -> None:
        """Start counting afresh (e.g. when a host session starts); stream state is kept."""
        self.stats = FaultStats()
        self._seg_len, self._seg_clean = 0, True

    def _draw_garbage_time(self, now: float) -> float:
        rate = self.config.garbage_rate_hz
        return now + self.rng.exponential(1.0 / rate) if rate > 0 else float("inf")

    def _corrupt(self, frame: bytes) -> bytes:
        cfg = self.config
        data = frame
        if cfg.ber > 0:
            nflip = int(self.rng.binomial(8 * len(data), cfg.ber))
            if nflip:
                buf = bytearray(data)
                for bit in self.rng.choice(8 * len(buf), size=nflip, replace=False):
                    buf[bit >> 3] ^= 1 << (bit & 7)
                self.stats.bits_flipped += nflip
                data = bytes(buf)
        if cfg.drop_rate > 0:
            keep = self.rng.random(len(data)) >= cfg.drop_rate
            if not keep.all():
                self.stats.bytes_dropped += int((~keep).sum())
                data = bytes(np.frombuffer(data, dtype=np.uint8)[keep])
        return data

    def _account(self, chunk: bytes, clean: bool) -> None:
        """Advance the segment scanner over emitted bytes; ``clean`` = part of a delivered frame."""
        parts = chunk.split(b"\x00")
        for i, part in enumerate(parts):
            if part:
                self._seg_len += len(part)
                self._seg_clean = self._seg_clean and clean
            if i < len(parts) - 1:  # a delimiter ends the segment
                if self._seg_len and not self._seg_clean:
                    self.stats.bad_segments += 1
                self._seg_len, self._seg_clean = 0, True

    def _emit(self, data: bytes, now: float) -> None:
        if data:
            self._delay.append((now + self.config.latency_s, data))

    def process(self, frame: bytes, seq: int | None = None, now: float | None = None) -> None:
        """Queue one encoded frame (with its delimiter(s)) for transmission, possibly corrupted."""
        now = time.monotonic() if now is None else now
        if self._next_garbage is None:
            self._next_garbage = self._draw_garbage_time(now)
        if now >= self._next_garbage:
            n = int(self.rng.integers(1, self.config.garbage_max_bytes + 1))
            garbage = self.rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
            self.stats.garbage_bursts += 1
            self.stats.garbage_bytes += n
            self._account(garbage, clean=False)
            self._emit(garbage, now)
            self._next_garbage = self._draw_garbage_time(now)
        data = self._corrupt(frame)
        modified = data != frame
        delivered = not modified and (self._seg_len == 0 or frame[:1] == b"\x00")
        self.stats.frames += 1
        self.stats.frames_modified += int(modified)
        if not delivered:
            self.stats.lost_frames += 1
            if seq is not None and len(self.stats.lost_seqs) < 1_000_000:
                self.stats.lost_seqs.append(seq)
        self._account(data, clean=delivered)
        self._emit(data, now)

    def pass_clean(self, data: bytes, now: float | None = None) -> None:
        """Queue bytes without corruption (still accounted, still delayed)."""
        now = time.monotonic() if now is None else now
        self._account(data, clean=self._seg_len == 0 or data[:1] == b"\x00")
        self._emit(data, now)

    def due(self, now: float | None = None, flush: bool = False) -> bytes:
        """Bytes whose added latency has elapsed (all of them with ``flush``)."""
        now = time.monotonic() if now is None else now
        out = []
        while self._delay and (flush or self._delay[0][0] <= now):
            out.append(self._delay.popleft()[1])
        return b"".join(out)

    def next_due_time(self) -> float | None:
        """Release time of the oldest delayed chunk, or None when the delay line is empty."""
        return self._delay[0][0] if self._delay else None

    def clear(self) -> None:
        """Forget delayed bytes and the partial segment (the line was unplugged)."""
        self._delay.clear()
        self._seg_len, self._seg_clean = 0, True
