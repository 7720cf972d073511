"""The simulated plant: limits, delay, zero-order hold, encoders, noise, flags."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import rigs
from rigs.config import load_config
from rigs.sim import RigSimulator


def _quiet(rig: str, **sim_changes) -> rigs.RigConfig:
    """The shipped config with a noiseless plant (and any other plant settings changed)."""
    cfg = load_config(rig)
    plant = dataclasses.replace(cfg.sim, count_noise_std=0.0, current_noise_std=0.0, **sim_changes)
    return dataclasses.replace(cfg, sim=plant)


@pytest.mark.parametrize("rig", ["cartpole", "furuta"])
def test_hard_limit_enforced_and_flagged(rig):
    sim = RigSimulator(rig, seed=0)
    hard = sim.cfg.limits.position_hard
    sim.reset()
    assert sim.faults == ()
    max_pos = 0.0
    for _ in range(1000):  # full positive voltage for 2 s drives the cart / arm into the stop
        sim.apply(sim.cfg.limits.voltage_max)
        sim.advance(0.002)
        max_pos = max(max_pos, abs(sim.state[0]))
    assert max_pos <= hard + 1e-12
    assert sim.state[0] == pytest.approx(hard)
    assert sim.state[2] == 0.0  # restitution 0: stopped dead
    assert sim.flags["limit_hard"] and sim.flags["limit_soft"]
    assert "limit_hard" in sim.faults
    sim.clear_flags()
    assert sim.faults == ()
    sim.apply(-sim.cfg.limits.voltage_max)
    sim.advance(0.5)
    assert sim.state[0] < hard  # it can leave the stop again


def test_end_stop_impact_bounces_and_conserves_pendulum_momentum():
    cfg = _quiet("cartpole", restitution=0.5, actuation_delay_s=0.0)
    sim = RigSimulator(cfg, seed=0, param_overrides={"friction_scale": 0.0, "back_emf_scale": 0.0})
    hard = cfg.limits.position_hard
    sim.reset([hard - 1e-4, np.pi - 0.3, 1.0, 0.0])
    x_free = sim.model.step(sim.state, [0.0], 0.001)  # the same millisecond without the stop
    assert x_free[0] > hard
    sim.advance(0.001)
    x = sim.state
    assert x[0] == pytest.approx(hard) and sim.impacts == 1
    assert x[2] == pytest.approx(-0.5 * x_free[2], rel=1e-12)  # bounced back with restitution 0.5
    m = sim.model.mass_matrix(x[1])
    # the end-stop impulse acts on the cart coordinate only: the pendulum's generalised momentum
    # m10 v0 + m11 v1 is the same just before and just after the impact
    before = m[1, 0] * x_free[2] + m[1, 1] * x_free[3]
    after = m[1, 0] * x[2] + m[1, 1] * x[3]
    assert after == pytest.approx(before, rel=1e-12)
    assert abs(x[3]) > 0.1  # the jolt visibly kicks the pendulum


def test_voltage_clipped_and_non_finite_rejected():
    sim = RigSimulator("furuta", seed=0)
    vmax = sim.cfg.limits.voltage_max
    assert sim.apply(100.0) == vmax
    assert sim.apply(-100.0) == -vmax
    assert sim.flags["voltage_clipped"]
    with pytest.raises(ValueError, match="finite"):
        sim.apply(float("nan"))
    with pytest.raises(ValueError, match="dt"):
        sim.advance(-1.0)
    with pytest.raises(ValueError, match="x0"):
        sim.reset([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="hard limit"):
        sim.reset([5.0, 0.0, 0.0, 0.0])


def test_actuation_delay_and_zero_order_hold():
    cfg = _quiet("cartpole", actuation_delay_s=0.0035)
    sim = RigSimulator(cfg, seed=0)
    sim.reset()
    sim.apply(6.0)
    sim.advance(0.003)
    assert sim.voltage == 0.0  # still the safe-state voltage before the delay elapses
    np.testing.assert_allclose(sim.state, sim.model.hanging(), atol=1e-15)
    sim.advance(0.001)
    assert sim.voltage == 6.0
    assert sim.state[2] > 0


def test_extra_actuation_delay_override_adds_to_the_config_delay():
    cfg = _quiet("cartpole", actuation_delay_s=0.001)
    sim = RigSimulator(cfg, seed=0, param_overrides={"actuation_delay_extra_ms": 4, "motor_gain_scale": 0.8})
    assert sim.delay == pytest.approx(0.005)
    assert sim.model._p.motor_torque_constant == pytest.approx(0.8 * cfg.physics.motor_torque_constant)
    sim.reset()
    sim.apply(6.0)
    sim.advance(0.0045)
    assert sim.voltage == 0.0
    sim.advance(0.001)
    assert sim.voltage == 6.0
    with pytest.raises(rigs.RigConfigError, match="actuation_delay_extra_ms"):
        RigSimulator(cfg, param_overrides={"actuation_delay_extra_ms": -1.0})
    with pytest.raises(rigs.RigConfigError, match="actuation_delay_extra_ms"):
        rigs.make_model(cfg, {"actuation_delay_extra_ms": 4})  # not a physics parameter


def test_plant_matches_model_without_delay_and_limits():
    """With no delay the plant is exactly the model integrated by RK4 at the firmware rate."""
    cfg = _quiet("furuta", actuation_delay_s=0.0)
    sim = RigSimulator(cfg, seed=0, param_overrides={"pole_mass_scale": 1.3})
    x0 = np.array([0.0, np.pi - 0.2, 0.0, 0.0])
    sim.reset(x0)
    model = rigs.make_model(cfg, {"pole_mass_scale": 1.3})
    x = x0.copy()
    for k in range(50):
        v = 2.0 * np.sin(0.3 * k)
        sim.apply(v)
        sim.advance(0.002)
        for _ in range(2):
            x = model.step(x, [v], 0.001)
    np.testing.assert_allclose(sim.state, x, rtol=1e-12, atol=1e-12)
    assert sim.time == pytest.approx(0.1)
    nominal = RigSimulator(cfg, seed=0)
    nominal.reset(x0)
    nominal.apply(2.0)
    nominal.advance(0.2)
    sim.reset(x0)
    sim.apply(2.0)
    sim.advance(0.2)
    assert not np.allclose(sim.state, nominal.state)  # the override changes the plant


@pytest.mark.parametrize("rig", ["cartpole", "furuta"])
def test_counts_quantise_state_and_round_trip(rig):
    sim = RigSimulator(_quiet(rig), seed=0)
    x0 = np.array([0.1234567, 2.0123456, 0.0, 0.0])
    sim.reset(x0)
    counts = sim.read_counts()
    assert all(isinstance(c, int) for c in counts)
    pos = sim.counts_to_positions(counts)
    res = np.asarray(sim.cfg.encoders.resolution)
    assert np.all(np.abs(pos - x0[:2]) <= 0.5 * res + 1e-12)  # within half a count
    np.testing.assert_array_equal(sim.cfg.encoders.positions_to_counts(pos), counts)
    sim.reset()  # hanging pose = the power-up pose: counts (0, 0)
    assert sim.read_counts() == (0, 0)


def test_count_and_current_noise_are_seeded():
    a = RigSimulator("cartpole", seed=5)
    b = RigSimulator("cartpole", seed=5)
    c = RigSimulator("cartpole", seed=6)
    reads = [[s.read_counts() for _ in range(200)] for s in (a, b, c)]
    assert reads[0] == reads[1]
    assert reads[0] != reads[2]
    spread = np.asarray(reads[0])
    assert np.all(np.abs(spread) <= 2)  # jitter of a count or two around the true reading
    assert len(set(map(tuple, spread))) > 1
    currents = np.array([a.read_current() for _ in range(500)])
    assert abs(currents.mean()) < 3 * a.cfg.sim.current_noise_std / np.sqrt(500) + 1e-12
    assert currents.std() == pytest.approx(a.cfg.sim.current_noise_std, rel=0.15)


def test_current_estimate_and_sample():
    sim = RigSimulator(_quiet("furuta", actuation_delay_s=0.0), seed=0)
    sim.apply(4.2)
    assert sim.read_current() == pytest.approx(4.2 / sim.cfg.physics.motor_resistance)  # stalled
    sim.advance(0.3)
    assert 0 < sim.read_current() < 4.2 / sim.cfg.physics.motor_resistance  # back-EMF reduces it
    s = sim.sample()
    assert s.time == pytest.approx(0.3) and s.voltage == 4.2 and len(s.counts) == 2
    assert set(s.flags) == {"limit_hard", "limit_soft", "overspeed", "voltage_clipped"}


def test_overspeed_flag():
    sim = RigSimulator(_quiet("furuta"), seed=0)
    sim.reset([0.0, np.pi, 0.0, 70.0])  # pendulum spinning faster than pendulum_velocity_max
    sim.advance(0.001)
    assert sim.flags["overspeed"]
