"""State estimators: per-update cost, and diff vs kf vs fm-ukf on the virtual rig measured from /truth.

    python bench/bench_estimators.py cost                       # us per update of each estimator
    python bench/bench_estimators.py runs --duration 30 [--rigs cartpole furuta] [--mismatch]

``cost`` feeds 2000 synthetic frames (2 ms apart) to each estimator in-process; fm-ukf's model call runs on
its worker thread, its time is reported separately (p50 / p99 of the call). ``runs`` starts the real
``rigfm run RIG --virtual --controller lqr --init upright --estimator E --log DIR`` (``--controller swingup``:
from hanging) per estimator (and with
``--mismatch`` again with ``--set plant.pole_mass_scale=1.4 --set plant.friction_scale=2``) and
prints, from each log's /truth and /command (``controllers.estimator_eval.log_metrics``): velocity RMS
error per joint, pendulum angle RMS, base RMS, RMS command, command chatter RMS(u[k]-u[k-1]), overruns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISMATCH = ("pole_mass_scale=1.4", "friction_scale=2")


def cost(n: int = 2000) -> None:
    import rigs
    from controllers.estimator_select import make_estimator
    from controllers.tuning import load_tuning

    for rig in ("cartpole", "furuta"):
        cfg = rigs.load_config(rig)
        model = rigs.make_model(cfg)
        tun = load_tuning(cfg.kind, None)
        for name in ("diff", "kf", "fm-ukf"):
            onnx = str(ROOT / f"fm_core/weights/{rig}.int8.onnx")
            est = make_estimator(name, model, cfg, tun, fm_model=onnx)
            rng = np.random.default_rng(0)
            times = []
            for k in range(n):
                t = 0.002 * k
                pos = np.array([0.01 * np.sin(t), 0.02 * np.sin(3 * t)]) + rng.normal(0, 1e-4, 2)
                t0 = time.perf_counter()
                est.update(pos, t, 0.5 * np.sin(5 * t))
                times.append(time.perf_counter() - t0)
                if name == "fm-ukf":
                    time.sleep(0.0005)  # the loop's period leaves the worker time (here: ~2.5 ms per frame)
            us = np.asarray(times[200:]) * 1e6
            extra = ""
            if hasattr(est, "stats"):
                st = est.stats()
                extra = (f"  model call p50 {st['fm_model_ms_p50']:.2f} ms p99 "
                         f"{st['fm_model_ms_p99']:.2f} ms, grid updates {st['fm_grid_updates']}, "
                         f"late {st['fm_late']}")
                est.close()
            print(f"{rig:8s} {name:7s} update p50 {np.percentile(us, 50):7.1f} us  p99 "
                  f"{np.percentile(us, 99):7.1f} us{extra}", flush=True)


def one_run(rig: str, est: str, duration: float, params: tuple[str, ...], out: Path, controller: str = "lqr",
            skip_s: float = 1.0) -> dict:
    from controllers.estimator_eval import log_metrics

    d = out / f"{rig}-{est}-{'mis' if params else 'nom'}"
    cmd = [sys.executable, "-m", "controllers.cli", "run", rig, "--virtual", "--controller", controller,
           "--init", "upright" if controller == "lqr" else "hanging", "--duration", str(duration),
           "--estimator", est, "--quiet", "--stale-ms", "1000",
           "--log", str(d), "--summary-json", str(d / "s.json")]
    if est == "fm-ukf":
        cmd += ["--model", "shipped"]
    for p in params:
        cmd += ["--set", f"plant.{p}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=duration + 300)
    row = {"rig": rig, "estimator": est, "plant": "mismatch" if params else "nominal", "rc": proc.returncode}
    try:
        s = json.loads((d / "s.json").read_text())
        row.update(fault=s["fault"], overrun_pct=s["stats"]["overrun_pct"])
        row.update({k: v for k, v in s.get("estimation", {}).items() if k.startswith("fm_")})
        row.update(log_metrics(str(next(d.glob("*.mcap"))), skip_s=skip_s))
    except (OSError, ValueError, StopIteration, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}; {proc.stderr[-300:]}"
    return row


def runs(args: argparse.Namespace) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_est_"))
    plants = [()] + ([MISMATCH] if args.mismatch else [])
    rows = []
    for params in plants:
        for rig in args.rigs:
            for est in args.estimators:
                row = one_run(rig, est, args.duration, params, out, args.controller, args.skip)
                rows.append(row)
                print(json.dumps(row, default=float), flush=True)
    print("\n| rig | plant | estimator | vel RMS err q0 / q1 | angle RMS (mrad) | base RMS (mm) | "
          "u RMS (V) | chatter RMS (V) | overruns % | fault |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['rig']} | {r['plant']} | {r['estimator']} | {r['error'][:80]} |")
            continue
        print(f"| {r['rig']} | {r['plant']} | {r['estimator']} | {r['vel_rms_q0']:.4f} / "
              f"{r['vel_rms_q1']:.4f} | {r['angle_rms'] * 1e3:.2f} | {r['base_rms'] * 1e3:.1f} | "
              f"{r['u_rms']:.2f} | "
              f"{r['chatter_rms']:.3f} | {r['overrun_pct']:.2f} | {r['fault'] or 'none'} |")


def lockstep(args: argparse.Namespace) -> None:
    """The same comparison in lock-step (controllers.estimator_eval.simulate_balance: firmware timing, no
    machine load): LQR balance from 0.05 rad, 0.5 V white kicks on the command so there is something to
    estimate; fm-ukf synchronous (its model call does not count against the simulated time)."""
    import rigs
    from controllers.estimator_eval import simulate_balance
    from controllers.estimator_select import make_estimator
    from controllers.lqr import LQRController
    from controllers.tuning import load_tuning

    models = {}
    for spec in args.model:
        rig, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--model {spec!r}: expected RIG=PATH of an existing .onnx file")
        models[rig] = path
    print("| rig | plant | estimator | vel RMS err q0 / q1 | angle RMS (mrad) | base RMS (mm) | u RMS (V) | "
          "chatter RMS (V) | NEES mean | fault |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for plant, ov in (("nominal", None), ("mismatch", {"pole_mass_scale": 1.4, "friction_scale": 2.0})):
        for rig in args.rigs:
            cfg = rigs.load_config(rig)
            model = rigs.make_model(cfg)
            tun = load_tuning(cfg.kind, None)
            ctl = LQRController(model, 0.002, cfg=cfg, tuning=tun)
            for name in args.estimators:
                onnx = models.get(rig, str(ROOT / f"fm_core/weights/{rig}.int8.onnx"))
                if name.startswith("kf:d="):  # kf with the voltage-offset state of this noise density
                    dtun = {**tun, "estimation": {**tun.get("estimation", {}),
                                                  "kf_disturbance_noise": float(name[5:])}}
                    est = make_estimator("kf", model, cfg, dtun)
                elif name.startswith("fm-ukf:"):  # fm-ukf with the sigma windows' history rule fixed|shift
                    htun = {**tun, "estimation": {**tun.get("estimation", {}), "fm_ukf_history": name[7:]}}
                    est = make_estimator("fm-ukf", model, cfg, htun, fm_model=onnx)
                else:
                    est = make_estimator(name, model, cfg, tun, fm_model=onnx)
                if name.startswith("fm-ukf"):
                    est.close()
                    est.worker = None  # synchronous
                r = simulate_balance(cfg, est, ctl, args.duration, seed=0, overrides=ov, rng_kick=args.kick)
                m = r.metrics()
                print(f"| {rig} | {plant} | {name} | {m['vel_rms_q0']:.4f} / {m['vel_rms_q1']:.4f} | "
                      f"{m['angle_rms'] * 1e3:.2f} | {m['base_rms'] * 1e3:.1f} | {m['u_rms']:.2f} | "
                      f"{m['chatter_rms']:.3f} | {m['nees_mean']:.2f} | {r.fault or 'none'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("cost")
    r = sub.add_parser("runs")
    r.add_argument("--duration", type=float, default=30.0)
    r.add_argument("--rigs", nargs="+", default=["cartpole", "furuta"])
    r.add_argument("--estimators", nargs="+", default=["diff", "kf", "fm-ukf"])
    r.add_argument("--mismatch", action="store_true")
    r.add_argument("--controller", default="lqr", choices=("lqr", "swingup"),
                   help="lqr from --init upright, or swingup from hanging (then use --skip past the catch)")
    r.add_argument("--skip", type=float, default=1.0, help="seconds left out at the start of each log")
    r.add_argument("--out", default=None)
    ls = sub.add_parser("lockstep")
    ls.add_argument("--duration", type=float, default=30.0)
    ls.add_argument("--rigs", nargs="+", default=["cartpole", "furuta"])
    ls.add_argument("--estimators", nargs="+", default=["diff", "kf", "fm-ukf"],
                    help="also kf:d=Q: kf with a voltage-offset state, random walk of density Q (V^2/s); "
                         "fm-ukf:fixed|shift: fm-ukf with that sigma-window history rule")
    ls.add_argument("--kick", type=float, default=0.5)
    ls.add_argument("--model", action="append", default=[], metavar="RIG=PATH",
                    help="fm-ukf's model for RIG (default: the shipped fm_core/weights/RIG.int8.onnx)")
    args = ap.parse_args()
    if args.what == "cost":
        cost()
    elif args.what == "lockstep":
        lockstep(args)
    else:
        runs(args)


if __name__ == "__main__":
    main()
