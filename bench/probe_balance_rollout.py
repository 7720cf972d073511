"""How well each rollout model predicts balance: open-loop error over the MPC's horizon on logged balance
data, in physical units, next to the size of the balance motion itself.

MPC on a model helps only if the model's error over the planning horizon is small against the motion it
regulates. This prints, per state channel, the RMS over windows and horizon steps of

* the data's deviation from upright over the same steps (the signal MPC acts on);
* persistence (the state held), the nominal rig physics, the plant's own physics (``--set`` overrides: an
  oracle), and every exported model given (``OnnxPredictor``, the deployed predictor's code).

    python bench/probe_balance_rollout.py DATA.npz MODEL.onnx [MODEL.onnx ...] [--horizon 8] [--context 30]
        [--set motor_gain_scale=0.8 ...]

DATA: a trajectory file of a balance run (``rigfm dataset build`` of a run log); models are scored on all its
windows, so give a run the models were not trained on (the flywheel's ``logs_after``).

A second table gives each model's input response, what MPC optimises over: the mean change of the state at
the horizon's end when ``--input-step`` volts are added to every planned input (physics: the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rigs  # noqa: E402
from controllers.base import pendulum_index, wrap_angle  # noqa: E402
from controllers.flywheel_gate import input_response, onnx_rollout  # noqa: E402
from controllers.mpc import PhysicsRollout  # noqa: E402
from export.onnx_runtime import OnnxPredictor  # noqa: E402
from fm_core.cli_types import parse_kv  # noqa: E402
from fm_core.metrics import metric_windows  # noqa: E402
from fm_core.trajfile import load_trajectories  # noqa: E402
from rigs.sim import split_sim_overrides  # noqa: E402


def physics_rollout(model: object, dt: float, x: np.ndarray, u: np.ndarray, context: int) -> np.ndarray:
    """(W, H, n) open-loop rollouts of the rig physics from the last context state under the logged inputs."""
    roll = PhysicsRollout(model, dt, substeps=4)
    return np.stack([roll(x[w, :context], u[w, :context], u[None, w, context - 1 : -1])[0]
                     for w in range(x.shape[0])])


def print_table(title: str, names: list[str], rows: dict[str, np.ndarray], fmt: str) -> None:
    """A markdown table: one row per entry of ``rows``, one column per state channel."""
    print(title)
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k, v in rows.items():
        print(f"| {k} | " + " | ".join(fmt.format(e) for e in v) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("models", nargs="*")
    p.add_argument("--context", type=int, default=30)
    p.add_argument("--horizon", type=int, default=8, help="model steps (the shipped MPC plans 8)")
    p.add_argument("--set", dest="plant", action="append", default=[], help="plant override KEY=VALUE")
    p.add_argument("--input-step", type=float, default=0.5, help="V added to the planned inputs (response)")
    a = p.parse_args(argv)
    ts = load_trajectories(a.data)
    x, u = metric_windows(ts.x.astype(np.float64), ts.u.astype(np.float64), a.context + a.horizon)
    future = x[:, a.context :]
    nominal = rigs.make_model(ts.rig)
    pend = pendulum_index(nominal)
    upright = np.asarray(nominal.upright(), float)

    def rms(err: np.ndarray) -> np.ndarray:
        err = err.copy()
        err[..., pend] = wrap_angle(err[..., pend])
        return np.sqrt(np.mean(err.reshape(-1, err.shape[-1]) ** 2, axis=0))

    models: dict[str, object] = {
        "nominal physics": lambda xx, uu: physics_rollout(nominal, ts.dt, xx, uu, a.context)}
    if a.plant:
        true = rigs.make_model(ts.rig, split_sim_overrides(parse_kv(a.plant, number=True))[0])
        models["plant physics (oracle)"] = lambda xx, uu: physics_rollout(true, ts.dt, xx, uu, a.context)
    for path in a.models:
        label = Path(path).name if sum(Path(q).name == Path(path).name for q in a.models) == 1 else path
        models[label] = lambda xx, uu, pr=OnnxPredictor(path, self_test=False, find_step=True): \
            onnx_rollout(pr, xx, uu, a.context)
    rows = {"balance motion (x - upright)": rms(future - upright),
            "persistence": rms(future - x[:, a.context - 1 : a.context])}
    response = {}
    for name, roll in models.items():
        rows[name] = rms(future - roll(x, u))
        response[name] = input_response(roll, x, u, a.context, a.input_step)
    print_table(f"{ts.rig}, {x.shape[0]} windows, context {a.context}, horizon {a.horizon} x {ts.dt} s; RMS "
                "over windows and horizon steps (SI units)", ts.state_names, rows, "{:.2e}")
    print_table(f"\ninput response: mean state change at the horizon's end for +{a.input_step} V on every "
                "planned input", ts.state_names, response, "{:+.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
