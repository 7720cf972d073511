"""The shipped pretrained checkpoint: loads with weights_only=True and predicts unseen synthetic systems."""

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
