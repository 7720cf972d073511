"""The Lyapunov-exponent estimate (fm_core/lyapunov.py) on maps with known exponents, the model's latent
map (it follows the model's own autoregressive rollout; exact gradients), and the PDEDER penalty in
pretraining."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fm_core.config import ConfigError, load_config
from fm_core.data import BatchSpec, make_batch
from fm_core.lyapunov import latent_lyapunov, latent_map, max_lyapunov
from fm_core.model import DynamicsFM, ModelConfig
from fm_core.train import pretrain

SMOKE = Path(__file__).resolve().parents[1] / "fm_core" / "configs" / "smoke.toml"

pytestmark = pytest.mark.usefixtures("torch_one_thread")
F64 = torch.float64


def linear(a: torch.Tensor):
    return lambda x, c: (x @ a.T, c)


def test_linear_map_gives_the_log_spectral_radius_and_the_top_singular_growth():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 3, generator=g, dtype=F64)
    a = q @ torch.diag(torch.tensor([1.3, 0.9, -0.5], dtype=F64)) @ torch.linalg.inv(q)  # not normal
    x0 = torch.randn(8, 3, generator=g, dtype=F64)
    lam = max_lyapunov(linear(a), x0, 100, burn_in=50, generator=g)
    np.testing.assert_allclose(lam.numpy(), math.log(1.3), atol=1e-6)  # log of the spectral radius
    # no burn-in, k steps from the top right singular vector of A^k: exactly (1/k) log sigma_max(A^k)
    k = 7
    _, s, vh = torch.linalg.svd(torch.linalg.matrix_power(a, k))
    lam_k = max_lyapunov(linear(a), x0[:1], k, v0=vh[:1])
    assert lam_k.item() == pytest.approx(math.log(s[0].item()) / k, abs=1e-10)
    assert lam_k.item() > math.log(1.3)  # the transient growth of a non-normal map
    # measured through an injective linear embedding y = M x the exponent is the same
    m = torch.randn(3, 6, generator=g, dtype=F64)
    lam_m = max_lyapunov(linear(a), x0, 100, burn_in=50, measure=lambda x, c: x @ m, generator=g)
    np.testing.assert_allclose(lam_m.numpy(), math.log(1.3), atol=0.02)


@pytest.mark.parametrize("r, expected", [(4.0, math.log(2.0)), (2.8, math.log(0.8))])
def test_logistic_map_expanding_and_contracting(r, expected):
    """x -> r x (1 - x): chaotic at r = 4 (exponent ln 2); at r = 2.8 it contracts to the fixed point
    1 - 1/r, where the exponent is ln |2 - r| = ln 0.8 < 0."""
    x0 = torch.linspace(0.1, 0.9, 256, dtype=F64)[:, None]
    lam = max_lyapunov(lambda x, c: (r * x * (1 - x), c), x0, 800 if r == 4.0 else 100, burn_in=100)
    assert (lam.mean().item() > 0) == (expected > 0)
    assert lam.mean().item() == pytest.approx(expected, abs=0.02)


def test_context_is_carried_and_bad_arguments_are_named():
    calls = []

    def step(x, c):
        k, n = c
        calls.append(n)
        return 2.0 * x + k, (k + 1.0, n + 1)

    lam = max_lyapunov(step, torch.ones(2, 1, dtype=F64), 3, ctx=(torch.zeros(1, dtype=F64), 0))
    assert calls == [0, 1, 2]
    np.testing.assert_allclose(lam.numpy(), math.log(2.0))  # the additive context does not change J
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        max_lyapunov(step, torch.ones(2, 1), 0)


def tiny(dtype=torch.float32) -> tuple[DynamicsFM, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = DynamicsFM(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64)).to(dtype)
    spec = BatchSpec(batch_size=6, seq_len=40, patch=2, n_max=6, m_max=2, mask_prob=0.0)
    b = make_batch(np.random.default_rng(0), spec, {"n_max": 6, "m_max": 2})
    return model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()}


def test_latent_map_follows_the_models_own_autoregressive_rollout():
    """The map's states are the model's predictions fed back as observed states (full forward each step)."""
    model, b = tiny()
    step, w, ctx, _ = latent_map(model, b, context=12, samples=3, n_steps=6)
    x, u, obs = b["x"][:3, 1:], b["u"][:3, 1:], b["obs"][:3, 1:]
    sm, im = b["state_mask"][:3], b["input_mask"][:3]
    seq = x[:, :12]
    with torch.no_grad():
        for i in range(7):
            o = torch.cat([obs[:, :12], torch.ones(3, seq.shape[1] - 12)], 1)
            nxt = model(seq, u[:, : seq.shape[1]], o, sm, im)[:, -1:]  # prediction of step seq_len
            if i > 0:
                w, ctx = step(w, ctx)
            torch.testing.assert_close(w[:, -1:], nxt, rtol=1e-4, atol=1e-5)
            seq = torch.cat([seq, nxt], 1)
    assert ctx[0].shape[3] == 12 + 6  # the cache grew by one token per step


def test_penalty_gradient_is_exact_and_nonzero():
    """float64, finite differences along a random direction of three parameter tensors."""
    model, b = tiny(F64)

    def est():
        return latent_lyapunov(model, b, steps=3, context=12, samples=3, burn_in=1,
                               generator=torch.Generator().manual_seed(1))

    model.zero_grad()
    est().backward()
    params = dict(model.named_parameters())
    for name in ("blocks.0.attn.k.weight", "embed.fc1.weight", "head.fc2.weight"):
        p = params[name]
        d = torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
        analytic = float((p.grad * d).sum())
        with torch.no_grad():
            p += 1e-6 * d
            plus = float(est())
            p -= 2e-6 * d
            minus = float(est())
            p += 1e-6 * d
        assert analytic != 0.0
        assert analytic == pytest.approx((plus - minus) / 2e-6, rel=1e-5, abs=1e-9), name


def test_pretraining_with_the_penalty_trains_without_nan(tmp_path):
    opts = ["train.steps=4", "train.log_every=2", "train.lyapunov_weight=0.1", "train.lyapunov_context=8",
            "train.lyapunov_steps=4", "train.lyapunov_samples=2"]
    s = pretrain(load_config(SMOKE, opts), tmp_path / "on", progress=False)
    off = pretrain(load_config(SMOKE, ["train.steps=4", "train.log_every=2"]), tmp_path / "off",
                   progress=False)
    assert s["completed"] and math.isfinite(s["final_train_loss"])
    hist = json.loads((tmp_path / "on" / "metrics.json").read_text())["history"]
    assert len(hist) == 2 and all(math.isfinite(h["lyapunov"]) for h in hist)
    assert "lyapunov" not in json.loads((tmp_path / "off" / "metrics.json").read_text())["history"][-1]
    assert s["param_hash"] != off["param_hash"]  # the penalty changed the update
    again = pretrain(load_config(SMOKE, opts), tmp_path / "again", progress=False)
    assert again["param_hash"] == s["param_hash"]  # tangents drawn from (seed, step): reproducible


def test_config_checks_the_estimate_fits_the_window():
    with pytest.raises(ConfigError, match=r"lyapunov_context .* must be <= \[data\] seq_len=24"):
        load_config(SMOKE, ["train.lyapunov_weight=0.1"])  # default context 16 + 1 + 8 + 1 > 24
    with pytest.raises(ConfigError, match="lyapunov_weight must be >= 0"):
        load_config(SMOKE, ["train.lyapunov_weight=-1"])
    load_config(SMOKE)  # off by default: no constraint
