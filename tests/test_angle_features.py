"""(sin, cos) angle representation (fm_core.angle_features) and `rigfm evaluate --angle-features`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from controllers.evaluate import EvalConfig, EvaluateError, angle_codec
from fm_core.angle_features import SinCosCodec, SinCosPredictor, wrap_angle
from fm_core.baselines import Budget, fit_model
from fm_core.trajfile import TrajData
from rigs.config import RigConfigError
from rigs.physics import pendulum_angle_name


def spinning(k: int = 6, t: int = 120, seed: int = 0) -> TrajData:
    """Pendulum-like data that makes several full turns: x = [p, theta, p_dot, theta_dot]."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1, 1, size=(k, t, 1)).astype(np.float32)
    w = rng.uniform(6.0, 12.0, size=(k, 1))  # rad/s: up to ~2 turns per second
    time = np.arange(t) * 0.01
    theta = 2.0 + w * time[None]
    p = np.cumsum(0.01 * u[..., 0], axis=1)
    x = np.stack([p, theta, np.gradient(p, axis=1), np.broadcast_to(w, theta.shape)], axis=-1)
    return TrajData(
        x.astype(np.float32), u, 0.01, ["p", "theta", "p_dot", "theta_dot"], ["voltage"], "cartpole"
    )


def test_rig_pendulum_angle_comes_from_the_physics_module():
    assert pendulum_angle_name("cartpole") == "theta"
    assert pendulum_angle_name("furuta") == "alpha"  # the Furuta's "theta" is the arm
    with pytest.raises(RigConfigError, match="unknown rig kind 'qube'"):
        pendulum_angle_name("qube")


def test_codec_layout_names_and_exact_round_trip_through_full_turns():
    td = spinning()
    codec = SinCosCodec(4, [1])
    z = codec.encode(td.x)
    assert z.shape == (*td.x.shape[:-1], 5)
    assert codec.names(td.state_names) == ["p", "sin(theta)", "cos(theta)", "p_dot", "theta_dot"]
    np.testing.assert_allclose(z[..., 1] ** 2 + z[..., 2] ** 2, 1.0, atol=1e-6)
    np.testing.assert_array_equal(z[..., [0, 3, 4]], td.x[..., [0, 2, 3]])
    assert np.ptp(td.x[..., 1]) > 4 * np.pi  # the data really wraps more than once
    back = codec.decode_sequence(z[:, 30:], td.x[:, 29, [1]])
    np.testing.assert_allclose(back, td.x[:, 30:], atol=2e-5)
    # teacher-forced decoding picks the turn nearest to the previous angle, 2 pi off or not
    prev = td.x[:, :-1, [1]] + 2 * np.pi * 3
    step = codec.decode_step(z[:, 1:], prev)
    np.testing.assert_allclose(step[..., 1], td.x[:, 1:, 1] + 6 * np.pi, atol=1e-4)
    assert np.all(np.abs(wrap_angle(np.array([np.pi, -np.pi, 7.0]))) <= np.pi)


def test_codec_refuses_bad_channels_and_shapes():
    with pytest.raises(ValueError, match="no angle channel"):
        SinCosCodec(4, [])
    with pytest.raises(ValueError, match=r"angle channel\(s\) \[4\] outside a state of 4"):
        SinCosCodec(4, [4])
    with pytest.raises(ValueError, match="expected 4 state channels, got 3"):
        SinCosCodec(4, [1]).encode(np.zeros((2, 3)))


def test_a_real_model_trained_on_sincos_predicts_in_the_logged_units():
    tr, va = spinning(8, seed=1), spinning(4, seed=2)
    codec = SinCosCodec(4, [1])
    inner = fit_model(
        "linreg", codec.encode_data(tr), codec.encode_data(va), 0, Budget(val_rollout=(30, 50)), 1.0
    )
    pred = SinCosPredictor(inner, codec)
    te = spinning(3, seed=3)
    roll = pred.rollout(te.x[:, :30], te.u[:, :29], te.u[:, 29:79])
    assert roll.shape == (3, 50, 4) and np.all(np.isfinite(roll))
    # the angle continues the context's turn count (no 2 pi jumps) and follows the truth closely
    assert np.max(np.abs(np.diff(roll[..., 1], axis=1))) < 0.5  # true steps <= 0.12 rad; a wrap would be ~6
    rms = np.sqrt(np.mean((roll[..., 1] - te.x[:, 30:80, 1]) ** 2))
    hold = np.sqrt(np.mean((te.x[:, 29:30, 1] - te.x[:, 30:80, 1]) ** 2))  # persistence: > 2 rad here
    assert rms < 0.5 * hold
    one = pred.one_step(te.x, te.u)
    assert one.shape == (3, 119, 4)
    assert np.sqrt(np.mean((one[..., 1] - te.x[:, 1:, 1]) ** 2)) < 0.05
    assert pred.info["angle_features"] == "sincos"


def test_evaluate_option_is_validated_and_names_the_missing_state():
    with pytest.raises(EvaluateError, match="angle_features 'polar'"):
        EvalConfig(angle_features="polar")
    td = spinning()
    assert angle_codec("cartpole", td).channels == (1,)
    with pytest.raises(EvaluateError, match="the furuta data has no state 'alpha'"):
        angle_codec("furuta", td)


def test_cli_runs_every_model_kind_on_sincos_and_records_it(tmp_path):
    import torch

    from controllers.experiment_commands import register
    from fm_core.checkpoint import save_checkpoint
    from fm_core.model import DynamicsFM, ModelConfig
    from fm_core.trajfile import save_trajectories

    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "tiny.pt",
        DynamicsFM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=128)),
        meta={"rig": "synthetic"},
    )
    td = spinning(12, t=60, seed=4)
    data = tmp_path / "spin.npz"
    split = np.array(["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    save_trajectories(
        data,
        td.x,
        td.u,
        dt=0.01,
        state_names=td.state_names,
        input_names=["voltage"],
        split=split,
        source=[f"spin{i}" for i in range(12)],
        rig="cartpole",
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    opts = "--quick --rigs cartpole --models fm,specialist,linreg,ffn,sindy --fractions 1 --seeds 1"
    extra = ["--data", str(data), "--checkpoint", str(ckpt), "--angle-features", "sincos"]
    args = parser.parse_args(["evaluate", *opts.split(), *extra, "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    rr = res["rigs"]["cartpole"]
    assert res["config"]["angle_features"] == "sincos" and rr["angle_features"] == "sincos"
    assert rr["model_state_names"] == ["p", "sin(theta)", "cos(theta)", "p_dot", "theta_dot"]
    expected = {"fm0", "fm0_long", "persistence", "fm", "specialist", "linreg", "ffn", "sindy"}
    assert {r["model"] for r in rr["runs"]} == expected
    sindy = next(r for r in rr["runs"] if r["model"] == "sindy")
    assert sindy["info"]["angle_features"] == "sincos" and sindy["info"]["rollout_windows"] >= 1
    for r in rr["runs"]:
        assert np.isfinite(r["multi_step_mse"]) and len(r["per_channel_multi"]) == 4  # logged units
    assert np.asarray(rr["example"]["linreg"]).shape[-1] == 4
    assert "Angle features: `sincos`" in (tmp_path / "out" / "summary.md").read_text()
