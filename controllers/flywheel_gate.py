"""The flywheel's deployment gate: keep v1 when an update taught v2 that the motor barely moves the pendulum.

A balancing run's input is a function of the state (``u = -K x``), so a fine-tune on it can fit the run as
well with a far weaker input response as with the plant's, and often does: measured on the closed-loop
benchmark's cart-pole flywheels, v2's pendulum-angle response fell to 1-11 % of v1's (sign flipped on one)
and MPC on it drove the cart into the soft limit (docs/controllers.md). The gate measures each model's input
response the way MPC uses it -- the mean change of the state at the end of an open-loop rollout when every
planned input is raised by ``step_v`` volts, from windows of run 1's data -- and fails the update when v2's
pendulum-angle response is below ``min_ratio`` x v1's (same sign).

Torch-free (onnxruntime through :class:`export.onnx_runtime.OnnxPredictor`), like the whole control side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MIN_RATIO = 0.25


def onnx_rollout(pred: Any, x: np.ndarray, u: np.ndarray, context: int) -> np.ndarray:
    """(W, H, n) open-loop rollouts of an exported model (its own rollout mode) from ``x[:, :context]`` under
    the inputs ``u`` (W, context + H, m), in batches of the model's ``max_batch``."""
    xf, uf, b = x.astype(np.float32), u.astype(np.float32), pred.meta.max_batch
    out = [pred.rollout_windows(xf[i : i + b, :context], uf[i : i + b, : context - 1],
                                uf[i : i + b, context - 1 : -1]) for i in range(0, len(x), b)]
    return np.concatenate(out)


def input_response(roll: Any, x: np.ndarray, u: np.ndarray, context: int, step_v: float) -> np.ndarray:
    """Mean change (n,) of the state at the rollout's last step when ``step_v`` is added to every planned
    input; ``roll(x, u) -> (W, H, n)``."""
    stepped = u.copy()
    stepped[:, context - 1 :] += step_v
    return np.mean(roll(x, stepped)[:, -1] - roll(x, u)[:, -1], axis=0)


@dataclass
class GateResult:
    """What the gate measured and decided (``passed``: deploy v2)."""

    passed: bool
    ratio: float                  # v2's pendulum-angle response / v1's (nan: not measurable)
    min_ratio: float
    channel: str
    v1_response: list[float]
    v2_response: list[float]
    windows: int
    reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


def response_ratio(r1: np.ndarray, r2: np.ndarray, channel: int) -> float:
    """v2's response on ``channel`` over v1's (negative: the sign flipped; nan: v1 shows none)."""
    a, b = float(r1[channel]), float(r2[channel])
    if not (math.isfinite(a) and math.isfinite(b)) or a == 0.0:
        return math.nan
    return b / a


def check_update(v1: str | Path, v2: str | Path, data: str | Path, *, min_ratio: float = DEFAULT_MIN_RATIO,
                 context: int = 30, horizon: int = 8, step_v: float = 0.5) -> GateResult:
    """Compare the input responses of the v1 and v2 ONNX models on windows of the trajectory file ``data``."""
    import rigs
    from controllers.base import pendulum_index
    from export.onnx_runtime import OnnxPredictor
    from fm_core.metrics import metric_windows
    from fm_core.trajfile import load_trajectories

    ts = load_trajectories(data)
    length = context + horizon
    if ts.x.shape[1] < length:
        context = max(2, ts.x.shape[1] - horizon)
        length = context + horizon
    x, u = metric_windows(ts.x.astype(np.float64), ts.u.astype(np.float64), length)
    pend = pendulum_index(rigs.make_model(ts.rig))
    settings = {"context": context, "horizon": horizon, "step_v": step_v, "data": str(data)}
    responses = []
    for path in (v1, v2):
        pred = OnnxPredictor(path, self_test=False, find_step=True)
        responses.append(input_response(lambda xx, uu, p=pred: onnx_rollout(p, xx, uu, context), x, u,
                                        context, step_v))
    r1, r2 = responses
    ratio = response_ratio(r1, r2, pend)
    channel = str(ts.state_names[pend])
    if math.isnan(ratio):
        passed, reason = True, f"v1 shows no {channel} input response to compare with: not gated"
    elif ratio < min_ratio:
        passed, reason = False, (f"v2's {channel} response to +{step_v} V over {horizon} steps is "
                                 f"{ratio:.3g}x v1's (below {min_ratio}): the update learned that the input "
                                 "barely acts (closed-loop data without excitation; try --dither)")
    else:
        passed, reason = True, f"v2's {channel} input response is {ratio:.3g}x v1's"
    return GateResult(passed, ratio, min_ratio, channel, [float(v) for v in r1], [float(v) for v in r2],
                      int(x.shape[0]), reason, settings)
