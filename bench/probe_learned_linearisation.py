"""The learned model's linearisation at upright against the physics', and what the LQR design makes of it.

Three ways to take the one-step Jacobians ``(Ad, Bd)`` of an exported model at the model step
(``controllers.learned_lqr``; inputs perturbed at the newest step only):

* ``steady/present``: a still window at upright, the newest step perturbed (the `--lqr-design learned`
  default, ``[learned_lqr] history = "present"``);
* ``steady/trajectory``: the same window, each state perturbation carried along it as one consistent path
  (``history = "trajectory"``);
* ``data/trajectory``: windows of logged data that stay within 0.05 rad of upright, consistent-path
  perturbations on top of them, the median over windows.

For each: the diagonal of ``Ad``, d angle'/d rate, ``Bd``, and the design's verdict (``design_learned``,
trust band included).

    python bench/probe_learned_linearisation.py cartpole fm_core/weights/cartpole.int8.onnx \
        runs/eval_work/cartpole.npz
"""

from __future__ import annotations

import argparse

import numpy as np


def _data_jacobians(predict, x_win: np.ndarray, u_win: np.ndarray, hx: np.ndarray, hu: np.ndarray,
                    dt: float) -> tuple[np.ndarray, np.ndarray]:
    from controllers.base import window_path_offsets

    n, m = x_win.shape[2], u_win.shape[2]

    def moved(i: int, sign: float) -> np.ndarray:
        x, u = x_win.copy(), u_win.copy()
        if i < n:
            x += window_path_offsets(sign * hx[i] * np.eye(n)[i], x_win.shape[1], dt)
        else:
            u[:, -1, i - n] += sign * hu[i - n]
        return np.asarray(predict(x.astype(np.float32), u.astype(np.float32)), float)[:, -1]

    steps = np.concatenate([hx, hu])
    cols = [np.median((moved(i, 1.0) - moved(i, -1.0)) / (2 * steps[i]), axis=0) for i in range(n + m)]
    jac = np.stack(cols, 1)
    return jac[:, :n], jac[:, n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rig", choices=("cartpole", "furuta"))
    ap.add_argument("model", help="exported full-window ONNX model of the rig")
    ap.add_argument("data", help="trajectory .npz of the rig (for the data/trajectory row)")
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()

    import rigs
    from controllers.learned_lqr import (
        LearnedDesignParams,
        LearnedLQRController,
        _f32_exact,
        design_learned,
        gain_scale,
        model_jacobians,
    )
    from controllers.lqr import discretize_zoh
    from controllers.tuning import load_tuning
    from export.onnx_runtime import OnnxPredictor
    from fm_core.trajfile import load_trajectories

    cfg = rigs.load_config(args.rig)
    model = rigs.make_model(cfg)
    ctl = LearnedLQRController(model, 1 / cfg.control_rate_hz, cfg=cfg, tuning=load_tuning(cfg.kind, None))
    pred = OnnxPredictor(args.model, threads=1)
    params = LearnedDesignParams()
    dt = float(cfg.model_dt)
    up = np.asarray(model.upright(), float)
    hx = _f32_exact(params.rel_step * gain_scale(cfg))
    hu = _f32_exact(np.full(model.m, params.u_step_frac * float(cfg.limits.voltage_max)))
    a, b = model.linearize(up, np.zeros(model.m))
    ad_phys, bd_phys = discretize_zoh(np.asarray(a, float), np.asarray(b, float), dt)

    ts = load_trajectories(args.data)
    ctx = args.context
    wins = []
    for i in range(ts.x.shape[0]):
        off = np.abs((ts.x[i, :, 1] - up[1] + np.pi) % (2 * np.pi) - np.pi) < 0.05
        wins += [(i, s) for s in range(0, ts.x.shape[1] - ctx, ctx) if off[s:s + ctx].all()]
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(wins), min(args.windows, len(wins)), replace=False) if wins else []
    pick = [wins[j] for j in chosen]

    rows = [("physics", ad_phys, bd_phys)]
    for hist in ("present", "trajectory"):
        jac = model_jacobians(pred.predict, up, np.zeros(model.m), hx, hu, ctx, hist, dt)
        rows.append((f"steady/{hist}", *jac))
    if pick:
        xw = np.stack([ts.x[i, s:s + ctx] for i, s in pick]).astype(float)
        uw = np.stack([ts.u[i, s:s + ctx] for i, s in pick]).astype(float)
        jac = _data_jacobians(pred.predict, xw, uw, hx, hu, dt)
        rows.append((f"data/trajectory ({len(pick)} windows)", *jac))
    names = list(ts.state_names)
    print(f"{args.model}: one-step Jacobians at upright, model step {dt} s\n")
    print(f"| linearisation | diag Ad ({', '.join(names)}) | d {names[1]}'/d {names[3]} | Bd | LQR design |")
    print("|---|---|---:|---|---|")
    for label, ad, bd in rows:
        if label == "physics":
            verdict = "the nominal design"
        else:
            d = design_learned(ctl.nominal, ad, bd, dt, gain_scale(cfg))
            verdict = "learned" if d.source == "learned" else f"rejected: {d.reason}"
        diag = ", ".join(f"{v:.3f}" for v in np.diag(ad))
        bds = ", ".join(f"{v:+.4f}" for v in np.ravel(bd))
        print(f"| {label} | {diag} | {ad[1, 3]:+.4f} | {bds} | {verdict} |")


if __name__ == "__main__":
    main()
