"""The ONNX pairs shipped in fm_core/weights: fresh against their .pt, equal to torch on a real window and
stream, the portable (standard-opset) exporter outside onnxruntime, and `rigfm demo` / `rigfm run --model
shipped` without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.onnx_runtime import OnnxPredictor
from export.quantize import QUANTIZED, RECIPE
from export.shipped import (
    REGENERATE,
    SHIPPED_RIGS,
    WEIGHTS,
    checkpoint_path,
    file_sha256,
    metadata,
    shipped_onnx,
    staleness,
)

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"cartpole": ["p", "sin(theta)", "cos(theta)", "p_dot", "theta_dot"],
          "furuta": ["theta", "sin(alpha)", "cos(alpha)", "theta_dot", "alpha_dot"]}


def _sim_run(rig: str, t: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """A chirp-driven run of the rig's simulator from near hanging: (t, 4) states, (t, 1) inputs."""
    import rigs

    cfg = rigs.load_config(rig)
    plant = rigs.make_model(cfg)
    x, u = np.zeros((t, plant.n)), np.zeros((t, plant.m))
    s = np.asarray(plant.hanging(), float) + np.array([0.0, 0.3, 0.0, 0.0])
    for i in range(t):
        tt = i * cfg.model_dt
        u[i] = 3.0 * np.sin(2 * np.pi * (0.5 + 1.5 * tt) * tt)
        x[i] = s
        s = plant.step(s, u[i], cfg.model_dt)
    return x.astype(np.float32), u.astype(np.float32)


@pytest.mark.parametrize("rig", SHIPPED_RIGS)
def test_shipped_pair_records_its_checkpoint_and_layout(rig):
    """Fails when fm_core/weights/<rig>.pt changes without the ONNX pair being regenerated."""
    full = shipped_onnx(rig)
    assert full is not None and full.name == f"{rig}.int8.onnx", f"no shipped ONNX for {rig}: {REGENERATE}"
    assert staleness(full) is None, staleness(full)
    want = file_sha256(checkpoint_path(rig))
    meta = metadata(full)
    step = full.with_name(meta["rigfm.step_file"])
    assert step.name == f"{rig}_step.int8.onnx"
    for m in (meta, metadata(step)):
        assert m["rigfm.checkpoint_sha256"] == want, f"{rig}.pt changed: {REGENERATE}"
        assert m["rigfm.rig"] == rig and json.loads(m["rigfm.angle_channels"]) == [1]
        assert json.loads(m["rigfm.input_layout"]) == LAYOUT[rig]  # the graph's channels, (sin, cos) named
        assert json.loads(m["rigfm.op_domains"]) == ["com.microsoft"]  # the fused graphs need onnxruntime
        assert m["rigfm.context"] == "32" and m["rigfm.quantized"] == QUANTIZED
        assert m["rigfm.quantize_recipe"] == RECIPE
    p = OnnxPredictor(full, find_step=True)
    assert p.has_step and Path(p.step_path) == step and p.meta.input_layout == tuple(LAYOUT[rig])


def test_a_changed_checkpoint_makes_the_pair_stale(tmp_path):
    full = shipped_onnx("cartpole")
    assert full is not None
    for name in (full.name, metadata(full)["rigfm.step_file"]):
        shutil.copyfile(full.with_name(name), tmp_path / name)
    ckpt = tmp_path / "cartpole.pt"
    shutil.copyfile(checkpoint_path("cartpole"), ckpt)
    assert staleness(tmp_path / full.name, ckpt) is None
    with open(ckpt, "ab") as f:  # any change of the weights file
        f.write(b"\0")
    why = staleness(tmp_path / full.name, ckpt)
    assert why is not None and full.name in why and REGENERATE in why
    (tmp_path / metadata(full)["rigfm.step_file"]).unlink()
    assert "missing" in staleness(tmp_path / full.name, ckpt)


def _stream(pred: OnnxPredictor, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The served stream (step graph, shadow re-primes) over a run: predictions of x[1:] and window starts."""
    st = pred.stream(shadow=True)
    out, starts = [], []
    for t in range(x.shape[0] - 1):
        out.append(st.step(x[t], u[t]))
        starts.append(st.start)
    assert st.primes >= 2  # re-primed across the 32-step context
    return np.array(out), starts


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("rig", SHIPPED_RIGS)
def test_shipped_pair_matches_its_checkpoint(rig, tmp_path):
    """On a simulator run, window graph and the control loop's stream (step graph, re-primes):
    1. the float32 export of the .pt (`rigfm export`'s first stage) == torch to 1e-4 (the parity bound);
    2. the shipped int8 pair == the int8 quantisation of that export (export/quantize.py), to 1e-6;
    3. the shipped int8 pair against the simulator's truth, over the run's windows and its stream: one-step
       error within 1.1x torch's and the int8 - torch gap under a fifth of the one-step increment
       (tests/test_quantize.py's int8 bounds)."""
    import torch

    from export.onnx_export import export_checkpoint, load_for_export
    from export.quantize import quantize_int8
    from fm_core.angle_features import SinCosCodec

    res = export_checkpoint(checkpoint_path(rig), tmp_path / f"{rig}.onnx", context=32,
                            streaming=tmp_path / f"{rig}_step.onnx")
    q_step = quantize_int8(res.step_path, tmp_path / f"{rig}_step.int8.onnx")
    regen = OnnxPredictor(quantize_int8(res.full_path, tmp_path / f"{rig}.int8.onnx", q_step.name),
                          find_step=True)
    fp32 = OnnxPredictor(res.full_path, res.step_path)
    shipped = OnnxPredictor(shipped_onnx(rig), find_step=True)
    system = load_for_export(checkpoint_path(rig)).system
    codec = SinCosCodec(4, [1])
    x, u = _sim_run(rig)

    def torch_window(lo: int, hi: int) -> np.ndarray:
        """torch's predictions of x[lo+1 .. hi] from the window x[lo:hi] (raw units)."""
        xz = codec.encode(x[None, lo:hi])
        with torch.no_grad():
            pz = system(torch.from_numpy(xz), torch.from_numpy(u[None, lo:hi]), torch.ones(1, hi - lo))
        return codec.decode_step(pz.numpy()[0], x[lo:hi, [1]])

    w = slice(40, 72)  # a window of the model's context
    ref_w = torch_window(40, 72)
    f_stream, starts = _stream(fp32, x, u)
    ref_s = np.array([torch_window(lo, t + 1)[-1] for t, lo in enumerate(starts)])
    np.testing.assert_allclose(fp32.predict(x[None, w], u[None, w])[0], ref_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f_stream, ref_s, rtol=1e-4, atol=1e-4)

    got_w = shipped.predict(x[None, w], u[None, w])[0]
    got_s, shipped_starts = _stream(shipped, x, u)
    assert shipped_starts == starts
    np.testing.assert_allclose(got_w, regen.predict(x[None, w], u[None, w])[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_s, _stream(regen, x, u)[0], rtol=1e-6, atol=1e-6)

    # accuracy on every 32-step window of the run at a 40-step stride (one window's 31 predictions are too
    # few: a single window may be 13 % worse in int8 while the run's stream is within 3 %)
    los = range(0, x.shape[0] - 32 + 1, 40)
    win_q = np.concatenate([shipped.predict(x[None, lo:lo + 32], u[None, lo:lo + 32])[0][:-1] for lo in los])
    win_t = np.concatenate([torch_window(lo, lo + 32)[:-1] for lo in los])
    win_x = np.concatenate([x[lo + 1:lo + 32] for lo in los])
    win_prev = np.concatenate([x[lo:lo + 31] for lo in los])
    assert len(los) >= 3
    for what, got, ref, truth, prev in (("windows", win_q, win_t, win_x, win_prev),
                                        ("stream", got_s, ref_s, x[1:], x[:-1])):
        err_q, err_t = ((got - truth) ** 2).mean(0).sum(), ((ref - truth) ** 2).mean(0).sum()
        assert err_q <= 1.1 * err_t, (what, err_q, err_t)
        gap = np.sqrt(((got - ref) ** 2).mean(0)) / np.sqrt(((ref - prev) ** 2).mean(0))
        assert (gap < 0.2).all(), (what, gap)


@pytest.mark.usefixtures("torch_one_thread")
def test_portable_exporter_writes_standard_onnx_that_runs_outside_onnxruntime(tmp_path):
    """`rigfm export --exporter torchscript` of a shipped .pt: only standard-domain operators, onnx.checker,
    and onnx's own ReferenceEvaluator (numpy, no onnxruntime) gives torch's predictions."""
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator

    from controllers.cli import main
    from export.onnx_export import load_for_export
    from fm_core.angle_features import SinCosCodec

    full = tmp_path / "portable.onnx"
    assert main(["export", str(checkpoint_path("cartpole")), "-o", str(full), "--context", "32", "--exporter",
                 "torchscript"]) == 0
    system = load_for_export(checkpoint_path("cartpole")).system
    x, u = _sim_run("cartpole", 24)
    xz = SinCosCodec(4, [1]).encode(x)[None]
    model = onnx.load(str(full))
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["rigfm.op_domains"]) == [] and props["rigfm.exporter"] == "torchscript"
    assert json.loads(props["rigfm.input_layout"]) == LAYOUT["cartpole"]
    ref = ReferenceEvaluator(onnx.load(str(full)))
    obs = np.ones((1, 24), np.float32)
    pz = ref.run(["pred"], {"x": xz, "u": u[None], "obs": obs})[0]
    with torch.no_grad():
        want = system(torch.from_numpy(xz), torch.from_numpy(u[None]), torch.from_numpy(obs)).numpy()
    assert np.abs(pz - want).max() <= 1e-4 * np.abs(want).max()



def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment where `import torch` and `import onnx` fail in every process (a `pip install -e .`
    rig PC): shadow packages first on PYTHONPATH, inherited by the virtual rig and predictor processes."""
    shadow = tmp_path / "shadow"
    for name in ("torch", "onnx"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), str(ROOT)]))


def test_demo_serves_the_shipped_onnx_without_torch(tmp_path):
    env = _no_torch_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed here" in probe.stderr
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "controllers.cli", "demo", "cartpole", "--duration", "3",
                        "--no-plots", "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "model: fm_core/weights/cartpole.int8.onnx (shipped ONNX of cartpole.pt)" in summary
    s = json.loads((out / "summary.json").read_text())
    # the predictor process served this file (the session checked its info reply); counts vary with the load
    assert s["fault"] is None and s["predictor"]["pred_requests"] > 0
    from hardware.log_reader import read_topics

    scan, _ = read_topics(s["log_files"][0], set())
    models = [m["model"] for _, m in scan.metadata if "model" in m]
    assert models == [str(WEIGHTS / "cartpole.int8.onnx")], scan.metadata
    assert not list(out.glob("*.onnx"))  # nothing was exported


def test_run_model_shipped_without_torch(tmp_path):
    env = _no_torch_env(tmp_path)
    summary = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "controllers.cli", "run", "furuta", "--virtual", "--controller",
                        "lqr", "--init", "upright", "--model", "shipped", "--duration", "2", "--quiet",
                        "--stale-ms", "1000", "--summary-json", str(summary)],
                       env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model: {WEIGHTS / 'furuta.int8.onnx'} (shipped ONNX of furuta.pt)" in r.stderr
    s = json.loads(summary.read_text())
    assert s["fault"] is None and s["predictor"]["pred_requests"] > 0


def test_model_shipped_names_a_rig_without_one(tmp_path):
    from controllers.session import RunOptions, resolve_model

    toml = tmp_path / "bench_cart.toml"
    text = (ROOT / "rigs" / "cartpole.toml").read_text()
    assert 'name = "cartpole"' in text
    toml.write_text(text.replace('name = "cartpole"', 'name = "bench_cart"'))
    with pytest.raises(ValueError, match="no shipped ONNX model for rig 'bench_cart'"):
        resolve_model(RunOptions(rig=str(toml), virtual=True, model="shipped"))
    opts = resolve_model(RunOptions(rig="cartpole", virtual=True, model="shipped"))
    assert opts.model == str(WEIGHTS / "cartpole.int8.onnx")


def test_demo_model_choice_with_a_stale_pair(tmp_path, monkeypatch, capsys):
    """A pair whose checkpoint changed: exported afresh from the checkpoint when torch is there, served with a
    warning when it is not; neither a pair nor torch: a clear error."""
    import controllers.demo as demo
    import export.shipped as shipped

    weights = tmp_path / "weights"
    weights.mkdir()
    full = shipped_onnx("cartpole")
    for name in (full.name, metadata(full)["rigfm.step_file"]):
        shutil.copyfile(full.with_name(name), weights / name)
    shutil.copyfile(checkpoint_path("furuta"), weights / "cartpole.pt")  # another checkpoint: pair stale
    monkeypatch.setattr(shipped, "WEIGHTS", weights)
    monkeypatch.setattr(demo, "WEIGHTS", weights)
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    assert staleness(weights / full.name) is not None

    out = tmp_path / "run"
    out.mkdir()
    path, note = demo.demo_model(out, "cartpole")  # torch is installed here: export the checkpoint
    assert path == out / "model.onnx" and path.is_file() and "weights/cartpole.pt exported" in note
    assert metadata(path)["rigfm.checkpoint_sha256"] == file_sha256(weights / "cartpole.pt")
    assert "shipped ONNX is stale" in capsys.readouterr().err

    monkeypatch.setattr(demo, "_torch_available", lambda: False)
    path, note = demo.demo_model(out, "cartpole")
    assert path == weights / full.name and "WARNING" in note and REGENERATE in note
    for name in (full.name, metadata(full)["rigfm.step_file"]):
        (weights / name).unlink()
    with pytest.raises(RuntimeError, match="no shipped ONNX model for rig 'cartpole' and no torch"):
        demo.demo_model(out, "cartpole")
