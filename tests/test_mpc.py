"""Sampling MPC on a batched rollout model (rig physics as the stand-in dynamics), warm start, fallback."""

from __future__ import annotations

import numpy as np
import pytest

import rigs
from controllers.loop import ControlLoop
from controllers.lqr import LQRController
from controllers.mpc import MPCController, MPCParams, PhysicsRollout, SamplingMPC, make_mpc
from controllers.simrig import SimulatedRig, run_lockstep
from export.client import PredictorTimeout, PredictorUnavailable


def test_physics_rollout_matches_model_steps(cart):
    cfg, model = cart
    ro = PhysicsRollout(model, 0.01, substeps=2)
    x0 = np.array([0.0, 0.1, 0.0, 0.0])
    plan = np.full((3, 5, 1), 2.0)
    out = ro(x0[None], np.zeros((0, 1)), plan)
    assert out.shape == (3, 5, 4)
    x = x0
    for _ in range(5):
        x = model.step(model.step(x, np.array([2.0]), 0.005), np.array([2.0]), 0.005)
    np.testing.assert_allclose(out[0, -1], x, rtol=1e-10)


@pytest.mark.parametrize("method", ["mppi", "cem"])
def test_mpc_balances_simulated_cartpole(cart, method):
    cfg, model = cart
    lqr = LQRController(model, 0.002, cfg=cfg)
    ctl = make_mpc(model, cfg, PhysicsRollout(model, cfg.model_dt), lqr, cfg.model_dt,
                   params=MPCParams(method=method, samples=48), threaded=False)
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.12, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    loop = ControlLoop(rig, ctl, model, cfg, rate_hz=500)
    states = np.array(run_lockstep(loop, rig, 2.0))
    assert loop.fault is None
    assert ctl.fallbacks == 0 and ctl.plans >= 190  # the MPC, not the fallback, did the balancing
    assert np.abs(states[500:, 1]).max() < np.deg2rad(5.0)


def test_trust_band_keeps_a_wrong_model_from_toppling_the_pendulum(cart):
    """A rollout model with the input sign flipped plans the wrong way; trust_frac bounds the damage."""
    cfg, model = cart

    def flipped(x_hist, u_hist, u_plan):
        return PhysicsRollout(model, cfg.model_dt)(x_hist, u_hist, -np.asarray(u_plan))

    lqr = LQRController(model, 0.002, cfg=cfg)
    ctl = make_mpc(model, cfg, flipped, lqr, cfg.model_dt,
                   params=MPCParams(samples=32, trust_frac=0.3), threaded=False)
    sim = rigs.RigSimulator(cfg, seed=0)
    sim.reset(np.array([0.0, 0.05, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    loop = ControlLoop(rig, ctl, model, cfg, rate_hz=500)
    states = np.array(run_lockstep(loop, rig, 2.0))
    assert loop.fault is None and ctl.fallbacks == 0  # the (wrong) MPC was in charge throughout
    assert np.abs(states[500:, 1]).max() < np.deg2rad(5.0)
    with pytest.raises(ValueError, match="trust_frac"):
        make_mpc(model, cfg, flipped, lqr, cfg.model_dt, params=MPCParams(trust_frac=-1.0))


def test_input_clipping_state_penalty_and_warm_start(cart):
    cfg, model = cart
    mpc = SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(),
                      MPCParams(horizon=6, samples=16, q=(1, 1, 1, 1), r=(0.1,), lqr_terminal=False),
                      angle_channels=(1,), state_bounds=np.array([0.3, np.inf, np.inf, np.inf]))
    plan = mpc.plan(np.array([[0.0, 0.3, 0.0, 0.0]]), np.zeros((0, 1)))
    assert plan.shape == (6, 1) and np.all(np.abs(plan) <= 10.0)
    mpc.plan_u = np.arange(6.0)[:, None]
    mpc.shift(2)
    np.testing.assert_allclose(mpc.plan_u[:, 0], [2, 3, 4, 5, 5, 5])
    xs = np.zeros((2, 3, 4))
    xs[1, :, 0] = 0.5  # beyond the 0.3 m bound
    c = mpc.cost(xs, np.zeros((2, 3, 1)))
    assert c[1] > c[0] + 1e3 * 0.2**2 * 3 - 1e-9
    with pytest.raises(ValueError, match="method"):
        SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(), MPCParams(method="nope"))


class FailingRollout:
    def __init__(self, inner, fail_after, exc):
        self.inner, self.calls, self.fail_after, self.exc = inner, 0, fail_after, exc

    def __call__(self, *a):
        self.calls += 1
        if self.calls > self.fail_after:
            raise self.exc("predictor gone")
        return self.inner(*a)


@pytest.mark.parametrize("exc", [PredictorTimeout, PredictorUnavailable])
def test_predictor_failure_falls_back_to_lqr_on_the_next_tick(cart, exc):
    cfg, model = cart
    lqr = LQRController(model, 0.002, cfg=cfg)
    ro = FailingRollout(PhysicsRollout(model, cfg.model_dt), fail_after=2 * 60, exc=exc)  # 2 iterations/plan
    clock = [0.0]
    ctl = make_mpc(model, cfg, ro, lqr, cfg.model_dt, params=MPCParams(samples=32), threaded=False,
                   clock=lambda: clock[0])
    sim = rigs.RigSimulator(cfg, seed=1)
    sim.reset(np.array([0.0, 0.08, 0.0, 0.0]))
    rig = SimulatedRig(sim, cfg)
    loop = ControlLoop(rig, ctl, model, cfg, rate_hz=500)
    modes = []

    def on_tick(k, lp):
        clock[0] = (k + 1) * 0.002
        modes.append(lp.mode)

    states = np.array(run_lockstep(loop, rig, 2.0, on_tick=on_tick))
    first_fb = modes.index("fallback")
    assert modes[:first_fb] and set(modes[:first_fb]) == {"mpc"}
    assert set(modes[first_fb:]) == {"fallback"}  # stays on LQR while the predictor is down
    assert ctl.fallback_delays and max(ctl.fallback_delays) <= 0.002 + 1e-9  # within one period
    assert ctl.fallback_delay_ticks == [0]  # lock-step: the failing plan ran inside this very tick
    assert loop.fault is None and np.abs(states[-200:, 1]).max() < np.deg2rad(5.0)


def test_stale_plan_falls_back(cart):
    cfg, model = cart
    lqr = LQRController(model, 0.002, cfg=cfg)
    planner = SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(), MPCParams(samples=8))
    ctl = MPCController(planner, lqr, 0.01, max_plan_age_s=0.03, threaded=False)
    x = np.array([0.0, 0.05, 0.0, 0.0])
    assert ctl.compute(x, 0.0).mode == "mpc"
    ctl._next_sample_t = 1e9  # no more replanning: the plan ages
    assert ctl.compute(x, 0.02).mode == "mpc"
    out = ctl.compute(x, 0.05)
    assert out.mode == "fallback"
    np.testing.assert_allclose(out.u, lqr.compute(x).u)


def test_a_late_plan_tracks_its_predicted_path(cart):
    """Within one model step of its state a plan's input is applied as planned; later the fallback LQR's gain
    feeds back the deviation from the plan's predicted path (weight ramping 0 -> 1 over the second step)."""
    cfg, model = cart
    lqr = LQRController(model, 0.002, cfg=cfg)
    planner = SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(), MPCParams(samples=8))
    ctl = MPCController(planner, lqr, 0.01, max_plan_age_s=0.1, threaded=False)
    x0 = np.array([0.0, 0.05, 0.0, 0.0])
    u0 = ctl.compute(x0, 0.0).u
    t0, plan_u, path = ctl._plan
    assert path.shape == (planner.p.horizon + 1, 4) and np.allclose(path[0], x0)
    np.testing.assert_allclose(u0, plan_u[0])
    ctl._next_sample_t = 1e9  # no replanning: the plan ages
    off = np.array([0.0, 0.01, 0.0, 0.0])
    ref = path[0] + 0.5 * (path[1] - path[0])
    np.testing.assert_allclose(ctl.compute(ref + off, 0.005).u, plan_u[0])  # fresh: no feedback
    ref = path[1] + 0.5 * (path[2] - path[1])
    np.testing.assert_allclose(ctl.compute(ref, 0.015).u, plan_u[1])  # on the path: as planned
    np.testing.assert_allclose(ctl.compute(ref + off, 0.015).u, plan_u[1] - 0.5 * lqr.k @ off)
    ref = path[2] + 0.5 * (path[3] - path[2])
    np.testing.assert_allclose(ctl.compute(ref + off, 0.025).u, plan_u[2] - lqr.k @ off)
    planner.p.tracking = False
    np.testing.assert_allclose(ctl.compute(ref + off, 0.025).u, plan_u[2])
    assert ctl.land_age_s == 0.0  # planned inline: each plan lands at its state's time


def test_a_plan_keeps_the_inputs_applied_before_it_lands(cart):
    cfg, model = cart
    planner = SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(), MPCParams(samples=8))
    warm = np.array([[1.5], [-2.0], [0.5], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0]])
    planner.plan_u = warm.copy()
    plan = planner.plan(np.array([[0.0, 0.05, 0.0, 0.0]]), np.zeros((1, 1)), fixed=2)
    np.testing.assert_array_equal(plan[:2], warm[:2])  # applied before the plan lands: kept
    assert np.abs(plan[2:] - warm[2:]).max() > 0.1  # the rest is optimised
    lqr = LQRController(model, 0.002, cfg=cfg)
    ctl = MPCController(planner, lqr, 0.01, threaded=True)
    assert ctl.delay_steps() == 0  # no plan has landed yet
    ctl.land_age_s = 0.023
    assert ctl.delay_steps() == 2  # two whole model steps pass before a plan lands
    ctl.threaded = False
    assert ctl.delay_steps() == 0  # inline planning: nothing is late
    with pytest.raises(ValueError, match="delay_steps"):
        SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(), MPCParams(delay_steps=10))


def test_lqr_takes_over_while_the_pendulum_is_far_from_upright(cart):
    """takeover_angle: beyond it the tick uses LQR (counted, flagged), below half of it MPC is back; the
    band has hysteresis; a non-positive angle is refused."""
    cfg, model = cart
    lqr = LQRController(model, 0.002, cfg=cfg)
    planner = SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(),
                          MPCParams(samples=8, takeover_angle=0.02), angle_channels=(1,))
    ctl = MPCController(planner, lqr, 0.01, threaded=False)
    up = np.asarray(model.upright(), float)

    def tick(angle: float, t: float):
        x = up.copy()
        x[1] += angle
        return ctl.compute(x, t)

    assert tick(0.005, 0.0).mode == "mpc"
    out = tick(0.03, 0.01)
    assert out.mode == "fallback" and out.info["mpc_takeover"] == 1.0
    x = up.copy()
    x[1] += 0.03
    np.testing.assert_allclose(out.u, lqr.compute(x).u)
    assert tick(0.015, 0.02).mode == "fallback"        # inside the band but above half of it: LQR keeps it
    assert tick(-0.009, 0.03).mode == "mpc"            # below half: MPC again
    assert tick(2 * np.pi + 0.005, 0.04).mode == "mpc"  # angles wrap
    assert ctl.takeovers == 2
    with pytest.raises(ValueError, match="takeover_angle must be > 0"):
        SamplingMPC(PhysicsRollout(model, 0.01), 4, 1, 10.0, model.upright(), MPCParams(takeover_angle=0.0))
