"""Dynamic int8 quantisation (onnxruntime.quantization.quantize_dynamic): accuracy and speed vs float32.

    python bench/bench_quantize.py [--checkpoint CKPT] [--iters 300]

Accuracy: relative error of the int8 prediction vs the float32 ONNX model on simulator trajectories (cart-pole
from rigs if available, else smooth signals), full window and 16-step masked rollouts.
Speed: interleaved single-thread onnxruntime timings, batch 1 (T=16, T=64) and batch 256 (T=16).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_predictor import get_checkpoint, system_overrides  # noqa: E402


def trajectories(batch: int, t: int, n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    try:
        import rigs

        cfg = rigs.load_config("cartpole")
        model = rigs.make_model(cfg)
        if (model.n, model.m) != (n, m):
            raise AttributeError("rig dims differ from the model's")
        x = np.zeros((batch, t, n))
        u = np.zeros((batch, t, m))
        for b in range(batch):
            xs = np.asarray(model.hanging(), float) + rng.normal(0, 0.1, n)
            f, a = rng.uniform(0.5, 3), rng.uniform(0.5, 3)
            for i in range(t):
                ui = np.array([a * np.sin(2 * np.pi * f * i * cfg.model_dt)])
                x[b, i], u[b, i] = xs, ui
                xs = model.step(xs, ui, cfg.model_dt)
        return x.astype(np.float32), u.astype(np.float32)
    except (ImportError, AttributeError):
        tt = np.arange(t)[None, :, None] * 0.05
        ph = rng.uniform(0, 6.28, (batch, 1, max(n, m)))
        return np.sin(tt + ph[..., :n]).astype(np.float32), np.cos(0.7 * tt + ph[..., :m]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    from export.onnx_export import export_checkpoint, quantize_int8
    from export.onnx_runtime import OnnxPredictor

    with tempfile.TemporaryDirectory(prefix="rigfm-q-") as d:
        tmp = Path(d)
        ckpt, label = get_checkpoint(args.checkpoint, tmp)
        res = export_checkpoint(ckpt, tmp / "model.onnx", **system_overrides(ckpt))
        quantize_int8(res.full_path, tmp / "model.int8.onnx")
        fp = OnnxPredictor(res.full_path)
        q8 = OnnxPredictor(tmp / "model.int8.onnx")
        me = fp.meta
        sizes = (res.full_path.stat().st_size, (tmp / "model.int8.onnx").stat().st_size)
        print(f"model: {label}\nfile size: float32 {sizes[0] / 1e6:.2f} MB, int8 {sizes[1] / 1e6:.2f} MB")
        x, u = trajectories(32, me.context, me.n, me.m)
        scale = np.abs(x).max(axis=(0, 1))
        a, b = q8.predict(x, u), fp.predict(x, u)
        err = np.abs(a - b).max(axis=(0, 1)) / np.maximum(scale, 1e-6)
        print(f"one-step prediction, max |int8 - fp32| / max|x| per state: {np.round(err, 5).tolist()}")
        plan = u[:, -16:][:8]
        ra = q8.rollout(x[0, :-16], u[0, :-17], plan)
        rb = fp.rollout(x[0, :-16], u[0, :-17], plan)
        err = np.abs(ra - rb).max(axis=(0, 1)) / np.maximum(scale, 1e-6)
        print(f"16-step rollout,     max |int8 - fp32| / max|x| per state: {np.round(err, 5).tolist()}")
        rng = np.random.default_rng(1)
        print("\nlatency (interleaved, 1 thread)      fp32 p50    int8 p50   speed-up")
        for bsz, t, n_it in (
            (1, 16, args.iters),
            (1, me.context, args.iters),
            (256, 16, max(5, args.iters // 30)),
        ):
            xb = rng.normal(size=(bsz, t, me.n)).astype(np.float32)
            ub = rng.normal(size=(bsz, t, me.m)).astype(np.float32)
            ts: dict[str, list[float]] = {"fp32": [], "int8": []}
            for i in range(n_it + 5):
                for name, p in (("fp32", fp), ("int8", q8)):
                    t0 = time.perf_counter()
                    p.predict(xb, ub)
                    if i >= 5:
                        ts[name].append((time.perf_counter() - t0) * 1e3)
            f50, q50 = np.median(ts["fp32"]), np.median(ts["int8"])
            print(
                f"  batch {bsz:3d} T={t:<3d}                  {f50:8.3f} ms {q50:8.3f} ms   {f50 / q50:5.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
