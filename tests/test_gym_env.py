"""RigEnv (gymnasium) on a virtual rig over a real pty."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils import env_checker as ec
from gymnasium.utils.passive_env_checker import env_reset_passive_checker, env_step_passive_checker

from hardware.driver import CommandRejected, RigConnection
from hardware.gym_env import RigEnv, RigEnvClosed
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


# ------------------------------------------------------------------------------ registered gymnasium ids
@pytest.mark.parametrize("env_id", ["rigfm/CartPole-v0", "rigfm/Furuta-v0"])
def test_registered_virtual_rig_passes_gymnasiums_own_checker(env_id):
    """The lock-step virtual rig: gymnasium's full check_env, determinism checks included."""
    env = gym.make(env_id)
    assert env.spec.nondeterministic is False and env.spec.kwargs["rig"] in ("cartpole", "furuta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ec.check_env(env.unwrapped)
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if "determinis" in m or "not equal" in m or "not within" in m], msgs
    env.close()


def test_lockstep_env_replays_a_seed_and_differs_for_another():
    def run(seed: int) -> np.ndarray:
        env = gym.make("rigfm/CartPole-v0", control_rate_hz=100)
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(7)
        out = [obs]
        for _ in range(60):
            obs, *_ = env.step(env.action_space.sample() * 0.3)
            out.append(obs)
        env.close()
        return np.array(out)

    a, b, c = run(3), run(3), run(4)
    assert np.array_equal(a, b)  # same seed, same actions: bit for bit
    assert not np.array_equal(a, c)  # another seed: other encoder noise
    assert np.abs(a[:, 0]).max() > 1e-3  # the cart moved


def test_lockstep_env_stops_at_the_limit_with_the_motor_zeroed():
    """Driven into the rail: the episode terminates past the soft limit, where the firmware has cut the
    outward voltage (LIMIT_HIT, the same firmware semantics as the pty virtual rig)."""
    from hardware.protocol import StatusFlags

    env = gym.make("rigfm/CartPole-v0")
    env.reset(seed=0)
    for _ in range(5000):
        obs, _, terminated, truncated, info = env.step([6.0])
        if terminated:
            break
    assert terminated and not truncated and obs[0] > env.unwrapped.cfg.limits.position_soft
    assert info["flags"] & StatusFlags.LIMIT_HIT and info["applied_voltage"] == 0.0
    env.close()


def test_serial_id_is_flagged_nondeterministic_and_passes_check_env():
    """A plant that cannot replay a seed (here the real-time virtual rig on a pty, as a physical rig):
    registered with gymnasium's nondeterministic=True, check_env runs every check but the replay ones."""
    env = gym.make("rigfm/CartPoleRig-v0", control_rate_hz=100, settle_timeout_s=0.2)
    assert env.spec.nondeterministic is True
    vrig = env.unwrapped.virtual_rig
    assert vrig is not None and vrig.proc.poll() is None and env.unwrapped.rig.port == vrig.port
    ec.check_env(env.unwrapped)
    env.reset(seed=0)
    obs, *_ = env.step([0.0])
    assert env.observation_space.contains(obs)
    env.close()
    assert vrig.proc.poll() is not None  # the env stopped the virtual rig it started
    with pytest.raises(RigEnvClosed, match="closed"):
        env.step([0.0])


def test_step_and_reset_after_close_raise(vrig):
    with RigConnection(port=vrig.port, rig_config="cartpole") as rig:
        env = RigEnv(rig, control_rate_hz=100, settle_timeout_s=0.1)
        env.reset()
        env.close()
        with pytest.raises(RigEnvClosed, match=r"RigEnv.step: the environment is closed"):
            env.step([0.0])
        with pytest.raises(RigEnvClosed, match=r"RigEnv.reset: the environment is closed"):
            env.reset()
        env.close()  # still idempotent
    lock = gym.make("rigfm/Furuta-v0")
    lock.reset(seed=1)
    lock.close()
    with pytest.raises(RigEnvClosed):
        lock.step([0.0])


def test_ids_register_through_the_module_syntax_without_torch():
    code = ("import sys, gymnasium\n"
            "env = gymnasium.make('hardware.gym_env:rigfm/Furuta-v0')\n"
            "obs, info = env.reset(seed=0); env.step([1.0]); env.close()\n"
            "assert 'torch' not in sys.modules, 'the env pulled torch'\n"
            "print(sorted(k for k in gymnasium.registry if k.startswith('rigfm/')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == str(sorted(["rigfm/CartPole-v0", "rigfm/CartPoleRig-v0",
                                                  "rigfm/Furuta-v0", "rigfm/FurutaRig-v0"]))
