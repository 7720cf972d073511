"""A gymnasium Env over a RigConnection: fixed-rate stepping of a real (or virtual) rig.

Observation ``[channel-0 position, pendulum angle, channel-0 velocity, pendulum velocity]`` (SI, the
contract state order of docs/architecture.md) as float32. Positions come from the encoder counts; the
pendulum angle is wrapped to [-pi, pi) (0 = upright); velocities are finite differences over device time,
low-pass filtered (``velocity_tau_s``) and clipped to the observation bounds. Action ``[volts]`` in
``Box(-voltage_max, voltage_max)``; out-of-range actions are clipped, non-finite ones raise CommandRejected.

``step()`` sends the command, then sleeps until the next control deadline on the monotonic clock and
observes the newest STATE; when late by more than one period it re-synchronises (``info["overruns"]``).
``reset()`` brings the rig to a safe state: motor 0 V, e-stop cleared, waits until it has settled
(or ``settle_timeout_s``). It does not re-centre the cart/arm; that is a controller's job. On a
:class:`~hardware.lockstep_rig.LockstepRig` (the registered ``rigfm/CartPole-v0`` / ``rigfm/Furuta-v0``) time
is simulated: ``step()`` advances the plant by one period instead of sleeping, and ``reset()`` powers the
device on afresh with a plant seeded from the env's ``np_random`` (so ``reset(seed=s)`` and the same actions
replay exactly). After ``close()``, ``step()`` and ``reset()`` raise :class:`RigEnvClosed`.

Registered ids (on import of this module, or ``gymnasium.make("hardware.gym_env:rigfm/CartPole-v0")``):

* ``rigfm/CartPole-v0``, ``rigfm/Furuta-v0``: the virtual rig in lock-step (deterministic; passes gymnasium's
  ``check_env`` as it is). Options: ``seed``, ``init`` (``"hanging"``/``"upright"``), ``params`` (plant
  overrides), ``control_rate_hz``, ``max_episode_steps`` and the ``RigEnv`` keywords.
* ``rigfm/CartPoleRig-v0``, ``rigfm/FurutaRig-v0``: a rig over serial, in real time: ``port="/dev/ttyUSB0"``
  for a physical one; without ``port`` the env starts (and stops) a virtual rig on a real pty. Registered with
  ``nondeterministic=True``, gymnasium's own flag for a plant that cannot replay a seed: ``check_env`` then
  skips its determinism assertions and runs every other check.
"""

from __future__ import annotations

import math
import time
from typing import Any

import gymnasium as gym
import numpy as np

from hardware.driver import CommandRejected, RigConnection, StateSample
from rigs.physics_base import wrap_angle

RIGS = {"cartpole": "CartPole", "furuta": "Furuta"}


class RigEnvClosed(RuntimeError):
    """``step()`` or ``reset()`` on a RigEnv after ``close()``."""


class RigEnv(gym.Env):
    """Gymnasium environment for a cart-pole or Furuta rig behind a RigConnection (or a port path)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        connection: Any,
        rig_config: Any = None,
        control_rate_hz: float | None = None,
        *,
        max_episode_steps: int | None = None,
        settle_timeout_s: float = 5.0,
        settle_velocity: tuple[float, float] = (0.01, 0.05),
        velocity_tau_s: float = 0.005,
        state_timeout_s: float = 0.5,
    ) -> None:
        """``connection``: an open RigConnection or LockstepRig (not closed by the env) or a port path (opened
        and owned)."""
        if isinstance(connection, RigConnection) or getattr(connection, "lockstep", False):
            self.rig, self._owns = connection, False
        else:
            self.rig, self._owns = (
                RigConnection(port=str(connection), rig_config=rig_config or "cartpole"),
                True,
            )
        self.cfg = self.rig.cfg
        rate = float(self.cfg.control_rate_hz if control_rate_hz is None else control_rate_hz)
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"RigEnv: control_rate_hz must be a positive number, got {control_rate_hz!r}")
        self.period = 1.0 / rate
        self.max_episode_steps = max_episode_steps
        self.settle_timeout_s = settle_timeout_s
        self.settle_velocity = settle_velocity
        self.velocity_tau_s = velocity_tau_s
        self.state_timeout_s = state_timeout_s
        lim = self.cfg.limits
        vmax = float(self.rig.voltage_limit)
        vel_bound = np.array([3.0 * lim.actuated_velocity_max, 3.0 * lim.pendulum_velocity_max])
        high = np.array([lim.position_hard * 1.05, math.pi, *vel_bound], dtype=np.float32)
        self.observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.action_space = gym.spaces.Box(-vmax, vmax, shape=(1,), dtype=np.float32)
        self._obs_high = high
        self._deadline = 0.0
        self._prev: StateSample | None = None
        self._vel = np.zeros(2)
        self._steps = 0
        self.overruns = 0
        self._lockstep = bool(getattr(self.rig, "lockstep", False))
        self._closed = False
        self._on_close: list[Any] = []  # extra resources owned by the env (a virtual rig process)
        self.virtual_rig: Any = None  # the VirtualRigProcess started by make_serial_env, if any

    # ---------------------------------------------------------------------------------- helpers
    def _now(self) -> float:
        return self.rig.time_s if self._lockstep else time.monotonic()

    def _sleep(self, seconds: float) -> None:
        if self._lockstep:
            self.rig.advance(seconds)
        elif seconds > 0:
            time.sleep(seconds)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RigEnvClosed(f"RigEnv.{what}: the environment is closed (close() was called); "
                               "make a new one")

    def _observe(self, sample: StateSample) -> np.ndarray:
        pos = np.asarray(sample.positions, dtype=np.float64)
        if self._prev is not None and sample.device_time_us > self._prev.device_time_us:
            dt = (sample.device_time_us - self._prev.device_time_us) * 1e-6
            raw = (pos - np.asarray(self._prev.positions)) / dt
            a = dt / (dt + self.velocity_tau_s) if self.velocity_tau_s > 0 else 1.0
            self._vel = (1 - a) * self._vel + a * raw
        elif self._prev is None:
            self._vel = np.zeros(2)
        self._prev = sample
        obs = np.array([pos[0], float(wrap_angle(pos[1])), self._vel[0], self._vel[1]], dtype=np.float32)
        return np.clip(obs, -self._obs_high, self._obs_high)

    def _fresh_state(self) -> StateSample | None:
        after = self._prev.seq if self._prev is not None else None
        s = self.rig.wait_state(after, timeout=self.state_timeout_s)
        return s

    def _reward(self, obs: np.ndarray, u: float) -> float:
        soft = self.cfg.limits.position_soft
        vmax = float(self.action_space.high[0])
        return float(math.cos(obs[1]) - 0.1 * (obs[0] / soft) ** 2 - 0.01 * (u / vmax) ** 2)

    def _info(self, s: StateSample | None) -> dict[str, Any]:
        info: dict[str, Any] = {"overruns": self.overruns, "steps": self._steps}
        if s is not None:
            info.update(
                seq=s.seq,
                device_time_us=s.device_time_us,
                flags=s.flags,
                applied_voltage=s.applied_voltage,
                counts=s.counts,
            )
        return info

    # ------------------------------------------------------------------------------------- API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Motor 0 V, clear the e-stop, wait (up to settle_timeout_s) until the rig is at rest.

        On a lock-step virtual rig the device is first powered on afresh (plant seeded from ``np_random``)."""
        self._check_open("reset")
        super().reset(seed=seed)
        if self._lockstep:
            self.rig.power_on(int(self.np_random.integers(2**31 - 1)))
        options = options or {}
        timeout = float(options.get("settle_timeout_s", self.settle_timeout_s))
        self.rig.send_command(0.0)
        s = self.rig.wait_state(timeout=self.state_timeout_s)
        if s is not None and s.estopped:
            self.rig.clear_estop()
        self._prev, self._vel = None, np.zeros(2)
        deadline = self._now() + timeout
        settled = False
        obs = None
        n = 0
        while True:
            self.rig.send_command(0.0)  # keep the watchdog fed with a safe command
            s = self._fresh_state()
            if s is None:
                raise TimeoutError(
                    f"RigEnv.reset: no STATE from {self.rig.port} within {self.state_timeout_s} s"
                )
            obs = self._observe(s)
            n += 1
            if n >= 3 and abs(obs[2]) < self.settle_velocity[0] and abs(obs[3]) < self.settle_velocity[1]:
                settled = True
                break
            if self._now() >= deadline:
                break
            self._sleep(self.period)
        self._steps = 0
        self._deadline = self._now()
        info = self._info(s)
        info["settled"] = settled
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Apply ``action`` (volts) for one control period and observe."""
        self._check_open("step")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.size != 1:
            raise ValueError(f"RigEnv.step: action must have 1 element (volts), got shape {np.shape(action)}")
        u = float(a[0])
        if not math.isfinite(u):
            raise CommandRejected(f"RigEnv.step: action {u!r} V is not finite")
        u = float(np.clip(u, self.action_space.low[0], self.action_space.high[0]))
        sent = self.rig.send_command(u)
        self._deadline += self.period
        now = self._now()
        if now > self._deadline + self.period:
            self.overruns += 1
            self._deadline = now
        else:
            self._sleep(self._deadline - now)
        s = self._fresh_state()
        self._steps += 1
        if s is None:  # disconnected or stalled rig: end the episode, the motor is zeroed by the watchdog
            obs = np.zeros(4, dtype=np.float32) if self._prev is None else self._observe(self._prev)
            info = self._info(None)
            info["disconnected"] = True
            return obs, 0.0, False, True, info
        obs = self._observe(s)
        terminated = bool(abs(obs[0]) > self.cfg.limits.position_soft or s.estopped)
        truncated = not sent or (self.max_episode_steps is not None and self._steps >= self.max_episode_steps)
        return obs, self._reward(obs, u), terminated, bool(truncated), self._info(s)

    def close(self) -> None:
        """Zero the motor; close the connection (and a virtual rig) if the env opened it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.rig.connected:
                self.rig.send_command(0.0)
        finally:
            try:
                if self._owns:
                    self.rig.close()
            finally:
                for release in reversed(self._on_close):
                    release()
                self._on_close.clear()
        super().close()


# ------------------------------------------------------------------------------------ gymnasium ids
def make_virtual_env(
    rig: str = "cartpole",
    *,
    seed: int = 0,
    init: str = "hanging",
    params: dict[str, float] | None = None,
    **env_kwargs: Any,
) -> RigEnv:
    """The env of ``rigfm/CartPole-v0`` / ``rigfm/Furuta-v0``: RigEnv on a lock-step virtual rig.

    ``seed`` seeds the plant until the first ``reset()`` (which reseeds it from the env's ``np_random``);
    ``params``: plant overrides (e.g. ``{"pole_mass_scale": 1.4}``); ``env_kwargs`` go to RigEnv."""
    from hardware.lockstep_rig import LockstepRig

    env = RigEnv(LockstepRig(rig, seed=seed, init=init, param_overrides=params), **env_kwargs)
    env._on_close.append(env.rig.close)
    return env


def make_serial_env(rig: str = "cartpole", *, port: str | None = None, seed: int = 0, init: str = "hanging",
                    params: dict[str, float] | None = None, **env_kwargs: Any) -> RigEnv:
    """The env of ``rigfm/CartPoleRig-v0`` / ``rigfm/FurutaRig-v0``: RigEnv over serial in real time.

    ``port``: the rig's serial port; without it a virtual rig is started on a pty (``seed``, ``init``,
    ``params`` apply to it) and stopped by ``close()``."""
    if port is not None:
        if params or init != "hanging":
            raise ValueError("make_serial_env: init / params apply to a virtual rig, not to port=" + port)
        return RigEnv(port, rig_config=rig, **env_kwargs)
    from hardware.virtual_rig import VirtualRigProcess

    vrig = VirtualRigProcess(rig, seed=seed, init=init, params=params)
    vrig.__enter__()

    def release() -> None:
        vrig.__exit__(None, None, None)  # stop the process, remove its temporary folder

    try:
        env = RigEnv(vrig.port, rig_config=rig, **env_kwargs)
    except BaseException:
        release()
        raise
    env._on_close.append(release)
    env.virtual_rig = vrig
    return env


def register_envs() -> list[str]:
    """Register the gymnasium ids above (idempotent); returns them."""
    from gymnasium.envs.registration import register, registry

    ids = []
    for rig, name in RIGS.items():
        for env_id, entry, nondeterministic in ((f"rigfm/{name}-v0", "make_virtual_env", False),
                                                (f"rigfm/{name}Rig-v0", "make_serial_env", True)):
            if env_id not in registry:
                register(id=env_id, entry_point=f"{__name__}:{entry}", kwargs={"rig": rig},
                         nondeterministic=nondeterministic)
            ids.append(env_id)
    return ids


register_envs()
