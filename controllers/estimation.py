"""Velocity estimation from encoder positions: filtered ("dirty") differentiation.

``v_k = v_{k-1} + a (dpos_k / dt_k - v_{k-1})`` with ``a = 1 - exp(-2 pi f_c dt_k)``: a first-order low-pass
on the finite difference, evaluated with the actual sample spacing (device timestamps), so jittery or
skipped samples do not bias the estimate.  Angle channels difference on the circle (wrap-safe).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from controllers.base import wrap_angle


class VelocityEstimator:
    """Per-channel filtered differentiation of positions sampled at irregular times."""

    def __init__(self, n_pos: int, cutoff_hz: float = 25.0, angle_channels: Sequence[int] = (),
                 max_gap_s: float = 0.1) -> None:
        if n_pos < 1:
            raise ValueError(f"VelocityEstimator needs at least one position channel, got {n_pos}")
        if not (cutoff_hz > 0 and np.isfinite(cutoff_hz)):
            raise ValueError(f"velocity filter cutoff_hz must be positive, got {cutoff_hz!r}")
        self.n_pos = n_pos
        self.cutoff_hz = float(cutoff_hz)
        self.angle_channels = np.zeros(n_pos, dtype=bool)
        self.angle_channels[list(angle_channels)] = True
        self.max_gap_s = float(max_gap_s)
        self.reset()

    def reset(self, positions: np.ndarray | None = None, t: float | None = None) -> None:
        """Forget the history (optionally seeding the last sample); velocity restarts at zero."""
        self._pos = None if positions is None else np.asarray(positions, dtype=float).copy()
        self._t = t
        self.velocity = np.zeros(self.n_pos)

    def update(self, positions: np.ndarray, t: float) -> np.ndarray:
        """Feed a sample (positions in SI units, ``t`` in seconds); returns the velocity estimate (copy)."""
        pos = np.asarray(positions, dtype=float).reshape(-1)
        if pos.shape != (self.n_pos,):
            raise ValueError(f"expected {self.n_pos} positions, got shape {np.shape(positions)}")
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"non-finite encoder positions: {pos.tolist()}")
        if self._pos is None or self._t is None:
            self._pos, self._t = pos.copy(), float(t)
            return self.velocity.copy()
        dt = float(t) - self._t
        if dt <= 0:  # same sample again (or clock went backwards): keep the estimate
            return self.velocity.copy()
        d = pos - self._pos
        d[self.angle_channels] = wrap_angle(d[self.angle_channels])
        raw = d / dt
        if dt > self.max_gap_s:  # a long gap: restart from the raw difference rather than filtering it
            self.velocity = raw
        else:
            a = 1.0 - np.exp(-2.0 * np.pi * self.cutoff_hz * dt)
            self.velocity = self.velocity + a * (raw - self.velocity)
        self._pos, self._t = pos.copy(), float(t)
        return self.velocity.copy()
