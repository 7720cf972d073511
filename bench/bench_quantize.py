"""Dynamic int8 quantisation (export.quantize, the project's recipe): accuracy and speed vs float32.

    python bench/bench_quantize.py [--checkpoint CKPT] [--data DATA.npz] [--iters 300]
    taskset -c 0 python bench/bench_quantize.py --checkpoint fm_core/weights/cartpole.pt --data data.npz

Each int8 model is compared with the float32 ONNX model of the same checkpoint: the shipped recipe (int8
per-channel weights in the blocks; embedding and head float32) and, for reference, every MatMul in int8 with
per-tensor scales (the recipe before 2026-12-02).
Accuracy: |int8 - fp32| on simulator trajectories (cart-pole from rigs if available, else smooth signals),
as a fraction of the state range and of the model's own one-step increment; with ``--data`` (a ``rigfm
dataset build`` file of the checkpoint's rig) also ``rigfm score``'s MSE against the recorded truth, which is
what matters for control, for the window graph (``rigfm score``'s table) and for the stream.
Speed: interleaved single-thread onnxruntime timings, batch 1 (T=16, T=context), batch 256 (T=16), the
streaming step (shadow re-prime), and torch eager on the same B1 T16 window for the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

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


def _previous_recipe(src: Path, dst: Path) -> None:
    """Every MatMul in int8 with per-tensor scales: the recipe before 2026-12-02, for comparison."""
    import warnings

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def _interleaved(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """p50 in ms of each callable, timed in alternating blocks of 50 calls, as bench_predictor times."""
    from export.latency import timeit_interleaved

    out = timeit_interleaved(list(fns.values()), iters, block=min(50, iters))
    return {k: float(np.median(ts)) for k, ts in zip(fns, out, strict=True)}


def _accuracy(fp: Any, models: dict[str, Any]) -> None:
    me = fp.meta
    x, u = trajectories(32, me.context, me.n, me.m)
    scale = np.maximum(np.abs(x).max(axis=(0, 1)), 1e-6)
    ref = fp.predict(x, u)
    incr = np.maximum(np.sqrt(((ref - x) ** 2).mean(axis=(0, 1))), 1e-9)
    plan = u[:, -16:][:8]
    rref = fp.rollout(x[0, :-16], u[0, :-17], plan)
    print("\nvs float32 on simulator trajectories, per state: max |int8 - fp32| / max|x| one step | 16-step"
          " rollout;\nrms |int8 - fp32| / rms one-step increment")
    for name, p in models.items():
        a = p.predict(x, u)
        e1 = np.abs(a - ref).max(axis=(0, 1)) / scale
        e16 = np.abs(p.rollout(x[0, :-16], u[0, :-17], plan) - rref).max(axis=(0, 1)) / scale
        rel = np.sqrt(((a - ref) ** 2).mean(axis=(0, 1))) / incr
        shown = [np.round(v.astype(float), d).tolist() for v, d in ((e1, 4), (e16, 4), (rel, 3))]
        print(f"  {name:28s} {shown[0]} | {shown[1]}; {shown[2]}")


def _stream_scores(models: dict[str, Any], data: str) -> None:
    """One-step MSE of each model's stream (step graph, shadow re-prime) over every test run of ``data``, in
    raw units / train std (rigfm score's units)."""
    from fm_core.trajfile import load_trajectories

    ts = load_trajectories(data)
    split = np.asarray(ts.split)
    x, u = ts.x[split == "test"].astype(np.float32), ts.u[split == "test"].astype(np.float32)
    train = ts.x[split == "train"] if (split == "train").any() else ts.x
    scale = np.maximum(train.reshape(-1, x.shape[-1]).std(0), 1e-6)
    print(f"\nstream one-step MSE over {x.shape[0]} test runs of {x.shape[1]} steps (raw units / train std)")
    for name, p in models.items():
        se = []
        for w in range(x.shape[0]):
            stream = p.stream(shadow=True)
            pred = np.array([stream.step(x[w, t], u[w, t]) for t in range(x.shape[1] - 1)])
            se.append(((pred - x[w, 1:]) / scale) ** 2)
        print(f"  {name:30s} {float(np.mean(se)):.6f}")


def _speed(fp: Any, q8: Any, ckpt: Path, over: dict[str, Any], iters: int) -> None:
    me = fp.meta
    rng = np.random.default_rng(1)
    print("\nlatency (alternating blocks, 1 thread)         fp32 p50    int8 p50   speed-up")
    for bsz, t, n_it in ((1, 16, iters), (1, me.context, iters), (256, 16, max(5, iters // 30))):
        xb = rng.normal(size=(bsz, t, me.n)).astype(np.float32)
        ub = rng.normal(size=(bsz, t, me.m)).astype(np.float32)
        r = _interleaved({"fp32": partial(fp.predict, xb, ub), "int8": partial(q8.predict, xb, ub)}, n_it)
        print(f"  predict batch {bsz:3d} T={t:<3d}                 {r['fp32']:8.3f} ms {r['int8']:8.3f} ms"
              f"  {r['fp32'] / r['int8']:5.2f}x")
    # one MPC rollout request: samples x horizon of controllers/tuning.toml after the MPC's 16-step history
    k_plans, horizon = 16, 8
    xh = rng.normal(size=(16, me.n)).astype(np.float32)
    uh = rng.normal(size=(xh.shape[0], me.m)).astype(np.float32)
    plans = rng.normal(size=(k_plans, horizon, me.m)).astype(np.float32)
    r = _interleaved({"fp32": partial(fp.rollout, xh, uh, plans), "int8": partial(q8.rollout, xh, uh, plans)},
                     max(5, iters // 10))
    print(f"  rollout K={k_plans} H={horizon} (MPC request)           {r['fp32']:8.3f} ms {r['int8']:8.3f} ms"
          f"  {r['fp32'] / r['int8']:5.2f}x")
    xs, us = trajectories(1, 4 * me.context, me.n, me.m, seed=2)
    steps = {}
    for name, p in (("fp32", fp), ("int8", q8)):
        stream, it = p.stream(shadow=True), itertools.cycle(range(xs.shape[1]))
        steps[name] = lambda stream=stream, it=it: stream.step(*(a[0, next(it)] for a in (xs, us)))
    r = _interleaved(steps, 4 * iters)
    print(f"  stream step (shadow re-prime)               {r['fp32']:8.3f} ms {r['int8']:8.3f} ms"
          f"  {r['fp32'] / r['int8']:5.2f}x")

    import torch

    from export.onnx_export import load_for_export

    torch.set_num_threads(1)
    system = load_for_export(ckpt, **over).system.eval()
    xb = rng.normal(size=(1, 16, me.n)).astype(np.float32)
    ub = rng.normal(size=(1, 16, me.m)).astype(np.float32)
    # torch sees the graph's states: (sin, cos) for angle channels (fp.encode; the identity otherwise)
    xt, ut, ot = torch.from_numpy(fp.encode(xb)), torch.from_numpy(ub), torch.ones(1, 16)

    def eager() -> None:
        with torch.no_grad():
            system(xt, ut, ot)

    r = _interleaved(
        {"torch": eager, "fp32": partial(fp.predict, xb, ub), "int8": partial(q8.predict, xb, ub)}, iters
    )
    print(f"\ntorch eager B1 T16 p50 {r['torch']:.3f} ms; torch / onnxruntime: "
          f"fp32 {r['torch'] / r['fp32']:.2f}x, int8 {r['torch'] / r['int8']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: fm_core/weights/default.pt")
    ap.add_argument("--data", default=None, help="rigfm dataset build .npz of the checkpoint's rig (truth)")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    from export.onnx_export import export_checkpoint
    from export.onnx_runtime import OnnxPredictor
    from export.quantize import RECIPE, quantize_int8

    with tempfile.TemporaryDirectory(prefix="rigfm-q-") as d:
        tmp = Path(d)
        ckpt, label = get_checkpoint(args.checkpoint, tmp)
        over = system_overrides(ckpt)
        res = export_checkpoint(ckpt, tmp / "model.onnx", streaming=tmp / "model_step.onnx", **over)
        assert res.step_path is not None
        q_full, q_step = tmp / "model.int8.onnx", tmp / "model_step.int8.onnx"
        q_all = tmp / "model.int8-all.onnx"
        quantize_int8(res.step_path, q_step)
        quantize_int8(res.full_path, q_full, step_file=q_step.name)
        q_all_step = tmp / "model_step.int8-all.onnx"
        _previous_recipe(res.full_path, q_all)
        _previous_recipe(res.step_path, q_all_step)
        fp, q8 = OnnxPredictor(res.full_path, res.step_path), OnnxPredictor(q_full, q_step)
        print(f"model: {label}\nint8 recipe: {RECIPE}")
        sizes = [f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in (res.full_path, q_full)]
        print("file size: " + ", ".join(sizes))
        _accuracy(fp, {"int8 (shipped recipe)": q8, "int8, every MatMul per-tensor": OnnxPredictor(q_all)})
        if args.data:
            from export.score import markdown, score

            for ctx, hor in ((32, 32), (30, 50)):
                print()
                table = markdown(score([res.full_path, q_full, q_all], args.data, context=ctx, horizon=hor))
                print(table, end="")
            _stream_scores({"float32": fp, "int8 (shipped recipe)": q8,
                            "int8, every MatMul per-tensor": OnnxPredictor(q_all, q_all_step)}, args.data)
        _speed(fp, q8, ckpt, over, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
