"""Shared machinery of the two-degree-of-freedom rig models: M(q) q_dd = r(q, q_d, u) (numpy only).

Both rigs have generalised coordinates q = [q0 (actuated: cart position or arm angle), q1 (pendulum angle)],
state x = [q0, q1, q0_dot, q1_dot] and input u = [voltage]. The mass matrix depends on q1 only. A subclass
provides the mass matrix, its derivative with respect to q1, the right-hand side r (motor, friction, gravity,
Coriolis/centrifugal terms) with its partial derivatives, and the potential energy. Everything here is
vectorised over leading dimensions: x (..., 4), u (..., 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

Array = np.ndarray


def wrap_angle(a: np.ndarray | float) -> np.ndarray:
    """Angle(s) mapped to [-pi, pi) (the one definition every package uses)."""
    return (np.asarray(a) + np.pi) % (2.0 * np.pi) - np.pi


def _as_xu(x: Any, u: Any) -> tuple[Array, Array]:
    """Validate (shapes, finiteness) and broadcast x (..., 4) and u (..., 1); a scalar u is accepted."""
    x = np.asarray(x, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    if x.shape[-1:] != (4,):
        raise ValueError(f"x must have last dimension 4, got shape {x.shape}")
    if u.ndim == 0:
        u = u[None]
    if u.shape[-1:] != (1,):
        raise ValueError(f"u must have last dimension 1, got shape {u.shape}")
    if not (np.isfinite(x).all() and np.isfinite(u).all()):
        raise ValueError("x and u must be finite (got NaN or Inf)")
    if x.shape[:-1] == u.shape[:-1]:
        return x, u
    lead = np.broadcast_shapes(x.shape[:-1], u.shape[:-1])
    return np.broadcast_to(x, lead + (4,)), np.broadcast_to(u, lead + (1,))


class RigModel:
    """Continuous-time nonlinear model of a rig; the single source of truth for its equations of motion."""

    n: int = 4
    m: int = 1
    kind: str = ""
    state_names: tuple[str, ...] = ()
    input_names: tuple[str, ...] = ("voltage",)

    def __init__(self, params: Any) -> None:
        self._p = params
        p = params
        self.j_pivot = p.pendulum_inertia + p.pendulum_mass * p.pendulum_com**2  # pendulum about its pivot
        self.mgl = p.pendulum_mass * p.gravity * p.pendulum_com

    # ------------------------------------------------------------------ subclass interface
    def _mass(self, q1: Array) -> tuple[Array | float, Array | float, Array | float]:
        """Entries (m00, m01, m11) of the symmetric mass matrix at pendulum angle q1 (floats if constant)."""
        raise NotImplementedError

    def _dmass(self, q1: Array) -> tuple[Array | float, Array | float, Array | float]:
        """Derivatives of (m00, m01, m11) with respect to q1 (floats if constant)."""
        raise NotImplementedError

    def _rhs(self, x: Array, u: Array) -> Array:
        """Right-hand side r (..., 2) of M q_dd = r: generalised forces minus velocity-product terms."""
        raise NotImplementedError

    def _drhs(self, x: Array, u: Array) -> tuple[Array, Array]:
        """Partial derivatives of r: (dr/dx (..., 2, 4), dr/du (..., 2, 1))."""
        raise NotImplementedError

    def potential(self, x: Any) -> Array:
        """Gravitational potential energy relative to the upright pendulum (J): m g l (cos q1 - 1), 0 upright,
        -2 m g l hanging."""
        x = np.asarray(x, dtype=np.float64)
        return self.mgl * (np.cos(x[..., 1]) - 1.0)

    def energy(self, x: Any) -> Array:
        """Pendulum energy about its pivot (base at rest), J: 1/2 J_pivot q1_dot^2 + m g l (cos q1 - 1);
        0 at upright rest, -2 m g l hanging at rest."""
        x = np.asarray(x, dtype=np.float64)
        return 0.5 * self.j_pivot * x[..., 3] ** 2 + self.potential(x)

    def actuator_speed(self, x: Any) -> Array:
        """Motor shaft speed (rad/s) for the state x."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    @property
    def params(self) -> dict[str, float]:
        """Physical parameters (SI) as a plain dict."""
        return {k: float(v) for k, v in vars(self._p).items()}

    @property
    def physics(self) -> Any:
        """The validated parameter dataclass (rigs.config.CartPoleParams / FurutaParams)."""
        return self._p

    def upright(self) -> Array:
        """Upright equilibrium state (pendulum up, at rest, actuator centred)."""
        return np.zeros(4)

    def hanging(self) -> Array:
        """Hanging equilibrium state (pendulum down, at rest, actuator centred)."""
        return np.array([0.0, np.pi, 0.0, 0.0])

    def mass_matrix(self, q1: Any) -> Array:
        """Mass matrix M (..., 2, 2) at pendulum angle q1 (includes the reflected rotor inertia)."""
        q1 = np.asarray(q1, dtype=np.float64)
        m00, m01, m11 = self._mass(q1)
        out = np.empty(q1.shape + (2, 2))
        out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1] = m00, m01, m01, m11
        return out

    def _solve(self, q1: Array, r: Array) -> Array:
        """q_dd = M(q1)^-1 r with the closed-form 2x2 inverse; r (..., 2) or (..., 2, k)."""
        m00, m01, m11 = self._mass(q1)
        inv_det = 1.0 / (m00 * m11 - m01 * m01)
        out = np.empty(r.shape)
        if r.ndim == q1.ndim + 1:
            r0, r1 = r[..., 0], r[..., 1]
            out[..., 0] = (m11 * r0 - m01 * r1) * inv_det
            out[..., 1] = (m00 * r1 - m01 * r0) * inv_det
            return out
        m00, m01, m11, inv_det = (np.asarray(a)[..., None] for a in (m00, m01, m11, inv_det))
        r0, r1 = r[..., 0, :], r[..., 1, :]
        out[..., 0, :] = (m11 * r0 - m01 * r1) * inv_det
        out[..., 1, :] = (m00 * r1 - m01 * r0) * inv_det
        return out

    def accelerations(self, x: Any, u: Any) -> Array:
        """Generalised accelerations q_dd (..., 2)."""
        x, u = _as_xu(x, u)
        return self._solve(x[..., 1], self._rhs(x, u))

    def deriv(self, x: Any, u: Any) -> Array:
        """Continuous-time state derivative x_dot (..., 4) (friction and motor back-EMF included)."""
        x, u = _as_xu(x, u)
        return self._deriv(x, u)

    def _deriv(self, x: Array, u: Array) -> Array:
        """deriv without input validation (x, u already float arrays with matching leading shape)."""
        out = np.empty(x.shape)
        out[..., :2] = x[..., 2:]
        out[..., 2:] = self._solve(x[..., 1], self._rhs(x, u))
        return out

    def step(self, x: Any, u: Any, dt: float, method: str = "rk4") -> Array:
        """One fixed step of length dt with u held constant (zero-order hold): "rk4" or "euler"."""
        x, u = _as_xu(x, u)
        if not np.isfinite(dt) or dt < 0:
            raise ValueError(f"dt must be finite and >= 0, got {dt}")
        if method == "euler":
            return x + dt * self._deriv(x, u)
        if method != "rk4":
            raise ValueError(f"method must be 'rk4' or 'euler', got {method!r}")
        f = self._deriv
        k1 = f(x, u)
        k2 = f(x + 0.5 * dt * k1, u)
        k3 = f(x + 0.5 * dt * k2, u)
        k4 = f(x + dt * k3, u)
        return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    def rollout(self, x0: Any, u_seq: Any, dt: float, substeps: int = 1, method: str = "rk4") -> Array:
        """Integrate from x0 (..., 4) under u_seq (..., T, 1); returns states (..., T + 1, 4)."""
        u_seq = np.asarray(u_seq, dtype=np.float64)
        if u_seq.ndim < 2 or u_seq.shape[-1] != 1:
            raise ValueError(f"u_seq must have shape (..., T, 1), got {u_seq.shape}")
        if substeps < 1:
            raise ValueError(f"substeps must be >= 1, got {substeps}")
        x = np.asarray(x0, dtype=np.float64)
        out = [np.broadcast_to(x, np.broadcast_shapes(x.shape[:-1], u_seq.shape[:-2]) + (4,))]
        h = dt / substeps
        for t in range(u_seq.shape[-2]):
            u = u_seq[..., t, :]
            for _ in range(substeps):
                x = self.step(x, u, h, method)
            out.append(x)
        return np.stack(out, axis=-2)

    def jacobians(self, x: Any, u: Any) -> tuple[Array, Array]:
        """Analytic continuous-time Jacobians A = d x_dot/dx (..., 4, 4), B = d x_dot/du (..., 4, 1).

        Implicit differentiation of M(q1) q_dd = r: d q_dd/dz = M^-1 (dr/dz - (dM/dz) q_dd), where only
        z = q1 enters M.
        """
        x, u = _as_xu(x, u)
        q1 = x[..., 1]
        qdd = self._solve(q1, self._rhs(x, u))
        dr_dx, dr_du = self._drhs(x, u)
        d00, d01, d11 = self._dmass(q1)
        dr_dx = dr_dx.copy()
        dr_dx[..., 0, 1] -= d00 * qdd[..., 0] + d01 * qdd[..., 1]
        dr_dx[..., 1, 1] -= d01 * qdd[..., 0] + d11 * qdd[..., 1]
        lead = x.shape[:-1]
        A = np.zeros(lead + (4, 4))
        A[..., 0, 2] = 1.0
        A[..., 1, 3] = 1.0
        A[..., 2:, :] = self._solve(q1, dr_dx)
        B = np.zeros(lead + (4, 1))
        B[..., 2:, :] = self._solve(q1, dr_du)
        return A, B

    def kinetic_energy(self, x: Any) -> Array:
        """Total kinetic energy 1/2 q_d^T M q_d (J), including the cart/arm and the motor rotor."""
        x = np.asarray(x, dtype=np.float64)
        m00, m01, m11 = self._mass(x[..., 1])
        v0, v1 = x[..., 2], x[..., 3]
        return 0.5 * (m00 * v0 * v0 + 2.0 * m01 * v0 * v1 + m11 * v1 * v1)

    def total_energy(self, x: Any) -> Array:
        """Total mechanical energy (J): kinetic (all bodies) + potential, 0 at upright rest.

        Conserved by deriv when friction is zero and no motor current flows (see make_model overrides)."""
        return self.kinetic_energy(x) + self.potential(x)

    def motor_current(self, x: Any, u: Any) -> Array:
        """Armature current (A), inductance neglected: i = (V - k_m omega_motor) / R_m."""
        x, u = _as_xu(x, u)
        p = self._p
        return (u[..., 0] - p.motor_back_emf_constant * self.actuator_speed(x)) / p.motor_resistance

    def linearize(self, x_eq: Any = None, u_eq: Any = None) -> tuple[Array, Array]:
        """Continuous-time (A, B) at an operating point (default: upright, 0 V)."""
        x_eq = self.upright() if x_eq is None else x_eq
        u_eq = np.zeros(1) if u_eq is None else u_eq
        return self.jacobians(x_eq, u_eq)

    def linearize_discrete(self, dt: float, x_eq: Any = None, u_eq: Any = None) -> tuple[Array, Array]:
        """Zero-order-hold discretisation (Ad, Bd) of linearize(x_eq, u_eq): expm of the augmented matrix."""
        if not np.isfinite(dt) or dt <= 0:
            raise ValueError(f"dt must be finite and > 0, got {dt}")
        A, B = self.linearize(x_eq, u_eq)
        if A.ndim != 2:
            raise ValueError("linearize_discrete takes a single operating point, not a batch")
        aug = np.zeros((5, 5))
        aug[:4, :4] = A
        aug[:4, 4:] = B
        E = scipy.linalg.expm(aug * dt)
        return E[:4, :4], E[:4, 4:]
