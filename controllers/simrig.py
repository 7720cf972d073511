"""In-process stand-in for ``hardware.RigConnection`` around ``rigs.RigSimulator`` (no pty, no threads).

For fast, deterministic closed-loop tests of the controller logic: ``SimulatedRig.advance(dt)`` moves the
plant and produces a new sample (encoder counts converted with the rig config's shared conversion), and
``run_lockstep`` alternates plant steps with ``ControlLoop.tick`` on simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SimSample:
    """Same fields as ``hardware.StateSample``."""

    seq: int
    device_time_us: int
    host_time_ns: int
    counts: tuple[int, ...]
    positions: np.ndarray
    current: float | None
    flags: int


class SimulatedRig:
    """RigConnection-like wrapper: latest_state(), send_command(), estop(), stats()."""

    def __init__(self, sim: Any, cfg: Any) -> None:
        self.sim = sim
        self.cfg = cfg
        self.t = 0.0
        self.seq = 0
        self.commands: list[float] = []
        self.estopped = False
        self._sample: SimSample | None = None
        self._sample_now()

    def _sample_now(self) -> None:
        counts = tuple(int(c) for c in self.sim.read_counts())
        pos = np.asarray(self.cfg.counts_to_positions(np.asarray(counts)), dtype=float)
        self.seq += 1
        self._sample = SimSample(self.seq, int(round(self.t * 1e6)) % (1 << 32), int(self.t * 1e9), counts,
                                 pos, None, 0)

    def advance(self, dt: float) -> None:
        """Advance the plant by ``dt`` seconds and take a new sample."""
        self.sim.advance(dt)
        self.t += dt
        self._sample_now()

    def latest_state(self) -> SimSample | None:
        return self._sample

    def send_command(self, volts: float) -> None:
        if self.estopped:
            return
        self.commands.append(float(volts))
        self.sim.apply(float(volts))

    def estop(self) -> None:
        self.estopped = True
        self.sim.apply(0.0)

    def stats(self) -> dict[str, Any]:
        return {"commands": len(self.commands), "estopped": self.estopped}


def run_lockstep(loop: Any, rig: SimulatedRig, duration_s: float, on_tick: Any = None) -> list[np.ndarray]:
    """Alternate ``rig.advance(period)`` and ``loop.tick(t)`` for ``duration_s``; returns the true states."""
    period = 1.0 / loop.rate_hz
    states = []
    clock, loop.clock = loop.clock, lambda: rig.t  # log times on the simulated clock, like the samples
    try:
        for k in range(int(round(duration_s / period))):
            if not loop.tick(k * period):
                break
            rig.advance(period)
            states.append(np.asarray(rig.sim.state, dtype=float).copy())
            if on_tick is not None:
                on_tick(k, loop)
    finally:
        loop.clock = clock
    return states
