"""Simulated data collection: excitation runs on ``rigs.RigSimulator`` logged as MCAP, like a live run.

Each run drives the simulator through the REAL control loop (``controllers.loop.ControlLoop`` stepped in
lock-step by ``controllers.simrig.run_lockstep``, not real time), so the logs are exactly what the loop
writes on hardware: ``/state`` with the encoder positions (quantised, noisy counts from the simulator) and
the velocities of the loop's own ``VelocityEstimator`` (cut-off from ``controllers/tuning.toml``),
``/command``
with the clamped voltage, ``/mode`` with the excitation type, ``/fault`` when the soft limit trips. One MCAP
file per run (``hardware.RunLogger``), consumable unchanged by ``rigfm dataset build``.

Excitation (sampled per run and per segment of 1.5-5 s from the run's seed): energy swing-up + LQR catch
(``controllers.swingup``), LQR balancing from near upright (``controllers.lqr``) with dither, random steps,
PRBS, chirps and multisines. Open-loop signals get a weak PD term pulling the base (cart / arm) back to the
centre, and the loop's soft-limit clamp applies as usual. Simulator limit flags are reported in the
sample's ``flags`` (``LIMIT_HIT`` for soft/hard limit contact, ``FAULT`` for overspeed), so the dataset
builder excludes those stretches; a soft-limit trip ends the run early (the rest is simply not logged).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controllers.base import ControlOutput, base_index, pendulum_index, voltage_limit
from controllers.simrig import SimulatedRig, run_lockstep
from fm_core.cli_types import SEED, finite_float, int_range, option, options_from_args

EXCITATIONS = ("swingup", "lqr", "steps", "prbs", "chirp", "multisine", "free")
_WEIGHTS = {"swingup": 0.2, "steps": 0.18, "prbs": 0.14, "chirp": 0.16, "multisine": 0.2, "free": 0.12}


class CollectError(ValueError):
    """Bad collection option (the message names it)."""


# ------------------------------------------------------------------------------------------- signals
def _signal(kind: str, rng: np.random.Generator, duration: float, amp: float) -> Any:
    """An open-loop voltage signal ``f(t_rel) -> float`` of the given kind (t_rel from the segment start)."""
    if kind == "steps":
        hold = rng.uniform(0.05, 0.5)
        vals = rng.uniform(-amp, amp, size=int(duration / hold) + 2)
        return lambda t: float(vals[min(int(t / hold), len(vals) - 1)])
    if kind == "prbs":
        hold = rng.uniform(0.02, 0.12)
        bits = rng.choice([-amp, amp], size=int(duration / hold) + 2)
        return lambda t: float(bits[min(int(t / hold), len(bits) - 1)])
    if kind == "chirp":
        f0, f1 = rng.uniform(0.1, 1.0), rng.uniform(2.0, 8.0)
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        k = (f1 - f0) / max(duration, 1e-6)
        ph = rng.uniform(0, 2 * math.pi)
        return lambda t: float(amp * math.sin(ph + 2 * math.pi * (f0 * t + 0.5 * k * t * t)))
    if kind == "multisine":
        nf = int(rng.integers(3, 9))
        freqs = np.exp(rng.uniform(math.log(0.15), math.log(8.0), size=nf))
        phases = rng.uniform(0, 2 * math.pi, size=nf)
        weights = rng.uniform(0.3, 1.0, size=nf)
        weights *= amp / weights.sum() * 1.6
        return lambda t: float(np.clip(np.sum(weights * np.sin(2 * math.pi * freqs * t + phases)), -amp, amp))
    if kind == "free":
        return lambda t: 0.0
    raise CollectError(f"unknown open-loop excitation {kind!r}")


@dataclass
class Segment:
    """One stretch of a run: an excitation kind from ``t_start`` for ``duration`` seconds."""

    kind: str
    t_start: float
    duration: float
    amp: float
    dither: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "t_start": round(self.t_start, 3),
            "duration": round(self.duration, 3),
            "amp": round(self.amp, 3),
            "dither": round(self.dither, 3),
        }


def plan_segments(
    rng: np.random.Generator, duration: float, u_max: float, start_upright: bool
) -> list[Segment]:
    """Random excitation schedule covering ``duration`` seconds (first segment LQR when starting upright)."""
    kinds = list(_WEIGHTS)
    p = np.array([_WEIGHTS[k] for k in kinds])
    segs: list[Segment] = []
    t = 0.0
    while t < duration:
        d = float(rng.uniform(1.5, 5.0))
        kind = "lqr" if (start_upright and not segs) else str(rng.choice(kinds, p=p / p.sum()))
        amp = float(rng.uniform(0.15, 0.7) * u_max)
        dither = float(rng.uniform(0.0, 0.15) * u_max)
        segs.append(Segment(kind, t, d, amp, dither, int(rng.integers(1 << 31))))
        t += d
    return segs


class ExcitationController:
    """``compute(x, t)`` following a segment schedule; modes are the excitation kinds (all logged)."""

    name = "collect"

    def __init__(
        self,
        model: Any,
        cfg: Any,
        dt: float,
        segments: list[Segment],
        tuning: dict[str, Any],
        centre_hz: float = 0.4,
    ) -> None:
        from controllers.lqr import LQRController
        from controllers.swingup import SwingUpController

        self.model, self.cfg, self.segments = model, cfg, segments
        self.u_max = voltage_limit(cfg)
        self.lqr = LQRController(model, dt, cfg=cfg, tuning=tuning)
        self.swing = SwingUpController(
            model, cfg, dt, lqr=LQRController(model, dt, cfg=cfg, tuning=tuning), tuning=tuning
        )
        self.bi = base_index(model)
        self.pi = pendulum_index(model)
        x0 = np.asarray(model.hanging(), dtype=float)
        acc = np.asarray(model.deriv(x0, np.ones(model.m))) - np.asarray(model.deriv(x0, np.zeros(model.m)))
        self.b_gain = float(acc[model.n // 2 + self.bi])  # base acceleration per volt (at rest)
        wn = 2 * math.pi * centre_hz
        self.kp, self.kd = wn * wn, 2 * 0.8 * wn
        wg = 2 * math.pi * 1.5
        self.kp_guard, self.kd_guard = wg * wg, 2 * 1.0 * wg
        lim = cfg.limits
        self.b_safe = float(lim.position_soft - lim.position_margin)
        self.guard = False
        self.guard_count = 0
        self._idx = -1
        self._sig: Any = None
        self._rng = np.random.default_rng(0)

    def reset(self) -> None:
        self._idx = -1
        self.guard = False

    def _segment(self, t: float) -> Segment:
        i = max(0, self._idx)
        while i + 1 < len(self.segments) and t >= self.segments[i + 1].t_start:
            i += 1
        if i != self._idx:
            self._idx = i
            seg = self.segments[i]
            self._rng = np.random.default_rng(seg.seed)
            if seg.kind == "swingup":
                self.swing.reset()
            elif seg.kind == "lqr":
                self.lqr.reset()
            else:
                self._sig = _signal(seg.kind, self._rng, seg.duration, seg.amp)
        return self.segments[self._idx]

    def compute(self, x: np.ndarray, t: float = 0.0) -> ControlOutput:
        seg = self._segment(t)
        x = np.asarray(x, dtype=float)
        b, bd = float(x[self.bi]), float(x[self.model.n // 2 + self.bi])
        if not self.guard and abs(b + 0.15 * bd) > 0.7 * self.b_safe:
            self.guard = True
            self.guard_count += 1
        elif self.guard and abs(b) < 0.3 * self.b_safe and abs(bd) < 2.0 * self.b_safe:
            self.guard = False
            if seg.kind == "swingup":
                self.swing.reset()
        if self.guard:  # recover: strong PD back to the centre (pendulum left free)
            u = float(
                np.clip(-(self.kp_guard * b + self.kd_guard * bd) / self.b_gain, -self.u_max, self.u_max)
            )
            return ControlOutput(u=np.array([u]), mode="collect-recover", info={"segment": self._idx})
        if seg.kind in ("swingup", "lqr"):
            out = (self.swing if seg.kind == "swingup" else self.lqr).compute(x, t)
            u = float(out.u[0]) + seg.dither * float(self._rng.standard_normal()) * 0.3
            mode = f"collect-{out.mode}"
        else:
            centre = -(self.kp * x[self.bi] + self.kd * x[self.model.n // 2 + self.bi]) / self.b_gain
            u = self._sig(t - seg.t_start) + centre
            mode = f"collect-{seg.kind}"
        u = float(np.clip(u, -self.u_max, self.u_max))
        return ControlOutput(u=np.array([u]), mode=mode, info={"segment": self._idx})


# ------------------------------------------------------------------------------------------- the rig
class FlaggedSimRig(SimulatedRig):
    """``SimulatedRig`` whose samples carry the simulator's limit / overspeed events as status flags."""

    def _sample_now(self) -> None:
        super()._sample_now()
        from hardware.protocol import StatusFlags as F

        fl = self.sim.flags
        bits = int(F.CONNECTED | F.CONFIGURED | F.MOTOR_ENABLED)
        if fl.get("limit_hard") or fl.get("limit_soft"):
            bits |= int(F.LIMIT_HIT)
        if fl.get("overspeed"):
            bits |= int(F.FAULT)
        self.sim.clear_flags()
        s = self._sample
        s.flags = bits
        s.current = float(self.sim.read_current())


# ------------------------------------------------------------------------------------------- runs
@dataclass
class CollectOptions:
    """What ``collect`` does; each ``option(...)`` field is also its ``rigfm collect`` flag."""

    rig: str = option(required=True, flag="rig", help="cartpole | furuta | path/to/rig.toml")
    out: Path = option(required=True, flag=("-o", "--out"), type=Path,
                       help="output directory for the .mcap files")
    runs: int = option(40, type=int_range(1, 1_000_000), help="number of runs (default 40)")
    duration_s: float = option(20.0, flag="--duration", type=finite_float(0, 1e6, lo_open=True, unit="s"),
                               help="seconds per run (default 20)")
    seed: int = option(0, type=SEED)
    params: dict[str, float] = field(default_factory=dict)  # simulator physics overrides (--set KEY=V)
    upright_fraction: float = option(0.25, type=finite_float(0, 1),
                                     help="share of runs starting near upright under LQR (default 0.25)")
    rate_hz: float | None = option(None, flag="--rate", type=finite_float(0, 10_000, lo_open=True, unit="Hz"),
                                   help="loop rate in Hz (default: rig control_rate_hz)")
    progress: bool = option(True, flag="--quiet", action="store_false", help="no progress bar")
    estimator: str = option("diff", choices=("diff", "kf"),
                            help="the loop's state estimator, whose velocities are logged: diff (filtered "
                                 "differences, default) or kf (EKF on the rig physics)")


def initial_state(model: Any, rng: np.random.Generator, upright: bool) -> np.ndarray:
    """Random start near hanging (or near upright) rest, base near the centre."""
    x = np.asarray(model.upright() if upright else model.hanging(), dtype=float).copy()
    pi, bi, h = pendulum_index(model), base_index(model), model.n // 2
    x[pi] += rng.normal(0, 0.05 if upright else 0.3)
    x[bi] += rng.normal(0, 0.02)
    x[h + pi] += rng.normal(0, 0.05 if upright else 0.5)
    return x


def collect_run(
    opts: CollectOptions, index: int, cfg: Any, model: Any, tuning: dict[str, Any]
) -> dict[str, Any]:
    """Simulate, control and log run ``index``; returns a summary (file, seconds logged, segments, trip)."""
    import rigs
    from controllers.estimator_select import make_estimator
    from controllers.loop import ControlLoop
    from hardware.logger import RunLogger

    rng = np.random.default_rng([opts.seed, index])
    rate = float(opts.rate_hz or cfg.control_rate_hz)
    upright = bool(rng.random() < opts.upright_fraction)
    segs = plan_segments(rng, opts.duration_s, voltage_limit(cfg), upright)
    sim = rigs.RigSimulator(cfg, seed=int(rng.integers(1 << 31)), param_overrides=opts.params or None)
    sim.reset(initial_state(model, rng, upright))
    rig = FlaggedSimRig(sim, cfg)
    ctl = ExcitationController(model, cfg, 1.0 / rate, segs, tuning)
    cut = float(tuning.get("estimation", {}).get("velocity_cutoff_hz", 25.0))
    est = make_estimator(opts.estimator, model, cfg, tuning, pendulum=pendulum_index(model))
    run_name = f"{cfg.kind}_collect_s{opts.seed}_{index:04d}"
    meta = {
        "rig": cfg.kind,
        "controller": "collect",
        "state_names": list(cfg.state_names),
        "controller_params": {
            "segments": [s.as_dict() for s in segs],
            "start_upright": upright,
            "param_overrides": opts.params,
            "seed": opts.seed,
            "index": index,
            "rate_hz": rate,
            "velocity_cutoff_hz": cut,
            "estimator": opts.estimator,
        },
        "rig_config": {"name": cfg.name, "kind": cfg.kind, "model_dt": cfg.model_dt, "control_rate_hz": rate},
        "firmware_version": "sim",
        "protocol_version": 1,
    }
    log = RunLogger(opts.out, metadata=meta, run_name=run_name)
    try:
        loop = ControlLoop(rig, ctl, model, cfg, rate_hz=rate, estimator=est, logger=log, status_hz=0.0)
        states = run_lockstep(loop, rig, opts.duration_s)
    finally:
        stats = log.close()
    dropped = int(stats.get("dropped", 0)) if isinstance(stats, dict) else 0
    if dropped:
        raise RuntimeError(f"run {run_name}: the logger dropped {dropped} messages")
    files = sorted(str(p) for p in Path(opts.out).glob(f"{run_name}_*.mcap"))
    return {
        "run": run_name,
        "files": files,
        "seconds": len(states) / rate,
        "fault": None if loop.fault is None else loop.fault.code,
        "kinds": sorted({s.kind for s in segs}),
    }


def collect(opts: CollectOptions) -> list[dict[str, Any]]:
    """Collect ``opts.runs`` runs into ``opts.out`` (one MCAP file per run); returns per-run summaries."""
    import rigs
    from controllers.tuning import load_tuning

    if opts.runs < 1:
        raise CollectError(f"--runs must be >= 1, got {opts.runs}")
    if not opts.duration_s > 0:
        raise CollectError(f"--duration must be > 0 s, got {opts.duration_s}")
    cfg = rigs.load_config(opts.rig)
    rigs.make_model(cfg, opts.params or None)  # validates override keys early (RigConfigError names them)
    model = rigs.make_model(cfg)  # controllers use the nominal model, as on a real rig with unknown params
    tuning = load_tuning(cfg.kind)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    it: Any = range(opts.runs)
    if opts.progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"collect {cfg.kind}", unit="run", dynamic_ncols=True)
    return [collect_run(opts, i, cfg, model, tuning) for i in it]


def main_collect(args: argparse.Namespace) -> int:
    """CLI handler of ``rigfm collect``."""
    t0 = time.time()
    try:
        opts = options_from_args(CollectOptions, args, params=dict(args.overrides))
        res = collect(opts)
    except ValueError as exc:  # CollectError, RigConfigError: the message names the option / file
        print(f"rigfm collect: {exc}", file=sys.stderr)
        return 2
    faults = sum(r["fault"] is not None for r in res)
    summary = {
        "rig": args.rig,
        "runs": len(res),
        "seconds_logged": round(sum(r["seconds"] for r in res), 2),
        "runs_ended_by_fault": faults,
        "out": str(opts.out),
        "wall_s": round(time.time() - t0, 2),
    }
    print(json.dumps(summary))
    return 0
