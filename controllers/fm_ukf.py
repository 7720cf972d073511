"""``fm-ukf``: an unscented Kalman filter whose process model is the learned dynamics model (torch-free).

The learned model predicts one model step (``model_dt``, 10 ms on the shipped rigs) from a window of
``[x, u]`` steps, so the UKF runs on that grid:

* at a grid sample (the first STATE frame ``model_dt`` after the previous one) the 8 sigma points of the
  grid posterior (``lambda = 0``: ``x +- 2 chol(P)`` columns, weights 1/8) each end a window of the filter's
  own recent grid posteriors and step inputs (mean applied voltage over each step); one batched
  onnxruntime call (``export.onnx_runtime.OnnxPredictor.predict``) gives their next states, whose sample
  mean and covariance plus ``Q`` are the prior; the sensor model is known and linear (encoder positions,
  noise ``q^2 (1/12 + sigma_c^2)``), so the update is the exact Kalman update with that frame's positions;
* the call runs on a worker thread (onnxruntime releases the GIL), so a tick never waits for it; its result
  is fused at the first frame after it arrives (the posterior is for the grid sample's time);
* between grid posteriors the output is either the physics EKF (``between="kf"``, the default: started
  from the newest grid posterior and fed every frame since) or the physics mean prediction from it
  (``between="hold"``). A result that arrives after the next grid sample was due is ``late``: that step is
  skipped (the next grid step starts from the posterior once it lands).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from controllers.base import window_path_offsets
from controllers.estimators import PhysicsEKF, measurement_variance


class _Worker:
    """One background call at a time: ``submit(fn, *args)``, then ``poll()`` -> result or None."""

    def __init__(self) -> None:
        self._job: tuple[Callable[..., Any], tuple] | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._wake = threading.Event()
        self._stop = False
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="fm-ukf-model", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            job = self._job
            if job is None:
                continue
            try:
                self._result = job[0](*job[1])
            except BaseException as exc:  # noqa: BLE001 - handed to the loop thread by poll()
                self._error = exc
            self._done.set()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._job, self._result, self._error = (fn, args), None, None
        self._done.clear()
        self.busy = True
        self._wake.set()

    def poll(self, wait_s: float = 0.0) -> Any:
        if not self.busy or not self._done.wait(wait_s):
            return None
        self.busy = False
        if self._error is not None:
            raise self._error
        return self._result

    def wait(self, timeout_s: float) -> bool:
        """Block until the running call has finished (without taking its result); True when it has."""
        return not self.busy or self._done.wait(timeout_s)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=2.0)


class FMUKF:
    """UKF on the learned model at its step, physics between (see module docstring)."""

    name = "fm-ukf"
    every_frame = True

    def __init__(self, predict: Callable[[np.ndarray, np.ndarray], np.ndarray], model: Any, cfg: Any,
                 model_dt: float, process_std: Sequence[float] = (2e-4, 2e-3, 2e-2, 1e-1), context: int = 8,
                 between: str = "kf", asynchronous: bool = True,
                 kf_accel_noise: Sequence[float] = (1e-2, 1e-1),
                 init_velocity_std: Sequence[float] = (0.5, 5.0), angle_channels: Sequence[int] = (1,),
                 max_gap_s: float = 0.1, warmup_s: float = 0.2, history: str = "fixed") -> None:
        if between not in ("kf", "hold"):
            raise ValueError(f"fm-ukf: between must be 'kf' or 'hold', got {between!r}")
        if history not in ("shift", "fixed"):
            raise ValueError(f"fm-ukf: history must be 'shift' or 'fixed', got {history!r}")
        self.history = history
        if not (model_dt > 0 and context >= 1):
            raise ValueError(f"fm-ukf: model_dt must be > 0 and context >= 1, got {model_dt}, {context}")
        self.predict_fn = predict
        self.model_dt = float(model_dt)
        self.q = np.diag(np.asarray(process_std, dtype=float) ** 2)
        self.r = measurement_variance(cfg)
        self.context = int(context)
        self.between = between
        self.max_gap_s = float(max_gap_s)
        self.warmup_s = float(warmup_s)
        self.v0 = np.asarray(init_velocity_std, dtype=float) ** 2
        self.kf = PhysicsEKF(model, cfg, accel_noise=kf_accel_noise, angle_channels=angle_channels)
        self.angle = tuple(angle_channels)
        self.worker = _Worker() if asynchronous else None
        self.grid_updates = 0
        self.late = 0
        self.model_ms: deque[float] = deque(maxlen=4096)
        self._reset_state()

    @classmethod
    def from_onnx(cls, path: str, model: Any, cfg: Any, tuning: dict | None = None,
                  angle_channels: Sequence[int] = (1,), **kw: Any) -> FMUKF:
        """With the full-window ONNX graph at ``path`` in-process (1 onnxruntime thread)."""
        from export.onnx_runtime import OnnxPredictor

        pred = OnnxPredictor(path, threads=1)
        t = tuning or {}
        dt = float(pred.meta.dt or cfg.model_dt)
        opts = {"process_std": t.get("fm_ukf_process_std", (2e-4, 2e-3, 2e-2, 1e-1)),
                "context": int(t.get("fm_ukf_context", 8)), "between": t.get("fm_ukf_between", "kf"),
                "history": t.get("fm_ukf_history", "fixed"),
                "kf_accel_noise": t.get("kf_accel_noise", (1e-2, 1e-1))}
        opts.update(kw)
        est = cls(pred.predict, model, cfg, dt, angle_channels=angle_channels, **opts)
        est.onnx_path = str(path)
        return est

    # ------------------------------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.xg: np.ndarray | None = None  # grid posterior
        self._started = False  # the grid chain starts from the physics filter after warmup_s
        self.pg = np.eye(4)
        self.tg = 0.0
        self._hist_x: deque[np.ndarray] = deque(maxlen=max(self.context - 1, 1))
        self._hist_u: deque[float] = deque(maxlen=max(self.context - 1, 1))
        self._frames: deque[tuple[float, np.ndarray]] = deque(maxlen=64)  # (t, pos) since the grid point
        self._pending: tuple[float, np.ndarray, float, float, np.ndarray] | None = None  # t, z, u, t_sub, x0
        self._x_out = np.zeros(4)

    def _init(self, pos: np.ndarray, t: float, u: float) -> None:
        self._reset_state()
        self.xg = np.concatenate([pos, np.zeros(2)])
        self.pg = np.diag(np.concatenate([self.r, self.v0]))
        self.tg = t
        self.kf.x, self.kf.P, self.kf._t = self.xg.copy(), self.pg.copy(), t
        self.kf.inputs.clear()
        self.kf.inputs.add(t, u)
        self._x_out = self.xg.copy()
        self._t_init = t

    # ------------------------------------------------------------------------------------ the UKF step
    def sigma_points(self) -> np.ndarray:
        """(8, 4): ``x +- 2 L`` columns, ``L L^T = P`` (lambda = 0, equal weights 1/8)."""
        assert self.xg is not None
        pg = 0.5 * (self.pg + self.pg.T)
        try:
            low = np.linalg.cholesky(pg)
        except np.linalg.LinAlgError:
            w, v = np.linalg.eigh(pg)
            low = v * np.sqrt(np.clip(w, 1e-18, None))
        d = 2.0 * low.T
        return np.concatenate([self.xg + d, self.xg - d])

    def _windows(self, sig: np.ndarray, u_step: float) -> tuple[np.ndarray, np.ndarray]:
        hx = list(self._hist_x)
        hu = list(self._hist_u)
        t = len(hx) + 1
        x = np.empty((sig.shape[0], t, 4), np.float32)
        u = np.empty((sig.shape[0], t, 1), np.float32)
        if hx:
            x[:, :-1] = np.asarray(hx, np.float32)
            u[:, :-1, 0] = np.asarray(hu, np.float32)
        x[:, -1] = sig
        u[:, -1, 0] = u_step
        if self.history == "shift" and hx:
            # each sigma point's deviation carried back along the window as a consistent trajectory
            # (docs/controllers.md)
            assert self.xg is not None
            x[:, :-1] += window_path_offsets(sig - self.xg, t, self.model_dt)[:, :-1].astype(np.float32)
        return x, u

    def _run_model(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        y = np.asarray(self.predict_fn(x, u), dtype=float)[:, -1]
        return y, (time.perf_counter() - t0) * 1e3

    def _fuse(self, y: np.ndarray, model_ms: float) -> None:
        """Prior from the propagated sigma points, exact linear update with the grid sample's positions."""
        assert self._pending is not None
        t_grid, z, u_step, _, _ = self._pending
        self._pending = None
        self.model_ms.append(model_ms)
        if not np.all(np.isfinite(y)):
            raise FloatingPointError("fm-ukf: the learned model returned NaN/Inf")
        m = y.mean(axis=0)
        d = y - m
        p = d.T @ d / y.shape[0] + self.q
        innov = z - m[:2]
        for i in self.angle:
            innov[i] = (innov[i] + np.pi) % (2.0 * np.pi) - np.pi
        s = p[:2, :2] + np.diag(self.r)
        k = p[:, :2] @ np.linalg.inv(s)
        x_post = m + k @ innov
        ikh = np.eye(4)
        ikh[:, :2] -= k
        p_post = ikh @ p @ ikh.T + k @ np.diag(self.r) @ k.T
        assert self.xg is not None
        self._hist_x.append(self.xg.astype(np.float32))
        self._hist_u.append(u_step)
        self.xg, self.pg, self.tg = x_post, p_post, t_grid
        self.grid_updates += 1
        self._rebase()

    def _rebase(self) -> None:
        """Restart the between-filter from the grid posterior and replay the frames after the grid sample."""
        kf = self.kf
        assert self.xg is not None
        kf.x, kf.P, kf._t = self.xg.copy(), self.pg.copy(), self.tg
        for t, pos in self._frames:
            if t <= self.tg:
                continue
            kf.predict(t)
            if self.between == "kf":
                kf.correct(pos)
        self._x_out = kf.x.copy()

    # ------------------------------------------------------------------------------------------ public
    def update(self, positions: np.ndarray, t: float, u_applied: float = 0.0) -> np.ndarray:
        pos = np.asarray(positions, dtype=float).reshape(-1)
        if pos.shape != (2,) or not np.all(np.isfinite(pos)):
            raise ValueError(f"fm-ukf: expected 2 finite positions, got {np.asarray(positions).tolist()}")
        t = float(t)
        if self.xg is None or t < self.kf._t or t - self.kf._t > self.max_gap_s:
            self._init(pos, t, u_applied)
            return self._x_out.copy()
        if t == self.kf._t:
            return self._x_out.copy()
        self._frames.append((t, pos.copy()))
        # the pending model call: fuse it as soon as it has landed
        if self._pending is not None:
            if self.worker is None:
                y, ms = self._run_model(*self._pending[4])
                self._fuse(y, ms)
            else:
                res = self.worker.poll()
                if res is not None:
                    self._fuse(*res)
                    # the rebase replayed every frame incl. this one
                    self.kf.inputs.add(t, u_applied)
                    return self._x_out.copy()
                if t - self._pending[0] >= self.model_dt - 5e-4:
                    self.late += 1  # the next grid sample is due and the model has not answered
        # between grid posteriors: the physics filter (or prediction) on this frame
        kf = self.kf
        kf.predict(t)
        if self.between == "kf":
            kf.correct(pos)
        self._x_out = kf.x.copy()
        if not self._started:  # a converged start: the physics filter's estimate after warmup_s
            if t - self._t_init >= self.warmup_s:
                self._started = True
                self.xg, self.pg, self.tg = kf.x.copy(), kf.P.copy(), t
                self._frames.clear()
            kf.inputs.add(t, u_applied)
            return self._x_out.copy()
        # a new grid sample: submit its sigma points
        if self._pending is None and t - self.tg >= self.model_dt - 5e-4:
            u_step = kf.inputs.mean(self.tg, t)
            x, u = self._windows(self.sigma_points(), u_step)
            self._pending = (t, pos.copy(), u_step, time.perf_counter(), (x, u))
            while self._frames and self._frames[0][0] <= self.tg:
                self._frames.popleft()
            if self.worker is None:
                y, ms = self._run_model(x, u)
                self._fuse(y, ms)
            else:
                self.worker.submit(self._run_model, x, u)
        kf.inputs.add(t, u_applied)
        if not np.all(np.isfinite(self._x_out)):
            raise FloatingPointError(f"fm-ukf: state estimate became non-finite at t = {t:.6f} s")
        return self._x_out.copy()

    @property
    def P(self) -> np.ndarray:  # noqa: N802 - the covariance, as PhysicsEKF.P
        return self.kf.P

    def stats(self) -> dict[str, Any]:
        """Grid updates, late model calls, model call time p50 / p99 (ms)."""
        ms = np.asarray(self.model_ms)
        return {"fm_grid_updates": self.grid_updates, "fm_late": self.late,
                "fm_model_ms_p50": float(np.percentile(ms, 50)) if ms.size else float("nan"),
                "fm_model_ms_p99": float(np.percentile(ms, 99)) if ms.size else float("nan"),
                "fm_context": self.context, "fm_between": self.between}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
