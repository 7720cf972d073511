"""Control quality with the velocity estimator fed every STATE frame (StateFeed) vs the latest frame per tick.

Lock-step, so the machine's load does not matter: the real ControlLoop + LQR from upright (pendulum 0.05 rad
off) on ``rigs.RigSimulator``, the plant sampled at the rig's STATE rate (``sample_rate_hz``, 1 kHz) and the
loop ticking at ``--rate`` (500 Hz), i.e. two frames per tick. "latest" is what the loop does without a
feed (one estimator update per tick); "every" drains the feed as ``rigfm run`` does. Prints per seed the RMS
of the true pendulum angle error (mrad), of the true base/cart position, of the command, and of the
velocity estimate's error against the true velocities.

    python bench/bench_state_feed.py [--duration 10] [--seeds 3] [--rig furuta] [--count-noise STD]

``--count-noise`` overrides the simulator's encoder count jitter (counts; the rig config's by default).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import numpy as np

import rigs
from controllers.base import pendulum_index
from controllers.estimation import VelocityEstimator
from controllers.loop import ControlLoop
from controllers.session import build_controller
from controllers.simrig import SimulatedRig, run_lockstep
from controllers.tuning import load_tuning
from hardware.state_feed import StateFeed


class _SubsampledRig(SimulatedRig):
    """SimulatedRig that takes ``sub`` samples per advance and hands each to ``feed`` (like the driver)."""

    def __init__(self, sim: Any, cfg: Any, feed: StateFeed | None, sub: int) -> None:
        self.feed, self.sub = feed, sub
        super().__init__(sim, cfg)

    def _sample_now(self) -> None:
        super()._sample_now()
        if getattr(self, "feed", None) is not None:
            self.feed(self._sample)

    def advance(self, dt: float) -> None:
        for _ in range(self.sub):
            self.sim.advance(dt / self.sub)
            self.t += dt / self.sub
            self._sample_now()


def run_one(cfg: Any, every_frame: bool, seed: int, duration_s: float, rate_hz: float) -> dict[str, Any]:
    """One lock-step LQR run; figures of control quality and velocity-estimate error."""
    model = rigs.make_model(cfg)
    tuning = load_tuning(cfg.kind, None)
    pi = pendulum_index(model)
    x_star = np.asarray(model.upright(), dtype=float)
    sim = rigs.RigSimulator(cfg, seed=seed)
    x0 = x_star.copy()
    x0[pi] += 0.05
    sim.reset(x0)
    feed = StateFeed() if every_frame else None
    rig = _SubsampledRig(sim, cfg, feed, max(1, int(round(cfg.sample_rate_hz / rate_hz))))
    cutoff = float(tuning.get("estimation", {}).get("velocity_cutoff_hz", 25.0))
    est = VelocityEstimator(cfg.n // 2, cutoff, angle_channels=(pi,))
    ctrl = build_controller("lqr", model, cfg, tuning, 1.0 / rate_hz, None, (), 0.1)
    loop = ControlLoop(rig, ctrl, model, cfg, rate_hz=rate_hz, estimator=est, stale_ms=500.0, state_feed=feed)
    if feed is not None:
        feed.keep_latest()
    est_x: list[np.ndarray] = []
    us: list[float] = []

    def on_tick(k: int, lp: Any) -> None:
        est_x.append(lp.last.x.copy())
        us.append(lp.last.u)

    true = np.asarray(run_lockstep(loop, rig, duration_s, on_tick=on_tick))
    ang = (true[:, pi] - x_star[pi] + np.pi) % (2 * np.pi) - np.pi
    h = cfg.n // 2
    verr = np.asarray(est_x)[1:, h:] - true[:-1, h:]  # tick k's estimate is of the sample after step k-1
    return {"fault": None if loop.fault is None else loop.fault.code,
            "rms_angle_mrad": 1e3 * float(np.sqrt(np.mean(ang ** 2))),
            "rms_base": float(np.sqrt(np.mean(true[:, 1 - pi] ** 2))),
            "rms_u": float(np.sqrt(np.mean(np.square(us)))),
            "rms_vel_err": np.sqrt(np.mean(verr ** 2, axis=0))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rig", action="append", help="rig(s) to run (default: furuta and cartpole)")
    ap.add_argument("--count-noise", type=float, default=None, help="encoder count jitter std (counts)")
    args = ap.parse_args()
    for name in args.rig or ["furuta", "cartpole"]:
        cfg = rigs.load_config(name)
        if args.count_noise is not None:
            cfg = dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, count_noise_std=args.count_noise))
        print(f"\n{name}: LQR from upright, {args.duration:g} s lock-step at {args.rate:g} Hz, STATE at "
              f"{cfg.sample_rate_hz:g} Hz, count jitter {cfg.sim.count_noise_std:g} counts")
        print(f"{'estimator fed':<16}{'seed':>5}{'fault':>8}{'angle mrad':>12}{'base':>9}{'u V':>8}"
              f"{'vel err (per channel)':>26}")
        for every in (False, True):
            for seed in range(args.seeds):
                r = run_one(cfg, every, seed, args.duration, args.rate)
                verr = ", ".join(f"{v:.4f}" for v in r["rms_vel_err"])
                print(f"{'every frame' if every else 'latest/tick':<16}{seed:>5}{str(r['fault']):>8}"
                      f"{r['rms_angle_mrad']:>12.3f}{r['rms_base']:>9.4f}{r['rms_u']:>8.3f}{verr:>26}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
