"""Cost of the (sin, cos) angle codec in the predictor: a sincos model vs a raw one of the same size.

    taskset -c 0 python bench/bench_angle_codec.py [--iters 2000]

Both models have the default architecture with random weights (the codec's cost does not depend on them); the
sincos one has one more graph state channel and ``rigfm.angle_channels = [1]``, so ``OnnxPredictor``
encodes inputs and decodes predictions (atan2 + unwrap). In-process, one onnxruntime thread, interleaved
blocks: 50 streaming steps (shadow re-prime), one ``predict`` B1 T16, one ``rollout`` K=64 plans x H=50.
Prints p50 per path and the sincos / raw ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def build(tmp: Path) -> tuple[str, str, str, str]:
    import torch

    from export.onnx_export import export_checkpoint, save_random_checkpoint

    raw = export_checkpoint(save_random_checkpoint(tmp / "raw.pt", seed=0), tmp / "raw.onnx",
                            context=64, streaming=tmp / "raw_step.onnx")
    ck = torch.load(save_random_checkpoint(tmp / "sc.pt", seed=0, n=5), weights_only=True)
    ck["meta"].update(angle_channels=[1], raw_state_names=["p", "theta", "p_dot", "theta_dot"])
    torch.save(ck, tmp / "sc.pt")
    sc = export_checkpoint(tmp / "sc.pt", tmp / "sc.onnx", context=64, streaming=tmp / "sc_step.onnx")
    return str(raw.full_path), str(raw.step_path), str(sc.full_path), str(sc.step_path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000, help="stream steps per model (other paths: / 50)")
    args = ap.parse_args(argv)
    from export.onnx_runtime import OnnxPredictor

    with tempfile.TemporaryDirectory(prefix="rigfm-angle-") as d:
        paths = build(Path(d))
        models = {"raw": OnnxPredictor(paths[0], paths[1]), "sincos": OnnxPredictor(paths[2], paths[3])}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.iters + 64, 4)).astype(np.float32)
    x[:, 1] += np.linspace(0, 60, len(x))  # the pendulum spins: ~10 turns
    u = rng.normal(size=(len(x), 1)).astype(np.float32)
    plan = rng.normal(size=(64, 50, 1)).astype(np.float32)
    streams = {k: p.stream(shadow=True) for k, p in models.items()}
    times: dict[tuple[str, str], list[float]] = {}

    def timed(key: tuple[str, str], fn) -> None:
        t0 = time.perf_counter()
        fn()
        times.setdefault(key, []).append((time.perf_counter() - t0) * 1e3)

    for block in range(0, args.iters, 50):  # per block: 50 stream steps, one window, one MPC rollout
        for name, p in models.items():
            st = streams[name]
            for t in range(block, block + 50):
                timed((name, "stream_step"), lambda st=st, t=t: st.step(x[t], u[t]))
            xw, uw = x[None, block : block + 16], u[None, block : block + 16]
            timed((name, "predict B1 T16"), lambda p=p, xw=xw, uw=uw: p.predict(xw, uw))
            xh, uh = x[block : block + 14], u[block : block + 13]
            timed((name, "rollout K64 H50"), lambda p=p, xh=xh, uh=uh: p.rollout(xh, uh, plan))
    print("| path | raw p50 | sincos p50 | sincos / raw | calls |\n|---|---|---|---|---|")
    for path in ("stream_step", "predict B1 T16", "rollout K64 H50"):
        a, b = np.median(times[("raw", path)]), np.median(times[("sincos", path)])
        print(f"| {path} | {a:.3f} ms | {b:.3f} ms | {b / a:.3f} | {len(times[('raw', path)])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
