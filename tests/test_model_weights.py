"""Shipped checkpoints: the pretrained one predicts unseen synthetic systems; rig models serve raw states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fm_core.checkpoint import load_checkpoint
from fm_core.model import DynamicsFM
from fm_core.rkhs import RKHSConfig, generate_batch

WEIGHTS = Path(__file__).resolve().parents[1] / "fm_core" / "weights"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _one_step_mse(model: DynamicsFM, batch) -> float:
    x, u = torch.as_tensor(batch.x), torch.as_tensor(batch.u)
    sm = torch.as_tensor(batch.state_mask())
    im = torch.as_tensor(batch.input_mask())
    obs = torch.ones(x.shape[0], x.shape[1] - 1)
    with torch.no_grad():
        pred = model(x[:, :-1], u[:, :-1], obs, sm, im)
    se = ((pred - x[:, 1:]) ** 2) * sm[:, None]
    return float(se.sum() / (sm.sum() * (x.shape[1] - 1)))


def test_shipped_checkpoint_loads_and_beats_random_init():
    path = WEIGHTS / "default.pt"
    assert path.stat().st_size < 8 * 2**20, "default.pt must stay a few MB"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "rigfm-ckpt-v1" and raw["meta"]["rig"] == "synthetic"
    assert raw["meta"]["train"]["steps"] > 0
    model, _ = load_checkpoint(path)
    # fresh systems: a seed the training stream never uses (it uses SeedSequence([seed, stream, rank, i]))
    batch = generate_batch(np.random.default_rng(20261123), 32, 65, RKHSConfig())
    trained = _one_step_mse(model, batch)
    torch.manual_seed(0)
    random_init = _one_step_mse(DynamicsFM(model.cfg).eval(), batch)
    x = batch.x
    persistence = float((((x[:, 1:] - x[:, :-1]) ** 2) * batch.state_mask()[:, None]).sum()
                        / (batch.state_mask().sum() * (x.shape[1] - 1)))
    assert trained < random_init / 10, (trained, random_init)
    assert trained < persistence, (trained, persistence)
    assert (WEIGHTS / "MODEL_CARD.md").is_file() and (WEIGHTS / "loss_curve.png").is_file()


@pytest.mark.parametrize("rig", ["cartpole", "furuta"])
def test_shipped_rig_models_see_the_angle_as_sincos_and_serve_raw_states(rig, tmp_path):
    """fm_core/weights/<rig>.pt (MODEL_CARD.md): exported and run through the real onnxruntime predictor on
    the rig's own simulator, it beats holding the last state on every channel and is blind to whole turns."""
    import rigs
    from export.onnx_export import export_checkpoint
    from export.onnx_runtime import OnnxPredictor

    cfg = rigs.load_config(rig)
    plant = rigs.make_model(cfg)
    meta = torch.load(WEIGHTS / f"{rig}.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["angle_channels"] == [1] and meta["raw_state_names"] == list(cfg.state_names)
    assert meta["rig"] == rig and meta["n"] == 5
    pred = OnnxPredictor(export_checkpoint(WEIGHTS / f"{rig}.pt", tmp_path / "m.onnx").full_path)
    assert (pred.meta.n, pred.meta.state_names) == (4, tuple(cfg.state_names))
    x, u, s = np.zeros((1, 60, 4)), np.zeros((1, 60, 1)), np.asarray(plant.hanging(), float)
    for i in range(60):
        u[0, i] = 3.0 * np.sin(2 * np.pi * 1.5 * i * cfg.model_dt)
        x[0, i] = s
        s = plant.step(s, u[0, i], cfg.model_dt)
    x, u = x.astype(np.float32), u.astype(np.float32)
    one = pred.predict(x, u)[0, :-1]
    err = ((one - x[0, 1:]) ** 2).mean(0)
    hold = ((x[0, :-1] - x[0, 1:]) ** 2).mean(0)
    assert (err < hold / 2).all(), (err, hold)
    turned = x.copy()
    turned[..., 1] += 4 * np.pi  # two whole turns of the pendulum: the same pose
    np.testing.assert_allclose(pred.predict(turned, u)[0, :-1], one + [0, 4 * np.pi, 0, 0], atol=1e-3)
