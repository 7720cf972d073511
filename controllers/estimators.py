"""State estimators the control loop can use (``rigfm run --estimator diff|kf|fm-ukf``).

Every estimator maps encoder positions sampled at device times, plus the voltage the firmware reports it
applied at each sample, to a full state estimate ``x = [q0, q1, q0_dot, q1_dot]``:

* ``diff`` (:class:`DiffEstimator`): the filtered differentiation of ``controllers.estimation`` (raw
  positions, low-passed finite-difference velocities), fed the newest frame of each tick;
* ``kf`` (:class:`PhysicsEKF`): a discrete extended Kalman filter on the rig's own physics
  (``rigs.RigModel._deriv``), fed every frame: prediction with the applied voltage as the input (the
  actuation delay of the rig config respected), Jacobians by finite differences in one batched call, a
  second-order Taylor step; update with the encoder positions, noise ``q^2 (1/12 + sigma_c^2)`` per channel
  (quantisation step ``q``, the config's count jitter ``sigma_c``);
* ``fm-ukf`` (``controllers.fm_ukf.FMUKF``): a UKF with the learned model as its process model.

Tuning lives in ``controllers/tuning.toml`` ``[<kind>.estimation]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from controllers.estimation import VelocityEstimator

ESTIMATORS = ("diff", "kf", "fm-ukf")


class EstimatorSetupError(ValueError):
    """An estimator cannot be built as asked (e.g. ``fm-ukf`` without a learned model)."""


class StateEstimator(Protocol):
    """What ``ControlLoop`` needs from an estimator."""

    name: str
    every_frame: bool  # True: fed every STATE frame; False: only the newest frame of a tick

    def update(self, positions: np.ndarray, t: float, u_applied: float) -> np.ndarray:
        """Feed one sample (SI positions, device time s, voltage applied at it); returns x (copy)."""
        ...


class DiffEstimator:
    """The loop's historical estimator: raw positions + filtered finite-difference velocities."""

    name = "diff"
    every_frame = False

    def __init__(self, vel: VelocityEstimator) -> None:
        self.vel = vel

    def update(self, positions: np.ndarray, t: float, u_applied: float = 0.0) -> np.ndarray:
        pos = np.asarray(positions, dtype=float).reshape(-1)
        return np.concatenate([pos, self.vel.update(pos, t)])


def measurement_variance(cfg: Any) -> np.ndarray:
    """Encoder noise variance per position channel (SI^2): quantisation ``q^2/12`` plus count jitter."""
    q = np.asarray(cfg.encoders.resolution, dtype=float)
    sc = float(cfg.sim.count_noise_std)
    return q * q * (1.0 / 12.0 + sc * sc)


class InputHistory:
    """Applied voltages at sample times; the mean voltage acting on the plant over an interval, given the
    actuation delay (a voltage applied at sample time ``s`` acts from ``s + delay`` until the next one)."""

    def __init__(self, delay_s: float, maxlen: int = 16) -> None:
        self.delay = float(delay_s)
        self.maxlen = int(maxlen)
        self._t: list[float] = []
        self._v: list[float] = []

    def add(self, t: float, v: float) -> None:
        if self._t and t <= self._t[-1]:
            self._v[-1] = float(v)
            return
        self._t.append(float(t))
        self._v.append(float(v))
        if len(self._t) > self.maxlen:
            del self._t[0], self._v[0]

    def mean(self, t0: float, t1: float) -> float:
        """Time-weighted mean of the acting voltage over [t0, t1] (the dynamics are affine in the voltage);
        before the first logged voltage the first one is assumed."""
        ts, vs = self._t, self._v
        if not ts:
            return 0.0
        if t1 <= t0:
            return vs[-1]
        d = self.delay
        acc = 0.0
        end = t1
        for i in range(len(ts) - 1, -1, -1):  # newest first; stop once a segment starts before t0
            start = ts[i] + d if i else -np.inf
            lo = start if start > t0 else t0
            if end > lo:
                acc += vs[i] * (end - lo)
            if start <= t0:
                break
            end = start if start < end else end
        return acc / (t1 - t0)

    def clear(self) -> None:
        self._t.clear()
        self._v.clear()


class PhysicsPropagator:
    """Mean and Jacobians of one step of the rig physics (numpy, no validation in the hot path)."""

    def __init__(self, model: Any, fd_eps: Sequence[float] = (1e-6, 1e-6, 1e-5, 1e-5)) -> None:
        self.model = model
        self.eps = np.asarray(fd_eps, dtype=float)
        self._xb = np.empty((5, 4))
        self._ub = np.empty((5, 1))
        self._eye = np.eye(4)
        self._deps = np.diag(self.eps)

    def step(self, x: np.ndarray, u: float, dt: float, with_jacobian: bool = True
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """x(t + dt) by a second-order Taylor step ``x + dt f + dt^2/2 A f``, and F = d x(t+dt) / d x.

        ``f`` and ``A = df/dx`` come from one batched call of the model's derivative (x and x + eps e_i)."""
        xb, ub = self._xb, self._ub
        xb[:] = x
        xb[1:] += self._deps
        ub[:] = u
        d = self.model._deriv(xb, ub)
        f = d[0]
        a = ((d[1:] - f) / self.eps[:, None]).T  # columns: df/dx_i
        af = a @ f
        x_new = x + dt * f + 0.5 * dt * dt * af
        if not with_jacobian:
            return x_new, None
        adt = a * dt
        return x_new, self._eye + adt + 0.5 * adt @ adt


def _accel_noise(dt: float, qa: np.ndarray) -> np.ndarray:
    """Discrete process noise of white acceleration noise (spectral density qa per joint)."""
    q = np.zeros((4, 4))
    for i in range(2):
        q[i, i] = qa[i] * dt**3 / 3.0
        q[i, i + 2] = q[i + 2, i] = qa[i] * dt**2 / 2.0
        q[i + 2, i + 2] = qa[i] * dt
    return q


class PhysicsEKF:
    """Discrete EKF on the rig physics, encoder positions measured (see module docstring)."""

    name = "kf"
    every_frame = True

    def __init__(self, model: Any, cfg: Any, accel_noise: Sequence[float] = (1.0, 10.0),
                 init_velocity_std: Sequence[float] = (0.5, 5.0), max_gap_s: float = 0.1,
                 max_substep_s: float = 0.0025, angle_channels: Sequence[int] = (1,),
                 disturbance_noise: float = 0.0, init_disturbance_std: float = 1.0) -> None:
        """``disturbance_noise`` (V^2/s, 0 = off) adds a fifth state: a voltage offset ``d`` acting with the
        applied voltage (``u + d``), a random walk of that spectral density -- it absorbs a steady mismatch
        between the model and the plant (friction, motor gain) instead of biasing the velocities."""
        if not (math.isfinite(disturbance_noise) and disturbance_noise >= 0):
            raise ValueError(f"kf: disturbance_noise must be a finite number >= 0, got {disturbance_noise}")
        self.nd = 1 if disturbance_noise > 0 else 0
        self.qdist = float(disturbance_noise)
        self.d0 = float(init_disturbance_std) ** 2
        self.model = model
        self.cfg = cfg
        self.qa = np.asarray(accel_noise, dtype=float)
        self.r = measurement_variance(cfg)
        self.v0 = np.asarray(init_velocity_std, dtype=float) ** 2
        self.max_gap_s = float(max_gap_s)
        self.max_substep_s = float(max_substep_s)
        self.angle = np.zeros(2, dtype=bool)
        self.angle[list(angle_channels)] = True
        self.prop = PhysicsPropagator(model)
        self.inputs = InputHistory(float(cfg.sim.actuation_delay_s))
        self._angle_idx = tuple(int(i) for i in np.flatnonzero(self.angle))
        self._rdiag = np.diag(self.r)
        dim = 4 + self.nd
        self._eye = np.eye(dim)
        self._h = np.eye(2, dim)
        self._qcache: dict[float, np.ndarray] = {}
        self.x = np.zeros(dim)
        self.P = np.eye(dim)
        self._t: float | None = None
        self.updates = 0

    def reset(self, positions: np.ndarray | None = None, t: float | None = None) -> None:
        """Restart from ``positions`` at rest (velocity uncertain), or wait for the next sample."""
        self._t = None if positions is None else t
        if positions is not None:
            self._init(np.asarray(positions, dtype=float), t)

    def _init(self, pos: np.ndarray, t: float | None) -> None:
        self.x = np.concatenate([pos, np.zeros(2 + self.nd)])
        self.P = np.diag(np.concatenate([self.r, self.v0, np.full(self.nd, self.d0)]))
        self._t = t

    def predict(self, t: float) -> None:
        """Propagate x, P to time t (substeps of at most ``max_substep_s``) under the logged voltages."""
        assert self._t is not None
        span = t - self._t
        k = max(1, int(np.ceil(span / self.max_substep_s - 1e-9)))
        h = span / k
        t0 = self._t
        key = round(h, 7)
        qd = self._qcache.get(key)
        if qd is None:
            if len(self._qcache) > 256:
                self._qcache.clear()
            qd = _accel_noise(h, self.qa)
            if self.nd:
                qd = np.pad(qd, (0, 1))
                qd[4, 4] = self.qdist * h
            self._qcache[key] = qd
        for i in range(k):
            u = self.inputs.mean(t0 + i * h, t0 + (i + 1) * h)
            if not self.nd:
                self.x, f = self.prop.step(self.x, u, h)
            else:
                d = self.x[4]
                x4, f4 = self.prop.step(self.x[:4], u + d, h)
                xu, _ = self.prop.step(self.x[:4], u + d + 1e-4, h, with_jacobian=False)
                f = np.eye(5)
                f[:4, :4] = f4
                f[:4, 4] = (xu - x4) / 1e-4  # d x(t+h) / d d (the derivative is affine in the voltage)
                self.x = np.append(x4, d)
            self.P = f @ self.P @ f.T + qd
        self._t = t

    def correct(self, pos: np.ndarray) -> None:
        """Measurement update with encoder positions (H = [I 0]); angle innovations wrapped."""
        y = pos - self.x[:2]
        for i in self._angle_idx:
            y[i] = (y[i] + np.pi) % (2.0 * np.pi) - np.pi
        p = self.P
        s = p[:2, :2] + self._rdiag
        det = s[0, 0] * s[1, 1] - s[0, 1] * s[1, 0]
        s_inv = np.array([[s[1, 1], -s[0, 1]], [-s[1, 0], s[0, 0]]]) / det
        k = p[:, :2] @ s_inv  # P H^T S^-1
        self.x = self.x + k @ y
        ikh = self._eye - k @ self._h
        self.P = ikh @ p @ ikh.T + k @ self._rdiag @ k.T  # Joseph form: stays symmetric positive
        self.last_innovation = y
        self.last_s = s

    def update(self, positions: np.ndarray, t: float, u_applied: float = 0.0) -> np.ndarray:
        pos = np.asarray(positions, dtype=float).reshape(-1)
        if pos.shape != (2,) or not math.isfinite(pos[0] + pos[1]):
            raise ValueError(f"kf: expected 2 finite positions, got {np.asarray(positions).tolist()}")
        t = float(t)
        if self._t is None or t - self._t > self.max_gap_s or t < self._t:
            self._init(pos, t)
            self.inputs.clear()
            self.inputs.add(t, u_applied)
            return self.x[:4].copy()
        if t > self._t:
            self.predict(t)
            self.correct(pos)
            self.updates += 1
        self.inputs.add(t, u_applied)
        if not math.isfinite(self.x.sum()):
            raise FloatingPointError(f"kf: state estimate became non-finite at t = {t:.6f} s")
        return self.x[:4].copy()
