"""Cost of the PDEDER Lyapunov penalty per pretraining step (fm_core/lyapunov.py, [train] lyapunov_*).

Times the pretraining step (forward, Huber loss, backward, clip, Adam) on pre-generated synthetic batches of a
config, with the penalty off and on (alternating blocks, so drift in machine load hits both), and prints
steps/s of each, the ratio and the penalty's own value. One run; no assertion.

    taskset -c 1 python bench/bench_lyapunov.py --config fm_core/configs/pretrain_default.toml --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fm_core.config import load_config
from fm_core.data import SyntheticStream
from fm_core.model import DynamicsFM, ModelConfig
from fm_core.train import batch_loss, batch_spec, lyapunov_penalty, rkhs_config_dict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="fm_core/configs/pretrain_default.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting and block")
    ap.add_argument("--blocks", type=int, default=2, help="alternating off/on blocks")
    ap.add_argument("--weight", type=float, default=0.1, help="lyapunov_weight when on")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides + [f"train.lyapunov_weight={args.weight}"])
    t = cfg.train
    mc = ModelConfig.from_dict(cfg.model)
    torch.manual_seed(0)
    model = DynamicsFM(mc)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ds = SyntheticStream(batch_spec(cfg, mc), rkhs_config_dict(cfg, mc), seed=0)
    batches = [ds.batch(i) for i in range(args.steps)]

    def run(on: bool) -> tuple[float, list[float]]:
        lyap = []
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            _, loss = batch_loss(model, b, cfg)
            if on:
                pen = lyapunov_penalty(model, b, t, i)
                lyap.append(float(pen.detach()))
                loss = loss + args.weight * pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return len(batches) / (time.perf_counter() - t0), lyap

    run(False)  # warm-up (first-call overheads, functorch included)
    run(True)
    rates: dict[bool, list[float]] = {False: [], True: []}
    values: list[float] = []
    for _ in range(args.blocks):
        for on in (False, True):
            r, v = run(on)
            rates[on].append(r)
            values += v
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"config {args.config} {' '.join(args.overrides)}: {sum(p.numel() for p in model.parameters())} "
          f"params, batch {cfg.data.batch_size} x {cfg.data.seq_len} tokens, {args.threads} thread(s)")
    print(f"penalty: weight {args.weight}, {t.lyapunov_samples} windows, context {t.lyapunov_context}, "
          f"burn-in {t.lyapunov_burn_in} + {t.lyapunov_steps} steps")
    print(f"steps/s off: {off:.3f} (blocks {[round(r, 3) for r in rates[False]]})")
    print(f"steps/s on:  {on:.3f} (blocks {[round(r, 3) for r in rates[True]]})")
    print(f"on / off time per step: {off / on:.2f}x; lyapunov estimate mean {statistics.mean(values):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
