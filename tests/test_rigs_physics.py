"""Equations of motion of the rigs: conservation, Jacobians, periods, linearisation, integration."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

from rigs.config import RigConfigError, load_config
from rigs.physics import CartPoleModel, FurutaModel, make_model

RIGS = ("cartpole", "furuta")
# motor disconnected (no current can flow with 0 V and no back-EMF) and no friction: a conservative system
CONSERVATIVE = {"friction_scale": 0.0, "back_emf_scale": 0.0}


def _random_states(rng: np.random.Generator, k: int) -> np.ndarray:
    x = np.empty((k, 4))
    x[:, 0] = rng.uniform(-0.3, 0.3, k)
    x[:, 1] = rng.uniform(-np.pi, np.pi, k)
    x[:, 2] = rng.normal(0.0, 1.0, k)
    x[:, 3] = rng.normal(0.0, 5.0, k)
    x[: k // 4, 2:] *= 0.01  # some states inside the tanh (Coulomb) transition region
    return x


@pytest.mark.parametrize("rig", RIGS)
def test_api_shapes_and_names(rig):
    model = make_model(rig)
    assert (model.n, model.m) == (4, 1)
    assert model.input_names == ("voltage",)
    expected = ("p", "theta", "p_dot", "theta_dot") if rig == "cartpole" else ("theta", "alpha", "theta_dot",
                                                                              "alpha_dot")
    assert model.state_names == expected
    assert isinstance(model, CartPoleModel if rig == "cartpole" else FurutaModel)
    x = np.zeros((3, 5, 4))
    u = np.zeros((3, 5, 1))
    assert model.deriv(x, u).shape == (3, 5, 4)
    A, B = model.jacobians(x, u)
    assert A.shape == (3, 5, 4, 4) and B.shape == (3, 5, 4, 1)
    assert model.step(x, u, 0.01).shape == (3, 5, 4)
    assert model.energy(x).shape == (3, 5)
    assert model.deriv(np.zeros(4), 0.0).shape == (4,)  # scalar voltage accepted for m = 1
    with pytest.raises(ValueError, match="last dimension 4"):
        model.deriv(np.zeros(3), [0.0])
    with pytest.raises(ValueError, match="finite"):
        model.deriv([0.0, np.nan, 0.0, 0.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        model.step(np.zeros(4), [np.inf], 0.01)
    with pytest.raises(ValueError, match="method"):
        model.step(np.zeros(4), [0.0], 0.01, method="rk45")


@pytest.mark.parametrize("rig", RIGS)
def test_deriv_vectorised_matches_pointwise(rig):
    model = make_model(rig)
    rng = np.random.default_rng(1)
    x = _random_states(rng, 12).reshape(3, 4, 4)
    u = rng.uniform(-10, 10, (3, 4, 1))
    batched = model.deriv(x, u)
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(batched[i, j], model.deriv(x[i, j], u[i, j]), rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("rig", RIGS)
def test_equilibria_and_energy_zero(rig):
    model = make_model(rig)
    for x_eq in (model.upright(), model.hanging()):
        np.testing.assert_allclose(model.deriv(x_eq, [0.0]), 0.0, atol=1e-12)
    assert model.energy(model.upright()) == pytest.approx(0.0, abs=1e-15)
    assert model.total_energy(model.upright()) == pytest.approx(0.0, abs=1e-15)
    p = model.params
    mgl = p["pendulum_mass"] * p["gravity"] * p["pendulum_com"]
    assert model.energy(model.hanging()) == pytest.approx(-2 * mgl, rel=1e-12)


@pytest.mark.parametrize("rig", RIGS)
def test_total_energy_conserved_without_friction_and_input(rig):
    """RK4 at dt = 1 ms for 10 s from several non-trivial states: relative drift of total energy < 1e-6."""
    model = make_model(rig, CONSERVATIVE)
    two_mgl = -model.energy(model.hanging())
    x = _random_states(np.random.default_rng(7), 40)
    x[:, 0] = 0.0
    # |E| well away from 0 so that the relative drift is meaningful (E = 0 is the upright separatrix level)
    x = x[np.abs(model.total_energy(x)) > 0.25 * two_mgl][:6]
    assert len(x) == 6
    e0 = model.total_energy(x)
    scale = np.abs(e0)
    kinetic0 = model.kinetic_energy(x)
    u = np.zeros((6, 1))
    e_min, e_max = e0.copy(), e0.copy()
    for _ in range(10_000):
        x = model.step(x, u, 1e-3)
        e = model.total_energy(x)
        e_min, e_max = np.minimum(e_min, e), np.maximum(e_max, e)
    drift = np.maximum(e_max - e0, e0 - e_min) / scale
    assert np.all(drift < 1e-6), drift
    assert np.all(kinetic0 > 0)


@pytest.mark.parametrize("rig", RIGS)
def test_friction_and_back_emf_dissipate(rig):
    model = make_model(rig)
    x = np.array([0.0, 2.5, 0.3, 4.0])
    e0 = model.total_energy(x)
    for _ in range(500):
        x_new = model.step(x, [0.0], 1e-3)
        assert model.total_energy(x_new) <= model.total_energy(x) + 1e-12
        x = x_new
    assert model.total_energy(x) < e0


@pytest.mark.parametrize("rig", RIGS)
def test_jacobians_match_central_differences(rig):
    model = make_model(rig)
    rng = np.random.default_rng(3)
    x = _random_states(rng, 16)
    u = rng.uniform(-10, 10, (16, 1))
    A, B = model.jacobians(x, u)
    A_fd, B_fd = np.zeros_like(A), np.zeros_like(B)
    for j in range(4):
        h = 1e-6 * max(1.0, float(np.abs(x[:, j]).max()))
        e = np.zeros(4)
        e[j] = h
        A_fd[..., j] = (model.deriv(x + e, u) - model.deriv(x - e, u)) / (2 * h)
    B_fd[..., 0] = (model.deriv(x, u + 1e-4) - model.deriv(x, u - 1e-4)) / 2e-4
    for k in range(16):
        np.testing.assert_allclose(A[k], A_fd[k], rtol=1e-5, atol=1e-5 * np.abs(A_fd[k]).max())
        np.testing.assert_allclose(B[k], B_fd[k], rtol=1e-5, atol=1e-5 * np.abs(B_fd[k]).max())


@pytest.mark.parametrize("rig", RIGS)
def test_rk4_matches_scipy_reference(rig):
    """Fixed-step RK4 (friction, motor, constant voltage) against solve_ivp DOP853 at tight tolerance."""
    model = make_model(rig)
    x0 = np.array([0.05, np.pi - 0.4, 0.0, 1.0])
    u = np.array([2.0])
    sol = scipy.integrate.solve_ivp(lambda t, x: model.deriv(x, u), (0.0, 1.0), x0, method="DOP853",
                                    rtol=1e-11, atol=1e-12)
    x = x0.copy()
    for _ in range(1000):
        x = model.step(x, u, 1e-3)
    np.testing.assert_allclose(x, sol.y[:, -1], rtol=1e-6, atol=1e-7)
    x_euler = x0.copy()
    for _ in range(1000):
        x_euler = model.step(x_euler, u, 1e-3, method="euler")
    err_euler = np.abs(x_euler - sol.y[:, -1]).max()
    assert 1e-7 < err_euler < 0.2  # first order: visibly worse than RK4 but converging


def _measured_period(model, expected: float, amplitude: float = 1e-3) -> float:
    """Small-oscillation period about hanging from zero crossings of the pendulum angle (RK4, ~4 periods)."""
    x = np.array([0.0, np.pi + amplitude, 0.0, 0.0])
    dt, t_end = expected / 1000, 3.6 * expected
    t, prev, crossings = 0.0, amplitude, []
    while t < t_end:
        x = model.step(x, [0.0], dt)
        t += dt
        phi = x[1] - np.pi
        if prev > 0 >= phi or prev < 0 <= phi:
            crossings.append(t - dt * phi / (phi - prev))  # linear interpolation of the crossing time
        prev = phi
    assert len(crossings) >= 7
    return 2.0 * float(np.mean(np.diff(crossings)))


def test_furuta_period_arm_locked_is_uniform_rod_about_its_end():
    """Arm locked (huge arm inertia): the QUBE pendulum, a uniform rod about its end: T = 2 pi sqrt(2L/3g)."""
    model = make_model("furuta", {**CONSERVATIVE, "arm_inertia": 1e6})
    p = model.params
    assert p["pendulum_com"] == pytest.approx(p["pendulum_length"] / 2)
    rod_inertia = p["pendulum_mass"] * p["pendulum_length"] ** 2 / 12
    assert p["pendulum_inertia"] == pytest.approx(rod_inertia, rel=1e-3)
    theory = 2 * np.pi * np.sqrt(2 * p["pendulum_length"] / (3 * p["gravity"]))
    # the TOML rounds J_p to 5 digits: compare with the rod formula to that precision, with the model to 1e-5
    measured = _measured_period(model, theory)
    assert measured == pytest.approx(theory, rel=1e-4)
    assert measured == pytest.approx(2 * np.pi / model.natural_frequency(), rel=1e-5)


def test_furuta_period_arm_free_includes_coupling():
    """Arm free: angular momentum about the motor axis conserved, T = 2 pi sqrt((J_al - h^2/K) / (m g l))."""
    model = make_model("furuta", CONSERVATIVE)
    locked = 2 * np.pi / model.natural_frequency()
    free = 2 * np.pi / model.natural_frequency(arm_free=True)
    assert free < 0.9 * locked  # the coupling term matters for the QUBE
    assert _measured_period(model, free) == pytest.approx(free, rel=1e-5)


def test_cartpole_period_cart_locked_and_free():
    """Cart locked (huge mass): physical pendulum sqrt(J_t / m g l); cart free: momentum-conserving case."""
    heavy = make_model("cartpole", {**CONSERVATIVE, "cart_mass": 1e9})
    p = heavy.params
    j_pivot = p["pendulum_inertia"] + p["pendulum_mass"] * p["pendulum_com"] ** 2
    theory = 2 * np.pi * np.sqrt(j_pivot / (p["pendulum_mass"] * p["gravity"] * p["pendulum_com"]))
    assert _measured_period(heavy, theory) == pytest.approx(theory, rel=1e-5)
    free = make_model("cartpole", CONSERVATIVE)
    t_free = 2 * np.pi / free.natural_frequency(cart_free=True)
    assert _measured_period(free, t_free) == pytest.approx(t_free, rel=1e-5)
    assert t_free < theory


@pytest.mark.parametrize("rig", RIGS)
def test_upright_unstable_and_controllable(rig):
    model = make_model(rig)
    A, B = model.linearize(model.upright(), [0.0])
    eig = np.linalg.eigvals(A)
    assert np.sum(eig.real > 1e-9) == 1
    ctrb = np.hstack([np.linalg.matrix_power(A, k) @ B for k in range(4)])
    assert np.linalg.matrix_rank(ctrb) == 4
    # hanging: no eigenvalue with positive real part (one zero from the free cart position / arm angle)
    Ah, Bh = model.linearize(model.hanging(), [0.0])
    assert np.all(np.linalg.eigvals(Ah).real < 1e-9)
    assert np.linalg.matrix_rank(np.hstack([np.linalg.matrix_power(Ah, k) @ Bh for k in range(4)])) == 4


@pytest.mark.parametrize("rig", RIGS)
def test_linearize_discrete_is_zoh(rig):
    model = make_model(rig)
    dt = 0.01
    A, B = model.linearize()
    Ad, Bd = model.linearize_discrete(dt)
    np.testing.assert_allclose(Ad, scipy.linalg.expm(A * dt), rtol=1e-10, atol=1e-12)
    # Bd = integral_0^dt expm(A s) ds B: integrate the linear system from 0 with u = 1 held
    z = np.zeros(4)
    h = dt / 2000
    for _ in range(2000):
        k1 = A @ z + B[:, 0]
        k2 = A @ (z + h / 2 * k1) + B[:, 0]
        k3 = A @ (z + h / 2 * k2) + B[:, 0]
        k4 = A @ (z + h * k3) + B[:, 0]
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    np.testing.assert_allclose(Bd[:, 0], z, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="dt"):
        model.linearize_discrete(0.0)


@pytest.mark.parametrize("rig", RIGS)
def test_voltage_drives_actuator_positive_direction(rig):
    model = make_model(rig)
    xdd = model.deriv(model.hanging(), [5.0])
    assert xdd[2] > 0  # positive voltage accelerates the cart / arm in the positive direction
    i = model.motor_current(model.hanging(), [5.0])
    assert i == pytest.approx(5.0 / model.params["motor_resistance"])


def test_overrides_scale_and_replace():
    cfg = load_config("cartpole")
    base = make_model(cfg)
    heavy = make_model(cfg, {"pole_mass_scale": 1.5, "friction_scale": 2.0})
    assert heavy.params["pendulum_mass"] == pytest.approx(1.5 * base.params["pendulum_mass"])
    assert heavy.params["pendulum_inertia"] == pytest.approx(1.5 * base.params["pendulum_inertia"])
    assert heavy.params["cart_viscous"] == pytest.approx(2 * base.params["cart_viscous"])
    assert heavy.params["pendulum_coulomb"] == pytest.approx(2 * base.params["pendulum_coulomb"])
    assert heavy.params["pendulum_length"] == base.params["pendulum_length"]
    assert not np.allclose(heavy.deriv([0, 0.3, 0, 0], [1.0]), base.deriv([0, 0.3, 0, 0], [1.0]))
    assert make_model(cfg, {"cart_mass": 0.94}).params["cart_mass"] == 0.94
    fur = make_model("furuta", {"arm_inertia_scale": 2.0, "motor_gain_scale": 0.5})
    assert fur.params["motor_torque_constant"] == pytest.approx(0.021)
    with pytest.raises(RigConfigError, match="unknown override 'pole_mas_scale'"):
        make_model(cfg, {"pole_mas_scale": 1.5})
    with pytest.raises(RigConfigError, match="arm_inertia_scale"):
        make_model(cfg, {"arm_inertia_scale": 1.5})  # a Furuta-only scale on the cart-pole
    with pytest.raises(RigConfigError, match=r"physics.cart_mass must be > 0, got -1"):
        make_model(cfg, {"cart_mass": -1})
    with pytest.raises(RigConfigError, match="friction_scale must be a finite number >= 0"):
        make_model(cfg, {"friction_scale": float("nan")})
    with pytest.raises(RigConfigError, match="pendulum_mass must be > 0"):
        make_model(cfg, {"pole_mass_scale": 0.0})


def test_rollout_matches_repeated_steps():
    model = make_model("furuta")
    rng = np.random.default_rng(0)
    u = rng.uniform(-3, 3, (2, 20, 1))
    xs = model.rollout(np.array([0.0, np.pi, 0.0, 0.0]), u, dt=0.01, substeps=5)
    assert xs.shape == (2, 21, 4)
    x = np.array([0.0, np.pi, 0.0, 0.0])
    for t in range(20):
        for _ in range(5):
            x = model.step(x, u[1, t], 0.002)
    np.testing.assert_allclose(xs[1, -1], x, rtol=1e-12, atol=1e-12)


def _independent_mass_matrix(rig: str, model, q: np.ndarray) -> np.ndarray:
    """M(q) from Cartesian kinematics (finite-difference Jacobians), independent of the models' algebra."""
    p = model.params
    m, l = p["pendulum_mass"], p["pendulum_com"]
    if rig == "cartpole":
        def com(q):
            return np.array([q[0] + l * np.sin(q[1]), 0.0, l * np.cos(q[1])])
        rod = np.array([np.sin(q[1]), 0.0, np.cos(q[1])])
        j_omega = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # the pendulum turns about e_y only
        rotor = p["motor_inertia"] * (p["gear_ratio"] / p["pinion_radius"]) ** 2  # reflected to the rack
        base = np.diag([p["cart_mass"] + rotor, 0.0])
        j_axial, j_perp = 0.0, p["pendulum_inertia"]
    else:
        L = p["arm_length"]

        def com(q):
            e_r = np.array([np.cos(q[0]), np.sin(q[0]), 0.0])
            e_t = np.array([-np.sin(q[0]), np.cos(q[0]), 0.0])
            return L * e_r + l * (np.sin(q[1]) * e_t + np.cos(q[1]) * np.array([0.0, 0.0, 1.0]))
        e_r = np.array([np.cos(q[0]), np.sin(q[0]), 0.0])
        e_t = np.array([-np.sin(q[0]), np.cos(q[0]), 0.0])
        rod = np.sin(q[1]) * e_t + np.cos(q[1]) * np.array([0.0, 0.0, 1.0])
        j_omega = np.column_stack([[0.0, 0.0, 1.0], e_r])  # omega = theta_dot e_z + alpha_dot e_r
        base = np.diag([p["arm_inertia"] + p["hub_inertia"] + p["motor_inertia"], 0.0])
        j_axial, j_perp = p["pendulum_axial_inertia"], p["pendulum_inertia"]
    h = 1e-6
    j_v = np.column_stack([(com(q + h * e) - com(q - h * e)) / (2 * h) for e in np.eye(2)])
    inertia = j_axial * np.outer(rod, rod) + j_perp * (np.eye(3) - np.outer(rod, rod))
    return base + m * j_v.T @ j_v + j_omega.T @ inertia @ j_omega


@pytest.mark.parametrize("rig", RIGS)
def test_equations_match_independent_lagrangian(rig):
    """M(q) from Cartesian kinematics; accelerations from M, its Christoffel symbols and gravity."""
    extra = {"pendulum_axial_inertia": 2e-6} if rig == "furuta" else {}
    model = make_model(rig, {**CONSERVATIVE, **extra})
    p = model.params
    mgl = p["pendulum_mass"] * p["gravity"] * p["pendulum_com"]
    rng = np.random.default_rng(11)
    for x in _random_states(rng, 8):
        q, qd = x[:2], x[2:]
        M = _independent_mass_matrix(rig, model, q)
        np.testing.assert_allclose(model.mass_matrix(q[1]), M, rtol=1e-7, atol=1e-12)
        h = 1e-3  # outer difference of an inner difference: a larger step keeps round-off small
        m_of = _independent_mass_matrix
        dM = [(m_of(rig, model, q + h * e) - m_of(rig, model, q - h * e)) / (2 * h) for e in np.eye(2)]
        coriolis = np.array([sum(0.5 * (dM[k][i, j] + dM[j][i, k] - dM[i][j, k]) * qd[j] * qd[k]
                                 for j in range(2) for k in range(2)) for i in range(2)])
        grad_v = np.array([0.0, -mgl * np.sin(q[1])])  # V = m g l (cos q1 - 1)
        qdd = np.linalg.solve(M, -coriolis - grad_v)
        np.testing.assert_allclose(model.accelerations(x, [0.0]), qdd, rtol=1e-5,
                                   atol=1e-6 * (1 + np.abs(qdd).max()))
