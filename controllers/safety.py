"""Safety: soft limits with margins, stale-state watch, command clamping and the motor-to-zero guard.

* ``SoftLimits`` -- from the rig config's ``limits``: the base coordinate (cart position / arm angle) must
  stay within its soft limit (violation => e-stop); inside the margin before it, commands that would push
  the base further out are cut to zero.  Voltages are clipped to ``voltage_max``.
* ``StaleStateWatch`` -- fault when no new state (new ``seq``) has arrived for ``stale_ms``.
* ``MotorGuard`` -- context manager: motor to zero (then e-stop on faults) on normal exit, exceptions,
  Ctrl-C (SIGINT), SIGTERM and interpreter exit (atexit).
* ``OverrunWatch`` -- fault when > 90 % of the ticks of a 1 s window overran (the loop cannot hold its rate).
* ``DryRunRig`` -- wraps a rig connection; reads pass through, commands are recorded, never sent.
"""

from __future__ import annotations

import atexit
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np

from controllers.base import base_index, cfg_get, pendulum_index


class SafetyFault(RuntimeError):
    """A condition that stops the run (limit violation, stale state, device fault)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class SoftLimits:
    """Soft limits on the base coordinate and the voltage; ``margin`` is the braking zone width."""

    base_index: int
    base_soft: float
    margin: float
    voltage_max: float
    base_sign: float = 1.0  # sign of d(base acceleration)/d(voltage)

    @classmethod
    def from_config(cls, cfg: Any, model: Any) -> SoftLimits:
        """From the rig config's ``limits``: ``position_soft``, ``position_margin`` and ``voltage_max``."""
        lim = cfg_get(cfg, "limits")
        if lim is None:
            raise ValueError(f"rig config {cfg_get(cfg, 'name', default='?')!r} has no [limits] table")
        vals = {}
        for key in ("voltage_max", "position_soft", "position_margin"):
            v = cfg_get(lim, key)
            if v is None or not np.isfinite(float(v)) or float(v) < 0:
                raise ValueError(f"rig config {cfg_get(cfg, 'name', default='?')!r}: limits.{key} missing "
                                 f"or invalid ({v!r})")
            vals[key] = float(v)
        if not vals["position_margin"] < vals["position_soft"]:
            raise ValueError("rig config limits.position_margin must be smaller than limits.position_soft")
        bi = base_index(model)
        x0 = np.asarray(model.hanging(), dtype=float)
        du = np.asarray(model.deriv(x0, np.ones(model.m))) - np.asarray(model.deriv(x0, np.zeros(model.m)))
        sign = 1.0 if du[model.n // 2 + bi] >= 0 else -1.0
        return cls(bi, vals["position_soft"], vals["position_margin"], vals["voltage_max"], sign)

    def check(self, x: np.ndarray) -> SafetyFault | None:
        """A fault when the state is non-finite or the base is beyond its soft limit."""
        x = np.asarray(x, dtype=float)
        if not np.all(np.isfinite(x)):
            return SafetyFault("nonfinite_state", f"state has non-finite entries: {x.tolist()}")
        b = float(x[self.base_index])
        if abs(b) > self.base_soft:
            return SafetyFault("limit", f"base coordinate {b:+.3f} beyond soft limit +-{self.base_soft:.3f}")
        return None

    def clamp(self, u: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Clip to +-voltage_max; in the margin zone zero any push further towards the limit."""
        u = np.asarray(u, dtype=float).reshape(-1).copy()
        if not np.all(np.isfinite(u)):
            return np.zeros_like(u)
        u = np.clip(u, -self.voltage_max, self.voltage_max)
        b = float(x[self.base_index])
        if abs(b) > self.base_soft - self.margin and np.sign(u[0] * self.base_sign) == np.sign(b):
            u[0] = 0.0
        return u


class StaleStateWatch:
    """Fault when the device's sample ``seq`` has not advanced for ``stale_ms`` milliseconds."""

    def __init__(self, stale_ms: float = 25.0) -> None:
        if not stale_ms > 0:
            raise ValueError(f"stale_ms must be positive, got {stale_ms!r}")
        self.stale_s = stale_ms / 1000.0
        self._seq: int | None = None
        self._t_new: float | None = None

    def update(self, seq: int | None, now: float) -> SafetyFault | None:
        """Record the latest seq seen at ``now`` (s); a fault if it is stale."""
        if self._t_new is None:
            self._t_new = now
        if seq is not None and seq != self._seq:
            self._seq, self._t_new = seq, now
            return None
        age = now - self._t_new
        if age > self.stale_s:
            return SafetyFault("stale_state", f"no new state for {age * 1000:.1f} ms (limit "
                                              f"{self.stale_s * 1000:.0f} ms)")
        return None


class OverrunWatch:
    """Fault when the loop cannot keep its rate: more than ``max_fraction`` of the ticks of a ``window_s``
    window overran their period (windows of fewer than ``min_ticks`` ticks are not judged).

    Default: more than 90 % of the ticks of a 1 s window, i.e. (nearly) every tick takes longer than the
    period: a rate the machine cannot hold, a forecast too expensive for the period.  That trips within
    about a second.  Host stalls (one long tick each) and a loaded machine that preempts some ticks (60 %
    overruns seen at load 9 on 2 cores without ``--realtime``) are counted in the summary, not a fault."""

    def __init__(self, window_s: float = 1.0, max_fraction: float = 0.9, min_ticks: int = 10) -> None:
        if not (window_s > 0 and 0 < max_fraction <= 1 and min_ticks >= 1):
            raise ValueError("OverrunWatch needs window_s > 0, 0 < max_fraction <= 1, min_ticks >= 1")
        self.window_s = float(window_s)
        self.max_fraction = float(max_fraction)
        self.min_ticks = int(min_ticks)
        self._t0: float | None = None
        self._ticks0 = 0
        self._over0 = 0

    def update(self, ticks: int, overruns: int, now: float) -> SafetyFault | None:
        """Feed the runner's running counts at ``now`` (s); a fault when the window just closed is bad."""
        if self._t0 is None:
            self._t0, self._ticks0, self._over0 = now, ticks, overruns
            return None
        if now - self._t0 < self.window_s:
            return None
        n, k = ticks - self._ticks0, overruns - self._over0
        span = now - self._t0
        self._t0, self._ticks0, self._over0 = now, ticks, overruns
        if n >= self.min_ticks and k > self.max_fraction * n:
            return SafetyFault("overrun", f"{k} of {n} ticks overran their period in {span:.2f} s (limit "
                                          f"{self.max_fraction:.0%} of the ticks per {self.window_s:g} s): "
                                          "the loop cannot hold its rate")
        return None


class DryRunRig:
    """Pass-through rig that never actuates: commands are counted and remembered, not sent."""

    def __init__(self, rig: Any) -> None:
        self.rig = rig
        self.commands = 0
        self.last_command = 0.0

    def latest_state(self) -> Any:
        return self.rig.latest_state()

    def send_command(self, volts: float) -> None:
        self.commands += 1
        self.last_command = float(volts)

    def estop(self) -> None:
        self.last_command = 0.0

    def stats(self) -> dict:
        return dict(self.rig.stats()) if hasattr(self.rig, "stats") else {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rig, name)


class MotorGuard:
    """Motor to zero on exit, exception, SIGINT, SIGTERM and at interpreter exit.

    Inside the ``with`` block SIGINT raises ``KeyboardInterrupt`` (Python's default) and SIGTERM raises
    ``SystemExit``; either unwinds the loop, and ``__exit__`` sends 0 V and ``estop()`` on every exit (the
    device then holds 0 V by its latch rather than tripping its watchdog while the session tears down; the
    next run clears the latch at connect).  Signal handlers are only installed from the main thread and
    restored afterwards."""

    def __init__(self, rig: Any, estop_on_error: bool = True) -> None:
        self.rig = rig
        self.estop_on_error = estop_on_error
        self._old: dict[int, Any] = {}
        self._done = False
        self.stopped_by: str | None = None

    def zero(self, estop: bool = False) -> None:
        """Send 0 V (best effort, never raises); optionally e-stop as well."""
        try:
            self.rig.send_command(0.0)
        except Exception:  # noqa: BLE001 - the link may already be gone; still try the e-stop
            pass
        if estop:
            try:
                self.rig.estop()
            except Exception:  # noqa: BLE001
                pass

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.stopped_by = "SIGTERM"
        raise SystemExit(128 + signum)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.stopped_by = "SIGINT"
        raise KeyboardInterrupt

    def __enter__(self) -> MotorGuard:
        atexit.register(self._atexit)
        if threading.current_thread() is threading.main_thread():
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            # e-stop on every exit, normal ones too: the device then holds 0 V by its latch instead of
            # tripping its watchdog (and reporting a WATCHDOG fault) while the session tears down
            self.zero(estop=self.estop_on_error)
        finally:
            self._done = True
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()
            atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        if not self._done:
            self.zero(estop=True)


__all__ = ["DryRunRig", "MotorGuard", "OverrunWatch", "SafetyFault", "SoftLimits", "StaleStateWatch",
           "pendulum_index"]
