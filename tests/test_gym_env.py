"""RigEnv (gymnasium) on a virtual rig over a real pty."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from gymnasium.utils import env_checker as ec
from gymnasium.utils.passive_env_checker import env_reset_passive_checker, env_step_passive_checker

from hardware.driver import CommandRejected, RigConnection
from hardware.gym_env import RigEnv
from hardware.virtual_rig import VirtualRigProcess


@pytest.fixture(scope="module")
def vrig():
    with VirtualRigProcess("cartpole", seed=5) as vr:
        yield vr


def test_spaces_follow_the_rig_config(vrig):
    with RigConnection(port=vrig.port, rig_config="cartpole") as rig:
        env = RigEnv(rig, control_rate_hz=100)
        assert env.action_space.shape == (1,) and env.action_space.high[0] == pytest.approx(10.0)
        assert env.observation_space.shape == (4,)
        assert env.observation_space.high[1] == pytest.approx(math.pi)
        assert env.observation_space.high[0] >= rig.cfg.limits.position_hard
        env.close()
        assert rig.connected  # a connection passed in stays open


def test_env_checker_passes(vrig):
    """gymnasium's checks, minus the seed-determinism ones (a physical plant is not replayable)."""
    with RigConnection(port=vrig.port, rig_config="cartpole") as rig:
        env = RigEnv(rig, control_rate_hz=100, settle_timeout_s=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ec.check_action_space(env.action_space)
            ec.check_space_limit(env.action_space, "action")
            ec.check_observation_space(env.observation_space)
            ec.check_space_limit(env.observation_space, "observation")
            ec.check_reset_return_type(env)
            ec.check_reset_options(env)
            env_reset_passive_checker(env)
            env_step_passive_checker(env, env.action_space.sample())
            ec.check_returned_data_not_reused(env)
        env.close()
        env.close()  # closing twice is allowed
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if "not within the observation space" in m or "dtype" in m], msgs


def test_reset_clears_estop_and_steps_move_the_rig(vrig):
    with RigConnection(port=vrig.port, rig_config="cartpole") as rig:
        rig.estop()
        env = RigEnv(rig, control_rate_hz=100, settle_timeout_s=0.3)
        obs, info = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        assert not rig.latest_state().estopped
        assert abs(obs[1]) == pytest.approx(math.pi, abs=0.1)  # hanging, wrapped to [-pi, pi)
        seqs = [info["seq"]]
        sign = -1.0 if obs[0] > 0 else 1.0  # toward the centre: the module's tests share one rig
        for _ in range(20):
            obs, reward, terminated, truncated, info = env.step(np.array([2.0 * sign], dtype=np.float32))
            assert env.observation_space.contains(obs) and np.isfinite(reward)
            assert not truncated
            seqs.append(info["seq"])
        assert len(set(seqs)) == len(seqs)  # every step observed a fresh STATE
        assert info["applied_voltage"] == pytest.approx(2.0 * sign)
        assert obs[2] * sign > 0.01  # the cart moves in the commanded direction
        with pytest.raises(CommandRejected, match="not finite"):
            env.step([float("nan")])
        obs, *_, info = env.step([50.0 * sign])  # out-of-range actions are clipped to the action space
        obs, *_, info = env.step([50.0 * sign])
        assert info["applied_voltage"] == pytest.approx(10.0 * sign)
        env.close()
        s = rig.wait_state(timeout=1.0)
        s = rig.wait_state(s.seq, timeout=1.0)
        s = rig.wait_state(s.seq, timeout=1.0)
        assert s.applied_voltage == 0.0  # close() zeroed the motor


def test_env_opened_by_port_owns_and_closes_its_connection(vrig):
    env = RigEnv(vrig.port, rig_config="cartpole", control_rate_hz=50, settle_timeout_s=0.1)
    env.reset()
    env.step([0.0])
    env.close()
    assert not env.rig.connected
    with pytest.raises(ValueError, match="control_rate_hz"):
        RigEnv(env.rig, control_rate_hz=0)
