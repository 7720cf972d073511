"""Small shared pieces of the controllers: the controller output record, angle helpers, config access, the
consistent-path offsets of a state deviation along a model window."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rigs.physics_base import wrap_angle


@dataclass
class ControlOutput:
    """What a controller returns each tick: the command (m,), its mode name and optional diagnostics."""

    u: np.ndarray
    mode: str
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RigLink(Protocol):
    """What the control loop needs of a rig: the serial driver (``hardware.driver.RigConnection``), the
    lock-step simulator (``controllers.simrig.SimulatedRig``) and the dry-run wrapper
    (``controllers.safety.DryRunRig``) implement it (``tests/test_architecture.py``). A link may also offer
    ``drain_truth()`` (the virtual rig's true state); the loop uses it when present."""

    def latest_state(self) -> Any:
        """The newest state sample (``seq``, ``time``, ``positions``, ...), or None before the first."""
        ...

    def send_command(self, volts: float) -> Any:
        """Apply ``volts`` (the rig clamps to its limit; it may refuse while e-stopped)."""
        ...

    def estop(self) -> Any:
        """Motor to 0 V and latched until cleared."""
        ...

    def stats(self) -> Any:
        """Counters of the link (frames, errors, ...)."""
        ...


class Controller(Protocol):
    """Interface every controller implements."""

    name: str

    def reset(self) -> None: ...

    def compute(self, x: np.ndarray, t: float = 0.0) -> ControlOutput: ...


def angle_error(a: float, ref: float) -> float:
    """Signed smallest difference ``a - ref`` in [-pi, pi)."""
    return float(wrap_angle(a - ref))


def pendulum_index(model: Any) -> int:
    """Index of the pendulum angle: the position coordinate where hanging and upright differ by ~pi."""
    up = np.asarray(model.upright(), dtype=float)
    down = np.asarray(model.hanging(), dtype=float)
    npos = model.n // 2
    diff = np.abs(np.asarray(wrap_angle(down[:npos] - up[:npos])))
    idx = int(np.argmax(diff))
    if diff[idx] < 1.0:
        raise ValueError("rig model's upright() and hanging() states do not differ in a pendulum angle")
    return idx


def base_index(model: Any) -> int:
    """Index of the actuated base coordinate (cart position / arm angle): the other position coordinate."""
    pi = pendulum_index(model)
    npos = model.n // 2
    others = [i for i in range(npos) if i != pi]
    return others[0]


def cfg_get(obj: Any, *path: str, default: Any = None) -> Any:
    """Nested lookup through attributes or mapping keys; ``default`` when any step is missing."""
    cur = obj
    for key in path:
        if cur is None:
            return default
        if isinstance(cur, Mapping):
            cur = cur.get(key)
        else:
            cur = getattr(cur, key, None)
    return default if cur is None else cur


def voltage_limit(cfg: Any) -> float:
    """``cfg.limits.voltage_max`` (V)."""
    v = cfg_get(cfg, "limits", "voltage_max")
    if v is None:
        raise ValueError(f"rig config {cfg_get(cfg, 'name', default='?')!r} has no limits.voltage_max")
    return float(v)


def window_path_offsets(dev: np.ndarray, rows: int, dt: float) -> np.ndarray:
    """Offsets ``(..., rows, n)`` that carry a state deviation ``dev (..., n)`` back along a window of
    ``rows`` steps (oldest first; the newest row gets ``dev`` itself) as one constant-velocity path. The state
    is ``[positions, velocities]``: every row's velocities move by ``dv``, its positions by
    ``dp - lag * dt * dv`` (``lag`` steps before the newest). What a learned window model needs to see a
    deviation of the present state as a trajectory it could have observed (``controllers.fm_ukf``,
    ``controllers.learned_lqr``)."""
    dev = np.asarray(dev, dtype=np.float64)
    q = dev.shape[-1] // 2
    lag = np.arange(rows - 1, -1, -1, dtype=np.float64)[:, None]
    out = np.repeat(dev[..., None, :], rows, axis=-2)
    out[..., :q] -= lag * dt * dev[..., None, q:]
    return out
