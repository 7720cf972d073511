"""LQR: gain against an independent Riccati iteration, closed-loop stability, balance in simulation."""

from __future__ import annotations

import numpy as np
import pytest

import rigs
from controllers.loop import ControlLoop
from controllers.lqr import LQRController, LQRDesignError, discretize_zoh, dlqr, lqr_weights
from controllers.simrig import SimulatedRig, run_lockstep

RIGS = ("cartpole", "furuta")


def riccati_iteration(ad, bd, q, r, iters=200_000, tol=1e-12):
    """Independent check: iterate the Riccati difference equation backwards to its fixed point."""
    p = q.copy()
    for _ in range(iters):
        k = np.linalg.solve(r + bd.T @ p @ bd, bd.T @ p @ ad)
        p_next = q + ad.T @ p @ (ad - bd @ k)
        if np.max(np.abs(p_next - p)) <= tol * max(1.0, np.max(np.abs(p))):
            p = p_next
            break
        p = p_next
    k = np.linalg.solve(r + bd.T @ p @ bd, bd.T @ p @ ad)
    return k, p


@pytest.mark.parametrize("rig", RIGS)
@pytest.mark.parametrize("dt", [0.002, 0.01])
def test_gain_matches_riccati_iteration_and_is_stable(rig, dt):
    cfg = rigs.load_config(rig)
    model = rigs.make_model(cfg)
    ctl = LQRController(model, dt, cfg=cfg)
    k_ref, p_ref = riccati_iteration(ctl.ad, ctl.bd, ctl.q, ctl.r)
    np.testing.assert_allclose(ctl.k, k_ref, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ctl.p, p_ref, rtol=1e-5)
    eig = np.abs(ctl.closed_loop_eigenvalues())
    assert eig.max() < 1.0, eig
    # the open loop is unstable at upright (else the test proves nothing)
    assert np.abs(np.linalg.eigvals(ctl.ad)).max() > 1.0


def test_discretisation_matches_model_linearize_discrete():
    model = rigs.make_model("cartpole")
    a, b = model.jacobians(model.upright(), np.zeros(1))
    ad, bd = discretize_zoh(a, b, 0.01)
    ad2, bd2 = model.linearize_discrete(0.01)
    np.testing.assert_allclose(ad, ad2, atol=1e-12)
    np.testing.assert_allclose(bd, bd2, atol=1e-12)


def test_weights_come_from_tuning_and_bad_weights_are_named():
    cfg = rigs.load_config("cartpole")
    q, r = lqr_weights(cfg, tuning={"lqr": {"q": [1, 2, 3, 4], "r": [0.5]}})
    assert np.allclose(np.diag(q), [1, 2, 3, 4]) and r[0, 0] == 0.5
    with pytest.raises(LQRDesignError, match="lqr.q"):
        lqr_weights(cfg, tuning={"lqr": {"q": [1, 2, 3]}})
    with pytest.raises(LQRDesignError, match="positive definite"):
        dlqr(np.eye(2), np.ones((2, 1)), np.eye(2), np.zeros((1, 1)))
    with pytest.raises(LQRDesignError, match="sample time"):
        LQRController(rigs.make_model(cfg), 0.0, cfg=cfg)


def test_angle_error_is_wrapped():
    cfg = rigs.load_config("cartpole")
    ctl = LQRController(rigs.make_model(cfg), 0.002, cfg=cfg)
    x1 = np.array([0.0, 0.05, 0.0, 0.0])
    x2 = x1 + np.array([0.0, 2 * np.pi, 0.0, 0.0])
    np.testing.assert_allclose(ctl.compute(x1).u, ctl.compute(x2).u)
    assert abs(ctl.compute(np.array([0, 0.5, 0, 0])).u[0]) <= 10.0  # saturated to voltage_max


@pytest.mark.parametrize("rig", RIGS)
@pytest.mark.parametrize("mass_scale", [1.0, 1.5, 0.5])
def test_balances_simulated_rig_with_encoders_and_mass_mismatch(rig, mass_scale):
    """Closed loop through encoder counts, velocity estimation and actuation delay; plant mass off by 50%."""
    cfg = rigs.load_config(rig)
    model = rigs.make_model(cfg)  # nominal model for the controller
    sim = rigs.RigSimulator(cfg, seed=2, param_overrides={"pole_mass_scale": mass_scale})
    sim.reset(np.array([0.0, 0.12, 0.0, 0.0]))
    rig_ = SimulatedRig(sim, cfg)
    loop = ControlLoop(rig_, LQRController(model, 0.002, cfg=cfg), model, cfg, rate_hz=500)
    states = np.array(run_lockstep(loop, rig_, 4.0))
    assert loop.fault is None
    assert len(states) == 2000
    tail = states[1000:]
    assert np.max(np.abs(tail[:, 1])) < np.deg2rad(5.0)
    assert np.max(np.abs(states[:, 0])) < cfg.limits.position_soft
