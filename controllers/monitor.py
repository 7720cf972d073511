"""Prediction-error monitor: compares the model's one-step and k-step predictions with what the rig measured.

Predictions are registered against the index of the model step they are *for*; when that step's
measurement arrives the normalised error ``sqrt(mean(((x_pred - x_meas) / scale)^2))`` (angles wrapped)
updates, per horizon, an exponentially weighted mean and a windowed mean.  A drift flag rises when the
one-step EWMA stays above ``threshold`` for ``sustain_s`` seconds -- a sign the model needs fine-tuning --
and clears (with hysteresis) once it falls below ``clear_ratio * threshold``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from controllers.base import wrap_angle


@dataclass
class _HorizonStats:
    ewma: float = float("nan")
    window: deque = field(default_factory=deque)
    count: int = 0
    last: float = float("nan")


class PredictionMonitor:
    """Running one-step / k-step prediction error with EWMA, windowed mean and a sustained-drift flag."""

    def __init__(self, scale: Sequence[float], horizons: Sequence[int] = (1,), alpha: float = 0.05,
                 window: int = 200, threshold: float = 0.5, sustain_s: float = 1.0,
                 clear_ratio: float = 0.8, angle_channels: Sequence[int] = ()) -> None:
        self.scale = np.asarray(scale, dtype=float).reshape(-1)
        if self.scale.size == 0 or np.any(~np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError(f"monitor scale must be positive and finite per state, got {list(scale)}")
        if not 0 < alpha <= 1:
            raise ValueError(f"monitor alpha must be in (0, 1], got {alpha}")
        if window < 1 or not horizons or min(horizons) < 1:
            raise ValueError("monitor window and horizons must be >= 1")
        self.n = self.scale.size
        self.alpha = float(alpha)
        self.window_len = int(window)
        self.threshold = float(threshold)
        self.sustain_s = float(sustain_s)
        self.clear_ratio = float(clear_ratio)
        self.angle = np.zeros(self.n, dtype=bool)
        self.angle[list(angle_channels)] = True
        self.horizons = tuple(sorted(set(int(h) for h in horizons)))
        self._stats = {h: _HorizonStats(window=deque(maxlen=self.window_len)) for h in self.horizons}
        self._pending: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._above_since: float | None = None
        self._lock = threading.Lock()
        self._last_step: int | None = None
        self.drift = False
        self.drift_events = 0
        self.late_predictions = 0

    def add_prediction(self, target_step: int, x_pred: np.ndarray, horizon: int = 1) -> None:
        """Register a prediction of the state at model step ``target_step``, made ``horizon`` steps ahead."""
        if horizon not in self._stats:
            return
        x_pred = np.asarray(x_pred, dtype=float).reshape(-1)
        if x_pred.shape != (self.n,):
            raise ValueError(f"prediction must have {self.n} states, got shape {x_pred.shape}")
        with self._lock:
            if self._last_step is not None and target_step <= self._last_step:
                self.late_predictions += 1  # its measurement has already been seen
                return
            self._pending.setdefault(int(target_step), []).append((horizon, x_pred.copy()))
            if len(self._pending) > 4 * max(self.horizons) + 64:  # measurements never came: drop the oldest
                del self._pending[min(self._pending)]

    def error(self, x_pred: np.ndarray, x_meas: np.ndarray) -> float:
        """Normalised RMS error between a prediction and a measurement."""
        d = np.asarray(x_pred, dtype=float) - np.asarray(x_meas, dtype=float)
        d[self.angle] = wrap_angle(d[self.angle])
        return float(np.sqrt(np.mean((d / self.scale) ** 2)))

    def observe(self, step: int, x_meas: np.ndarray, t: float) -> dict[int, float]:
        """Measurement of model step ``step`` at time ``t`` (s); returns the settled errors per horizon."""
        x_meas = np.asarray(x_meas, dtype=float).reshape(-1)
        settled: dict[int, float] = {}
        with self._lock:
            self._last_step = int(step) if self._last_step is None else max(self._last_step, int(step))
            for old in [s for s in self._pending if s < step]:
                del self._pending[old]
            for horizon, x_pred in self._pending.pop(int(step), []):
                e = self._settle(horizon, x_pred, x_meas)
                if e is not None:
                    settled[horizon] = e
            self._update_drift(t)
        return settled

    def settle(self, horizon: int, x_pred: np.ndarray, x_meas: np.ndarray, t: float) -> float | None:
        """Score a prediction whose measurement is already known (e.g. a k-step prediction in hindsight)."""
        if horizon not in self._stats:
            return None
        with self._lock:
            e = self._settle(horizon, np.asarray(x_pred, dtype=float), np.asarray(x_meas, dtype=float))
            self._update_drift(t)
        return e

    def _settle(self, horizon: int, x_pred: np.ndarray, x_meas: np.ndarray) -> float | None:
        e = self.error(x_pred, x_meas)
        if not np.isfinite(e):
            return None
        st = self._stats[horizon]
        st.ewma = e if st.count == 0 else (1 - self.alpha) * st.ewma + self.alpha * e
        st.window.append(e)
        st.count += 1
        st.last = e
        return e

    def _update_drift(self, t: float) -> None:
        e1 = self._stats[self.horizons[0]].ewma
        if not np.isfinite(e1):
            return
        if e1 > self.threshold:
            if self._above_since is None:
                self._above_since = t
            if not self.drift and t - self._above_since >= self.sustain_s:
                self.drift = True
                self.drift_events += 1
        else:
            self._above_since = None
            if self.drift and e1 < self.clear_ratio * self.threshold:
                self.drift = False

    def snapshot(self) -> dict[str, float | int | bool]:
        """Numbers for the status line and the logger (``err{h}_ewma``, ``err{h}_win``, counts, drift)."""
        out: dict[str, float | int | bool] = {"drift": self.drift, "drift_events": self.drift_events,
                                              "late_predictions": self.late_predictions}
        with self._lock:
            for h, st in self._stats.items():
                out[f"err{h}_ewma"] = st.ewma
                out[f"err{h}_win"] = float(np.mean(st.window)) if st.window else float("nan")
                out[f"err{h}_last"] = st.last
                out[f"err{h}_count"] = st.count
        return out
