"""Ablations of the model / fine-tuning recipe on the VAL split (never the test split).

Each variant is a model name plus overrides of the evaluation's training budget
(``fm_core.train_configs.Budget``)
and is fitted with the same code path as ``rigfm evaluate``; the val windows are scored with the evaluation's
metric (one-step and open-loop rollout MSE in raw units / train-split std, pendulum angle decoded from
(sin, cos)). Prints one table row per variant, with the steps it used and its wall time, and writes JSON.

    python bench/ablate_fm.py --data runs/eval_data/cartpole.npz --rig cartpole \
        --variant base:fm --variant ar:fm:rollout_mode=ar,mask_prob=0 --fractions 1.0 --seeds 1 \
        --out runs/ablate/rollout_mode.json

A variant is ``LABEL:MODEL[:key=value,...]``; MODEL is one of ``fm_core.baselines.MODELS`` (``fm`` uses
``--checkpoint``; ``ckpt=PATH`` in the overrides picks another pretrained checkpoint for that variant).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controllers.evaluate import EvalConfig, angle_codec, load_splits, metric_setup, score  # noqa: E402


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(spec: str) -> tuple[str, str, dict]:
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--variant {spec!r}: expected LABEL:MODEL[:key=value,...]")
    over: dict = {}
    if len(parts) == 3 and parts[2]:
        for kv in parts[2].split(","):
            if "=" not in kv:
                raise SystemExit(f"--variant {spec!r}: {kv!r} is not key=value")
            k, v = kv.split("=", 1)
            over[k.strip()] = _value(v.strip())
    return parts[0], parts[1], over


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--rig", required=True, choices=["cartpole", "furuta"])
    ap.add_argument("--checkpoint", default="fm_core/weights/default.pt")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--fractions", default="1.0")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--angle-features", default="sincos", choices=["raw", "sincos"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import torch

    from fm_core.angle_features import SinCosPredictor
    from fm_core.baselines import fit_model
    from fm_core.checkpoint import load_checkpoint

    torch.set_num_threads(a.threads)
    cfg = EvalConfig(rigs=[a.rig], angle_features=a.angle_features)
    _, tr, va, _ = load_splits(Path(a.data), cfg)
    codec = angle_codec(a.rig, tr) if a.angle_features == "sincos" else None
    tr_fit, va_fit = (codec.encode_data(tr), codec.encode_data(va)) if codec else (tr, va)
    xw, uw, x_std = metric_setup(tr, va, cfg)  # the evaluation's metric, on the VAL split
    budget_keys = {f.name for f in fields(cfg.budget)}
    ckpts: dict[str, object] = {}
    rows = []
    for spec in a.variant:
        label, model, over = parse_variant(spec)
        ck_path = str(over.pop("ckpt", a.checkpoint))
        unknown = sorted(set(over) - budget_keys)
        if unknown:
            raise SystemExit(f"--variant {spec!r}: unknown budget key(s) {unknown}; "
                             f"known: {sorted(budget_keys)}")
        budget = replace(cfg.budget, **over)
        if ck_path not in ckpts:
            ckpts[ck_path] = load_checkpoint(ck_path)[0]
        for f in (float(v) for v in a.fractions.split(",")):
            for seed in range(a.seeds):
                t0 = time.time()
                pred = fit_model(model, tr_fit, va_fit, seed, budget, f, ckpt=ckpts[ck_path])
                if codec:
                    pred = SinCosPredictor(pred, codec)
                sc = score(pred, xw, uw, x_std, cfg.context, cfg.one_step_skip)
                info = {k: v for k, v in pred.info.items() if isinstance(v, int | float | str | type(None))}
                row = {"label": label, "model": model, "fraction": f, "seed": seed, "overrides": over,
                       "checkpoint": ck_path, "one_step_mse": sc["one_step_mse"],
                       "rollout_mse": sc["multi_step_mse"], "steps": info.get("steps_run"),
                       "best_step": info.get("best_step"), "wall_s": round(time.time() - t0, 1), "info": info,
                       "val_curve": pred.info.get("history") or []}
                rows.append(row)
                print(f"{label:24s} f={f:<5g} seed={seed} one-step {row['one_step_mse']:.5f} "
                      f"rollout {row['rollout_mse']:.4f} steps {row['steps']} (best {row['best_step']}) "
                      f"{row['wall_s']} s", flush=True)
                if a.out:
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.out).write_text(json.dumps({"argv": sys.argv, "budget": asdict(cfg.budget),
                                                       "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
