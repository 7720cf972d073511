"""Furuta pendulum equations of motion (QUBE-Servo 2), full model with the arm-pendulum coupling terms.

x = [theta, alpha, theta_dot, alpha_dot]; alpha = 0 upright. The pendulum swings in the plane normal to the
arm; its centre of mass is at L e_r + l (sin alpha e_t + cos alpha e_z). Following Cazzolato & Prime (2011),
with an axisymmetric pendulum (inertia J_p about the centre of mass across the rod, J_a along it). With
s = sin alpha, c = cos alpha, P = m l^2 + J_p - J_a, h = m L l, K = J_arm + J_hub + J_m + m L^2 + J_a and
J_al = J_p + m l^2:

  [K + P s^2  h c ] [th_dd]   [tau(V, th_d) - 2 P s c th_d al_d + h s al_d^2 - B_r th_d - T_r tanh(th_d/w_r)]
  [  h c     J_al ] [al_dd] = [P s c th_d^2 + m g l s - B_p al_d - T_p tanh(al_d/w_p)                     ]

with the direct-drive motor torque tau = eta k_t (V - k_m th_d) / R_m. Derivation in docs/rigs.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rigs.config import FurutaParams
from rigs.physics_base import Array, RigModel


class FurutaModel(RigModel):
    """Nonlinear Furuta pendulum (rotary arm + free pendulum) driven by motor voltage."""

    kind = "furuta"
    state_names = ("theta", "alpha", "theta_dot", "alpha_dot")

    def __init__(self, params: FurutaParams) -> None:
        super().__init__(params)
        p = params
        m, L, l = p.pendulum_mass, p.arm_length, p.pendulum_com
        self.K = p.arm_inertia + p.hub_inertia + p.motor_inertia + m * L * L + p.pendulum_axial_inertia
        self.P = m * l * l + p.pendulum_inertia - p.pendulum_axial_inertia
        self.h = m * L * l
        # torque = k_torque * V - k_emf * theta_dot
        self.k_torque = p.motor_efficiency * p.motor_torque_constant / p.motor_resistance
        self.k_emf = self.k_torque * p.motor_back_emf_constant

    def _mass(self, q1: Array) -> tuple[Array | float, Array | float, Array | float]:
        s, c = np.sin(q1), np.cos(q1)
        return self.K + self.P * s * s, self.h * c, self.j_pivot

    def _dmass(self, q1: Array) -> tuple[Array | float, Array | float, Array | float]:
        s, c = np.sin(q1), np.cos(q1)
        return 2.0 * self.P * s * c, -self.h * s, 0.0

    def _rhs(self, x: Array, u: Array) -> Array:
        p = self._p
        al, thd, ald = x[..., 1], x[..., 2], x[..., 3]
        s, c = np.sin(al), np.cos(al)
        r0 = (self.k_torque * u[..., 0] - (self.k_emf + p.arm_viscous) * thd
              - 2.0 * self.P * s * c * thd * ald + self.h * s * ald * ald
              - p.arm_coulomb * np.tanh(thd / p.arm_coulomb_velocity))
        r1 = (self.P * s * c * thd * thd + self.mgl * s - p.pendulum_viscous * ald
              - p.pendulum_coulomb * np.tanh(ald / p.pendulum_coulomb_velocity))
        r = np.empty(x.shape[:-1] + (2,))
        r[..., 0], r[..., 1] = r0, r1
        return r

    def _drhs(self, x: Array, u: Array) -> tuple[Array, Array]:
        p = self._p
        al, thd, ald = x[..., 1], x[..., 2], x[..., 3]
        s, c = np.sin(al), np.cos(al)
        c2 = c * c - s * s
        sech2_r = 1.0 - np.tanh(thd / p.arm_coulomb_velocity) ** 2
        sech2_p = 1.0 - np.tanh(ald / p.pendulum_coulomb_velocity) ** 2
        dr = np.zeros(x.shape[:-1] + (2, 4))
        dr[..., 0, 1] = -2.0 * self.P * c2 * thd * ald + self.h * c * ald * ald
        dr[..., 0, 2] = (-(self.k_emf + p.arm_viscous) - 2.0 * self.P * s * c * ald
                         - p.arm_coulomb / p.arm_coulomb_velocity * sech2_r)
        dr[..., 0, 3] = -2.0 * self.P * s * c * thd + 2.0 * self.h * s * ald
        dr[..., 1, 1] = self.P * c2 * thd * thd + self.mgl * c
        dr[..., 1, 2] = 2.0 * self.P * s * c * thd
        dr[..., 1, 3] = -p.pendulum_viscous - p.pendulum_coulomb / p.pendulum_coulomb_velocity * sech2_p
        du = np.zeros(x.shape[:-1] + (2, 1))
        du[..., 0, 0] = self.k_torque
        return dr, du

    def actuator_speed(self, x: Any) -> Array:
        """Motor shaft speed = arm speed theta_dot (direct drive)."""
        return np.asarray(x, dtype=np.float64)[..., 2]

    def natural_frequency(self, arm_free: bool = False) -> float:
        """Small-oscillation angular frequency (rad/s) about hanging, frictionless and unpowered.

        Arm locked: sqrt(m g l / J_al). Arm free (momentum conserved): sqrt(m g l / (J_al - h^2 / K)).
        """
        j = self.j_pivot - self.h**2 / self.K if arm_free else self.j_pivot
        return float(np.sqrt(self.mgl / j))
