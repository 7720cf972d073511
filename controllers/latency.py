"""Latency compensation: forecast the state at the moment the next command takes effect.

The measured state is ``delay_s`` old by the time a command computed from it acts on the motor (sensor
frame transport + computation + command transport).  ``PhysicsForecaster`` integrates the rig model over
that delay with the commands already sent (zero-order hold), so the controller acts on where the rig
will be rather than where it was.

``PredictorForecaster`` adds the learned model's correction to that physics forecast: the predictor's
newest one-step prediction ``x_{k+1}`` (from ``PredictorTap.last_one_step``) minus the physics model's own
step from the same ``(x_k, u_k)``, scaled by ``delay / model_dt``.  It falls back to the plain physics
forecast when no prediction is fresh (older than ``max_age_steps`` model steps) or the correction is
implausible (any channel beyond ``max_correction`` of its ``scale``, or not finite).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
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


OneStep = tuple[float, np.ndarray, np.ndarray, np.ndarray]  # (t_k, x_k, u_k, predicted x_{k+1})


class PredictorForecaster:
    """Physics forecast plus the learned model's one-step correction, when fresh and plausible."""

    def __init__(self, physics: PhysicsForecaster, source: Callable[[], OneStep | None], model_dt: float,
                 scale: np.ndarray, max_correction: float = 0.2, max_age_steps: float = 1.5) -> None:
        if not (model_dt > 0 and np.isfinite(model_dt)):
            raise ValueError(f"predictor forecast: model_dt must be positive, got {model_dt!r}")
        scale = np.asarray(scale, dtype=float).reshape(-1)
        if scale.shape != (physics.model.n,) or not np.all(scale > 0):
            raise ValueError(f"predictor forecast: scale must be {physics.model.n} positive values: {scale}")
        self.physics = physics
        self.model = physics.model
        self.delay_s = physics.delay_s
        self.source = source
        self.model_dt = float(model_dt)
        self.scale = scale
        self.max_correction = float(max_correction)
        self.max_age_s = float(max_age_steps) * self.model_dt
        self._cache: tuple[OneStep, np.ndarray] | None = None  # (prediction, its one-step correction)
        self.used = 0        # ticks forecast with the learned correction
        self.stale = 0       # ... without: no fresh prediction
        self.rejected = 0    # ... without: implausible correction

    def record_command(self, t: float, u: np.ndarray) -> None:
        """Remember a command (for the physics part)."""
        self.physics.record_command(t, u)

    def _step_correction(self, got: OneStep) -> np.ndarray:
        """Predicted minus physics ``x_{k+1}`` for one prediction (computed once per prediction)."""
        _, x_k, u_k, x_pred = got
        if self._cache is None or self._cache[0] is not got:
            steps = max(1, int(np.ceil(self.model_dt / self.physics.max_substep_s)))
            x = np.asarray(x_k, dtype=float)
            for _ in range(steps):
                x = np.asarray(self.model.step(x, np.asarray(u_k, dtype=float), self.model_dt / steps))
            self._cache = (got, np.asarray(x_pred, dtype=float) - x)
        return self._cache[1]

    def forecast(self, x: np.ndarray, t_meas: float, t_target: float | None = None) -> np.ndarray:
        """State at ``t_target`` (default ``t_meas + delay_s``): physics, plus the learned correction."""
        x_phys = self.physics.forecast(x, t_meas, t_target)
        horizon = (t_meas + self.delay_s if t_target is None else float(t_target)) - t_meas
        got = self.source()
        if horizon <= 0:
            return x_phys
        if got is None or not (0.0 <= t_meas - got[0] <= self.max_age_s):
            self.stale += 1
            return x_phys
        corr = self._step_correction(got) * (horizon / self.model_dt)
        if not np.all(np.isfinite(corr)) or np.max(np.abs(corr) / self.scale) > self.max_correction:
            self.rejected += 1
            return x_phys
        self.used += 1
        return x_phys + corr
