"""The predictor in the loop, without ever blocking it.

``PredictorTap.offer`` is called by the control loop every tick (after the command is chosen).  At each
model step (``model_dt``) it records ``(x_k, u_k)`` and wakes a worker thread; the loop never waits.
The worker

* feeds every new step to the one-step predictor -- ``stream_step(x_k, u_k) -> x_{k+1}`` (the
  predictor's incremental KV-cache stream; after a failure the stream is re-primed with ``stream_reset``
  from the local history) or, without a stream, ``rollout`` over the history -- and
* every ``kstep_every`` steps asks ``rollout`` for the k-step prediction of ``x_k`` from the history up to
  ``x_{k-H}`` with the inputs actually applied since (settled at once against the measured ``x_k``).

Predictions that arrive after their target step was measured count as late (``monitor.late_predictions``);
steps that pile up while the worker is busy are counted in ``late``.

feeds them to the ``PredictionMonitor`` and logs ``/prediction`` records.  Predictor errors (timeout,
unavailable) are counted and exposed as ``fault``; they never reach the loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from controllers.latest_job import LatestJobWorker
from controllers.monitor import PredictionMonitor
from hardware import log_clock


class PredictorTap(LatestJobWorker):
    """Non-blocking one-step / k-step prediction at the model rate, feeding the monitor and the logger."""

    def __init__(self, rollout: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], model_dt: float,
                 monitor: PredictionMonitor | None = None, logger: Any = None, context: int = 32,
                 kstep: int = 10, kstep_every: int = 10,
                 errors: tuple[type[BaseException], ...] = (),
                 stream_step: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 stream_reset: Callable[[np.ndarray, np.ndarray], Any] | None = None) -> None:
        if not model_dt > 0:
            raise ValueError(f"model_dt must be positive, got {model_dt!r}")
        self.rollout = rollout
        self.stream_step = stream_step
        self.stream_reset = stream_reset
        self._need_reset = False
        self._fed = -1  # last step index fed to the stream
        self.model_dt = float(model_dt)
        self.monitor = monitor
        self.logger = logger
        self.context = int(context)
        self.kstep = int(kstep)
        self.kstep_every = max(1, int(kstep_every))
        self.errors = errors or _predictor_errors()
        keep = self.context + self.kstep + 2
        self._x: deque[np.ndarray] = deque(maxlen=keep)
        self._u: deque[np.ndarray] = deque(maxlen=keep)
        self._meta: deque[tuple[int, int]] = deque(maxlen=keep)  # (seq, host_time_ns) per model step
        self.step_index = -1
        self._next_t: float | None = None
        super().__init__("predictor-tap", poll_s=0.05)
        self._last_one_step: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.late = 0          # model steps skipped because the previous request had not finished
        self.failures = 0      # predictor errors (timeout / unavailable)
        self.requests = 0
        self.fault: str | None = None
        self.latency_us: deque[float] = deque(maxlen=2000)

    def start(self) -> PredictorTap:
        """Start the worker thread (idempotent)."""
        self.start_worker()
        return self

    def close(self) -> None:
        """Stop the worker (waits for the request in flight, bounded by the client deadline)."""
        self.stop_worker()

    def __enter__(self) -> PredictorTap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loop side (never blocks) ---------------------------------------------------------------------
    def offer(self, x: np.ndarray, u: np.ndarray, now: float, seq: int | None = None,
              host_time_ns: int = 0) -> None:
        """Called every tick; acts once per model step."""
        if self._next_t is not None and now < self._next_t:
            return
        self._next_t = now + self.model_dt if self._next_t is None or now - self._next_t > self.model_dt \
            else self._next_t + self.model_dt
        self.step_index += 1
        self._x.append(np.asarray(x, dtype=float).copy())
        self._u.append(np.asarray(u, dtype=float).reshape(-1).copy())
        self._meta.append((-1 if seq is None else int(seq), int(host_time_ns)))
        if self.monitor is not None:
            self.monitor.observe(self.step_index, self._x[-1], now)
        if self.submit(self.step_index, now, np.stack(self._x), np.stack(self._u), self._meta[-1]):
            self.late += 1  # the worker had not even picked up the previous step

    def last_one_step(self) -> tuple[float, np.ndarray, np.ndarray, np.ndarray] | None:
        """The newest one-step prediction: ``(t_k, x_k, u_k, predicted x_{k+1})`` (None before the first)."""
        with self._lock:
            return self._last_one_step

    def status(self) -> dict[str, Any]:
        """Numbers for the status line."""
        st: dict[str, Any] = {"pred_requests": self.requests, "pred_late": self.late,
                              "pred_failures": self.failures, "pred_fault": self.fault}
        if self.latency_us:
            st["pred_latency_p50_us"] = float(np.percentile(self.latency_us, 50))
        if self.monitor is not None:
            st.update(self.monitor.snapshot())
        return st

    # -- worker ---------------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> np.ndarray | None:
        t0 = time.perf_counter()
        try:
            out = np.asarray(fn(*args), dtype=float)
        except self.errors as exc:
            self.failures += 1
            self.fault = f"{type(exc).__name__}: {exc}"
            return None
        self.latency_us.append((time.perf_counter() - t0) * 1e6)
        self.requests += 1
        self.fault = None
        return out

    def _reset_stream(self, xh: np.ndarray, uh: np.ndarray) -> np.ndarray:
        assert self.stream_reset is not None
        self.stream_reset(xh, uh)
        return np.zeros(1)

    def _one_step(self, k: int, xs: np.ndarray, us: np.ndarray) -> np.ndarray | None:
        """Prediction of x_{k+1} (streamed when possible); None on a predictor error."""
        c = self.context
        if self.stream_step is None:
            # history up to x_k (inputs u_{..k-1}), plan [u_k] -> x_{k+1}
            out = self._call(self.rollout, xs[-c:], us[-c:-1] if c > 1 else us[:0], us[-1][None, None, :])
            return None if out is None else out[0, 0]
        if self._need_reset or self._fed < 0 or k - self._fed > len(xs) - 1:
            if self.stream_reset is not None and len(xs) > 1:
                if self._call(self._reset_stream, xs[-c:-1], us[-c:-1]) is None:
                    self._need_reset = True
                    return None
            self._need_reset = False
            self._fed = k - 1
        pred = None
        for j in range(self._fed + 1, k + 1):  # catch up with steps that arrived while we were busy
            i = len(xs) - 1 - (k - j)
            pred = self._call(self.stream_step, xs[i], us[i])
            if pred is None:
                self._need_reset = True
                return None
            self._fed = j
        return pred

    def _run_job(self, k: int, now: float, xs: np.ndarray, us: np.ndarray, meta: tuple[int, int]) -> None:
        c = self.context
        pred = self._one_step(k, xs, us)
        if pred is not None:
            with self._lock:
                self._last_one_step = (now, xs[-1].copy(), us[-1].copy(), np.array(pred, dtype=float))
            if self.monitor is not None:
                self.monitor.add_prediction(k + 1, pred, horizon=1)
            if self.logger is not None:
                self.logger.write("/prediction", {
                    "host_time_ns": log_clock.now_ns(), "ref_seq": meta[0], "ref_host_time_ns": meta[1],
                    "dt": self.model_dt, "horizon": 1, "predicted": [pred.tolist()],
                    "latency_us": self.latency_us[-1] if self.latency_us else None})
        h = self.kstep
        if h > 1 and k % self.kstep_every == 0 and len(xs) > h + 1 and self.monitor is not None:
            # k steps in hindsight: history up to x_{k-h}, the inputs actually applied u_{k-h..k-1} -> x_k
            x_ctx = xs[:-h][-c:]
            u_ctx = us[:-h - 1][-(len(x_ctx) - 1):] if len(x_ctx) > 1 else us[:0]
            plan = us[-h - 1:-1][None]
            out = self._call(self.rollout, x_ctx, u_ctx, plan)
            if out is not None:
                self.monitor.settle(h, out[0, -1], xs[-1], now)


def _predictor_errors() -> tuple[type[BaseException], ...]:
    try:
        from export.client import PredictorError
    except ImportError:
        return (TimeoutError, ConnectionError)
    return (PredictorError, TimeoutError, ConnectionError)
