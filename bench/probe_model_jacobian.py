"""How an exported model's one-step prediction depends on each row of its context window.

For windows of logged data (``rigfm dataset build`` output), each state channel of each of the last ``--rows``
context rows is nudged by 2 % of the channel's std; the table gives the median finite-difference derivative
of the predicted next state (selected output channels) with respect to it. A state-transition model (what a
UKF needs as its process model) depends on the current row only: d angle'/d angle[k] = 1, d angle'/d rate[k]
= dt, d rate'/d rate[k] ~ 1, and ~0 on older rows. A model fitted on windows whose rows all lie on one smooth
trajectory is only pinned down along that trajectory; nudging one row leaves it, and the model's weight is
spread over the history (docs/controllers.md, fm-ukf). A second table therefore shifts the whole
window along one consistent trajectory (the only direction the data pins down).

    python bench/probe_model_jacobian.py fm_core/weights/cartpole.int8.onnx runs/eval_work/cartpole.npz
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="exported full-window ONNX model (raw states in and out)")
    ap.add_argument("data", help="trajectory .npz of the same rig")
    ap.add_argument("--rows", type=int, default=8, help="context rows (the window length)")
    ap.add_argument("--windows", type=int, default=32, help="windows drawn from the file")
    ap.add_argument("--start", type=int, default=50, help="first step of each window in its trajectory")
    ap.add_argument("--outputs", default="1,3", help="output state channels to report (comma separated)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from controllers.base import window_path_offsets
    from export.onnx_runtime import OnnxPredictor
    from fm_core.trajfile import load_trajectories

    pred = OnnxPredictor(args.model, threads=1)
    ts = load_trajectories(args.data)
    n = ts.x.shape[2]
    if args.start + args.rows > ts.x.shape[1]:
        raise SystemExit(f"--start {args.start} + --rows {args.rows} exceed the {ts.x.shape[1]}-step "
                         "trajectories")
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(ts.x.shape[0], min(args.windows, ts.x.shape[0]), replace=False)
    sl = slice(args.start, args.start + args.rows)
    x = ts.x[idx, sl].astype(np.float32)
    u = ts.u[idx, sl].astype(np.float32)
    sd = ts.x.reshape(-1, n).std(0)
    base = pred.predict(x, u)[:, -1]
    names = list(ts.state_names)
    outs = [int(c) for c in args.outputs.split(",")]
    rows = ", ".join(f"k-{i}" if i else "k" for i in range(args.rows))
    print(f"{args.model} on {args.data} (dt {ts.dt} s): median d next / d state over {len(idx)} windows\n")
    print(f"| derivative | {' | '.join(rows.split(', '))} | sum |")
    print("|---|" + "---:|" * (args.rows + 1))
    usd = ts.u.reshape(-1, ts.u.shape[2]).std(0)

    def row_derivatives(on_input: bool, ch: int, out: int) -> list[float]:
        """d next[out] / d (state or input channel ch) at each context row, newest first."""
        eps = 0.02 * float((usd if on_input else sd)[ch])
        vals = []
        for back in range(args.rows):
            xp, up = x.copy(), u.copy()
            (up if on_input else xp)[:, args.rows - 1 - back, ch] += eps
            vals.append(float(np.median((pred.predict(xp, up)[:, -1, out] - base[:, out]) / eps)))
        return vals

    channels = [(False, ch, names[ch], 3) for ch in range(n)]
    channels += [(True, j, uname, 4) for j, uname in enumerate(ts.input_names)]
    for on_input, ch, label, digits in channels:
        for out in outs:
            vals = row_derivatives(on_input, ch, out)
            cells = " | ".join(f"{v:+.{digits}f}" for v in vals)
            print(f"| d {names[out]}' / d {label} | {cells} | {sum(vals):+.{digits}f} |")
    if n % 2:
        return
    # the same nudges carried along the whole window as one consistent trajectory (what the data shows the
    # model): a position moves every row, a velocity dv moves every row's velocity by dv and its position by
    # -lag * dt * dv (controllers.base.window_path_offsets)
    print(f"\nconsistent shift of the whole window: d next / d state\n\n| shifted | "
          f"{' | '.join(names[o] + chr(39) for o in range(n))} |\n|---|" + "---:|" * n)
    for ch in range(n):
        eps = 0.02 * float(sd[ch])
        xp = x + window_path_offsets(eps * np.eye(n)[ch], args.rows, ts.dt)
        d = (pred.predict(xp.astype(np.float32), u)[:, -1] - base) / eps
        print(f"| {names[ch]} | " + " | ".join(f"{np.median(d[:, o]):+.3f}" for o in range(n)) + " |")


if __name__ == "__main__":
    main()
