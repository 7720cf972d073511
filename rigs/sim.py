"""The simulated plant behind the virtual rig and the data collector (numpy only).

`RigSimulator` integrates the true state of a rig with the equations of motion of rigs.physics (RK4 substeps
at the firmware rate, split exactly at command activation times), holds the motor voltage between commands
(zero-order hold) after a configurable actuation delay, enforces the hard travel limits (end stop: position
clamped, velocity zeroed or bounced, the pendulum's generalised momentum conserved through the impact), and
produces what the firmware would measure: integer encoder counts (quantised, with jitter) and a motor current
estimate (with noise). Flags latch until `clear_flags()` or `reset()`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rigs.config import RigConfig, RigConfigError, load_config
from rigs.physics import RigModel, make_model

__all__ = ["RigSimulator", "SimSample", "FLAG_NAMES"]

FLAG_NAMES = ("limit_hard", "limit_soft", "overspeed", "voltage_clipped")


@dataclass(frozen=True)
class SimSample:
    """One measurement as the firmware would report it."""

    time: float
    counts: tuple[int, ...]
    current: float
    voltage: float
    flags: dict[str, bool]


# plant overrides of the simulator itself (not physics parameters): handled here, the rest go to make_model
SIM_OVERRIDES = ("actuation_delay_extra_ms",)


def split_sim_overrides(overrides: dict[str, Any] | None) -> tuple[dict[str, Any] | None, float]:
    """``(physics overrides, extra actuation delay in s)``: ``actuation_delay_extra_ms`` (>= 0, <= 1000)
    adds to the config's ``sim.actuation_delay_s`` (a slower amplifier / more transport delay)."""
    if not overrides or "actuation_delay_extra_ms" not in overrides:
        return overrides, 0.0
    rest = {k: v for k, v in overrides.items() if k != "actuation_delay_extra_ms"}
    ms = overrides["actuation_delay_extra_ms"]
    if isinstance(ms, bool) or not isinstance(ms, int | float) or not (math.isfinite(ms) and 0 <= ms <= 1000):
        raise RigConfigError(f"override actuation_delay_extra_ms must be a number of ms in [0, 1000], "
                             f"got {ms!r}")
    return rest or None, float(ms) * 1e-3


class RigSimulator:
    """Plant simulator for one rig: true state, delayed ZOH actuation, limits, encoders, noise.

    `cfg` is a RigConfig or a shipped rig name / TOML path; `param_overrides` go to rigs.make_model (e.g.
    {"pole_mass_scale": 1.4}) so the plant can differ from the nominal model a controller uses, except
    `actuation_delay_extra_ms` (SIM_OVERRIDES), added to the config's actuation delay.
    """

    def __init__(self, cfg: RigConfig | str | Path, seed: int | None = 0,
                 param_overrides: dict[str, Any] | None = None) -> None:
        self.cfg = load_config(cfg)
        physics, extra_delay_s = split_sim_overrides(param_overrides)
        self.model: RigModel = make_model(self.cfg, physics)
        self.rng = np.random.default_rng(seed)
        self.substep = 1.0 / self.cfg.sample_rate_hz
        self.delay = self.cfg.sim.actuation_delay_s + extra_delay_s
        self._x = self.model.hanging()
        self._t = 0.0
        self._v = self.cfg.safe_state.voltage
        self._pending: deque[tuple[float, float]] = deque()
        self._flags = dict.fromkeys(FLAG_NAMES, False)
        self.impacts = 0
        self.reset()

    # ------------------------------------------------------------------ state access
    @property
    def state(self) -> np.ndarray:
        """Copy of the true state x (4,) in SI units."""
        return self._x.copy()

    @property
    def time(self) -> float:
        """Simulated time (s) since the last reset."""
        return self._t

    @property
    def voltage(self) -> float:
        """Voltage currently applied to the motor (after delay and clipping)."""
        return self._v

    @property
    def flags(self) -> dict[str, bool]:
        """Latched condition flags: limit_hard, limit_soft, overspeed, voltage_clipped."""
        return dict(self._flags)

    @property
    def faults(self) -> tuple[str, ...]:
        """Names of the latched flags that are set (empty tuple when all is well)."""
        return tuple(k for k in FLAG_NAMES if self._flags[k])

    def clear_flags(self) -> None:
        """Clear every latched flag (conditions still present re-latch on the next advance)."""
        self._flags = dict.fromkeys(FLAG_NAMES, False)

    # ------------------------------------------------------------------ commands
    def reset(self, x0: Any = None) -> None:
        """Restart at x0 (default: hanging at rest), t = 0, motor at the safe-state voltage, flags cleared."""
        x = self.model.hanging() if x0 is None else np.array(x0, dtype=np.float64)
        if x.shape != (4,) or not np.all(np.isfinite(x)):
            raise ValueError(f"x0 must be 4 finite numbers, got {x0!r}")
        hard = self.cfg.limits.position_hard
        if abs(x[0]) > hard:
            raise ValueError(f"x0[0] = {x[0]} lies beyond the hard limit +-{hard}")
        self._x = x
        self._t = 0.0
        self._v = float(self.cfg.safe_state.voltage)
        self._pending.clear()
        self.clear_flags()
        self.impacts = 0

    def apply(self, voltage: float) -> float:
        """Command a motor voltage (clipped to +-voltage_max); it takes effect after the actuation delay.

        Returns the clipped value. A non-finite voltage raises ValueError (the plant cannot be given NaN)."""
        v = float(voltage)
        if not math.isfinite(v):
            raise ValueError(f"voltage must be finite, got {voltage!r}")
        vmax = self.cfg.limits.voltage_max
        if abs(v) > vmax:
            self._flags["voltage_clipped"] = True
            v = math.copysign(vmax, v)
        if self.delay <= 0.0:
            self._pending.clear()
            self._v = v
        else:
            self._pending.append((self._t + self.delay, v))
        return v

    def advance(self, dt: float) -> np.ndarray:
        """Integrate the plant forward by dt seconds; returns the new true state."""
        if not math.isfinite(dt) or dt < 0:
            raise ValueError(f"dt must be finite and >= 0, got {dt!r}")
        t_end = self._t + dt
        eps = 1e-12
        while self._t < t_end - eps:
            while self._pending and self._pending[0][0] <= self._t + eps:
                self._v = self._pending.popleft()[1]
            t_next = min(t_end, self._t + self.substep)
            if self._pending and self._pending[0][0] < t_next:
                t_next = self._pending[0][0]
            self._x = self.model.step(self._x, self._v, t_next - self._t)
            self._t = t_next
            self._enforce_limits()
        self._t = max(self._t, t_end)  # (a remainder below 1e-12 s is not integrated)
        while self._pending and self._pending[0][0] <= self._t + eps:
            self._v = self._pending.popleft()[1]
        return self.state

    def _enforce_limits(self) -> None:
        """Hard end stop on channel 0 (impact keeps the pendulum's generalised momentum) and flag checks."""
        x = self._x
        if not np.all(np.isfinite(x)):
            raise FloatingPointError(f"simulated state became non-finite at t = {self._t:.6f} s: {x}")
        lim = self.cfg.limits
        if abs(x[0]) >= lim.position_hard:
            side = math.copysign(1.0, x[0])
            x[0] = side * lim.position_hard
            v_old = x[2]
            if v_old * side > 0:  # moving into the stop
                v_new = -self.cfg.sim.restitution * v_old
                m = self.model.mass_matrix(x[1])
                x[3] += m[0, 1] * (v_old - v_new) / m[1, 1]
                x[2] = v_new
                self.impacts += 1
            self._flags["limit_hard"] = True
        if abs(x[0]) > lim.position_soft:
            self._flags["limit_soft"] = True
        if abs(x[2]) > lim.actuated_velocity_max or abs(x[3]) > lim.pendulum_velocity_max:
            self._flags["overspeed"] = True

    # ------------------------------------------------------------------ measurements
    def read_counts(self) -> tuple[int, ...]:
        """Encoder counts per channel (cart/arm, pendulum): quantised positions with Gaussian count jitter."""
        enc = self.cfg.encoders
        scale = np.asarray(enc.counts_per_unit) * np.asarray(enc.sign, float)
        raw = (self._x[:2] - np.asarray(enc.zero_position)) * scale
        sd = self.cfg.sim.count_noise_std
        if sd > 0:
            raw = raw + self.rng.normal(0.0, sd, size=2)
        return tuple(int(c) for c in np.rint(raw))

    def counts_to_positions(self, counts: Any) -> np.ndarray:
        """Counts -> SI positions with the shared conversion of rigs.config (the one the driver uses)."""
        return self.cfg.encoders.counts_to_positions(counts)

    def read_current(self) -> float:
        """Motor current estimate (A) from the applied voltage and the motor speed, with sensor noise."""
        i = float(self.model.motor_current(self._x, self._v))
        sd = self.cfg.sim.current_noise_std
        return i + float(self.rng.normal(0.0, sd)) if sd > 0 else i

    def sample(self) -> SimSample:
        """A full measurement: time, counts, current, applied voltage and latched flags."""
        return SimSample(self._t, self.read_counts(), self.read_current(), self._v, self.flags)
