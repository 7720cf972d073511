"""Lock-step evaluation of a state estimator on the simulated plant (no pty, no threads, deterministic).

``simulate_balance`` runs the firmware's 1 kHz tick on ``rigs.RigSimulator`` (counts read, the setpoint
applied after the config's actuation delay, a STATE frame every ``divider`` ticks), an estimator fed each
frame with the applied voltage, and LQR on the estimate, the command reaching the firmware on its next tick.
It returns the true states, the estimates, the commands and the filter's NEES where it has a covariance.
Used by ``bench/bench_estimators.py`` and ``tests/test_estimators.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from controllers.base import wrap_angle


@dataclass
class EvalRun:
    """What one lock-step run produced (one row per STATE frame)."""

    t: np.ndarray          # (N,) device time (s)
    truth: np.ndarray      # (N, 4) true state at the frame
    est: np.ndarray        # (N, 4) estimate after the frame
    u: np.ndarray          # (N,) command computed from that estimate
    nees: np.ndarray       # (N,) (x - x_hat)^T P^-1 (x - x_hat), NaN without a covariance
    fault: str | None = None

    def error(self) -> np.ndarray:
        e = self.est - self.truth
        e[:, 1] = wrap_angle(e[:, 1])
        return e

    def metrics(self, skip_s: float = 1.0) -> dict[str, float]:
        """RMS velocity errors, pendulum angle RMS, base position RMS, command chatter RMS(u[k] - u[k-1])."""
        m = self.t >= self.t[0] + skip_s
        e = self.error()[m]
        du = np.diff(self.u[m])
        return {"vel_rms_q0": float(np.sqrt(np.mean(e[:, 2] ** 2))),
                "vel_rms_q1": float(np.sqrt(np.mean(e[:, 3] ** 2))),
                "pos_rms_q0": float(np.sqrt(np.mean(e[:, 0] ** 2))),
                "angle_rms": float(np.sqrt(np.mean(wrap_angle(self.truth[m, 1]) ** 2))),
                "base_rms": float(np.sqrt(np.mean(self.truth[m, 0] ** 2))),
                "u_rms": float(np.sqrt(np.mean(self.u[m] ** 2))),
                "chatter_rms": float(np.sqrt(np.mean(du**2))) if du.size else float("nan"),
                "nees_mean": float(np.nanmean(self.nees[m])) if np.isfinite(self.nees[m]).any()
                else float("nan")}


def simulate_balance(cfg: Any, estimator: Any, controller: Any, duration_s: float = 5.0, seed: int = 0,
                     overrides: dict[str, float] | None = None, x0: Any = None, divider: int = 2,
                     rng_kick: float = 0.0) -> EvalRun:
    """Balance from ``x0`` (default: upright, pendulum 0.05 rad off) on the (possibly mismatched) plant."""
    import rigs

    sim = rigs.RigSimulator(cfg, seed=seed, param_overrides=overrides or None)
    x0 = np.array([0.0, 0.05, 0.0, 0.0]) if x0 is None else np.asarray(x0, float)
    sim.reset(x0)
    rng = np.random.default_rng(seed + 1)
    vmax = float(cfg.limits.voltage_max)
    n_ticks = int(round(duration_s * cfg.sample_rate_hz))
    tick = 1.0 / cfg.sample_rate_hz
    setpoint, pending = 0.0, None
    rows: list[tuple] = []
    fault = None
    for k in range(n_ticks):
        if pending is not None:  # the command sent after the previous frame arrives this tick
            setpoint, pending = pending, None
        counts = sim.read_counts()
        sim.apply(setpoint)
        if k % divider == 0:
            t = k * tick
            pos = cfg.encoders.counts_to_positions(np.asarray(counts))
            truth = sim.state
            try:
                xh = np.asarray(estimator.update(pos, t, setpoint), dtype=float)
            except (ValueError, FloatingPointError) as exc:
                fault = f"estimator: {exc}"
                break
            u = float(np.clip(controller.compute(xh, t).u[0], -vmax, vmax))
            if rng_kick > 0:
                u = float(np.clip(u + rng.normal(0.0, rng_kick), -vmax, vmax))
            pending = u
            nees = float("nan")
            p = getattr(estimator, "P", None)
            if p is not None:
                e = xh - truth
                e[1] = wrap_angle(e[1])
                p = np.asarray(p)[:4, :4]  # the state's marginal (a kf disturbance state left out)
                nees = float(e @ np.linalg.solve(p, e))
            rows.append((t, truth, xh, u, nees))
        sim.advance(tick)
        if abs(sim.state[0]) >= cfg.limits.position_soft or abs(wrap_angle(sim.state[1])) > 0.8:
            fault = f"lost balance at t = {k * tick:.3f} s"
            break
    t, tr, es, u, ne = zip(*rows, strict=True)
    return EvalRun(np.array(t), np.array(tr), np.array(es), np.array(u), np.array(ne), fault)


def log_metrics(path: str, skip_s: float = 1.0) -> dict[str, float]:
    """Estimation error and balance figures of a ``rigfm run --log`` file with a /truth channel.

    From /truth (records with ``error``, i.e. samples the loop estimated): RMS velocity error per joint;
    from every /truth state: pendulum angle RMS (wrapped) and base position RMS; from /command (controller
    commands): RMS command and chatter RMS(u[k] - u[k-1]). The first ``skip_s`` seconds are left out."""
    from hardware.log_reader import read_topics

    _, recs = read_topics(path, {"/truth", "/command"})
    truth = [r for _, r in recs["/truth"]]
    if not truth:
        raise ValueError(f"{path}: no /truth records (not a virtual-rig run?)")
    t0 = truth[0]["host_time_ns"] + skip_s * 1e9
    truth = [r for r in truth if r["host_time_ns"] >= t0]
    err = np.array([r["error"] for r in truth if "error" in r]).reshape(-1, 4)
    x = np.array([r["state"] for r in truth]).reshape(-1, 4)
    u = np.array([r["voltage"] for _, r in recs["/command"]
                  if r.get("source") == "controller" and r["host_time_ns"] >= t0])
    du = np.diff(u)
    return {"vel_rms_q0": float(np.sqrt(np.mean(err[:, 2] ** 2))) if err.size else float("nan"),
            "vel_rms_q1": float(np.sqrt(np.mean(err[:, 3] ** 2))) if err.size else float("nan"),
            "angle_rms": float(np.sqrt(np.mean(wrap_angle(x[:, 1]) ** 2))) if x.size else float("nan"),
            "base_rms": float(np.sqrt(np.mean(x[:, 0] ** 2))) if x.size else float("nan"),
            "u_rms": float(np.sqrt(np.mean(u**2))) if u.size else float("nan"),
            "chatter_rms": float(np.sqrt(np.mean(du**2))) if du.size else float("nan"),
            "truth_samples": len(truth), "estimated_samples": int(len(err))}
