"""The normalised MSE of the experiment, shared by ``rigfm evaluate`` and ``rigfm score`` (numpy only).

One definition (docs/experiment.md, "Metric"):

* **scale**: per state channel, the std of the train split over all its steps (raw units, float64), floored
  at ``1e-3 * max(1, |mean|)`` so a (near-)constant channel stays finite -- :func:`channel_scale`;
* **windows**: non-overlapping windows of ``context + horizon`` steps from every trajectory of the scored
  split, starting at step 0 (a remainder shorter than a window is left out), ordered by start, then by
  trajectory -- :func:`metric_windows`;
* **one-step MSE**: teacher-forced predictions of ``x[1..L-1]`` of each window; the first ``one_step_skip``
  targets (``x[1..skip]``, too little history for the window models) are left out;
* **rollout (multi-step) MSE**: open-loop predictions of ``x[context..L-1]`` from ``context`` observed steps
  with the planned inputs given;
* errors are ``(prediction - truth) / scale`` in the data's raw units (an angle is compared unwrapped, as
  logged, whatever the model's internal representation); the MSE is the plain mean over windows, steps and
  channels; a non-finite result (a diverged rollout) is reported as ``inf``, never NaN.

Importable without torch: the deployment side (``export/score.py``) uses it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["ONE_STEP_SKIP", "channel_scale", "metric_windows", "prediction_errors"]

#: first targets of a window left out of the one-step MSE (the experiment's default)
ONE_STEP_SKIP = 10


def channel_scale(x_train: np.ndarray) -> np.ndarray:
    """Per-channel std of the train trajectories ``x_train (K,T,n)`` (or ``(N,n)``), floored at
    ``1e-3 * max(1, |mean|)``; float64 (n,)."""
    x = np.asarray(x_train, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        raise ValueError("channel_scale: no train steps to take the std of")
    mean = flat.mean(0)
    return np.maximum(flat.std(0), 1e-3 * np.maximum(1.0, np.abs(mean)))


def metric_windows(x: np.ndarray, u: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``length`` steps: x (K,T,n), u (K,T,m) -> (W,length,n), (W,length,m)
    with W = K * (T // length), ordered by start then trajectory. Raises ValueError when none fits."""
    x, u = np.asarray(x), np.asarray(u)
    if x.ndim != 3 or u.ndim != 3 or x.shape[:2] != u.shape[:2]:
        raise ValueError(f"metric_windows: x (K,T,n) and u (K,T,m) with equal K, T expected, got "
                         f"{x.shape} and {u.shape}")
    if length < 2 or x.shape[1] < length:
        raise ValueError(f"trajectories have T={x.shape[1]} steps; windows of {length} steps do not fit")
    starts = range(0, x.shape[1] - length + 1, length)
    return (np.concatenate([x[:, s : s + length] for s in starts]),
            np.concatenate([u[:, s : s + length] for s in starts]))


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def prediction_errors(
    one_step: np.ndarray | None, rollout: np.ndarray, x: np.ndarray, scale: np.ndarray, context: int,
    one_step_skip: int = ONE_STEP_SKIP,
) -> dict[str, Any]:
    """The metric from predictions on the windows ``x (W,L,n)``.

    ``one_step (W,L-1,n)``: teacher-forced predictions of ``x[:, 1:]`` (None: not scored);
    ``rollout (W,L-context,n)``: open-loop predictions of ``x[:, context:]``; ``scale (n,)``:
    :func:`channel_scale` of the train split. Returns ``one_step_mse``, ``multi_step_mse``,
    ``per_step_mse (H,)``, ``final_step_mse``, ``per_channel_multi (n,)``, ``windows`` and, with
    ``one_step``, ``per_channel_one_step (n,)``.
    """
    x = np.asarray(x, dtype=np.float64)
    w, length, n = x.shape
    sc = np.asarray(scale, dtype=np.float64).reshape(-1)
    if sc.shape != (n,) or not np.all(sc > 0):
        raise ValueError(f"prediction_errors: scale must be {n} positive values, got {sc.tolist()}")
    if not 1 <= context < length:
        raise ValueError(f"prediction_errors: context={context} outside [1, window length {length})")
    if one_step is not None and not 0 <= one_step_skip < length - 1:
        raise ValueError(f"one-step skip {one_step_skip} leaves no target in windows of {length} steps")
    r = np.asarray(rollout, dtype=np.float64)
    if r.shape != (w, length - context, n):
        raise ValueError(f"prediction_errors: rollout must be {(w, length - context, n)}, got {r.shape}")
    with np.errstate(all="ignore"):
        se = ((r - x[:, context:]) / sc) ** 2
        se = np.where(np.isnan(se), np.inf, se)  # NaN from inf - inf: a diverged rollout
        per_step = se.mean(axis=(0, 2))
        out: dict[str, Any] = {
            "multi_step_mse": _finite_or_inf(float(se.mean())),
            "per_step_mse": [_finite_or_inf(float(v)) for v in per_step],
            "final_step_mse": _finite_or_inf(float(per_step[-1])),
            "per_channel_multi": [_finite_or_inf(float(v)) for v in se.mean(axis=(0, 1))],
            "windows": int(w),
            "one_step_skip": int(one_step_skip),
        }
        if one_step is not None:
            p1 = np.asarray(one_step, dtype=np.float64)
            if p1.shape != (w, length - 1, n):
                raise ValueError(f"prediction_errors: one_step must be {(w, length - 1, n)}, got {p1.shape}")
            e1 = ((p1 - x[:, 1:]) / sc)[:, one_step_skip:] ** 2
            e1 = np.where(np.isnan(e1), np.inf, e1)
            out["one_step_mse"] = _finite_or_inf(float(e1.mean()))
            out["per_channel_one_step"] = [_finite_or_inf(float(v)) for v in e1.mean(axis=(0, 1))]
    return out
