"""The MPC planner with the physics as its model: LQR vs MPC whose rollouts are the nominal rig physics
(``PhysicsRollout``) on the closed-loop benchmark's mismatched plants, lock-step, ``kf`` estimates.

Separates what limits MPC on the learned model (``bench/bench_closed_loop.py --learned mpc``): if the same
planner balances like LQR on the physics, the learned model's rollouts are the limit, not the planner.

    python bench/bench_mpc_reference.py [--rigs cartpole furuta] [--seeds 2] [--duration 6]

Prints, per rig / mismatch / controller, the mean over seeds of the RMS pendulum angle and base position
(true state, after the first second) and the state cost ``e'Qe`` (the rig's LQR weights) on the true state.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_closed_loop import MISMATCHES  # noqa: E402  (the closed-loop benchmark's plants)


def one_run(rig: str, plant: dict, controller: str, seed: int, duration: float) -> dict[str, float]:
    cfg, model, tuning = rigs.load_config(rig), rigs.make_model(rig), load_tuning(rig)
    lqr = LQRController(model, 1.0 / cfg.control_rate_hz, cfg=cfg, tuning=tuning)
    ctl = lqr
    if controller == "mpc-physics":
        sec = {k: tuple(v) if isinstance(v, list) else v for k, v in tuning.get("mpc", {}).items()}
        ctl = make_mpc(model, cfg, PhysicsRollout(model, cfg.model_dt), lqr, cfg.model_dt,
                       params=MPCParams(**sec), threaded=False)
    sim = rigs.RigSimulator(cfg, seed=seed, param_overrides=plant)
    x0 = np.asarray(model.upright(), float)
    x0[pendulum_index(model)] += 0.02
    sim.reset(x0)
    rig_conn = SimulatedRig(sim, cfg)
    loop = ControlLoop(rig_conn, ctl, model, cfg, rate_hz=cfg.control_rate_hz,
                       estimator=make_estimator("kf", model, cfg, tuning, pendulum=pendulum_index(model)))
    x = np.asarray(run_lockstep(loop, rig_conn, duration))
    e = x[int(cfg.control_rate_hz):] - np.asarray(model.upright(), float)  # after the first second
    e[:, pendulum_index(model)] = wrap_angle(e[:, pendulum_index(model)])
    q, _ = lqr_weights(cfg)
    return {"fault": loop.fault is not None,
            "rms_angle": float(np.sqrt(np.mean(e[:, pendulum_index(model)] ** 2))),
            "rms_base": float(np.sqrt(np.mean(e[:, base_index(model)] ** 2))),
            "state_cost": float(np.mean(np.einsum("ki,ij,kj->k", e, q, e)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rigs", nargs="+", default=["cartpole", "furuta"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--duration", type=float, default=6.0)
    a = p.parse_args(argv)
    print("| rig / mismatch | controller | RMS angle (mrad) | RMS base | state cost e'Qe | faults |")
    print("|---|---|---:|---:|---:|---:|")
    for rig in a.rigs:
        for mm, plant in MISMATCHES.items():
            for ctl in ("lqr", "mpc-physics"):
                rows = [one_run(rig, plant, ctl, s, a.duration) for s in range(a.seeds)]
                mean = {k: float(np.mean([r[k] for r in rows]))
                        for k in ("rms_angle", "rms_base", "state_cost")}
                print(f"| {rig} / {mm} | {ctl} | {1e3 * mean['rms_angle']:.2f} | {mean['rms_base']:.4f} | "
                      f"{mean['state_cost']:.5f} | {sum(r['fault'] for r in rows)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
