"""How far does a state move in one step, in units of its own spread? Rig data against the synthetic prior.

    python bench/probe_increments.py --data runs/eval_work/cartpole.npz
    python bench/probe_increments.py --data runs/eval_work/cartpole.npz --time-scale 0.1 1.0

For every trajectory: the median over its channels of std(x[t+1] - x[t]) / std(x) (the pendulum angle as
(sin, cos), as the models see it); printed as the 10th / 50th / 90th percentile over trajectories, for the rig
file and for 400 trajectories of 128 steps of the pretraining prior (``fm_core/configs/pretrain_ar.toml``'s
[rkhs] section, optionally with ``RKHSConfig.time_scale_range``). Per-channel ratios of the rig file (pooled
over all steps) are printed too: a prior whose ratios bracket the rig's covers its time scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fm_core.angle_features import rig_angle_codec  # noqa: E402
from fm_core.rkhs import RKHSConfig, generate_batch  # noqa: E402
from fm_core.trajfile import load_trajectories  # noqa: E402


def step_ratio(x: np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """Per trajectory, the median over its (first n) channels of std(dx) / std(x): (K,T,c) -> (K,)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i, :, : (x.shape[2] if n is None else int(n[i]))].astype(np.float64)
        out.append(np.median(np.diff(xi, axis=0).std(0) / np.maximum(xi.std(0), 1e-9)))
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset .npz from `rigfm dataset build`")
    ap.add_argument("--config", default=str(ROOT / "fm_core" / "configs" / "pretrain_ar.toml"))
    ap.add_argument("--time-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    args = ap.parse_args(argv)
    ts = load_trajectories(args.data)
    codec = rig_angle_codec(ts.rig, ts)
    x = codec.encode(ts.x) if codec is not None else ts.x
    pct = (10, 50, 90)
    print(f"{args.data} ({ts.rig}, dt {ts.dt}): per-trajectory ratio p10/p50/p90 "
          f"{np.round(np.percentile(step_ratio(x), pct), 4).tolist()}")
    flat, d = x.reshape(-1, x.shape[-1]), np.diff(x, axis=1).reshape(-1, x.shape[-1])
    print("  per channel, pooled: " + ", ".join(f"{v:.4f}" for v in d.std(0) / flat.std(0)))
    rk = tomllib.loads(Path(args.config).read_text()).get("rkhs", {})
    model = tomllib.loads(Path(args.config).read_text())["model"]
    cfg = RKHSConfig(n_max=model["n_max"], m_max=model["m_max"], T=128, **rk,
                     time_scale_range=tuple(args.time_scale) if args.time_scale else None)
    b = generate_batch(np.random.default_rng(0), 400, 128, cfg)
    print(f"prior {Path(args.config).name} time_scale_range={cfg.time_scale_range}: per-trajectory ratio "
          f"p10/p50/p90 {np.round(np.percentile(step_ratio(b.x, b.n), pct), 4).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
