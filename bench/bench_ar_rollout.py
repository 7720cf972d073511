"""Autoregressive rollout requests through the ONNX predictor: in-place KV buffers vs grown cache copies.

    python bench/bench_ar_rollout.py                                  # fm_core/weights/cartpole.pt
    python bench/bench_ar_rollout.py --checkpoint runs/ship/cartpole/ft_ar/finetuned.pt --iters 50 --int8

An ``ar`` model answers a rollout request with one step-graph call per horizon step. ``OnnxPredictor`` runs
those steps on :class:`export.kv_slots.RolloutBuffers` (the cache loaded once, one IOBinding for all steps);
the reference is the same predictor with its horizon loop stepping through ``OnnxPredictor.step`` instead (a
grown copy of the whole cache and a fresh binding per step: :func:`copying_steps`). A checkpoint trained in
masked mode is exported with its rollout mode set to ``ar`` (the timing does not depend on the weights). One
thread, interleaved timing (blocks of 5); prints p50 per request, the speed-up and the largest difference
between the two paths.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from export.latency import pct, timeit_interleaved

ROOT = Path(__file__).resolve().parents[1]
CASES = (  # name, rows, context, horizon, shared history
    ("monitor K1 x H10", 1, 32, 10, True),
    ("MPC K64 x H10", 64, 32, 10, True),
    ("score B84 x L30 x H50", 84, 30, 50, False),
)


def copying_steps(self, xs: np.ndarray, u: np.ndarray, out: np.ndarray, j0: int, kc: np.ndarray,
                  vc: np.ndarray) -> None:
    """``OnnxPredictor._step_rollout`` through ``OnnxPredictor.step`` (the step graph on grown copies)."""
    from export.onnx_runtime import _fill_window

    k, h = out.shape[:2]
    s, p = kc.shape[3], self.meta.patch
    if kc.shape[1] != k:
        kc, vc = np.repeat(kc, k, axis=1), np.repeat(vc, k, axis=1)
    xw, uw = np.empty((k, p, xs.shape[2]), np.float32), np.empty((k, p, u.shape[2]), np.float32)
    for j in range(j0, h):
        t = s + j - j0
        _fill_window(xw, uw, xs, u, t)
        res, kc, vc = self.step(xw, uw, np.ones((k, p), np.float32), kc, vc)
        out[:, j] = res.reshape(k, -1)
        if t + 1 < xs.shape[1]:
            xs[:, t + 1] = out[:, j]


def ar_export(checkpoint: Path, tmp: Path, context: int, int8: bool = False) -> tuple[Path, Path]:
    """Export the checkpoint (its rollout mode forced to ``ar``) with its ``buffer`` step graph (``int8``:
    quantised as ``rigfm export --quantize`` does)."""
    from export.onnx_export import export_checkpoint
    from fm_core.checkpoint import load_checkpoint, rollout_mode_of, save_checkpoint

    model, meta = load_checkpoint(checkpoint)
    if rollout_mode_of(meta) != "ar":
        train = dict(meta.get("train", {}))
        train["config"] = {**train.get("config", {}), "rollout_mode": "ar"}
        checkpoint = save_checkpoint(tmp / "ar.pt", model, {**meta, "train": train})
    res = export_checkpoint(checkpoint, tmp / "ar.onnx", streaming=tmp / "ar_step.onnx", context=context)
    if not int8:
        return Path(res.full_path), Path(res.step_path)
    from export.quantize import quantize_int8

    quantize_int8(res.step_path, tmp / "ar_step.int8.onnx")
    quantize_int8(res.full_path, tmp / "ar.int8.onnx", "ar_step.int8.onnx")
    return tmp / "ar.int8.onnx", tmp / "ar_step.int8.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "fm_core" / "weights" / "cartpole.pt")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--int8", action="store_true", help="time the int8 graphs (rigfm export --quantize)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from export.onnx_runtime import OnnxPredictor

    with tempfile.TemporaryDirectory() as d:
        full, step = ar_export(args.checkpoint, Path(d), context=32, int8=args.int8)
        fast = OnnxPredictor(full, step)
        copying = OnnxPredictor(full, step)
        copying._step_rollout = types.MethodType(copying_steps, copying)  # type: ignore[method-assign]
        me = fast.meta
        print(f"{args.checkpoint}: {me.n_layers} layers x {me.n_heads} heads, {me.quantized or 'float32'}, "
              f"step cache {fast.step_meta.step_cache}")
        rng = np.random.default_rng(0)
        head = f"{'in place p50 ms':>16}{'copying p50 ms':>16}{'speed-up':>10}{'max |diff|':>12}"
        print(f"{'request':<24}{head}")
        for name, k, lx, h, shared in CASES:
            if shared:
                xh = rng.normal(0, 0.2, (lx, me.n)).astype(np.float32)
                uh = rng.normal(0, 1, (lx - 1, me.m)).astype(np.float32)
                up = rng.normal(0, 1, (k, h, me.m)).astype(np.float32)
                calls = [lambda p=p, a=(xh, uh, up): p.rollout(*a) for p in (fast, copying)]
            else:
                xc = rng.normal(0, 0.2, (k, lx, me.n)).astype(np.float32)
                uc = rng.normal(0, 1, (k, lx - 1, me.m)).astype(np.float32)
                uf = rng.normal(0, 1, (k, h, me.m)).astype(np.float32)
                calls = [lambda p=p, a=(xc, uc, uf): p.rollout_windows(*a) for p in (fast, copying)]
            diff = float(np.abs(calls[0]() - calls[1]()).max())
            t_fast, t_copy = timeit_interleaved(calls, args.iters, warmup=3, block=5)
            a, b = pct(t_fast)[0], pct(t_copy)[0]
            print(f"{name:<24}{a:>16.2f}{b:>16.2f}{b / a:>9.1f}x{diff:>12.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
