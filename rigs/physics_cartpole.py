"""Cart-pole equations of motion: IP02-class cart driven through a rack and pinion, free pendulum.

x = [p, theta, p_dot, theta_dot], theta = 0 upright (pendulum centre of mass at (p + l sin th, l cos th)).
Lagrangian derivation in docs/rigs.md:

    [a        b cos th] [p_dd ]   [F(V, p_d) + b sin th th_d^2 - B_c p_d - F_c tanh(p_d / v_c)]
    [b cos th   J_t   ] [th_dd] = [b g sin th - B_p th_d - T_c tanh(th_d / w_c)              ]

a = M_c + m_p + J_m K_g^2 / r_mp^2 (rotor inertia reflected to the rack), b = m_p l, J_t = J_p + m_p l^2,
and the motor force F = eta_g eta_m K_g k_t (V - k_m K_g p_d / r_mp) / (R_m r_mp).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rigs.config import CartPoleParams
from rigs.physics_base import Array, RigModel


class CartPoleModel(RigModel):
    """Nonlinear cart-pole (IP02 cart + long pendulum) driven by motor voltage."""

    kind = "cartpole"
    state_names = ("p", "theta", "p_dot", "theta_dot")

    def __init__(self, params: CartPoleParams) -> None:
        super().__init__(params)
        p = params
        eta = p.gear_efficiency * p.motor_efficiency
        self.a = p.cart_mass + p.pendulum_mass + p.motor_inertia * p.gear_ratio**2 / p.pinion_radius**2
        self.b = p.pendulum_mass * p.pendulum_com
        # force = k_force * V - k_emf * p_dot
        self.k_force = eta * p.gear_ratio * p.motor_torque_constant / (p.motor_resistance * p.pinion_radius)
        self.k_emf = self.k_force * p.motor_back_emf_constant * p.gear_ratio / p.pinion_radius

    def _mass(self, q1: Array) -> tuple[Array | float, Array | float, Array | float]:
        return self.a, self.b * np.cos(q1), self.j_pivot

    def _dmass(self, q1: Array) -> tuple[Array | float, Array | float, Array | float]:
        return 0.0, -self.b * np.sin(q1), 0.0

    def _rhs(self, x: Array, u: Array) -> Array:
        p = self._p
        th, pd, thd = x[..., 1], x[..., 2], x[..., 3]
        s = np.sin(th)
        r0 = (self.k_force * u[..., 0] - (self.k_emf + p.cart_viscous) * pd + self.b * s * thd * thd
              - p.cart_coulomb * np.tanh(pd / p.cart_coulomb_velocity))
        r1 = (self.b * p.gravity * s - p.pendulum_viscous * thd
              - p.pendulum_coulomb * np.tanh(thd / p.pendulum_coulomb_velocity))
        r = np.empty(x.shape[:-1] + (2,))
        r[..., 0], r[..., 1] = r0, r1
        return r

    def _drhs(self, x: Array, u: Array) -> tuple[Array, Array]:
        p = self._p
        th, pd, thd = x[..., 1], x[..., 2], x[..., 3]
        s, c = np.sin(th), np.cos(th)
        sech2_c = 1.0 - np.tanh(pd / p.cart_coulomb_velocity) ** 2
        sech2_p = 1.0 - np.tanh(thd / p.pendulum_coulomb_velocity) ** 2
        dr = np.zeros(x.shape[:-1] + (2, 4))
        dr[..., 0, 1] = self.b * c * thd * thd
        dr[..., 0, 2] = -(self.k_emf + p.cart_viscous) - p.cart_coulomb / p.cart_coulomb_velocity * sech2_c
        dr[..., 0, 3] = 2.0 * self.b * s * thd
        dr[..., 1, 1] = self.b * p.gravity * c
        dr[..., 1, 3] = -p.pendulum_viscous - p.pendulum_coulomb / p.pendulum_coulomb_velocity * sech2_p
        du = np.zeros(x.shape[:-1] + (2, 1))
        du[..., 0, 0] = self.k_force
        return dr, du

    def actuator_speed(self, x: Any) -> Array:
        """Motor shaft speed K_g p_dot / r_mp (rad/s)."""
        x = np.asarray(x, dtype=np.float64)
        return self._p.gear_ratio * x[..., 2] / self._p.pinion_radius

    def natural_frequency(self, cart_free: bool = False) -> float:
        """Small-oscillation angular frequency (rad/s) about hanging, frictionless and unpowered.

        Cart locked: sqrt(m g l / J_t). Cart free (momentum conserved): sqrt(m g l / (J_t - b^2 / a))."""
        j = self.j_pivot - self.b**2 / self.a if cart_free else self.j_pivot
        return float(np.sqrt(self.mgl / j))
