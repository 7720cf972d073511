"""Baseline predictors: ridge regression recovers a linear system, the FFN learns, rollout semantics agree
with
one-step prediction, and the transformer wrappers share fm_core.finetune's rollout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm_core.baselines import (
    Budget,
    TransformerPredictor,
    fit_ffn,
    fit_linreg,
    fit_model,
    zero_shot,
)
from fm_core.model import DynamicsFM, ModelConfig
from fm_core.trajfile import TrajData

A = np.array(
    [[1.0, 0.0, 0.01, 0.0], [0.0, 1.0, 0.0, 0.01], [-0.05, 0.02, 0.97, 0.0], [0.01, -0.08, 0.0, 0.98]]
)
B = np.array([[0.0], [0.0], [0.05], [-0.03]])


def linear_data(k: int, t: int, seed: int) -> TrajData:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(k, t, 1))
    x = np.zeros((k, t, 4))
    x[:, 0] = rng.normal(size=(k, 4))
    for i in range(t - 1):
        x[:, i + 1] = x[:, i] @ A.T + u[:, i] @ B.T
    return TrajData(x.astype(np.float32), u.astype(np.float32), 0.01)


def test_linreg_recovers_a_linear_system_and_rolls_out_exactly():
    tr, va, te = linear_data(20, 60, 0), linear_data(5, 60, 1), linear_data(4, 60, 2)
    p = fit_linreg(tr, va, 0, Budget(window=2), 1.0)
    one = p.one_step(te.x, te.u)
    assert one.shape == (4, 59, 4)
    assert np.abs(one - te.x[:, 1:])[:, 2:].max() < 1e-3  # after the edge-padded first steps
    roll = p.rollout(te.x[:, :20], te.u[:, :19], te.u[:, 19:-1])
    assert roll.shape == (4, 40, 4)
    assert np.abs(roll - te.x[:, 20:]).max() < 1e-2 * np.abs(te.x).max()
    assert p.info["ridge"] > 0 and p.info["n_train_trajectories"] == 20


def test_fraction_subsamples_the_same_trajectories_as_finetune():
    tr, va = linear_data(50, 30, 0), linear_data(5, 30, 1)
    assert fit_linreg(tr, va, 3, Budget(), 0.1).info["n_train_trajectories"] == 5
    assert fit_linreg(tr, va, 3, Budget(), 0.02).info["n_train_trajectories"] == 1


def test_ffn_learns_better_than_persistence_and_rollout_matches_one_step():
    tr, va, te = linear_data(20, 60, 0), linear_data(5, 60, 1), linear_data(4, 60, 2)
    p = fit_ffn(tr, va, 0, Budget(steps=150, val_every=25, patience=3, batch_size=8, seq_len=20), 1.0)
    one = p.one_step(te.x, te.u)
    persistence = np.mean((te.x[:, :-1] - te.x[:, 1:]) ** 2)
    assert np.mean((one - te.x[:, 1:]) ** 2) < 0.5 * persistence
    # the first rollout step is the one-step prediction from the same history
    r = p.rollout(te.x[:, :10], te.u[:, :9], te.u[:, 9:20])
    np.testing.assert_allclose(r[:, 0], one[:, 9], rtol=1e-5, atol=1e-5)
    assert np.isfinite(r).all() and p.info["steps_run"] <= 150


def tiny_model(seed: int = 0) -> DynamicsFM:
    torch.manual_seed(seed)
    return DynamicsFM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=64)).eval()


def test_transformer_predictor_rollout_first_step_equals_one_step():
    te = linear_data(3, 30, 2)
    p = zero_shot(tiny_model(), te)
    one = p.one_step(te.x, te.u)
    r = p.rollout(te.x[:, :12], te.u[:, :11], te.u[:, 11:20])
    assert one.shape == (3, 29, 4) and r.shape == (3, 9, 4)
    np.testing.assert_allclose(r[:, 0], one[:, 11], rtol=1e-4, atol=1e-4)
    # zero-shot normalisation comes from the given (train) split
    core = p.model
    np.testing.assert_allclose(core.x_mean[:4].numpy(), te.x.reshape(-1, 4).mean(0), atol=1e-4)


def test_fit_model_trains_every_transformer_kind_and_rejects_bad_names():
    tr, va = linear_data(6, 40, 0), linear_data(2, 40, 1)
    budget = Budget(steps=3, batch_size=2, seq_len=20, val_every=1, patience=5)
    ck = tiny_model()
    for name in ("fm", "specialist", "small_tf"):
        p = fit_model(name, tr, va, 0, budget, 0.5, ckpt=ck)
        assert isinstance(p, TransformerPredictor) and p.name == name
        assert np.isfinite(p.rollout(tr.x[:1, :10], tr.u[:1, :9], tr.u[:1, 9:15])).all()
    spec = fit_model("specialist", tr, va, 0, budget, 1.0, ckpt=ck)
    assert spec.model.cfg == ck.cfg  # same architecture as the foundation model ...
    assert not torch.equal(next(spec.model.parameters()), next(ck.parameters()))  # ... but not its weights
    with pytest.raises(ValueError, match="unknown model 'gp'"):
        fit_model("gp", tr, va, 0, budget, 1.0, ckpt=ck)
    with pytest.raises(ValueError, match="needs the pretrained checkpoint"):
        fit_model("fm", tr, va, 0, budget, 1.0)


def test_window_models_select_on_the_val_rollout_when_asked():
    from fm_core.baselines import _val_rollout_mse

    tr, va = linear_data(20, 60, 0), linear_data(5, 60, 1)
    p = fit_linreg(tr, va, 0, Budget(window=2, val_rollout=(20, 30)), 1.0)
    assert p.info["val_loss"] == pytest.approx(_val_rollout_mse(p, va, (20, 30)))
    assert p.info["val_loss"] < 1e-3  # the exact linear model rolls out almost perfectly
    f = fit_ffn(tr, va, 0, Budget(steps=40, val_every=10, patience=2, batch_size=8, seq_len=20,
                                  val_rollout=(20, 30)), 1.0)
    assert f.info["val_loss"] == pytest.approx(_val_rollout_mse(f, va, (20, 30)), rel=1e-5)
    with pytest.raises(ValueError, match="val_rollout context\\+horizon=90"):
        fit_linreg(tr, va, 0, Budget(val_rollout=(40, 50)), 1.0)


def test_fm_auto_fine_tuning_keeps_the_mode_with_the_lower_val_loss():
    tr, va = linear_data(6, 40, 0), linear_data(2, 40, 1)
    budget = Budget(steps=4, batch_size=2, seq_len=20, val_every=1, patience=5, val_rollout=(10, 10))
    ck = tiny_model()
    auto = fit_model("fm", tr, va, 0, Budget(**{**budget.__dict__, "ft_mode": "auto"}), 1.0, ckpt=ck)
    each = {m: fit_model("fm", tr, va, 0, Budget(**{**budget.__dict__, "ft_mode": m}), 1.0, ckpt=ck)
            for m in ("full", "head")}
    want = {m: p.info["best_val_loss"] for m, p in each.items()}
    assert auto.info["val_by_mode"] == pytest.approx(want)  # the same seeded fits
    assert auto.info["ft_mode"] == min(want, key=want.get)
    assert auto.info["best_val_loss"] == pytest.approx(min(want.values()))
    assert auto.info["train_s"] >= max(p.info["train_s"] for p in each.values())
