"""Score exported ONNX models on logged trajectories exactly as the predictor serves them (no torch).

``rigfm score MODEL.onnx [MODEL2.onnx ...] --data DATA.npz [--split test] [--context 30] [--horizon 50]``

For every model: the one-step MSE (teacher forced; the first ``--one-step-skip`` targets of a window left
out) and the open-loop rollout MSE over ``horizon`` steps after ``context`` observed steps (planned inputs
given; the predictor's ``rollout`` semantics), both in the data's raw units divided per channel by the std
of the file's train split, so a raw model and a (sin, cos) model (docs/predictor.md) are compared on the same
numbers. The metric is ``fm_core.metrics``, the same functions as ``rigfm evaluate`` (docs/experiment.md,
"Metric"). Prints a table, the ratio of each model to the first, and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.model_check import ModelMismatch, check_model_fits
from export.onnx_runtime import ModelFileError, OnnxPredictor
from fm_core.cli_types import int_range
from fm_core.metrics import ONE_STEP_SKIP, channel_scale, metric_windows, prediction_errors


class ScoreError(ValueError):
    """Bad scoring input: the message names the file, split or option."""


def _scale(ts: Any) -> np.ndarray:
    """:func:`fm_core.metrics.channel_scale` of the train split (all trajectories if the file has none)."""
    sel = np.asarray(ts.split) == "train"
    return channel_scale(ts.x[sel] if sel.any() else ts.x)


def rollout_windows(x: np.ndarray, u: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The metric's windows (:func:`fm_core.metrics.metric_windows`); ScoreError when none fits."""
    try:
        return metric_windows(x, u, length)
    except ValueError:
        raise ScoreError(f"trajectories have T={x.shape[1]} steps; context + horizon = {length} do not fit") \
            from None


def score_model(pred: OnnxPredictor, x: np.ndarray, u: np.ndarray, scale: np.ndarray, context: int,
                horizon: int, one_step_skip: int = ONE_STEP_SKIP) -> dict[str, Any]:
    """One-step and rollout MSE (normalised by ``scale``) of one loaded model on windows x (W,L,n), u."""
    me = pred.meta
    length = context + horizon
    if x.shape[-1] != me.n or u.shape[-1] != me.m:
        raise ScoreError(f"{pred.full_path}: serves n={me.n}, m={me.m}; the data has n={x.shape[-1]}, "
                         f"m={u.shape[-1]}")
    if length - 1 > me.max_len:
        raise ScoreError(f"context + horizon - 1 = {length - 1} exceeds the model's max_len={me.max_len}")
    one, roll = [], []
    for i in range(0, x.shape[0], me.max_batch):
        xb, ub = x[i : i + me.max_batch, : length - 1], u[i : i + me.max_batch, : length - 1]
        one.append(pred.predict(xb, ub))  # teacher forced: pred[:, t] estimates x[t + 1]
        # the model's own rollout mode (masked one pass, or autoregressive), as `rigfm evaluate` rolls it out
        roll.append(pred.rollout_windows(xb[:, :context], ub[:, : context - 1], ub[:, context - 1 :]))
    res = prediction_errors(np.concatenate(one), np.concatenate(roll), x[:, :length], scale, context,
                            one_step_skip)
    return {
        "model": pred.full_path, "windows": int(x.shape[0]), "context": context, "horizon": horizon,
        "one_step_skip": int(one_step_skip),
        "angle_channels": list(me.angle_channels), "checkpoint_sha256": me.checkpoint_sha256,
        "one_step_mse": res["one_step_mse"], "multi_step_mse": res["multi_step_mse"],
        "final_step_mse": res["final_step_mse"], "per_step_mse": res["per_step_mse"],
        "per_channel_one_step": res["per_channel_one_step"], "per_channel_multi": res["per_channel_multi"],
    }


def score(models: Sequence[str | Path], data: str | Path, split: str = "test", context: int = 30,
          horizon: int = 50, one_step_skip: int = ONE_STEP_SKIP) -> dict[str, Any]:
    """Score every model on the ``split`` windows of ``data``; raises ScoreError / ModelFileError."""
    from fm_core.trajfile import TrajectoryFileError, load_trajectories

    if context < 1 or horizon < 1:
        raise ScoreError(f"--context and --horizon must be >= 1, got {context} and {horizon}")
    if not 0 <= one_step_skip < context + horizon - 1:
        raise ScoreError(f"--one-step-skip must be in [0, context + horizon - 1 = {context + horizon - 1}), "
                         f"got {one_step_skip}")
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
        rows.append(score_model(pred, x, u, scale, context, horizon, one_step_skip))
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
             f"observed + {base['horizon']} rollout steps; MSE in raw units / train std (one-step: first "
             f"{base['one_step_skip']} targets of a window left out)", "",
             "| model | angles | one-step MSE | rollout MSE | last-step MSE | rollout MSE: first / this |",
             "|---|---|---|---|---|---|"]
    for r in res["models"]:
        ang = "sin/cos" if r["angle_channels"] else "raw"
        lines.append(f"| `{_shown(r['model'])}` | {ang} | {r['one_step_mse']:.4g} | "
                     f"{r['multi_step_mse']:.4g} | {r['final_step_mse']:.4g} | "
                     f"{_ratio(base['multi_step_mse'], r['multi_step_mse'])} |")
    names = res["state_names"]
    lines += ["", "Per state (one-step MSE / rollout MSE, same units):", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in res["models"]:
        pairs = zip(r["per_channel_one_step"], r["per_channel_multi"], strict=True)
        cells = " | ".join(f"{a:.4g} / {b:.4g}" for a, b in pairs)
        lines.append(f"| `{_shown(r['model'])}` | {cells} |")
    return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> str:
    """``a / b`` for the table; a diverged (inf) model is named, not divided."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "diverged" if not math.isfinite(b) else "n/a"
    return f"{a / b:.2f}"


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
    p.add_argument("--one-step-skip", type=int_range(0, 65_536), default=ONE_STEP_SKIP,
                   help=f"first targets of a window left out of the one-step MSE (default {ONE_STEP_SKIP}, "
                        "as rigfm evaluate)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    try:
        res = score(args.models, args.data, args.split, args.context, args.horizon, args.one_step_skip)
    except (ScoreError, ModelFileError) as exc:
        print(f"rigfm score: {exc}", file=sys.stderr)
        return 2
    print(markdown(res), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
