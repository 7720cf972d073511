"""Score exported ONNX models on logged trajectories exactly as the predictor serves them (no torch).

``rigfm score MODEL.onnx [MODEL2.onnx ...] --data DATA.npz [--split test] [--context 30] [--horizon 50]``

For every model: the one-step MSE (teacher forced, every position of every window) and the open-loop rollout
MSE over ``horizon`` steps after ``context`` observed steps (planned inputs given; the predictor's ``rollout``
semantics), both in the data's raw units divided per channel by the std of the file's train split, so a raw
model and a (sin, cos) model (docs/predictor.md) are compared on the same numbers. Prints a table, the ratio
of each model to the first, and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.model_check import ModelMismatch, check_model_fits
from export.onnx_runtime import ModelFileError, OnnxPredictor
from fm_core.cli_types import int_range


class ScoreError(ValueError):
    """Bad scoring input: the message names the file, split or option."""


def _scale(ts: Any) -> np.ndarray:
    """Per-channel std of the train split (all trajectories without one); floored to stay finite."""
    sel = np.asarray(ts.split) == "train"
    x = ts.x[sel] if sel.any() else ts.x
    return np.maximum(x.reshape(-1, x.shape[-1]).astype(np.float64).std(0), 1e-6)


def rollout_windows(x: np.ndarray, u: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``length`` steps from every trajectory (K,T,.) -> (W,length,.)."""
    per = x.shape[1] // length
    if per < 1:
        raise ScoreError(f"trajectories have T={x.shape[1]} steps; context + horizon = {length} do not fit")
    cut = per * length
    return (x[:, :cut].reshape(-1, length, x.shape[-1]), u[:, :cut].reshape(-1, length, u.shape[-1]))


def score_model(pred: OnnxPredictor, x: np.ndarray, u: np.ndarray, scale: np.ndarray, context: int,
                horizon: int) -> dict[str, Any]:
    """One-step and rollout MSE (normalised by ``scale``) of one loaded model on windows x (W,L,n), u."""
    me = pred.meta
    length = context + horizon
    if x.shape[-1] != me.n or u.shape[-1] != me.m:
        raise ScoreError(f"{pred.full_path}: serves n={me.n}, m={me.m}; the data has n={x.shape[-1]}, "
                         f"m={u.shape[-1]}")
    if length - 1 > me.max_len:
        raise ScoreError(f"context + horizon - 1 = {length - 1} exceeds the model's max_len={me.max_len}")
    obs = np.zeros((1, length - 1), np.float32)
    obs[:, :context] = 1.0
    one, multi, per_step = [], [], []
    for i in range(0, x.shape[0], me.max_batch):
        xb, ub = x[i : i + me.max_batch, : length - 1], u[i : i + me.max_batch, : length - 1]
        b = xb.shape[0]
        full = pred.predict(xb, ub)  # teacher forced: pred[:, t] estimates x[t + 1]
        one.append((((full - x[i : i + b, 1:length]) / scale) ** 2).mean(axis=(1, 2)))
        hidden = xb * np.broadcast_to(obs[..., None], xb.shape)
        roll = pred.predict(hidden, ub, np.repeat(obs, b, 0))[:, context - 1 :]
        se = ((roll - x[i : i + b, context:length]) / scale) ** 2
        multi.append(se.mean(axis=(1, 2)))
        per_step.append(se.mean(axis=2))
    steps = np.concatenate(per_step).mean(0)
    return {
        "model": pred.full_path, "windows": int(x.shape[0]), "context": context, "horizon": horizon,
        "angle_channels": list(me.angle_channels), "checkpoint_sha256": me.checkpoint_sha256,
        "one_step_mse": float(np.concatenate(one).mean()),
        "multi_step_mse": float(np.concatenate(multi).mean()),
        "final_step_mse": float(steps[-1]), "per_step_mse": steps.tolist(),
    }


def score(models: Sequence[str | Path], data: str | Path, split: str = "test", context: int = 30,
          horizon: int = 50) -> dict[str, Any]:
    """Score every model on the ``split`` windows of ``data``; raises ScoreError / ModelFileError."""
    from fm_core.trajfile import TrajectoryFileError, load_trajectories

    if context < 1 or horizon < 1:
        raise ScoreError(f"--context and --horizon must be >= 1, got {context} and {horizon}")
    try:
        ts = load_trajectories(data)
    except TrajectoryFileError as exc:
        raise ScoreError(str(exc)) from None
    sel = np.asarray(ts.split) == split
    if not sel.any():
        raise ScoreError(f"{data}: no trajectories with split {split!r} (have {sorted(set(ts.split))})")
    x, u = rollout_windows(ts.x[sel].astype(np.float32), ts.u[sel].astype(np.float32), context + horizon)
    scale = _scale(ts)
    rows = []
    for path in models:
        pred = OnnxPredictor(path, self_test=False)
        try:
            check_model_fits(pred.meta.to_dict(), model=str(path), target=f"the data in {data}", rig=ts.rig,
                             state_names=ts.state_names, dt=ts.dt)
        except ModelMismatch as exc:
            raise ScoreError(str(exc)) from None
        rows.append(score_model(pred, x, u, scale, context, horizon))
    return {"data": str(data), "split": split, "state_names": list(ts.state_names), "scale": scale.tolist(),
            "models": rows}


def _shown(path: str) -> str:
    """A model path as the user would type it: relative to the working directory when inside it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def markdown(res: dict[str, Any]) -> str:
    """The result as a markdown table (ratios against the first model)."""
    base = res["models"][0]
    lines = [f"{res['split']} split of `{res['data']}`: {base['windows']} windows, {base['context']} "
             f"observed + {base['horizon']} rollout steps; MSE in raw units / train std", "",
             "| model | angles | one-step MSE | rollout MSE | last-step MSE | rollout MSE: first / this |",
             "|---|---|---|---|---|---|"]
    for r in res["models"]:
        ang = "sin/cos" if r["angle_channels"] else "raw"
        lines.append(f"| `{_shown(r['model'])}` | {ang} | {r['one_step_mse']:.4g} | "
                     f"{r['multi_step_mse']:.4g} | {r['final_step_mse']:.4g} | "
                     f"{base['multi_step_mse'] / r['multi_step_mse']:.2f} |")
    return "\n".join(lines) + "\n"


def register(subparsers: Any) -> None:
    """Add ``score``."""
    p = subparsers.add_parser("score", help="score exported ONNX models on logged trajectories (no torch)")
    p.add_argument("models", nargs="+", help=".onnx full-window graphs")
    p.add_argument("--data", required=True, help="trajectory .npz (rigfm dataset build)")
    p.add_argument("--split", default="test", help="which split to score (default test)")
    p.add_argument("--context", type=int_range(1, 65_536), default=30,
                   help="observed steps before the rollout (default 30)")
    p.add_argument("--horizon", type=int_range(1, 65_536), default=50,
                   help="open-loop rollout steps (default 50)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    try:
        res = score(args.models, args.data, args.split, args.context, args.horizon)
    except (ScoreError, ModelFileError) as exc:
        print(f"rigfm score: {exc}", file=sys.stderr)
        return 2
    print(markdown(res), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
