"""The MPC planner with the physics as its model, and what a perfect model could gain: LQR vs MPC whose
rollouts are the rig physics (``PhysicsRollout``) on the closed-loop benchmark's mismatched plants, lock-step,
``kf`` estimates.

Controllers (``--controllers``):
* ``lqr``: nominal LQR (the benchmark's baseline); ``mpc-physics``: the shipped MPC on the nominal physics.
* ``lqr-true`` / ``mpc-true``: the same with the mismatched plant's own physics (design model, MPC rollouts
  and kf), the actuation delay left out: oracles, the best a perfectly learned model could give these
  controllers.
* ``mpc-v1`` / ``mpc-v2``: the shipped MPC on a learned model, ``--flywheels DIR`` (with ``{rig}`` and
  ``{mismatch}``, e.g. ``runs/bench_cl/fw-{rig}-{mismatch}``, written by ``bench/bench_closed_loop.py``)
  ``/v1.onnx`` (before) or what the flywheel served after its update (``v2.onnx``, or ``v1.onnx`` where its
  gate kept v1) in-process (``OnnxPredictor``): the
  learned model's rollouts without the predictor process's timing.

Separates what limits MPC on the learned model (``bench/bench_closed_loop.py --learned mpc``): if the same
planner balances like LQR on the physics, the learned model's rollouts are the limit, not the planner; if
the oracles are not much better than nominal LQR, no learned model can beat it by much with them.

    python bench/bench_mpc_reference.py [--rigs cartpole furuta] [--seeds 2] [--duration 6]
        [--controllers lqr mpc-physics lqr-true mpc-true mpc-v1 mpc-v2] [--flywheels DIR] [--estimator kf]

Prints, per rig / mismatch / controller, the mean over seeds of the RMS pendulum angle and base position
(true state, after the first second), the state cost ``e'Qe`` and the balance cost ``e'Qe + u'Ru`` (the
rig's LQR weights, the closed-loop benchmark's cost) on the true state, and the balance cost's ratio to
nominal LQR's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rigs  # noqa: E402
from controllers.base import base_index, pendulum_index, wrap_angle  # noqa: E402
from controllers.estimator_select import make_estimator  # noqa: E402
from controllers.loop import ControlLoop  # noqa: E402
from controllers.lqr import LQRController, lqr_weights  # noqa: E402
from controllers.mpc import MPCParams, PhysicsRollout, make_mpc  # noqa: E402
from controllers.simrig import SimulatedRig, run_lockstep  # noqa: E402
from controllers.tuning import load_tuning  # noqa: E402
from fm_core.cli_types import parse_kv  # noqa: E402
from rigs.sim import split_sim_overrides  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_closed_loop import MISMATCHES, deployed_v2  # noqa: E402  (the closed-loop benchmark's plants)

CONTROLLERS = ("lqr", "mpc-physics", "lqr-true", "mpc-true", "mpc-v1", "mpc-v2")


class PlanLatency:
    """The MPC's planning thread in simulated time: a plan lands ``latency_s`` after its job starts; a job
    submitted while one runs waits, and a newer one replaces it (``LatestJobWorker``'s rule)."""

    def __init__(self, mpc: object, latency_s: float, jitter_s: float = 0.0, seed: int = 0) -> None:
        self.mpc, self.latency_s, self.jitter_s = mpc, float(latency_s), float(jitter_s)
        self.rng = np.random.default_rng(seed)
        mpc.threaded, mpc.start = True, lambda: None
        mpc.submit = self._submit
        self._pending: tuple | None = None
        self._running: tuple[float, tuple] | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.mpc, name)

    def _submit(self, *job: object) -> bool:
        replaced, self._pending = self._pending is not None, job
        return replaced

    def _advance(self, now: float) -> None:
        if self._running is not None and self._running[0] <= now + 1e-9:
            self.mpc._run_job(*self._running[1])
            self._running = None
        if self._running is None and self._pending is not None:
            lat = self.latency_s + self.jitter_s * self.rng.uniform(-1.0, 1.0)
            self._running, self._pending = (now + max(lat, 0.0), self._pending), None

    def compute(self, x: np.ndarray, t: float | None = None) -> object:
        self._advance(t)
        out = self.mpc.compute(x, t)
        self._advance(t)
        return out


def one_run(rig: str, plant: dict, controller: str, seed: int, duration: float, estimator: str = "kf",
            learned: Path | None = None, latency_ms: float = 0.0,
            mpc_set: dict | None = None, jitter_ms: float = 0.0, max_plan_age_ms: float | None = None
            ) -> dict[str, float]:
    cfg, tuning = rigs.load_config(rig), load_tuning(rig)
    nominal = rigs.make_model(rig)
    # the oracles design on the plant's own physics (split_sim_overrides: the delay is not physics)
    model = rigs.make_model(rig, split_sim_overrides(plant)[0]) if controller.endswith("-true") else nominal
    lqr = LQRController(model, 1.0 / cfg.control_rate_hz, cfg=cfg, tuning=tuning)
    ctl = lqr
    if controller.startswith("mpc"):
        sec = {k: tuple(v) if isinstance(v, list) else v
               for k, v in {**tuning.get("mpc", {}), **(mpc_set or {})}.items()}
        rollout = PhysicsRollout(model, cfg.model_dt)
        if controller in ("mpc-v1", "mpc-v2"):
            from export.onnx_runtime import OnnxPredictor

            onnx = learned / "v1.onnx" if controller == "mpc-v1" else deployed_v2(learned)
            rollout = OnnxPredictor(onnx, self_test=False, find_step=True).rollout
        age = None if max_plan_age_ms is None else max_plan_age_ms / 1e3
        ctl = make_mpc(model, cfg, rollout, lqr, cfg.model_dt, params=MPCParams(**sec), threaded=False,
                       max_plan_age_s=age)
        if latency_ms > 0:
            ctl = PlanLatency(ctl, latency_ms / 1e3, jitter_ms / 1e3, seed)
    sim = rigs.RigSimulator(cfg, seed=seed, param_overrides=plant)
    x0 = np.asarray(model.upright(), float)
    x0[pendulum_index(model)] += 0.02
    sim.reset(x0)
    rig_conn = SimulatedRig(sim, cfg)
    est = make_estimator(estimator, model, cfg, tuning, pendulum=pendulum_index(model))
    loop = ControlLoop(rig_conn, ctl, model, cfg, rate_hz=cfg.control_rate_hz, estimator=est)
    loop_inputs: list[float] = []
    x = np.asarray(run_lockstep(loop, rig_conn, duration,
                                on_tick=lambda k, lp: loop_inputs.append(np.atleast_1d(lp.last.u))))
    e = x[int(cfg.control_rate_hz):] - np.asarray(model.upright(), float)  # after the first second
    e[:, pendulum_index(model)] = wrap_angle(e[:, pendulum_index(model)])
    u = np.asarray(loop_inputs, float)[int(cfg.control_rate_hz):]
    q, r = lqr_weights(cfg, tuning=tuning)
    state_cost = float(np.mean(np.einsum("ki,ij,kj->k", e, q, e)))
    return {"fault": loop.fault is not None,
            "rms_angle": float(np.sqrt(np.mean(e[:, pendulum_index(model)] ** 2))),
            "rms_base": float(np.sqrt(np.mean(e[:, base_index(model)] ** 2))),
            "state_cost": state_cost,
            "cost": state_cost + float(np.mean(np.einsum("ki,ij,kj->k", u, r, u)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rigs", nargs="+", default=["cartpole", "furuta"])
    p.add_argument("--mismatch", nargs="+", choices=list(MISMATCHES), default=list(MISMATCHES))
    p.add_argument("--controllers", nargs="+", choices=CONTROLLERS, default=list(CONTROLLERS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--estimator", choices=("kf", "diff"), default="kf")
    p.add_argument("--plan-latency-ms", type=float, default=0.0,
                   help="MPC: each plan lands this long after its job starts (simulated time; 0: at once)")
    p.add_argument("--plan-jitter-ms", type=float, default=0.0,
                   help="MPC: the landing delay varies uniformly by +- this much")
    p.add_argument("--max-plan-age-ms", type=float, default=None,
                   help="MPC: plans older than this give way to LQR (default 3 model steps; rigfm run: 100)")
    p.add_argument("--set", dest="mpc_set", action="append", default=[], metavar="KEY=VALUE",
                   help="MPCParams field for every MPC row, e.g. delay_steps=0")
    p.add_argument("--flywheels", default="runs/bench_cl/fw-{rig}-{mismatch}",
                   help="flywheel output dirs with v1.onnx / v2.onnx (mpc-v1 / mpc-v2)")
    a = p.parse_args(argv)
    print("| rig / mismatch | controller | RMS angle (mrad) | RMS base | state cost e'Qe | balance cost | "
          "vs nominal LQR | faults |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for rig in a.rigs:
        for mm in a.mismatch:
            plant, base_cost = MISMATCHES[mm], None
            for ctl in a.controllers:
                learned = Path(a.flywheels.format(rig=rig, mismatch=mm))
                rows = [one_run(rig, plant, ctl, s, a.duration, a.estimator, learned,
                                a.plan_latency_ms, parse_kv(a.mpc_set), a.plan_jitter_ms,
                                a.max_plan_age_ms) for s in range(a.seeds)]
                mean = {k: float(np.mean([r[k] for r in rows]))
                        for k in ("rms_angle", "rms_base", "state_cost", "cost")}
                base_cost = mean["cost"] if ctl == "lqr" else base_cost
                ratio = f"{mean['cost'] / base_cost:.2f}x" if base_cost else "-"
                print(f"| {rig} / {mm} | {ctl} | {1e3 * mean['rms_angle']:.2f} | {mean['rms_base']:.4f} | "
                      f"{mean['state_cost']:.5f} | {mean['cost']:.5f} | {ratio} | "
                      f"{sum(r['fault'] for r in rows)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
