"""Closed-loop benchmark on mismatched virtual rigs: nominal LQR vs the learned-model controllers (LQR on the
learned linearisation, MPC on the learned model), before and after one flywheel update.

For each rig (cartpole, furuta) and plant mismatch (``mass_friction``: pole mass x1.4, friction x2;
``gain_delay``: motor gain x0.8, 4 ms extra actuation delay):

1. ``rigfm flywheel --rig R --set plant.KEY=V ...`` (the real command: a logged swing-up run on the mismatched
   rig -> dataset -> fine-tune -> export -> gate -> hot reload -> run again) gives ``v1.onnx`` (the rig's
   model as shipped) and the model it served after one update: ``v2.onnx``, or ``v1.onnx`` again where its
   gate kept v1 (``controllers/flywheel_gate.py``); the ``*-v2`` rows run what it served.
2. Runs (``controllers.session.run_session``, virtual rig on a pty, 500 Hz, swing-up from hanging, seeds
   0..N-1, T s each) of: ``nominal`` (LQR on the physics, per estimator of ``--estimators``), ``learned-v1``
   and ``learned-v2`` (``--lqr-design learned`` on v1 / v2, predictor process serving it) and, with
   ``--learned mpc`` (balance only, ``--init upright``), ``mpc-v1`` / ``mpc-v2`` (``--controller mpc``).
3. Per run: swing-up success (caught once and held to the end) and time (first catch), and over the balance
   phase (from 1 s after the first catch, balance-mode ticks): RMS pendulum angle error and base position,
   RMS command, RMS command increment ``u[k] - u[k-1]`` (chatter), balance cost = mean of ``e'Qe + u'Ru``
   (the rig's LQR weights, ``e`` the loop's state estimate minus upright); faults; overruns; for MPC the
   share of ticks with a fresh plan (1 - fallback ticks / ticks).

Prints a markdown table (means over seeds) and writes JSON.  ``--quick``: 2 seeds x 12 s, 20 s flywheel runs
with at most 150 fine-tune steps.  ``python bench/bench_closed_loop.py [--quick] [--rigs cartpole furuta]
[--mismatch mass_friction gain_delay] [--seeds 5] [--duration 30] [--estimators diff kf fm-ukf]
[--learned lqr mpc] [--mpc-planner auto|predictor|local] [--init upright] [--realtime] [--flywheel-dither V]
[--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MISMATCHES: dict[str, dict[str, float]] = {
    "mass_friction": {"pole_mass_scale": 1.4, "friction_scale": 2.0},
    "gain_delay": {"motor_gain_scale": 0.8, "actuation_delay_extra_ms": 4.0},
}
SETTLE_S = 1.0  # balance metrics start this long after the first catch
BALANCE_MODES = ("balance", "mpc", "fallback")  # LQR balance; MPC plans and its LQR fallback ticks


def run_flywheel(rig: str, mismatch: str, out: Path, duration: float, steps: int,
                 seed: int, init: str = "hanging", dither: float = 0.0) -> dict[str, Any]:
    """``rigfm flywheel`` on the mismatched rig; returns its flywheel.json (reused when already there)."""
    res = out / "flywheel.json"
    if res.is_file() and (out / "v2.onnx").is_file():
        return json.loads(res.read_text())
    cmd = [sys.executable, "-m", "controllers.cli", "flywheel", "--rig", rig, "--duration", str(duration),
           "--steps", str(steps), "--seed", str(seed), "--init-state", init, "--out", str(out),
           "--dither", str(dither)]
    for k, v in MISMATCHES[mismatch].items():
        cmd += ["--set", f"plant.{k}={v}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"flywheel failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    print(f"  flywheel {rig}/{mismatch}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(res.read_text())


def deployed_v2(fw_dir: Path) -> Path:
    """The model the flywheel served after its update: v2.onnx, or v1.onnx where its gate kept v1
    (``deployed_onnx`` in flywheel.json; older results without it: v2.onnx)."""
    res = fw_dir / "flywheel.json"
    deployed = json.loads(res.read_text()).get("deployed_onnx") if res.is_file() else None
    return Path(deployed) if deployed else fw_dir / "v2.onnx"


def metrics(result: Any, cfg: Any, q: np.ndarray, r: np.ndarray, pend: int, base: int) -> dict[str, Any]:
    """Per-run figures from the session result (see module docstring)."""
    from controllers.base import wrap_angle

    traj, modes = result.trajectory, np.asarray(result.modes)
    t, u, x = traj[:, 0], traj[:, 1:2], traj[:, 2:]
    bal = np.isin(modes, BALANCE_MODES)
    catches = int(np.sum(bal[1:] & ~bal[:-1]) + (1 if bal.size and bal[0] else 0))
    out: dict[str, Any] = {"fault": result.fault, "overruns": int(result.stats["overruns"]),
                           "overrun_pct": float(result.stats["overrun_pct"]),
                           "ticks": int(result.stats["ticks"]),
                           "catches": catches, "lqr_design": result.lqr_design.get("source", "nominal"),
                           "gain_change": result.lqr_design.get("gain_change"),
                           "design_reason": result.lqr_design.get("reason", "")}
    if not bal.any():
        return {**out, "success": False, "swingup_s": None}
    i0 = int(np.argmax(bal))
    out["swingup_s"] = float(t[i0])
    out["success"] = bool(catches == 1 and bal[-1] and result.fault is None)
    sel = bal & (t >= t[i0] + SETTLE_S)
    if sel.sum() < 10:
        return out
    e = x[sel].copy()
    e[:, pend] = wrap_angle(e[:, pend])
    us = u[sel]
    du = np.diff(u[:, 0])[sel[1:] & sel[:-1]]
    out.update(
        balance_s=float(sel.sum() / max(result.stats["rate_hz"], 1.0)),
        rms_angle=float(np.sqrt(np.mean(e[:, pend] ** 2))), rms_base=float(np.sqrt(np.mean(e[:, base] ** 2))),
        rms_u=float(np.sqrt(np.mean(us ** 2))), rms_du=float(np.sqrt(np.mean(du ** 2))) if du.size else None,
        cost=float(np.mean(np.einsum("ki,ij,kj->k", e, q, e) + np.einsum("ki,ij,kj->k", us, r, us))))
    return out


def one_run(rig: str, mismatch: str, seed: int, duration: float, model: str | None, design: str,
            estimator: str, stale_ms: float, realtime: bool, init: str = "hanging",
            controller: str = "swingup", mpc_planner: str = "auto") -> dict[str, Any]:
    import rigs
    from controllers.base import base_index, pendulum_index
    from controllers.lqr import lqr_weights
    from controllers.session import RunOptions, run_session

    cfg = rigs.load_config(rig)
    m = rigs.make_model(cfg)
    q, r = lqr_weights(cfg)
    opts = RunOptions(rig=rig, controller=controller, virtual=True, duration_s=duration, seed=seed, init=init,
                      virtual_params=dict(MISMATCHES[mismatch]), model=model, lqr_design=design, status=False,
                      stale_ms=stale_ms, realtime=realtime, estimator=estimator, mpc_planner=mpc_planner)
    res = run_session(opts)
    out = metrics(res, cfg, q, r, pendulum_index(m), base_index(m))
    if controller == "mpc":
        pred = res.predictor or {}
        plans, fb = pred.get("mpc_plans"), pred.get("mpc_fallback_ticks")
        out.update(mpc_plans=plans, mpc_fallback_ticks=fb, mpc_land_age_ms=pred.get("mpc_land_age_ms"),
                   mpc_takeover_ticks=pred.get("mpc_takeover_ticks"),
                   plan_tick_frac=None if fb is None else 1.0 - fb / max(1, out["ticks"]))
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    v = [row[key] for row in rows if row.get(key) is not None]
    return float(np.mean(v)) if v else None


def aggregate(rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    return {"runs": n, "success": sum(bool(r.get("success")) for r in rows),
            "swingup_s": _mean(rows, "swingup_s"), "rms_angle": _mean(rows, "rms_angle"),
            "rms_base": _mean(rows, "rms_base"), "rms_u": _mean(rows, "rms_u"),
            "rms_du": _mean(rows, "rms_du"),
            "cost": _mean(rows, "cost"), "faults": sum(r["fault"] is not None for r in rows),
            "fault_codes": sorted({str(r["fault"]).split(":")[0] for r in rows if r["fault"]}),
            "overruns": sum(r["overruns"] for r in rows),
            "overrun_pct": 100.0 * sum(r["overruns"] for r in rows) / max(1, sum(r["ticks"] for r in rows)),
            "designs": sorted({r["lqr_design"] for r in rows}),
            "plan_tick_frac": _mean(rows, "plan_tick_frac"),
            "gain_change": _mean(rows, "gain_change"),
            "design_reasons": sorted({r["design_reason"] for r in rows if r["design_reason"]})}


def fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = ("| rig / mismatch | controller | gain | swing-up ok | swing-up s | RMS angle (rad) | RMS base "
            "| RMS u (V) | RMS du (V) | balance cost | vs nominal | faults | overruns |")
    lines = [head, "|" + "---|" * 13]
    for key, ctrls in summary.items():
        nom = next((a["cost"] for c, a in ctrls.items() if c.startswith("nominal")), None)
        for c, a in ctrls.items():
            rel = (f"{100 * (a['cost'] / nom - 1):+.0f} %" if a["cost"] is not None and nom else "-")
            gain = "/".join(a["designs"]) + (f" ({a['gain_change']:.2f})" if a["gain_change"] is not None
                                             and "learned" in a["designs"] else "")
            if a.get("plan_tick_frac") is not None:
                gain = f"MPC, plan on {100 * a['plan_tick_frac']:.1f} % of ticks"
            lines.append(f"| {key} | {c} | {gain} | {a['success']}/{a['runs']} | "
                         f"{fmt(a['swingup_s'], '.2f')} | {fmt(a['rms_angle'])} | {fmt(a['rms_base'])} | "
                         f"{fmt(a['rms_u'], '.3f')} | "
                         f"{fmt(a['rms_du'], '.3f')} | {fmt(a['cost'], '.4f')} | {rel} | {a['faults']} | "
                         f"{a['overruns']} ({a['overrun_pct']:.3f} %) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rigs", nargs="+", default=["cartpole", "furuta"])
    p.add_argument("--mismatch", nargs="+", default=list(MISMATCHES), choices=list(MISMATCHES))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per run (default 30)")
    p.add_argument("--estimators", nargs="+", default=["diff"], choices=("diff", "kf", "fm-ukf"),
                   help="velocity estimators of the nominal rows (fm-ukf on v1); the learned rows use the "
                        "first, and 'vs nominal' compares with the first")
    p.add_argument("--learned", nargs="+", default=["lqr"], choices=("lqr", "mpc"),
                   help="learned-model controllers: lqr (--lqr-design learned) and/or mpc (balance only: "
                        "needs --init upright); each on v1 and v2")
    p.add_argument("--flywheel-duration", type=float, default=30.0)
    p.add_argument("--flywheel-steps", type=int, default=300)
    p.add_argument("--flywheel-dither", type=float, default=0.0, metavar="V",
                   help="rigfm flywheel --dither V: input dither on the flywheel's balance runs (default 0)")
    p.add_argument("--stale-ms", type=float, default=200.0,
                   help="as the flywheel: tolerant on a loaded machine")
    p.add_argument("--realtime", action="store_true", help="SCHED_FIFO for the loop and the virtual rig "
                                                            "(rigfm run --realtime), as docs/controllers.md")
    p.add_argument("--init", choices=("hanging", "upright"), default="hanging",
                   help="virtual rig start: hanging (swing-up, then balance; default) or upright (balance "
                        "only: the balance figures even where the swing-up fails)")
    p.add_argument("--mpc-planner", choices=("auto", "predictor", "local"), default="auto",
                   help="MPC rollouts in the control process (local; auto, the default, as rigfm run: "
                        "local, the runs have the model file) or in the predictor process")
    p.add_argument("--quick", action="store_true", help="2 seeds x 12 s, 20 s flywheel runs, 150 steps")
    p.add_argument("--out", default="runs/bench_closed_loop")
    p.add_argument("--json", default=None, help="results JSON (default OUT/closed_loop.json)")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.duration, a.flywheel_duration = 2, 12.0, 20.0
        a.flywheel_steps = min(a.flywheel_steps, 150)
    if "mpc" in a.learned and a.init != "upright":
        p.error("--learned mpc balances only (no swing-up): add --init upright")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    runs: dict[str, dict[str, list[dict]]] = {}
    flywheels: dict[str, dict[str, Any]] = {}
    for rig in a.rigs:
        for mm in a.mismatch:
            key = f"{rig} / {mm}"
            fw_dir = (out / f"fw-{rig}-{mm}").resolve()
            fw = run_flywheel(rig, mm, fw_dir, a.flywheel_duration, a.flywheel_steps, 0, a.init,
                              a.flywheel_dither)
            flywheels[key] = {k: fw.get(k) for k in ("error_before", "error_after", "factor", "error1_before",
                                                     "error1_after", "stages_s", "wall_s", "deployed",
                                                     "gate")}
            v1_for_ukf = {e: str(fw_dir / "v1.onnx") if e == "fm-ukf" else None for e in a.estimators}
            ctrls: list[tuple[str, str | None, str, str, str]] = [
                (f"nominal ({e})", v1_for_ukf[e], "nominal", e, "swingup") for e in a.estimators]
            for kind in a.learned:
                for v in ("v1", "v2"):
                    name = f"learned-{v}" if kind == "lqr" else f"mpc-{v}"
                    onnx = fw_dir / "v1.onnx" if v == "v1" else deployed_v2(fw_dir)
                    ctrls.append((name, str(onnx), "learned" if kind == "lqr" else "nominal",
                                  a.estimators[0], "swingup" if kind == "lqr" else "mpc"))
            runs[key] = {}
            for name, model, design, est, controller in ctrls:
                rows = []
                for seed in range(a.seeds):
                    row = one_run(rig, mm, seed, a.duration, model, design, est, a.stale_ms, a.realtime,
                                  a.init, controller, a.mpc_planner)
                    rows.append({"seed": seed, **row})
                    print(f"  {key} {name} seed {seed}: cost {fmt(row.get('cost'))} fault {row['fault']} "
                          f"design {row['lqr_design']}", file=sys.stderr, flush=True)
                runs[key][name] = rows
            summary[key] = {name: aggregate(rows) for name, rows in runs[key].items()}
    md = table(summary)
    print(md)
    bar = {}
    for key, ctrls in summary.items():
        nom = next(a_["cost"] for c, a_ in ctrls.items() if c.startswith("nominal"))
        bar[key] = {}
        for name in (c for c in ("learned-v2", "mpc-v2") if c in ctrls):
            v2 = ctrls[name]
            red = None if not (nom and v2["cost"] is not None) else 1.0 - v2["cost"] / nom
            plans_ok = name != "mpc-v2" or (v2["plan_tick_frac"] or 0.0) >= 0.95
            met = bool(red is not None and red >= 0.30 and v2["faults"] == 0 and v2["overrun_pct"] < 0.1
                       and plans_ok)
            bar[key][name] = {"cost_reduction": red, "plan_tick_frac": v2["plan_tick_frac"], "met": met}
            plans = (f", plan on {100 * (v2['plan_tick_frac'] or 0):.1f} % of ticks"
                     if name == "mpc-v2" else "")
            vs = "n/a" if red is None else f"{abs(100 * red):.1f} % {'below' if red >= 0 else 'above'}"
            print(f"{key}: {name} balance cost {vs} nominal's; faults {v2['faults']}, overruns "
                  f"{v2['overrun_pct']:.3f} %{plans} -> bar "
                  f"{'met' if met else 'missed'}")
    res = {"args": vars(a), "wall_s": round(time.monotonic() - t0, 1), "summary": summary, "bar": bar,
           "flywheel": flywheels, "runs": runs, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path = Path(a.json) if a.json else out / "closed_loop.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path} ({res['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
