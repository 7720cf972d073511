"""ONNX export: graph validity, metadata, torch parity (random and simulator inputs), streaming == full."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx_helpers import TINY, rel_err

from export.kv_slots import buffer_step_io
from export.onnx_export import ExportError, export_checkpoint, load_for_export, save_random_checkpoint
from export.onnx_runtime import FULL_INPUTS, ModelFileError, OnnxPredictor, parse_metadata
from export.quantize import RECIPE

CONTEXT = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    ck = save_random_checkpoint(d / "tiny.pt", config=TINY, seed=3)
    res = export_checkpoint(ck, d / "tiny.onnx", context=CONTEXT, streaming=d / "tiny_step.onnx")
    return ck, res


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    """Default ModelConfig (the shipped size), random weights."""
    d = tmp_path_factory.mktemp("default")
    ck = save_random_checkpoint(d / "default.pt", seed=1)
    res = export_checkpoint(ck, d / "model.onnx", context=64, streaming=d / "model_step.onnx")
    return ck, res


def simulator_inputs(batch: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """'Real' inputs: cart-pole trajectories from rigs.make_model if available, else smooth signals."""
    rng = np.random.default_rng(seed)
    try:
        import rigs

        cfg = rigs.load_config("cartpole")
        model = rigs.make_model(cfg)
        dt = float(cfg.model_dt)
        x = np.zeros((batch, t, model.n))
        u = np.zeros((batch, t, model.m))
        for b in range(batch):
            xs = np.asarray(model.hanging(), float) + rng.normal(0, 0.1, model.n)
            freq, amp = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0)
            for i in range(t):
                ui = np.array([amp * np.sin(2 * np.pi * freq * i * dt)])
                x[b, i], u[b, i] = xs, ui
                xs = model.step(xs, ui, dt)
        return x.astype(np.float32), u.astype(np.float32)
    except (ImportError, AttributeError):
        tt = np.arange(t)[None, :, None] * 0.05
        ph = rng.uniform(0, 2 * np.pi, (batch, 1, 4))
        return np.sin(tt + ph).astype(np.float32), np.cos(0.7 * tt + ph[..., :1]).astype(np.float32)


def torch_full(system, x, u, obs) -> np.ndarray:
    with torch.no_grad():
        return system(torch.from_numpy(x), torch.from_numpy(u), torch.from_numpy(obs)).numpy()


def test_graphs_validate_and_carry_metadata(tiny):
    ck, res = tiny
    step_inputs = buffer_step_io(TINY["n_layers"])[0]  # the fused exporter's in-place KV layout
    for path, graph, inputs in ((res.full_path, "full", FULL_INPUTS), (res.step_path, "step", step_inputs)):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        props = {p.key: p.value for p in model.metadata_props}
        meta = parse_metadata(props, str(path))
        assert meta.graph == graph
        assert (meta.n, meta.m, meta.patch, meta.context, meta.max_len) == (4, 1, 2, CONTEXT, 64)
        assert meta.state_names == ("x0", "x1", "x2", "x3") and meta.input_names == ("u0",)
        assert meta.dt == 0.01 and meta.rig == "synthetic"
        assert len(meta.checkpoint_sha256) == 64 and meta.model_version
        assert meta.x_std != (1.0,) * 4  # non-trivial normalisation travelled into the file
        assert json.loads(props["rigfm.model_config"])["d_model"] == 32
        assert [i.name for i in model.graph.input] == list(inputs)
        assert meta.step_cache == ("buffer" if graph == "step" else "")
    full_props = {p.key: p.value for p in onnx.load(str(res.full_path)).metadata_props}
    assert full_props["rigfm.step_file"] == res.step_path.name
    step_props = {p.key: p.value for p in onnx.load(str(res.step_path)).metadata_props}
    with pytest.raises(ModelFileError, match="rigfm.step_cache"):
        parse_metadata(step_props | {"rigfm.step_cache": "ring"}, "s.onnx")
    older = {k: v for k, v in step_props.items() if k != "rigfm.step_cache"}
    with pytest.raises(ModelFileError, match="older layout: export the checkpoint again"):
        parse_metadata(older, "old.onnx")  # a step graph from before the one (buffer) layout


@pytest.mark.parametrize("which", ["tiny", "default_model"])
def test_full_graph_parity_random_and_simulator(which, request):
    ck, res = request.getfixturevalue(which)
    system = load_for_export(ck).system
    pred = OnnxPredictor(res.full_path)
    rng = np.random.default_rng(0)
    for b, t in ((1, 1), (3, 17), (2, pred.meta.max_len)):
        x = rng.normal(0, 2, (b, t, 4)).astype(np.float32)
        u = rng.normal(0, 2, (b, t, 1)).astype(np.float32)
        obs = (rng.uniform(size=(b, t)) > 0.3).astype(np.float32)
        assert rel_err(pred.predict(x, u, obs), torch_full(system, x, u, obs)) <= 1e-4
    x, u = simulator_inputs(4, 48)
    obs = np.ones((4, 48), np.float32)
    obs[:, 32:] = 0.0  # masked rollout part
    assert rel_err(pred.predict(x, u, obs), torch_full(system, x, u, obs)) <= 1e-4


@pytest.mark.parametrize("inputs", ["random", "simulator"])
def test_step_graph_parity_with_torch_step(tiny, inputs):
    """Step graph from an empty cache (S = 0) for 20 steps == torch SystemModel.step (pred and cache)."""
    ck, res = tiny
    system = load_for_export(ck).system
    pred = OnnxPredictor(res.full_path, res.step_path)
    if inputs == "simulator":
        x, u = simulator_inputs(2, 20, seed=1)
    else:
        rng = np.random.default_rng(11)
        x, u = (
            rng.normal(0, 2, (2, 20, 4)).astype(np.float32),
            rng.normal(0, 2, (2, 20, 1)).astype(np.float32),
        )
    p = system.patch
    cache = None
    k = v = np.zeros(
        (TINY["n_layers"], 2, TINY["n_heads"], 0, TINY["d_model"] // TINY["n_heads"]), np.float32
    )
    for t in range(20):
        xw = np.zeros((2, p, 4), np.float32)
        uw = np.zeros((2, p, 1), np.float32)
        lo = max(0, t - p + 1)
        xw[:, p - (t + 1 - lo) :], uw[:, p - (t + 1 - lo) :] = x[:, lo : t + 1], u[:, lo : t + 1]
        ow = np.ones((2, p), np.float32)
        with torch.no_grad():
            ref, cache = system.step(torch.from_numpy(xw), torch.from_numpy(uw), torch.from_numpy(ow), cache)
        out, k, v = pred.step(xw, uw, ow, k, v)
        assert rel_err(out, ref[:, 0].numpy()) <= 1e-4
        assert (
            k.shape[3] == t + 1
            and rel_err(k, cache.k.numpy()) <= 1e-4
            and rel_err(v, cache.v.numpy()) <= 1e-4
        )


@pytest.mark.parametrize("shadow", [False, True])
def test_streaming_onnx_equals_full_window_onnx(tiny, shadow):
    _, res = tiny
    pred = OnnxPredictor(res.full_path, res.step_path)
    assert pred.has_step
    x, u = simulator_inputs(1, 3 * CONTEXT + 5, seed=2)
    stream = pred.stream(shadow=shadow)
    starts = set()
    for t in range(x.shape[1]):
        out = stream.step(x[0, t], u[0, t])
        ref = pred.predict(x[:, stream.start : t + 1], u[:, stream.start : t + 1])[0, -1]
        assert rel_err(out, ref) <= 1e-4, t
        if t < CONTEXT:
            assert stream.start == 0  # exact stream within the context
        starts.add(stream.start)
    assert stream.primes >= 2 and len(starts) >= 3  # the stream was re-primed when the context filled


def test_shadow_stream_never_calls_the_full_window_after_the_first_step(tiny):
    """Shadow re-priming: same starts and predictions as full re-priming, one-token calls only."""
    _, res = tiny
    pred = OnnxPredictor(res.full_path, res.step_path)
    x, u = simulator_inputs(1, 4 * CONTEXT, seed=4)
    plain, shadow = pred.stream(), pred.stream(shadow=True)
    calls = {"prime": 0}
    real_prime = pred.prime

    def counting_prime(*a):
        calls["prime"] += 1
        return real_prime(*a)

    pred.prime = counting_prime  # instance attribute: counts the full-window calls of both streams
    for t in range(x.shape[1]):
        a = plain.step(x[0, t], u[0, t])
        before = calls["prime"]
        b = shadow.step(x[0, t], u[0, t])
        assert shadow.start == plain.start, t
        assert rel_err(b, a) <= 1e-4, t
        assert calls["prime"] == before + (1 if t == 0 else 0), t  # only the stream's first step
    assert shadow.primes == plain.primes >= 3
    # primed mid-way from a history: the first re-prime falls back to a full window, then shadows again
    shadow.prime_history(x[0, : CONTEXT - 3], u[0, : CONTEXT - 3])
    for t in range(CONTEXT - 3, 3 * CONTEXT):
        out = shadow.step(x[0, t], u[0, t])
        ref = pred.predict(x[:, shadow.start : t + 1], u[:, shadow.start : t + 1])[0, -1]
        assert rel_err(out, ref) <= 1e-4, t


def test_stream_without_step_graph_recomputes_the_window(tiny):
    _, res = tiny
    full_only = OnnxPredictor(res.full_path)  # no step graph: every step is one full-window call
    assert not full_only.has_step
    x, u = simulator_inputs(1, CONTEXT + 6, seed=3)
    stream = full_only.stream()
    for t in range(x.shape[1]):
        out = stream.step(x[0, t], u[0, t])
        assert stream.start == max(0, t + 1 - CONTEXT)  # sliding window of `context` steps
        np.testing.assert_array_equal(
            out, full_only.predict(x[:, stream.start : t + 1], u[:, stream.start : t + 1])[0, -1]
        )


def test_rollout_matches_manual_masked_window(tiny):
    ck, res = tiny
    system = load_for_export(ck).system
    pred = OnnxPredictor(res.full_path)
    x, u = simulator_inputs(1, 10, seed=4)
    plan = np.random.default_rng(5).normal(size=(3, 6, 1)).astype(np.float32)
    # x_hist one longer than u_hist: plan[:, 0] is applied at the current state x_hist[-1]
    out = pred.rollout(x[0], u[0, :9], plan)
    xx = np.zeros((3, 15, 4), np.float32)
    xx[:, :10] = x[0]
    uu = np.concatenate([np.repeat(u[:, :9], 3, 0), plan], axis=1)
    obs = np.zeros((3, 15), np.float32)
    obs[:, :10] = 1
    assert out.shape == (3, 6, 4)
    assert rel_err(out, torch_full(system, xx, uu, obs)[:, 9:]) <= 1e-4
    # equal-length history ("u_hist[i] led to x_hist[i]", as controllers log it): the first row is ignored
    out2 = pred.rollout(x[0], np.concatenate([np.full((1, 1), 99.0, np.float32), u[0, :9]]), plan)
    np.testing.assert_array_equal(out2, out)
    # a long history is cut to the context; a too-short u_hist is refused
    xl, ul = simulator_inputs(1, 40, seed=6)
    long_out = pred.rollout(xl[0], ul[0, :39], plan)
    short_out = pred.rollout(xl[0, -CONTEXT:], ul[0, 39 - CONTEXT + 1 : 39], plan)
    np.testing.assert_array_equal(long_out, short_out)
    with pytest.raises(ValueError, match="u_hist needs at least"):
        pred.rollout(x[0], u[0, :5], plan)


def test_onnx_rollout_matches_fm_core_rollout(tiny):
    """Same rollout semantics as fm_core.finetune.rollout (the training side's masked rollout)."""
    finetune = pytest.importorskip("fm_core.finetune")
    if not hasattr(finetune, "rollout"):
        pytest.skip("fm_core.finetune.rollout not available")
    ck, res = tiny
    system = load_for_export(ck).system
    pred = OnnxPredictor(res.full_path)
    x, u = simulator_inputs(1, 12, seed=8)
    plan = np.random.default_rng(9).normal(size=(4, 7, 1)).astype(np.float32)
    ours = pred.rollout(x[0], u[0, :11], plan)
    with torch.no_grad():
        ref = finetune.rollout(system, np.repeat(x, 4, 0), np.repeat(u[:, :11], 4, 0), plan)
    assert rel_err(ours, np.asarray(ref)) <= 1e-4


def test_checkpoint_errors_name_the_problem(tmp_path, tiny):
    with pytest.raises(ExportError, match="not found"):
        load_for_export(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(ExportError, match="format"):
        load_for_export(bad)
    ck, _ = tiny
    raw = torch.load(ck, weights_only=True)
    raw["meta"].update(n=None, state_names=[])  # like a synthetic pretraining checkpoint
    nometa = tmp_path / "pretrained.pt"
    torch.save(raw, nometa)
    with pytest.raises(ExportError, match=r"meta\.n .*--n"):
        load_for_export(nometa)
    assert load_for_export(nometa, n=3).meta["n"] == 3
    with pytest.raises(ExportError, match="context"):
        export_checkpoint(ck, tmp_path / "x.onnx", context=1000)


def test_predictor_rejects_wrong_files_and_inputs(tiny, tmp_path):
    _, res = tiny
    with pytest.raises(ModelFileError, match="expected the full-window graph"):
        OnnxPredictor(res.step_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    with pytest.raises(ModelFileError, match="junk.onnx"):
        OnnxPredictor(junk)
    pred = OnnxPredictor(res.full_path)
    with pytest.raises(ValueError, match="x must have shape"):
        pred.predict(np.zeros((1, 3, 5)), np.zeros((1, 3, 1)))
    with pytest.raises(ValueError, match="NaN"):
        pred.predict(np.full((1, 3, 4), np.nan), np.zeros((1, 3, 1)))
    with pytest.raises(ValueError, match="max_len"):
        pred.predict(np.zeros((1, 65, 4)), np.zeros((1, 65, 1)))


def test_export_cli_with_quantize(tiny, tmp_path):
    ck, _ = tiny
    out = tmp_path / "cli.onnx"
    cmd = [
        sys.executable,
        "-m",
        "controllers.cli",  # `rigfm export` through the umbrella CLI
        "export",
        str(ck),
        "-o",
        str(out),
        "--context",
        "8",
        "--streaming",
        str(tmp_path / "cli_step.onnx"),
        "--quantize",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    q = tmp_path / "cli.int8.onnx"
    assert q.is_file() and (tmp_path / "cli_step.int8.onnx").is_file()
    fp = OnnxPredictor(out, tmp_path / "cli_step.onnx")
    qp = OnnxPredictor(q)
    assert fp.meta.context == 8 and qp.meta.quantized == "int8-dynamic"
    assert qp.meta.step_file == "cli_step.int8.onnx"  # int8 windows pair with the int8 step graph
    assert RECIPE in r.stdout  # the recipe is named (export/quantize.py)
    x, u = simulator_inputs(2, 8)
    assert rel_err(qp.predict(x, u), fp.predict(x, u)) < 0.2  # int8: close, not exact
    qs = OnnxPredictor(q, tmp_path / "cli_step.int8.onnx")  # the int8 step graph keeps the in-place layout
    assert qs.step_meta.step_cache == "buffer" and qs.step_meta.quantized == "int8-dynamic"
    a, b = fp.stream(shadow=True), qs.stream(shadow=True)
    for t in range(3 * 8):  # crosses re-primes (context 8)
        assert rel_err(b.step(x[0, t % 8], u[0, t % 8]), a.step(x[0, t % 8], u[0, t % 8])) < 0.2, t
    assert a.primes == b.primes >= 2
    r = subprocess.run(
        [sys.executable, "-m", "export.export_commands", "export", str(tmp_path / "nope.pt"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "nope.pt" in r.stderr


def test_torchscript_exporter_parity_and_fused_is_smaller(tiny, tmp_path):
    """The traced (portable) window graph agrees with torch and the fused default; it has no step graph."""
    ck, res = tiny
    ts = export_checkpoint(ck, tmp_path / "t.onnx", context=CONTEXT, exporter="torchscript")
    assert res.metadata["rigfm.exporter"] == "fused" and ts.metadata["rigfm.exporter"] == "torchscript"
    assert max(ts.parity.values()) <= 1e-4 and max(res.parity.values()) <= 1e-4
    assert res.nodes["full"] * 3 < ts.nodes["full"] and ts.step_path is None and "step" not in ts.nodes
    with pytest.raises(ExportError, match="window graph only"):
        export_checkpoint(ck, tmp_path / "t2.onnx", streaming=tmp_path / "t2.s.onnx", exporter="torchscript")
    system = load_for_export(ck).system
    x, u = simulator_inputs(2, 30)
    obs = np.ones((2, 30), np.float32)
    obs[:, 20:] = 0.0
    a = OnnxPredictor(ts.full_path).predict(x, u, obs)
    b = OnnxPredictor(res.full_path).predict(x, u, obs)
    assert rel_err(a, torch_full(system, x, u, obs)) <= 1e-4 and rel_err(b, a) <= 1e-4


def test_export_parity_check_catches_a_wrong_graph(tiny, tmp_path):
    """check_parity (run on every export) rejects a graph whose weights differ from the checkpoint."""
    from onnx import numpy_helper

    from export.onnx_export import check_parity

    ck, res = tiny
    loaded = load_for_export(ck)
    model = onnx.load(str(res.full_path))
    init = next(i for i in model.graph.initializer if i.name == "l0_w_qkv")
    w = numpy_helper.to_array(init).copy()
    w[0, 0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    assert check_parity(loaded, "full", res.full_path) <= 1e-4
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(loaded, "full", bad)


def test_unknown_exporter_is_named(tiny, tmp_path):
    ck, _ = tiny
    with pytest.raises(ExportError, match="unknown exporter 'nope'"):
        export_checkpoint(ck, tmp_path / "x.onnx", exporter="nope")
