"""The shared metric (fm_core/metrics.py): its definition by hand, and `rigfm evaluate` and `rigfm score`
giving the same numbers for the same model on the same data (a torch model and its ONNX export, raw and
sin/cos)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from fm_core.metrics import ONE_STEP_SKIP, channel_scale, metric_windows, prediction_errors


def test_channel_scale_is_the_train_std_with_a_relative_floor():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 2.0, (3, 50)), 5.0 + 1e-6 * rng.normal(size=(3, 50)),
                  np.zeros((3, 50))], -1)
    s = channel_scale(x)
    assert s[0] == pytest.approx(x[..., 0].std(), rel=1e-12)
    assert s[1] == pytest.approx(5e-3)  # 1e-3 * |mean|: a near-constant channel stays finite
    assert s[2] == pytest.approx(1e-3)  # 1e-3 * max(1, |mean|)
    with pytest.raises(ValueError, match="no train steps"):
        channel_scale(np.zeros((0, 10, 3)))


def test_windows_are_non_overlapping_by_start_then_trajectory_and_drop_the_remainder():
    x = np.arange(2 * 7, dtype=float).reshape(2, 7, 1)  # trajectory k, step t -> 7k + t
    u = -x
    xw, uw = metric_windows(x, u, 3)
    assert xw[..., 0].tolist() == [[0, 1, 2], [7, 8, 9], [3, 4, 5], [10, 11, 12]]  # step 6 / 13 left out
    np.testing.assert_array_equal(uw, -xw)
    with pytest.raises(ValueError, match="T=7 steps; windows of 8 steps do not fit"):
        metric_windows(x, u, 8)


def test_prediction_errors_by_hand():
    x = np.zeros((2, 6, 2))
    scale = np.array([1.0, 2.0])
    one = np.zeros((2, 5, 2))
    one[:, :2] = 100.0  # errors on the skipped targets x[1], x[2] do not count
    one[0, 4, 1] = 4.0  # (4 / 2)^2 = 4 at one of 2 * 3 * 2 = 12 scored entries
    roll = np.zeros((2, 2, 2))
    roll[1, 1, 0] = 3.0  # 9 at the last rollout step
    r = prediction_errors(one, roll, x, scale, context=4, one_step_skip=2)
    assert r["one_step_mse"] == pytest.approx(4 / 12)
    assert r["multi_step_mse"] == pytest.approx(9 / 8)
    assert r["per_step_mse"] == pytest.approx([0.0, 9 / 4]) and r["final_step_mse"] == pytest.approx(9 / 4)
    assert r["per_channel_multi"] == pytest.approx([9 / 4, 0.0]) and r["windows"] == 2
    assert r["per_channel_one_step"] == pytest.approx([0.0, 4 / 6])  # per state: 2 windows x 3 targets
    assert prediction_errors(one, roll, x, scale, 4, one_step_skip=0)["one_step_mse"] > 1000
    roll[0, 0, 0] = np.nan  # a diverged rollout is inf, never NaN
    roll[0, 1, 0] = np.inf
    bad = prediction_errors(None, roll, x, scale, 4)
    assert bad["multi_step_mse"] == math.inf and bad["per_step_mse"] == [math.inf, math.inf]
    assert "one_step_mse" not in bad
    with pytest.raises(ValueError, match="one-step skip 5 leaves no target"):
        prediction_errors(one, roll, x, scale, 4, one_step_skip=5)
    with pytest.raises(ValueError, match="rollout must be"):
        prediction_errors(one, roll[:, :1], x, scale, 4, one_step_skip=0)


def test_metrics_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import fm_core.metrics, export.score")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 64}
NAMES = ["p", "theta", "p_dot", "theta_dot"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch

    from export.onnx_export import export_checkpoint, save_random_checkpoint
    from fm_core.trajfile import save_trajectories

    d = tmp_path_factory.mktemp("metric")
    raw_pt = save_random_checkpoint(d / "raw.pt", config=TINY, seed=3, rig="cartpole")
    sc_pt = save_random_checkpoint(d / "sc.pt", config=TINY, seed=4, n=5, rig="cartpole")
    ck = torch.load(sc_pt, weights_only=True)
    ck["meta"].update(angle_channels=[1], raw_state_names=NAMES)
    torch.save(ck, sc_pt)
    raw = export_checkpoint(raw_pt, d / "raw.onnx", context=32).full_path
    sincos = export_checkpoint(sc_pt, d / "sincos.onnx", context=32).full_path
    ar = {}
    for kind, src in (("raw_ar", raw_pt), ("sincos_ar", sc_pt)):  # the same weights, autoregressive rollouts
        ck = torch.load(src, weights_only=True)
        ck["meta"]["train"] = {"kind": "finetune", "config": {"rollout_mode": "ar"}}
        torch.save(ck, d / f"{kind}.pt")
        ar[kind] = (d / f"{kind}.pt", export_checkpoint(d / f"{kind}.pt", d / f"{kind}.onnx", context=32,
                                                        streaming=d / f"{kind}_step.onnx").full_path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 95, 4)).astype(np.float32)
    x[..., 1] += np.linspace(0, 20, 95)  # the angle makes several turns
    x[..., 2] = 2.0 + 1e-5 * rng.normal(size=(9, 95))  # near-constant: the std floor decides its scale
    u = rng.normal(size=(9, 95, 1)).astype(np.float32)
    data = d / "d.npz"
    save_trajectories(data, x, u, 0.01, NAMES, ["voltage"], ["train"] * 3 + ["val"] * 3 + ["test"] * 3,
                      [f"r{i}" for i in range(9)], "cartpole")
    return {"raw": (raw_pt, raw), "sincos": (sc_pt, sincos), **ar, "data": data}


@pytest.mark.parametrize("kind", ["raw", "sincos", "raw_ar", "sincos_ar"])
def test_evaluate_and_score_give_the_same_numbers(exported, kind):
    """The same model, torch inside `rigfm evaluate`'s scoring path and its ONNX export inside `rigfm score`,
    on the same file: equal one-step and rollout MSE (up to the export's float parity)."""
    from controllers.evaluate import EvalConfig, load_splits, metric_setup
    from controllers.evaluate import score as score_torch
    from export.score import score as score_onnx
    from fm_core.angle_features import SinCosCodec, SinCosPredictor
    from fm_core.baselines import TransformerPredictor
    from fm_core.checkpoint import load_checkpoint

    pt, onnx = exported[kind]
    cfg = EvalConfig(context=10, horizon=20, rigs=["cartpole"])
    _, tr, _, te = load_splits(exported["data"], cfg)
    xw, uw, scale = metric_setup(tr, te, cfg)
    model, meta = load_checkpoint(pt)
    assert model.rollout_mode == ("ar" if kind.endswith("_ar") else "masked")
    pred = TransformerPredictor("fm", model, meta["n"], 1)
    if kind.startswith("sincos"):
        pred = SinCosPredictor(pred, SinCosCodec(4, [1]))
    ev = score_torch(pred, xw, uw, scale, cfg.context, cfg.one_step_skip)
    sc = score_onnx([onnx], exported["data"], context=10, horizon=20)
    row = sc["models"][0]
    assert cfg.one_step_skip == ONE_STEP_SKIP == row["one_step_skip"]
    np.testing.assert_allclose(sc["scale"], scale, rtol=1e-12)
    assert sc["scale"][2] == pytest.approx(2e-3)  # the floor, not the 1e-5 std
    assert row["windows"] == len(xw) == 9
    assert row["one_step_mse"] == pytest.approx(ev["one_step_mse"], rel=1e-4)
    assert row["multi_step_mse"] == pytest.approx(ev["multi_step_mse"], rel=1e-4)
    np.testing.assert_allclose(row["per_step_mse"], ev["per_step_mse"], rtol=1e-4)
