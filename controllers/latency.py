"""Latency compensation: forecast the state at the moment the next command takes effect.

The measured state is ``delay_s`` old by the time a command computed from it acts on the motor (sensor
frame transport + computation + command transport).  ``PhysicsForecaster`` integrates the rig model over
that delay with the commands already sent (zero-order hold), so the controller acts on where the rig
will be rather than where it was.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


class PhysicsForecaster:
    """Forward-integrate the rig model by a known delay, replaying the commands issued in that window."""

    def __init__(self, model: Any, delay_s: float, max_substep_s: float = 0.001) -> None:
        if not (delay_s >= 0 and np.isfinite(delay_s)):
            raise ValueError(f"latency compensation delay_s must be >= 0, got {delay_s!r}")
        if not max_substep_s > 0:
            raise ValueError(f"max_substep_s must be positive, got {max_substep_s!r}")
        self.model = model
        self.delay_s = float(delay_s)
        self.max_substep_s = float(max_substep_s)
        self._cmds: deque[tuple[float, np.ndarray]] = deque(maxlen=256)

    def record_command(self, t: float, u: np.ndarray) -> None:
        """Remember a command sent at time ``t`` (s, same clock as ``forecast``)."""
        self._cmds.append((float(t), np.asarray(u, dtype=float).reshape(-1).copy()))

    def _input_at(self, t: float, default: np.ndarray) -> np.ndarray:
        """Command in force at time ``t`` (latest one sent at or before ``t``)."""
        u = default
        for tc, uc in self._cmds:
            if tc <= t:
                u = uc
            else:
                break
        return u

    def forecast(self, x: np.ndarray, t_meas: float, t_target: float | None = None) -> np.ndarray:
        """State at ``t_target`` (default ``t_meas + delay_s``) from measurement ``x`` taken at ``t_meas``."""
        x = np.asarray(x, dtype=float).copy()
        t_end = t_meas + self.delay_s if t_target is None else float(t_target)
        horizon = t_end - t_meas
        if horizon <= 0:
            return x
        steps = max(1, int(np.ceil(horizon / self.max_substep_s)))
        h = horizon / steps
        u0 = np.zeros(self.model.m)
        t = t_meas
        for _ in range(steps):
            x = np.asarray(self.model.step(x, self._input_at(t, u0), h), dtype=float)
            t += h
        if not np.all(np.isfinite(x)):
            raise FloatingPointError(f"latency forecast diverged from state {x.tolist()}")
        return x
