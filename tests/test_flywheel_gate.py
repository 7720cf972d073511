"""The flywheel's deployment gate on exact models: ONNX stand-ins whose one-step map is the rig physics'
linearisation with the input matrix scaled, so each model's input response, and their ratio, is known."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import rigs
from controllers.flywheel_gate import check_update, input_response, response_ratio
from fm_core.trajfile import save_trajectories

sys.path.insert(0, str(Path(__file__).parent))
from linear_standin import physics_standin  # noqa: E402


@pytest.fixture(scope="module")
def balance_data(tmp_path_factory):
    """Short near-upright cart-pole trajectories (6 x 80 steps at model_dt)."""
    cfg = rigs.load_config("cartpole")
    rng = np.random.default_rng(0)
    up = np.asarray(rigs.make_model(cfg).upright(), np.float32)
    x = (up + rng.normal(0, 0.01, (6, 80, 4))).astype(np.float32)
    u = rng.normal(0, 0.5, (6, 80, 1)).astype(np.float32)
    path = tmp_path_factory.mktemp("gate") / "run1.npz"
    save_trajectories(path, x, u, cfg.model_dt, list(cfg.state_names), ["voltage"], ["train"] * 6,
                      [f"w{i}" for i in range(6)], "cartpole")
    return path


@pytest.mark.parametrize("scale, passed", [(1.0, True), (0.5, True), (0.05, False), (-0.5, False)])
def test_the_ratio_is_the_input_gain_ratio_and_decides(balance_data, tmp_path, scale, passed):
    v1, _, _ = physics_standin(tmp_path / "v1.onnx", "cartpole")
    v2, _, _ = physics_standin(tmp_path / "v2.onnx", "cartpole", bd_scale=scale)
    g = check_update(v1, v2, balance_data, min_ratio=0.25)
    assert g.ratio == pytest.approx(scale, rel=1e-3, abs=1e-4)  # the response is linear in Bd
    assert g.passed is passed and g.channel == "theta" and g.windows == 12  # 6 x (80 // 38)
    assert g.v1_response[1] < 0  # +V pushes the cart and tips the upright pole back (physics sign)
    if not passed:
        assert "barely acts" in g.reason and "--dither" in g.reason


def test_no_v1_response_is_not_gated(balance_data, tmp_path):
    v1, _, _ = physics_standin(tmp_path / "v1.onnx", "cartpole", bd_scale=0.0)
    v2, _, _ = physics_standin(tmp_path / "v2.onnx", "cartpole")
    g = check_update(v1, v2, balance_data)
    assert g.passed and math.isnan(g.ratio) and "not gated" in g.reason


def test_input_response_of_a_known_map():
    """A map whose state moves by the sum of its planned inputs responds with horizon x step."""
    def roll(x, u):  # (W, H, n) with H = 5, context 3: state = cumulative sum of the planned inputs
        return np.repeat(np.cumsum(u[:, 2:-1], axis=1), 2, axis=2)

    x, u = np.zeros((4, 8, 2)), np.zeros((4, 8, 1))
    r = input_response(roll, x, u, context=3, step_v=0.5)
    np.testing.assert_allclose(r, [2.5, 2.5])
    assert response_ratio(np.array([2.0, 0.0]), np.array([-1.0, 0.0]), 0) == -0.5
    assert math.isnan(response_ratio(np.array([0.0]), np.array([1.0]), 0))
