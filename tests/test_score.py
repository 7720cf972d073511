"""`rigfm score`: exported models scored on logged trajectories through the real onnxruntime predictor."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from export.onnx_export import export_checkpoint, save_random_checkpoint
from export.onnx_runtime import OnnxPredictor
from export.score import ScoreError, score
from fm_core.trajfile import save_trajectories

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 64}
NAMES = ["p", "theta", "p_dot", "theta_dot"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("score")
    raw = export_checkpoint(save_random_checkpoint(d / "raw.pt", config=TINY, seed=3), d / "raw.onnx",
                            context=32).full_path
    ck = torch.load(save_random_checkpoint(d / "sc.pt", config=TINY, seed=4, n=5), weights_only=True)
    ck["meta"].update(angle_channels=[1], raw_state_names=NAMES)
    torch.save(ck, d / "sc.pt")
    sincos = export_checkpoint(d / "sc.pt", d / "sincos.onnx", context=32).full_path
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 90, 4)).astype(np.float32)
    x[..., 1] += np.linspace(0, 20, 90)  # several turns of the angle
    u = rng.normal(size=(6, 90, 1)).astype(np.float32)
    data = d / "d.npz"
    save_trajectories(data, x, u, 0.01, NAMES, ["voltage"], ["train"] * 3 + ["test"] * 3,
                      [f"r{i}" for i in range(6)], "cartpole")
    return {"raw": raw, "sincos": sincos, "data": data, "x": x, "u": u}


def test_scores_equal_the_predictors_own_rollout(setup):
    res = score([setup["raw"], setup["sincos"]], setup["data"], context=10, horizon=20)
    scale = setup["x"][:3].reshape(-1, 4).astype(np.float64).std(0)
    np.testing.assert_allclose(res["scale"], scale, rtol=1e-5)
    for row, path in zip(res["models"], (setup["raw"], setup["sincos"]), strict=True):
        assert row["windows"] == 3 * 3  # 90 steps -> three windows of 30 per test trajectory
        p = OnnxPredictor(path)
        se, one = [], []
        for k in range(3, 6):
            for w in range(3):
                x, u = setup["x"][k, 30 * w : 30 * w + 30], setup["u"][k, 30 * w : 30 * w + 30]
                roll = p.rollout(x[:10], u[:9], u[None, 9:29])[0]
                se.append((((roll - x[10:]) / scale) ** 2).mean())
                # the first 10 targets are left out of the one-step MSE (fm_core.metrics.ONE_STEP_SKIP)
                one.append((((p.predict(x[None, :29], u[None, :29])[0] - x[1:]) / scale)[10:] ** 2).mean())
        assert row["multi_step_mse"] == pytest.approx(float(np.mean(se)), rel=1e-4)
        assert row["one_step_mse"] == pytest.approx(float(np.mean(one)), rel=1e-4)
        assert len(row["per_step_mse"]) == 20
        assert row["final_step_mse"] == pytest.approx(row["per_step_mse"][-1])
        for key, total in (("per_channel_one_step", "one_step_mse"), ("per_channel_multi", "multi_step_mse")):
            assert len(row[key]) == 4 and float(np.mean(row[key])) == pytest.approx(row[total], rel=1e-9)
    assert res["models"][1]["angle_channels"] == [1] and res["models"][0]["angle_channels"] == []


def test_bad_input_is_named(setup, tmp_path):
    with pytest.raises(ScoreError, match="no trajectories with split 'val'"):
        score([setup["raw"]], setup["data"], split="val")
    with pytest.raises(ScoreError, match="max_len=64"):
        score([setup["raw"]], setup["data"], context=30, horizon=50)
    with pytest.raises(ScoreError, match="T=90 steps"):
        score([setup["raw"]], setup["data"], context=40, horizon=60)
    with pytest.raises(ScoreError, match="--context and --horizon must be >= 1"):
        score([setup["raw"]], setup["data"], horizon=0)
    bad = tmp_path / "n3.npz"
    save_trajectories(bad, setup["x"][..., :3], setup["u"], 0.01, NAMES[:3], ["voltage"], ["test"] * 6,
                      [f"r{i}" for i in range(6)], "cartpole")
    with pytest.raises(ScoreError, match="serves n=4, m=1; the data has n=3"):
        score([setup["raw"]], bad, context=10, horizon=20)
    cartpole_model = export_checkpoint(save_random_checkpoint(tmp_path / "c.pt", config=TINY, rig="cartpole"),
                                       tmp_path / "c.onnx", context=32).full_path
    furuta_data = tmp_path / "furuta.npz"
    save_trajectories(furuta_data, setup["x"], setup["u"], 0.01, NAMES, ["voltage"], ["test"] * 6,
                      [f"r{i}" for i in range(6)], "furuta")
    with pytest.raises(ScoreError, match="c.onnx was trained for rig 'cartpole', but the data "
                                         "in .*furuta.npz is rig 'furuta'"):
        score([cartpole_model], furuta_data, context=10, horizon=20)
    assert score([cartpole_model], setup["data"], context=10, horizon=20)["models"][0]["windows"] == 9


def test_cli_is_torch_free_and_prints_the_table(setup, tmp_path):
    """`rigfm score` on a rig PC: torch and onnx unimportable, a (sin, cos) model among the models."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "from controllers.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "s.json"
    args = ["score", str(setup["raw"]), str(setup["sincos"]), "--data", str(setup["data"]), "--context", "10",
            "--horizon", "20", "--json", str(out)]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"| `{setup['sincos']}` | sin/cos |" in r.stdout and f"| `{setup['raw']}` | raw |" in r.stdout
    assert "Per state (one-step MSE / rollout MSE" in r.stdout
    assert len(json.loads(out.read_text())["models"]) == 2
    r = subprocess.run([sys.executable, "-c", code, "score", str(tmp_path / "nope.onnx"), "--data",
                        str(setup["data"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model file not found" in r.stderr and "Traceback" not in r.stderr
