"""Model-size sweep on this CPU: parameters, torch-eager latency (batch 1, 64 tokens, 1 thread), training
speed and the loss after a fixed short training budget on synthetic RKHS data (optionally onnxruntime latency;
``--zero-shot CKPT`` evaluates a checkpoint on fresh synthetic systems instead).

    python bench/bench_model_size.py [--steps 60] [--threads 2] [--configs small,default] [--json out.json]

Prints one line per configuration (timings are medians; the machine is shared, expect noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fm_core.config import load_config
from fm_core.data import SyntheticStream
from fm_core.model import DynamicsFM, ModelConfig, count_parameters
from fm_core.train import batch_loss, batch_spec, rkhs_config_dict, validate

CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layers=4, n_heads=4, d_ff=256),
    "small": dict(d_model=128, n_layers=4, n_heads=8, d_ff=512),
    "default": dict(d_model=128, n_layers=6, n_heads=8, d_ff=512),
    "deep": dict(d_model=128, n_layers=8, n_heads=8, d_ff=512),
    "wide": dict(d_model=192, n_layers=6, n_heads=8, d_ff=768),
}


def latency_ms(model: DynamicsFM, tokens: int = 64, reps: int = 50) -> float:
    sys_model = model.for_system(4, 1).eval()
    x, u, obs = torch.randn(1, tokens, 4), torch.randn(1, tokens, 1), torch.ones(1, tokens)
    times = []
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # inference setting; multi-threaded tiny ops only spin on a shared CPU
    with torch.inference_mode():
        for _ in range(5):
            sys_model(x, u, obs)
        for _ in range(reps):
            t0 = time.perf_counter()
            sys_model(x, u, obs)
            times.append((time.perf_counter() - t0) * 1e3)
    torch.set_num_threads(old)
    return statistics.median(times)


def ort_latency_ms(
    model: DynamicsFM, tokens: tuple[int, ...] = (16, 32, 64), reps: int = 200
) -> dict[int, float]:
    """Median onnxruntime latency (1 intra-op thread, sequential) of the exported for_system(4, 1) forward."""
    import os
    import tempfile
    import warnings

    import numpy as np
    import onnxruntime as ort

    sys_model = model.for_system(4, 1).eval()
    x, u, obs = torch.randn(1, 16, 4), torch.randn(1, 16, 1), torch.ones(1, 16)
    t_dim = torch.export.Dim("T", min=2, max=model.cfg.max_len)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(d, "m.onnx")
        torch.onnx.export(sys_model, (x, u, obs), path, dynamo=True, verbose=False,
                          dynamic_shapes=({1: t_dim}, {1: t_dim}, {1: t_dim}))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = {}
    names = [i.name for i in sess.get_inputs()]
    for t in tokens:
        rng = np.random.default_rng(0)
        arrays = (rng.standard_normal((1, t, 4), np.float32), rng.standard_normal((1, t, 1), np.float32),
                  np.ones((1, t), np.float32))
        feed = dict(zip(names, arrays, strict=True))
        for _ in range(20):
            sess.run(None, feed)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
        out[t] = statistics.median(times)
    return out


def quick_train(name: str, arch: dict[str, int], steps: int, seed: int) -> dict[str, float]:
    cfg = load_config(None, [f"model.{k}={v}" for k, v in arch.items()] + [
        f"train.seed={seed}", "data.batch_size=32", "data.seq_len=64", "data.val_batches=4"])
    mc = ModelConfig.from_dict(cfg.model)
    torch.manual_seed(seed)
    model = DynamicsFM(mc)
    spec = batch_spec(cfg, mc)
    rk = rkhs_config_dict(cfg, mc)
    ds = SyntheticStream(spec, rk, seed=seed)
    val = [SyntheticStream(spec, rk, seed=seed, stream=1).batch(i) for i in range(cfg.data.val_batches)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [ds.batch(i) for i in range(steps)]  # generation excluded from the timing
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (i + 1) / 20)
        _, loss = batch_loss(model, b, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    dt = time.perf_counter() - t0
    v = validate(model, val, cfg)
    return {"params": count_parameters(model), "latency_ms_b1_t64": latency_ms(model),
            "train_steps_per_s": steps / dt, "val_loss": v["val_loss"], "val_ctx_mse": v["val_ctx_mse"]}


def zero_shot(ckpt: str, seed: int = 20261123, batch: int = 64, context: int = 32, horizon: int = 32) -> dict:
    """Zero-shot MSE of a checkpoint on fresh synthetic systems vs a random init and trivial baselines."""
    import numpy as np

    from fm_core.checkpoint import load_checkpoint
    from fm_core.rkhs import RKHSConfig, generate_batch

    model, _ = load_checkpoint(ckpt)
    b = generate_batch(np.random.default_rng(seed), batch, context + horizon, RKHSConfig())
    x, u = torch.as_tensor(b.x), torch.as_tensor(b.u)
    sm, im = torch.as_tensor(b.state_mask()), torch.as_tensor(b.input_mask())
    denom_1 = float(sm.sum()) * (x.shape[1] - 1)
    denom_h = float(sm.sum()) * horizon

    def scores(m: DynamicsFM) -> dict[str, float]:
        with torch.no_grad():
            one = m(x[:, :-1], u[:, :-1], torch.ones(batch, x.shape[1] - 1), sm, im)
            obs = torch.cat([torch.ones(batch, context), torch.zeros(batch, horizon - 1)], 1)
            roll = m(x[:, :-1], u[:, :-1], obs, sm, im)[:, context - 1 :]
        return {"one_step_mse": float((((one - x[:, 1:]) ** 2) * sm[:, None]).sum()) / denom_1,
                "rollout_mse": float((((roll - x[:, context:]) ** 2) * sm[:, None]).sum()) / denom_h}

    torch.manual_seed(0)
    hold = x[:, context - 1 : context].expand(-1, horizon, -1)
    return {
        "checkpoint": scores(model), "random_init": scores(DynamicsFM(model.cfg).eval()),
        "persistence_one_step_mse": float((((x[:, 1:] - x[:, :-1]) ** 2) * sm[:, None]).sum()) / denom_1,
        "hold_last_state_rollout_mse": float((((hold - x[:, context:]) ** 2) * sm[:, None]).sum()) / denom_h,
        "zero_rollout_mse": float(((x[:, context:] ** 2) * sm[:, None]).sum()) / denom_h,
        "systems": batch, "context": context, "horizon": horizon, "seed": seed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps per configuration (batch 32 x 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--onnx", action="store_true", help="also export and time onnxruntime at 16/32/64 tokens")
    ap.add_argument("--zero-shot", default=None, metavar="CKPT",
                    help="only evaluate CKPT zero-shot on fresh synthetic systems (vs random init and "
                         "trivial baselines)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.zero_shot:
        print(json.dumps(zero_shot(args.zero_shot), indent=1))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.steps} steps of batch 32 x 64")
    print(f"{'config':8s} {'params':>9s} {'eager b1 T64 ms':>16s} {'train step/s':>13s} {'val loss':>9s} "
          f"{'val 1-step mse':>15s}")
    res = {}
    for name in args.configs.split(","):
        r = quick_train(name, CONFIGS[name], args.steps, args.seed)
        res[name] = {"arch": CONFIGS[name], **r}
        line = (f"{name:8s} {r['params']:9d} {r['latency_ms_b1_t64']:16.2f} {r['train_steps_per_s']:13.2f} "
                f"{r['val_loss']:9.4f} {r['val_ctx_mse']:15.4f}")
        if args.onnx:
            torch.manual_seed(args.seed)
            ort_ms = ort_latency_ms(DynamicsFM(ModelConfig(**CONFIGS[name])))
            res[name]["ort_ms_b1"] = ort_ms
            line += "   ort b1 ms: " + ", ".join(f"T{t}={v:.2f}" for t, v in ort_ms.items())
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
