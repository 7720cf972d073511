"""Fixed-rate real-time control loop.

``FixedRateRunner`` paces ticks on ``time.monotonic``: it sleeps until ~0.3 ms before each deadline,
then spins; a tick that ends after the next deadline is an overrun and the missed deadlines are skipped
(no catch-up burst).  ``LoopStats`` keeps every tick's timing.

``ControlLoop.tick`` does, per tick: read the latest state -> watch for staleness -> estimate velocities ->
check soft limits -> (latency forecast) -> controller -> clamp -> send the command (unless dry-run) ->
hand the predictor tap and the logger their records (both non-blocking).  A loop whose ticks overrun
most of a 1 s window is a fault too (``OverrunWatch``).  On a fault it e-stops and returns False;
``ControlLoop.run`` stops then.  ``MotorGuard`` (controllers.safety) wraps ``run`` in
the CLI so the motor goes to zero however the run ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from controllers.base import ControlOutput, RigLink, pendulum_index, wrap_angle
from controllers.estimation import VelocityEstimator
from controllers.estimators import DiffEstimator
from controllers.safety import OverrunWatch, SafetyFault, SoftLimits, StaleStateWatch
from hardware import log_clock

DEVICE_CLOCK_WRAP_US = 1 << 32


class LoopStats:
    """Per-tick timing record (preallocated ring; percentiles over what it holds)."""

    def __init__(self, period_s: float, capacity: int = 1 << 20) -> None:
        self.period_s = float(period_s)
        self.capacity = int(capacity)
        self._start = np.zeros(self.capacity)
        self._late = np.zeros(self.capacity)
        self._busy = np.zeros(self.capacity)
        self.ticks = 0
        self.overruns = 0
        self.missed_deadlines = 0
        self.predictor_late = 0

    def record(self, deadline: float, start: float, end: float) -> None:
        i = self.ticks % self.capacity
        self._start[i] = start
        self._late[i] = start - deadline
        self._busy[i] = end - start
        self.ticks += 1

    def _ordered(self, arr: np.ndarray) -> np.ndarray:
        n = min(self.ticks, self.capacity)
        if self.ticks <= self.capacity:
            return arr[:n]
        i = self.ticks % self.capacity
        return np.concatenate([arr[i:], arr[:i]])

    def period_errors(self) -> np.ndarray:
        """Actual period minus nominal period for each consecutive pair of ticks (s)."""
        s = self._ordered(self._start)
        return np.diff(s) - self.period_s if s.size > 1 else np.zeros(0)

    def summary(self) -> dict[str, float]:
        """p50/p99/max of |period error| (us), jitter (std of the period, us), overrun %, rate (Hz)."""
        pe = np.abs(self.period_errors())
        late = self._ordered(self._late)
        busy = self._ordered(self._busy)
        starts = self._ordered(self._start)
        span = float(starts[-1] - starts[0]) if starts.size > 1 else 0.0

        def pct(a: np.ndarray, q: float) -> float:
            return float(np.percentile(a, q) * 1e6) if a.size else float("nan")

        return {
            "ticks": self.ticks,
            "rate_hz": (starts.size - 1) / span if span > 0 else float("nan"),
            "period_err_p50_us": pct(pe, 50),
            "period_err_p99_us": pct(pe, 99),
            "period_err_max_us": float(pe.max() * 1e6) if pe.size else float("nan"),
            "jitter_us": float(np.std(self.period_errors()) * 1e6) if pe.size else float("nan"),
            "late_p99_us": pct(late, 99),
            "busy_p50_us": pct(busy, 50),
            "busy_p99_us": pct(busy, 99),
            "overruns": self.overruns,
            "overrun_pct": 100.0 * self.overruns / self.ticks if self.ticks else 0.0,
            "missed_deadlines": self.missed_deadlines,
            "predictor_late": self.predictor_late,
        }


class FixedRateRunner:
    """Call ``tick(now) -> bool`` at a fixed rate until it returns False, time is up or ``stop`` is set."""

    def __init__(self, rate_hz: float, spin_s: float = 0.0003, clock: Callable[[], float] = time.monotonic,
                 stats: LoopStats | None = None) -> None:
        if not (rate_hz > 0 and np.isfinite(rate_hz)):
            raise ValueError(f"loop rate must be positive, got {rate_hz!r}")
        self.period = 1.0 / float(rate_hz)
        self.spin_s = float(spin_s)
        self.clock = clock
        self.stats = stats or LoopStats(self.period)

    def wait_until(self, deadline: float) -> None:
        """Sleep until ``spin_s`` before the deadline, then busy-wait."""
        remaining = deadline - self.clock() - self.spin_s
        if remaining > 0:
            time.sleep(remaining)
        while self.clock() < deadline:
            pass

    def run(self, tick: Callable[[float], bool], duration_s: float | None = None,
            stop: threading.Event | None = None) -> LoopStats:
        """Run until ``tick`` returns False, ``duration_s`` elapsed or ``stop`` is set."""
        t0 = self.clock() + self.period
        end_t = None if duration_s is None else t0 + float(duration_s)
        k = 0
        while not (stop is not None and stop.is_set()):
            deadline = t0 + k * self.period
            if end_t is not None and deadline >= end_t:
                break
            self.wait_until(deadline)
            start = self.clock()
            keep_going = tick(start)
            end = self.clock()
            self.stats.record(deadline, start, end)
            if not keep_going:
                break
            k += 1
            next_deadline = t0 + k * self.period
            if end > next_deadline:
                self.stats.overruns += 1
                k_new = int(np.ceil((end - t0) / self.period))
                self.stats.missed_deadlines += k_new - k
                k = k_new
        return self.stats


@dataclass
class TickRecord:
    """What the last tick did (for tests and the status line)."""

    t: float = float("nan")
    seq: int | None = None
    x: np.ndarray | None = None
    u: float = 0.0
    mode: str = "idle"
    fault: SafetyFault | None = None
    info: dict[str, float] = field(default_factory=dict)


class ControlLoop:
    """One rig, one controller: the per-tick pipeline (see module docstring)."""

    def __init__(self, rig: RigLink, controller: Any, model: Any, cfg: Any, *, rate_hz: float = 500.0,
                 limits: SoftLimits | None = None, estimator: Any = None,
                 stale_ms: float = 25.0, logger: Any = None, tap: Any = None, forecaster: Any = None,
                 dry_run: bool = False, status_cb: Callable[[dict[str, Any]], None] | None = None,
                 status_hz: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 state_feed: Any = None) -> None:
        self.rig = rig
        self.controller = controller
        self.model = model
        self.cfg = cfg
        self.rate_hz = float(rate_hz)
        self.limits = limits or SoftLimits.from_config(cfg, model)
        npos = model.n // 2
        # a StateEstimator (controllers.estimators: diff, kf, fm-ukf); a bare VelocityEstimator is ``diff``
        estimator = estimator or VelocityEstimator(npos, angle_channels=(pendulum_index(model),))
        if isinstance(estimator, VelocityEstimator):
            estimator = DiffEstimator(estimator)
        self.estimator = estimator
        self._every_frame = bool(getattr(estimator, "every_frame", False))
        self._pend = pendulum_index(model)
        self._est_at: dict[int, np.ndarray] = {}  # device_time_us -> estimate, for /truth records
        self.truth_frames = 0
        self.truth_matched = 0
        self.truth_err_sq = np.zeros(model.n)
        self.stale = StaleStateWatch(stale_ms)
        self.overrun_watch = OverrunWatch()
        self.logger = logger
        self.tap = tap
        self.forecaster = forecaster
        self.dry_run = dry_run
        self.status_cb = status_cb
        self.status_period = 1.0 / status_hz if status_hz > 0 else float("inf")
        self.clock = clock
        self.state_feed = state_feed  # hardware.state_feed.StateFeed: every received frame is logged
        self.runner = FixedRateRunner(self.rate_hz, clock=clock)
        self.stats = self.runner.stats
        self.last = TickRecord()
        self.mode = "idle"
        self.fault: SafetyFault | None = None
        self.commands_sent = 0
        self._cmd_seq = 0
        self._seq: int | None = None
        self._state_host_ns = 0
        self._dev_t_us: int | None = None
        self._dev_t_acc = 0.0
        self._x: np.ndarray | None = None
        self._next_status = 0.0
        self._next_monitor_log = 0.0
        self.mode_changes: list[tuple[float, str, str]] = []

    # -- helpers --------------------------------------------------------------------------------------
    def _device_time(self, t_us: int) -> float:
        """Device clock in seconds, unwrapped across the 32-bit microsecond wrap."""
        if self._dev_t_us is not None:
            self._dev_t_acc += ((int(t_us) - self._dev_t_us) % DEVICE_CLOCK_WRAP_US) * 1e-6
        self._dev_t_us = int(t_us)
        return self._dev_t_acc

    def _log(self, topic: str, record: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.write(topic, record)

    def host_ns(self) -> int:
        """Host time now on the log clock (hardware.log_clock): the loop's clock plus the process's
        wall-monotonic offset (in a lock-step simulation the loop's clock is the simulated one)."""
        if self.clock is time.monotonic:
            return log_clock.now_ns()
        return log_clock.from_monotonic_ns(int(round(self.clock() * 1e9)))

    def log_command(self, volts: float, source: str, estop: bool = False, requested: float | None = None,
                    state_seq: int | None = None) -> None:
        """One /command record (controller output, or the 0 V of a trip or of the shutdown)."""
        self._cmd_seq += 1
        rec: dict[str, Any] = {"seq": self._cmd_seq, "host_time_ns": self.host_ns(), "voltage": float(volts),
                               "source": source}
        if requested is not None:
            rec["requested"] = float(requested)
        if state_seq is not None:
            rec["state_seq"] = state_seq
        if estop:
            rec["estop"] = True
        self._log("/command", rec)

    def _take_state(self, s: Any, rx_index: int | None = None, link_lost: int | None = None,
                    estimate: bool = True) -> None:
        """Log one received frame; with ``estimate`` (the newest frame of a tick) it also updates the velocity
        estimate the controller uses. Frames between ticks are logged with the held estimate and
        ``estimated: false``: differencing every 1 kHz frame doubles the quantisation noise the velocity
        filter sees (docs/logging.md, "Every state frame"), so the estimator runs once per tick."""
        pos = np.asarray(s.positions, dtype=float)
        if estimate or self._x is None or self._every_frame:
            u_app = getattr(s, "applied_voltage", None)
            if u_app is None or not np.isfinite(u_app):
                u_app = self.last.u  # a rig that does not report it: the last command sent
            self._x = self.estimator.update(pos, self._device_time(s.device_time_us), float(u_app))
            vel = self._x[len(pos):]
            self._seq = int(s.seq)
            self._state_host_ns = log_clock.from_monotonic_ns(s.host_time_ns)
            estimate = True
            if len(self._est_at) >= 64:
                del self._est_at[next(iter(self._est_at))]
            self._est_at[int(s.device_time_us)] = self._x
        else:
            vel = self._x[len(pos):]
        if self.logger is None:
            return
        rec: dict[str, Any] = {"seq": int(s.seq), "device_time_us": int(s.device_time_us),
                               "host_time_ns": log_clock.from_monotonic_ns(s.host_time_ns),
                               "positions": pos.tolist(), "velocities": vel.tolist(),
                               "counts": [int(c) for c in s.counts], "flags": int(s.flags),
                               "estimated": bool(estimate)}
        for key in ("current", "applied_voltage"):
            v = getattr(s, key, None)
            if v is not None:
                rec[key] = float(v)
        if rx_index is not None:
            rec["rx_index"] = int(rx_index)
        if link_lost is not None:
            rec["link_lost"] = int(link_lost)
        self.logger.write("/state", rec)

    def _log_truth(self, samples: list[Any]) -> None:
        """/truth records (virtual rig only): the true state of each sample, with the loop's estimate and its
        error (angle wrapped) when that sample was estimated."""
        self.truth_frames += len(samples)
        for tr in samples:
            x = np.asarray(tr.state, dtype=float)
            est = self._est_at.get(int(tr.device_time_us))
            err = None
            if est is not None:
                err = est - x
                err[self._pend] = wrap_angle(err[self._pend])
                self.truth_err_sq = self.truth_err_sq + err * err
                self.truth_matched += 1
            if self.logger is None:
                continue
            rec: dict[str, Any] = {"device_time_us": int(tr.device_time_us),
                                   "host_time_ns": log_clock.from_monotonic_ns(tr.host_time_ns),
                                   "state": x.tolist(), "voltage": float(tr.voltage)}
            if err is not None:
                rec["estimate"] = est.tolist()
                rec["error"] = err.tolist()
            self.logger.write("/truth", rec)

    def estimation_summary(self) -> dict[str, Any]:
        """Estimator name and, on a rig with a truth channel, the RMS estimation error per state over the
        estimated samples (``truth_matched`` of them; ``truth_frames`` received)."""
        out: dict[str, Any] = {"estimator": getattr(self.estimator, "name", "?"),
                               "truth_frames": self.truth_frames, "truth_matched": self.truth_matched}
        if self.truth_matched:
            out["error_rms"] = np.sqrt(self.truth_err_sq / self.truth_matched).tolist()
        extra = getattr(self.estimator, "stats", None)
        if callable(extra):
            out.update(extra())
        return out

    def _set_mode(self, mode: str, now: float, reason: str = "") -> None:
        if mode != self.mode:
            self._log("/mode", {"host_time_ns": self.host_ns(), "mode": mode, "previous": self.mode,
                                "reason": reason})
            self.mode_changes.append((now, self.mode, mode))
            self.mode = mode

    def trip(self, fault: SafetyFault, now: float) -> None:
        """E-stop on a fault: motor to zero, record and log it."""
        self.fault = fault
        for action in (lambda: self.rig.send_command(0.0), self.rig.estop):
            try:
                action()
            except Exception:  # noqa: BLE001 - best effort; the link may be the thing that failed
                pass
        self.log_command(0.0, "fault", estop=True, state_seq=self._seq)
        self._log("/fault", {"host_time_ns": self.host_ns(), "code": fault.code, "message": fault.message})
        self._set_mode("estop", now, fault.code)
        self.last.fault = fault

    # -- per tick -------------------------------------------------------------------------------------
    def tick(self, now: float) -> bool:
        """One control period at time ``now`` (s); False when the run must stop (fault)."""
        if self.fault is not None:
            return False
        fault = self.overrun_watch.update(self.stats.ticks, self.stats.overruns, now)
        if fault is not None:
            self.trip(fault, now)
            return False
        s = self.rig.latest_state()
        seq = None if s is None else int(s.seq)
        fault = self.stale.update(seq, now)
        if fault is not None:
            self.trip(fault, now)
            return False
        if s is None:
            return True  # no state yet: nothing to act on
        if self.state_feed is not None:
            frames = self.state_feed.drain()  # every frame since the last tick: all logged, the newest used
            for i, (sample, rx_index, link_lost) in enumerate(frames):
                self._take_state(sample, rx_index, link_lost, estimate=i == len(frames) - 1)
            if self._x is None:
                self._take_state(s)
        elif seq != self._seq:
            self._take_state(s)
        drain_truth = getattr(self.rig, "drain_truth", None)
        if drain_truth is not None:
            self._log_truth(drain_truth())
        seq = self._seq
        x = self._x
        fault = self.limits.check(x)
        if fault is not None:
            self.trip(fault, now)
            return False
        x_ctrl = x
        if self.forecaster is not None:
            x_ctrl = self.forecaster.forecast(x, now)
        try:
            out: ControlOutput = self.controller.compute(x_ctrl, now)
        except (FloatingPointError, ValueError) as exc:
            self.trip(SafetyFault("controller", f"{type(exc).__name__}: {exc}"), now)
            return False
        requested = float(out.u[0])
        u = self.limits.clamp(out.u, x)
        volts = float(u[0])
        if not self.dry_run:
            try:
                self.rig.send_command(volts)
            except Exception as exc:  # noqa: BLE001 - any send failure is a fault that stops the run
                self.trip(SafetyFault("command", f"{type(exc).__name__}: {exc}"), now)
                return False
            self.commands_sent += 1
        if self.forecaster is not None:
            self.forecaster.record_command(now, u)
        self.log_command(volts, "controller", requested=requested, state_seq=seq)
        self._set_mode(out.mode if not self.dry_run else f"dry-{out.mode}", now, "controller")
        if self.tap is not None:
            self.tap.offer(x, u, now, seq, self._state_host_ns)
        self.last = TickRecord(now, seq, x, volts, self.mode, None, out.info)
        if now >= self._next_status:
            self._next_status = now + self.status_period
            if self.status_cb is not None:
                self.status_cb(self.status())
            if self.tap is not None and self.logger is not None and now >= self._next_monitor_log:
                self._next_monitor_log = now + 1.0  # prediction-error numbers into the log once a second
                self._log("/event", {"host_time_ns": self.host_ns(), "name": "prediction_monitor",
                                     "data": self.tap.status()})
        return True

    def status(self) -> dict[str, Any]:
        """Numbers for the live status line."""
        st: dict[str, Any] = {"mode": self.mode, "ticks": self.stats.ticks, "overruns": self.stats.overruns,
                              "u": self.last.u}
        pe = self.stats.period_errors()[-500:]
        starts = self.stats._ordered(self.stats._start)[-500:]
        if starts.size > 1:
            st["rate_hz"] = (starts.size - 1) / max(starts[-1] - starts[0], 1e-9)
            st["jitter_us"] = float(np.std(pe) * 1e6)
        if self._x is not None:
            st["x"] = self._x.tolist()
        if self.tap is not None:
            st.update(self.tap.status())
        return st

    def run(self, duration_s: float | None = None, stop: threading.Event | None = None) -> LoopStats:
        """Run at the fixed rate until a fault, ``duration_s`` or ``stop``; returns the timing stats."""
        self._log("/event", {"host_time_ns": self.host_ns(), "name": "run_start",
                             "data": {"rate_hz": self.rate_hz, "dry_run": self.dry_run,
                                      "controller": getattr(self.controller, "name", "?"),
                                      "estimator": getattr(self.estimator, "name", "?")}})
        try:
            self.runner.run(self.tick, duration_s, stop)
        finally:
            if self.tap is not None:
                self.stats.predictor_late = getattr(self.tap, "late", 0)
            self._log("/event", {"host_time_ns": self.host_ns(), "name": "run_end",
                                 "data": {k: v for k, v in self.stats.summary().items()}})
        return self.stats
