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
    assert full is not None and full.name == f"{rig}.onnx", f"no shipped ONNX for {rig}: {REGENERATE}"
    assert staleness(full) is None, staleness(full)
    want = file_sha256(checkpoint_path(rig))
    meta = metadata(full)
    step = full.with_name(meta["rigfm.step_file"])
    for m in (meta, metadata(step)):
        assert m["rigfm.checkpoint_sha256"] == want, f"{rig}.pt changed: {REGENERATE}"
        assert m["rigfm.rig"] == rig and json.loads(m["rigfm.angle_channels"]) == [1]
        assert json.loads(m["rigfm.input_layout"]) == LAYOUT[rig]  # the graph's channels, (sin, cos) named
        assert json.loads(m["rigfm.op_domains"]) == ["com.microsoft"]  # the fused graphs need onnxruntime
        assert m["rigfm.context"] == "32" and m.get("rigfm.quantized", "") == ""
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
    assert why is not None and "cartpole.onnx" in why and REGENERATE in why
    (tmp_path / metadata(full)["rigfm.step_file"]).unlink()
    assert "missing" in staleness(tmp_path / full.name, ckpt)


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("rig", SHIPPED_RIGS)
def test_shipped_pair_matches_torch_on_a_real_window_and_stream(rig):
    """onnxruntime (shipped files) vs torch (the .pt) on a simulator run: the window graph, and the stream the
    control loop uses (step graph, shadow re-primes across the 32-step context), both to 1e-4."""
    import torch

    from export.onnx_export import load_checkpoint
    from fm_core.angle_features import SinCosCodec

    pred = OnnxPredictor(shipped_onnx(rig), find_step=True)
    system = load_checkpoint(checkpoint_path(rig)).system
    codec = SinCosCodec(4, [1])
    x, u = _sim_run(rig)

    def torch_last(lo: int, hi: int) -> np.ndarray:
        """torch's prediction of x[hi] from the window x[lo:hi], decoded against x[hi - 1]."""
        xz, uu = codec.encode(x[None, lo:hi]), u[None, lo:hi]
        with torch.no_grad():
            pz = system(torch.from_numpy(xz), torch.from_numpy(uu), torch.ones(1, hi - lo)).numpy()
        return codec.decode_step(pz[0, -1], x[hi - 1, [1]])

    w = slice(40, 72)  # a window of the model's context
    got = pred.predict(x[None, w], u[None, w])[0]
    xz = codec.encode(x[None, w])
    with torch.no_grad():
        pz = system(torch.from_numpy(xz), torch.from_numpy(u[None, w]), torch.ones(1, 32)).numpy()[0]
    np.testing.assert_allclose(got, codec.decode_step(pz, x[w, [1]]), rtol=1e-4, atol=1e-4)

    stream = pred.stream(shadow=True)
    for t in range(x.shape[0] - 1):
        out = stream.step(x[t], u[t])
        np.testing.assert_allclose(out, torch_last(stream.start, t + 1), rtol=1e-4, atol=1e-4, err_msg=str(t))
    assert stream.primes >= 2  # the stream was re-primed (three times the context)


@pytest.mark.usefixtures("torch_one_thread")
def test_portable_exporter_writes_standard_onnx_that_runs_outside_onnxruntime(tmp_path):
    """`rigfm export --exporter torchscript` of a shipped .pt: only standard-domain operators, onnx.checker,
    and onnx's own ReferenceEvaluator (numpy, no onnxruntime) gives torch's predictions, window and step."""
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator

    from controllers.cli import main
    from export.onnx_export import load_checkpoint
    from fm_core.angle_features import SinCosCodec

    full, step = tmp_path / "portable.onnx", tmp_path / "portable_step.onnx"
    assert main(["export", str(checkpoint_path("cartpole")), "-o", str(full), "--streaming", str(step),
                 "--context", "32", "--exporter", "torchscript"]) == 0
    system = load_checkpoint(checkpoint_path("cartpole")).system
    x, u = _sim_run("cartpole", 24)
    xz = SinCosCodec(4, [1]).encode(x)[None]
    for path in (full, step):
        model = onnx.load(str(path))
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
    # the step graph ("concat" cache layout) from an empty cache, 6 steps, against torch's step
    rstep = ReferenceEvaluator(onnx.load(str(step)))
    c = system.core.cfg
    k = v = np.zeros((c.n_layers, 1, c.n_heads, 0, c.d_model // c.n_heads), np.float32)
    cache = None
    p = system.patch
    for t in range(6):
        xw, uw = np.zeros((1, p, 5), np.float32), np.zeros((1, p, 1), np.float32)
        ow = np.zeros((1, p), np.float32)
        lo = max(0, t - p + 1)
        xw[:, p - (t + 1 - lo):], uw[:, p - (t + 1 - lo):] = xz[:, lo:t + 1], u[None, lo:t + 1]
        ow[:, p - (t + 1 - lo):] = 1.0
        out, k, v = rstep.run(None, {"x_win": xw, "u_win": uw, "obs_win": ow, "past_k": k, "past_v": v})
        with torch.no_grad():
            r, cache = system.step(torch.from_numpy(xw), torch.from_numpy(uw), torch.from_numpy(ow), cache)
        assert np.abs(out - r[:, 0].numpy()).max() <= 1e-4 * np.abs(r.numpy()).max(), t


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
    assert "model: fm_core/weights/cartpole.onnx (shipped ONNX of cartpole.pt)" in summary
    s = json.loads((out / "summary.json").read_text())
    assert s["fault"] is None and s["predictor"]["pred_requests"] > 50
    assert s["monitor"]["err1_count"] > 0  # predictions came back and were scored against the rig
    assert not list(out.glob("*.onnx"))  # nothing was exported


def test_run_model_shipped_without_torch(tmp_path):
    env = _no_torch_env(tmp_path)
    summary = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "controllers.cli", "run", "furuta", "--virtual", "--controller",
                        "lqr", "--init", "upright", "--model", "shipped", "--duration", "2", "--quiet",
                        "--stale-ms", "200", "--summary-json", str(summary)],
                       env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model: {WEIGHTS / 'furuta.onnx'} (shipped ONNX of furuta.pt)" in r.stderr
    s = json.loads(summary.read_text())
    assert s["predictor"]["pred_requests"] > 20 and s["monitor"]["err1_count"] > 0


def test_model_shipped_names_a_rig_without_one(tmp_path):
    from controllers.session import RunOptions, resolve_model

    toml = tmp_path / "bench_cart.toml"
    text = (ROOT / "rigs" / "cartpole.toml").read_text()
    assert 'name = "cartpole"' in text
    toml.write_text(text.replace('name = "cartpole"', 'name = "bench_cart"'))
    with pytest.raises(ValueError, match="no shipped ONNX model for rig 'bench_cart'"):
        resolve_model(RunOptions(rig=str(toml), virtual=True, model="shipped"))
    opts = resolve_model(RunOptions(rig="cartpole", virtual=True, model="shipped"))
    assert opts.model == str(WEIGHTS / "cartpole.onnx")
