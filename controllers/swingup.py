"""Energy-based swing-up (Astrom-Furuta) with a catch region that hands over to LQR, for both rigs.

The law is Astrom-Furuta's, posed on the base acceleration ``a`` (cart / arm) and written without
rig-specific signs: with ``E(x)`` the pendulum energy of the rig model (0 at upright rest) and
``g = dE/da = grad E(x) . (df/da)`` the effect of the base acceleration on the energy rate (proportional
to ``theta_dot cos theta`` for both rigs),

    a_des = a_max * sat(k (E0 - E) / |E_hang|) * sign(g)  -  kp * base  -  kd * base_rate

(the PD part keeps the base near its centre).  The motor voltage that produces ``a_des`` comes from the
rig model itself (``deriv`` is affine in ``u``: ``a = a0(x) + b(x) u``), then it is saturated.  Posing the
law on acceleration matters because both motors act nearly as velocity sources (back-EMF + viscous
damping): a bang-bang *voltage* accelerates the base only right after each sign change, when
``theta_dot cos theta`` is ~0, and pumps almost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from controllers.base import ControlOutput, angle_error, base_index, cfg_get, pendulum_index, voltage_limit
from controllers.lqr import LQRController


@dataclass
class SwingUpParams:
    """Tuning of the energy pump and the hand-over (angles in rad, rates in rad/s)."""

    a_max: float = 4.0             # base acceleration of the pump (m/s^2 or rad/s^2)
    k_energy: float = 2.0          # gain on the energy error (fraction of the hanging energy), before sat
    u_frac: float = 1.0            # swing-up command saturates at u_frac * voltage_max
    kp_base: float = 0.0           # base-position feedback (1/s^2)
    kd_base: float = 0.0           # base-velocity feedback (1/s)
    catch_angle: float = np.deg2rad(25.0)
    catch_rate: float = 8.0
    release_angle: float = np.deg2rad(40.0)
    catch_energy: float = 0.2      # catch only when |E - E0| < catch_energy * |E_hang|
    catch_base: float = 0.7        # ... and the base within catch_base * the safe travel
    kick: float = 0.3              # fraction of a_max used to start from rest
    brake_accel: float = 0.0       # base deceleration used to stop before the travel limit (0: a_max)
    travel_frac: float = 0.9       # fraction of the safe travel (position_soft - margin) the pump may use
    energy_target: float = 0.0     # E0 (J), 0 = upright rest
    energy_ki: float = 0.0         # 1/s: raise the aim above E0 while the energy sits inside the catch band
    #                                uncaught (a proportional pump stalls short of E0 when the plant loses
    #                                more energy per swing than the model says); capped below catch_energy

    @classmethod
    def from_tuning(cls, tuning: Mapping[str, Any] | None, **overrides: float) -> SwingUpParams:
        """Defaults updated from ``tuning['swingup']`` (``*_deg`` keys in degrees), then ``overrides``."""
        p = cls()
        sec = (tuning or {}).get("swingup", {})
        for key, val in list(sec.items()) + list(overrides.items()):
            name, conv = (key[:-4], np.deg2rad) if key.endswith("_deg") else (key, float)
            if not hasattr(p, name):
                raise ValueError(f"unknown swing-up parameter {key!r} (known: {sorted(vars(cls()))})")
            setattr(p, name, float(conv(float(val))))
        if not (0 < p.catch_angle < p.release_angle):
            raise ValueError("swing-up release_angle must exceed catch_angle (hysteresis)")
        if not p.energy_ki >= 0:
            raise ValueError(f"swing-up energy_ki must be >= 0, got {p.energy_ki:g}")
        return p


class EnergySwingUp:
    """The pure energy pump (no hand-over): ``compute(x) -> ControlOutput(mode="swingup")``."""

    name = "energy"

    def __init__(self, model: Any, params: SwingUpParams, u_max: float,
                 base_limit: float | None = None) -> None:
        self.model = model
        self.base_limit = None if base_limit is None else float(base_limit) * params.travel_frac
        self.params = params
        self.u_max = float(u_max)
        self.pi = pendulum_index(model)
        self.bi = base_index(model)
        self.n = model.n
        self.e_hang = abs(float(model.energy(np.asarray(model.hanging(), dtype=float))))
        if not self.e_hang > 0:
            raise ValueError("rig model reports zero energy at the hanging state; cannot normalise swing-up")
        self.x_up = np.asarray(model.upright(), dtype=float)
        self.boost = 0.0  # the aim above E0, as a fraction of |E_hang| (energy_ki's integral)
        self._t: float | None = None

    def _input_effect(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``f(x, 0)`` and ``df/du`` (the rig model is affine in the voltage)."""
        u0 = np.zeros(self.model.m)
        u1 = np.zeros(self.model.m)
        u1[0] = 1.0
        f0 = np.asarray(self.model.deriv(x, u0), dtype=float)
        return f0, np.asarray(self.model.deriv(x, u1), dtype=float) - f0

    def energy(self, x: np.ndarray) -> np.ndarray | float:
        """Pendulum energy of the rig model (about its pivot, base at rest; 0 upright, < 0 hanging)."""
        return self.model.energy(x)

    def energy_gradient(self, x: np.ndarray) -> np.ndarray:
        """``grad E(x)`` by central differences of :meth:`energy`."""
        h = 1e-6
        xs = np.stack([x + h * d for d in np.eye(self.n)] + [x - h * d for d in np.eye(self.n)])
        es = np.asarray(self.energy(xs), dtype=float).reshape(-1)
        return (es[: self.n] - es[self.n:]) / (2 * h)

    def reset(self) -> None:
        """Forget the energy aim's integral."""
        self.boost = 0.0
        self._t = None

    def _update_boost(self, e: float, t: float) -> None:
        """Integrate the energy shortfall while it sits inside the catch band (capped at 90 % of it)."""
        p = self.params
        dt = 0.0 if self._t is None else min(max(t - self._t, 0.0), 0.1)
        self._t = t
        short = (p.energy_target - e) / self.e_hang
        if p.energy_ki > 0 and abs(short) < p.catch_energy:
            self.boost = float(np.clip(self.boost + p.energy_ki * short * dt, 0.0, 0.9 * p.catch_energy))

    def compute(self, x: np.ndarray, t: float = 0.0) -> ControlOutput:
        """Energy-pumping command with base-position regulation, saturated."""
        p = self.params
        x = np.asarray(x, dtype=float)
        vi = self.n // 2 + self.bi
        e = float(self.energy(x))
        f0, dfdu = self._input_effect(x)
        b = float(dfdu[vi])
        if abs(b) < 1e-9:
            raise FloatingPointError("rig model: the voltage has no effect on the base acceleration here")
        g = float(self.energy_gradient(x) @ dfdu) / b  # dE/dt per unit base acceleration
        self._update_boost(e, t)
        gap = p.energy_target + self.boost * self.e_hang - e
        level = float(np.clip(p.k_energy * gap / self.e_hang, -1.0, 1.0))
        hanging = abs(angle_error(x[self.pi], self.x_up[self.pi])) > 3.0
        at_rest = hanging and abs(x[self.n // 2 + self.pi]) < 0.05
        kick = at_rest and gap > 0.05 * self.e_hang and abs(g) < 1e-3 * self.e_hang
        base = x[self.bi] - self.x_up[self.bi]
        pump = p.kick * p.a_max if kick else p.a_max * level * float(np.sign(g))
        a_des = pump - p.kp_base * base - p.kd_base * x[vi]
        if self.base_limit is not None:  # travel guard: brake when the stopping distance uses up the room
            v = float(x[vi])
            a_brake = p.brake_accel or p.a_max
            room = self.base_limit - np.sign(v) * base
            if v != 0.0 and v * v / (2 * a_brake) >= room:
                a_des = -np.sign(v) * a_brake
            elif abs(base) >= self.base_limit and np.sign(a_des) == np.sign(base):
                a_des = 0.0
        u_sat = p.u_frac * self.u_max
        u = float(np.clip((a_des - f0[vi]) / b, -u_sat, u_sat))
        return ControlOutput(np.array([u]), "swingup", {"energy": e, "energy_gain": g, "a_des": a_des})


class SwingUpController:
    """Hybrid controller: energy swing-up until the catch region, then LQR; back to swing-up on release."""

    name = "swingup"

    def __init__(self, model: Any, cfg: Any, dt: float, lqr: LQRController | None = None,
                 params: SwingUpParams | None = None, tuning: Mapping[str, Any] | None = None) -> None:
        if tuning is None:
            from controllers.tuning import load_tuning

            tuning = load_tuning(str(cfg_get(cfg, "kind", default="")))
        self.params = params or SwingUpParams.from_tuning(tuning)
        self.u_max = voltage_limit(cfg)
        lim = cfg_get(cfg, "limits")
        safe = None if lim is None else float(lim.position_soft - lim.position_margin)
        self.pump = EnergySwingUp(model, self.params, self.u_max, base_limit=safe)
        self.lqr = lqr or LQRController(model, dt, cfg=cfg, tuning=tuning)
        self.pi = self.pump.pi
        self.n = model.n
        self.x_up = self.pump.x_up
        self.mode = "swingup"
        self.switches = 0

    def reset(self) -> None:
        """Start again in swing-up mode."""
        self.pump.reset()
        self.mode = "swingup"
        self.switches = 0

    def in_catch_region(self, x: np.ndarray) -> bool:
        """Pendulum close to upright, not spinning fast, with about the upright energy and room to move."""
        p = self.params
        err = abs(angle_error(x[self.pi], self.x_up[self.pi]))
        rate = abs(x[self.n // 2 + self.pi])
        if not (err < p.catch_angle and rate < p.catch_rate):
            return False
        if abs(float(self.pump.energy(x)) - p.energy_target) > p.catch_energy * self.pump.e_hang:
            return False
        lim = self.pump.base_limit
        return lim is None or abs(x[self.pump.bi] - self.x_up[self.pump.bi]) < p.catch_base * lim

    def compute(self, x: np.ndarray, t: float = 0.0) -> ControlOutput:
        """Swing-up or balance command, switching with hysteresis."""
        x = np.asarray(x, dtype=float)
        err = abs(angle_error(x[self.pi], self.x_up[self.pi]))
        if self.mode == "swingup" and self.in_catch_region(x):
            self.mode = "balance"
            self.switches += 1
        elif self.mode == "balance" and err > self.params.release_angle:
            self.mode = "swingup"
            self.switches += 1
            self.pump.reset()
        out = self.lqr.compute(x, t) if self.mode == "balance" else self.pump.compute(x, t)
        out.mode = self.mode
        return out
