"""A (sin, cos) angle model through the deployment path: finetune --angle-features sincos -> export -> the
predictor (in-process and as a real process over ZeroMQ), which takes and returns raw, unwrapped states."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from export.client import PredictorProcess
from export.onnx_export import ExportError, export_checkpoint, load_for_export
from export.onnx_runtime import ModelFileError, OnnxPredictor, parse_metadata
from fm_core import train_commands
from fm_core.angle_features import SinCosCodec, wrap_angle
from fm_core.checkpoint import save_checkpoint
from fm_core.finetune import rollout as torch_rollout
from fm_core.model import DynamicsFM, ModelConfig
from fm_core.trajfile import save_trajectories

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 64}
CONTEXT = 16
NAMES = ["p", "theta", "p_dot", "theta_dot"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def spinning(k: int, t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cart-pole-like data whose pendulum angle (channel 1) makes several full turns."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1, 1, size=(k, t, 1)).astype(np.float32)
    w = rng.uniform(6.0, 12.0, size=(k, 1))
    theta = rng.uniform(-3, 3, size=(k, 1)) + w * np.arange(t)[None] * 0.02
    p = np.cumsum(0.02 * u[..., 0], axis=1)
    x = np.stack([p, theta, np.gradient(p, axis=1), np.broadcast_to(w, theta.shape)], axis=-1)
    return x.astype(np.float32), u


def _finetune_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    train_commands.register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A tiny checkpoint fine-tuned with --angle-features sincos by the real CLI, exported (both graphs)."""
    d = tmp_path_factory.mktemp("sincos")
    x, u = spinning(16, 60, 0)
    split = ["train"] * 10 + ["val"] * 3 + ["test"] * 3
    data = d / "spin.npz"
    save_trajectories(data, x, u, 0.02, NAMES, ["voltage"], split, [f"r{i}" for i in range(16)], "cartpole")
    torch.manual_seed(0)
    init = save_checkpoint(d / "init.pt", DynamicsFM(ModelConfig(**TINY)), meta={"rig": "synthetic"})
    rc = _finetune_cli(["finetune", "--init", str(init), "--data", str(data), "--steps", "6",
                        "--set", "val_every=3", "--set", "seq_len=24", "--set", "batch_size=4",
                        "--angle-features", "sincos", "--out", str(d / "ft"), "--context", "8",
                        "--horizon", "8", "--no-progress"])
    assert rc == 0
    ckpt = d / "ft" / "finetuned.pt"
    res = export_checkpoint(ckpt, d / "m.onnx", context=CONTEXT, streaming=d / "m_step.onnx")
    return {"ckpt": ckpt, "export": res, "x": x, "u": u, "dir": d}


def test_finetune_records_the_angle_layout_in_the_checkpoint(deployed):
    meta = torch.load(deployed["ckpt"], weights_only=True)["meta"]
    assert meta["n"] == 5 and meta["angle_channels"] == [1] and meta["raw_state_names"] == NAMES
    assert meta["state_names"] == ["p", "sin(theta)", "cos(theta)", "p_dot", "theta_dot"]
    assert meta["train"]["angle_features"] == "sincos"
    report = json.loads((deployed["dir"] / "ft" / "eval.json").read_text())
    assert report["test"]["state_space"] == "sincos" and np.isfinite(report["test"]["multi_step_mse"])


def test_exported_metadata_describes_raw_states(deployed):
    md = deployed["export"].metadata
    assert md["rigfm.n"] == "4" and json.loads(md["rigfm.state_names"]) == NAMES
    assert json.loads(md["rigfm.angle_channels"]) == [1] and len(json.loads(md["rigfm.x_std"])) == 5
    pred = OnnxPredictor(deployed["export"].full_path, deployed["export"].step_path)
    assert (pred.meta.n, pred.meta.n_model, pred.meta.angle_channels) == (4, 5, (1,))


def _torch_reference(ckpt, x, u, obs=None):
    """The torch model on (sin, cos) states and the codec (the evaluation's SinCosPredictor does the same)."""
    core = load_for_export(ckpt).system
    codec = SinCosCodec(4, [1])
    obs = np.ones(x.shape[:2], np.float32) if obs is None else obs
    with torch.no_grad():
        pz = core(torch.as_tensor(codec.encode(x)), torch.as_tensor(u), torch.as_tensor(obs)).numpy()
    return codec, pz


def test_predict_and_rollout_take_raw_states_and_match_torch(deployed):
    pred = OnnxPredictor(deployed["export"].full_path, deployed["export"].step_path)
    x, u = deployed["x"][:3, :20], deployed["u"][:3, :20]
    codec, pz = _torch_reference(deployed["ckpt"], x, u)
    got = pred.predict(x, u)
    assert got.shape == (3, 20, 4)
    np.testing.assert_allclose(got, codec.decode_step(pz, x[..., [1]]), rtol=1e-4, atol=1e-4)
    # the angle comes back unwrapped: within half a turn of the angle it follows, even many turns out
    far = x.copy()
    far[..., 1] += 6 * np.pi
    got_far = pred.predict(far, u)
    assert np.abs(got_far[..., 1] - far[..., 1]).max() < np.pi
    np.testing.assert_allclose(got_far[..., 1] - 6 * np.pi, got[..., 1], atol=2e-3)
    np.testing.assert_allclose(np.delete(got_far, 1, -1), np.delete(got, 1, -1), atol=2e-3)

    # rollout: open loop over 12 planned inputs, angles unwrapped along the horizon (torch, then decoded)
    xh, uh, plan = x[0, :8], u[0, :7], u[:, 7:19]
    roll = pred.rollout(xh, uh, plan)
    core = load_for_export(deployed["ckpt"]).system
    xz, uz = np.repeat(codec.encode(xh)[None], 3, 0), np.repeat(uh[None], 3, 0)
    ref_z = torch_rollout(core, xz, uz, plan).numpy()
    ref = codec.decode_sequence(ref_z, np.full((3, 1), xh[-1, 1]))
    np.testing.assert_allclose(roll, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(np.diff(roll[..., 1], axis=1)).max() < np.pi  # no 2*pi jumps along the horizon


def test_hidden_steps_unwrap_against_the_previous_prediction(deployed):
    pred = OnnxPredictor(deployed["export"].full_path)
    x, u = deployed["x"][:2, :12].copy(), deployed["u"][:2, :12]
    x[..., 1] += 4 * np.pi
    obs = np.ones((2, 12), np.float32)
    obs[:, 6:] = 0
    x_in = x * obs[..., None]  # hidden states are not known to the caller
    got = pred.predict(x_in, u, obs)
    codec, pz = _torch_reference(deployed["ckpt"], x_in, u, obs)
    ref = codec.decode_sequence(pz[:, 5:], x[:, 5, [1]])[:, 1:]  # hidden run unwraps from the last known one
    np.testing.assert_allclose(got[:, 6:], ref, rtol=1e-4, atol=1e-4)
    assert np.abs(got[:, 6:, 1] - x[:, 5:6, 1]).max() < 2 * np.pi


def test_stream_matches_the_full_window_through_re_primes(deployed):
    pred = OnnxPredictor(deployed["export"].full_path, deployed["export"].step_path)
    x, u = deployed["x"][4], deployed["u"][4]
    for shadow in (False, True):
        st = pred.stream(shadow=shadow)
        for t in range(3 * CONTEXT):  # crosses re-primes
            got = st.step(x[t], u[t])
            ref = pred.predict(x[None, st.start : t + 1], u[None, st.start : t + 1])[0, -1]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert st.primes >= 2 and abs(float(wrap_angle(got[1] - x[t, 1]))) < np.pi


def test_predictor_process_serves_raw_states_over_zeromq(deployed, tmp_path):
    local = OnnxPredictor(deployed["export"].full_path, deployed["export"].step_path)
    x, u = deployed["x"][5], deployed["u"][5]
    with PredictorProcess(deployed["export"].full_path, f"ipc://{tmp_path}/p.sock") as proc:
        with proc.client(5000) as c:
            info = c.info()
            got = (info["n"], info["n_model"], info["angle_channels"], info["state_names"])
            assert got == (4, 5, [1], NAMES)
            np.testing.assert_allclose(c.predict(x[None, :20], u[None, :20]),
                                       local.predict(x[None, :20], u[None, :20]), rtol=1e-6, atol=1e-6)
            plan = np.repeat(u[None, 9:19], 4, 0)
            np.testing.assert_allclose(c.rollout(x[:10], u[:9], plan), local.rollout(x[:10], u[:9], plan),
                                       rtol=1e-6, atol=1e-6)
            c.stream_reset()
            ref = local.stream(shadow=True)
            for t in range(2 * CONTEXT):
                got = c.stream_step(x[t], u[t])
                np.testing.assert_allclose(got, ref.step(x[t], u[t]), rtol=1e-6, atol=1e-6)


def test_bad_angle_layouts_are_refused_with_the_key_named(deployed, tmp_path):
    props = dict(deployed["export"].metadata)
    for bad in ("[4]", "[1, 1]", "[true]", "{", '"1"'):
        with pytest.raises(ModelFileError, match="rigfm.angle_channels"):
            parse_metadata({**props, "rigfm.angle_channels": bad}, "m.onnx")
    with pytest.raises(ModelFileError, match="rigfm.x_mean"):  # x stats must have the graph's n_model entries
        parse_metadata({**props, "rigfm.angle_channels": "[]"}, "m.onnx")
    raw = torch.load(deployed["ckpt"], weights_only=True)
    raw["meta"]["angle_channels"] = [7]
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ExportError, match=r"meta.angle_channels must list distinct raw .* in \[0, 4\)"):
        load_for_export(tmp_path / "bad.pt")


def test_finetune_sincos_names_the_missing_pendulum_state(tmp_path, capsys):
    x, u = spinning(6, 30, 1)
    data = tmp_path / "d.npz"
    save_trajectories(data, x, u, 0.02, ["a", "b", "c", "d"], ["voltage"], ["train"] * 4 + ["val"] * 2,
                      [f"r{i}" for i in range(6)], "cartpole")
    rc = _finetune_cli(["finetune", "--init", "none", "--data", str(data), "--steps", "2",
                        "--angle-features", "sincos", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "no state 'theta'" in capsys.readouterr().err


def test_finetune_inherits_the_angle_layout_of_its_init(deployed, tmp_path, capsys):
    """Fine-tuning a (sin, cos) checkpoint on new logs keeps its layout unless told otherwise (and warns)."""
    data = deployed["dir"] / "spin.npz"
    common = ["finetune", "--init", str(deployed["ckpt"]), "--data", str(data), "--steps", "2",
              "--set", "val_every=1", "--set", "seq_len=24", "--set", "batch_size=4", "--no-progress"]
    assert _finetune_cli([*common, "--out", str(tmp_path / "auto")]) == 0
    meta = torch.load(tmp_path / "auto" / "finetuned.pt", weights_only=True)["meta"]
    assert meta["angle_channels"] == [1] and meta["n"] == 5
    assert "changes what its state channels mean" not in capsys.readouterr().err
    assert _finetune_cli([*common, "--angle-features", "raw", "--out", str(tmp_path / "raw")]) == 0
    assert "trained with angle features 'sincos'; fine-tuning it with 'raw'" in capsys.readouterr().err
    meta = torch.load(tmp_path / "raw" / "finetuned.pt", weights_only=True)["meta"]
    assert meta["n"] == 4 and "angle_channels" not in meta


def test_export_cli_says_which_angles_the_graph_sees_as_sincos(deployed, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "export.export_commands", "export", str(deployed["ckpt"]), "-o",
           str(tmp_path / "m.onnx")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "angles: theta as (sin, cos) inside the graph" in out.stdout
