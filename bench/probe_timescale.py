"""Does the pretraining time step matter zero-shot? The pretrained FM on rig data at the rig's dt
(0.01 s) vs resampled to its pretraining dt (0.05 s, ``--factor 5``), scored at the same 10 time points
(0.05 ... 0.5 s).

    python bench/probe_timescale.py --data runs/eval_data/cartpole.npz    # data: docs/experiment.md

Val split, 80-step windows: 30 context steps (0.3 s) then an open-loop rollout with the planned inputs (at
dt 0.05: 6 context samples, inputs averaged over each 0.05 s); MSE in units of the train-split state std.
Prints both MSEs, hold-last-state for reference, and the ratio resampled / native.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from fm_core.baselines import zero_shot
from fm_core.finetune import rollout
from fm_core.trajfile import as_trajdata, load_trajectories, split_trajectories


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset .npz from `rigfm dataset build` (dt 0.01 s)")
    ap.add_argument("--checkpoint", default="fm_core/weights/default.pt")
    ap.add_argument("--factor", type=int, default=5, help="resampling factor (0.01 s x 5 = 0.05 s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ts = load_trajectories(args.data)
    tr, va = as_trajdata(split_trajectories(ts, "train")), as_trajdata(split_trajectories(ts, "val"))
    model = zero_shot(args.checkpoint, split_trajectories(ts, "train")).model.for_system(
        tr.x.shape[-1], tr.u.shape[-1]
    )
    xs = tr.x.reshape(-1, tr.x.shape[-1]).std(0)
    k, c, h, length = args.factor, 30, 50, 80
    if c % k or h % k:
        raise SystemExit(f"--factor {k} must divide context {c} and horizon {h}")
    starts = range(0, va.x.shape[1] - length + 1, length)
    vx = np.concatenate([va.x[:, s : s + length] for s in starts]).astype(np.float32)
    vu = np.concatenate([va.u[:, s : s + length] for s in starts]).astype(np.float32)
    points = np.arange(k - 1, h, k)  # horizon indices at k, 2k, ... steps
    native = ((rollout(model, vx[:, :c], vu[:, : c - 1], vu[:, c - 1 : -1]).numpy() - vx[:, c:]) / xs) ** 2
    xd = vx[:, ::k]
    ud = vu.reshape(vu.shape[0], length // k, k, -1).mean(2)  # zero-order-hold average per coarse step
    cd, hd = c // k, h // k
    coarse = (
        (
            rollout(model, xd[:, :cd], ud[:, : cd - 1], ud[:, cd - 1 : cd - 1 + hd]).numpy()
            - xd[:, cd : cd + hd]
        )
        / xs
    ) ** 2
    hold = ((vx[:, c - 1 : c] - vx[:, c:]) / xs) ** 2
    a, b = float(native[:, points].mean()), float(coarse.mean())
    print(f"{args.data}: {len(vx)} val windows; MSE at the {len(points)} shared time points")
    print(f"  dt {ts.dt:g} s (rig)              {a:.3f}")
    print(f"  dt {ts.dt * k:g} s (resampled)       {b:.3f}")
    print(f"  hold last state             {float(hold[:, points].mean()):.3f}")
    print(f"  ratio resampled / native    {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
