"""In-place KV-cache slots (export.kv_slots) on the ``buffer`` step graph, against window-only streams."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_helpers import TINY, rel_err

from export.kv_slots import BufferSlots
from export.onnx_export import ExportError, export_checkpoint, save_random_checkpoint
from export.onnx_runtime import OnnxPredictor

CONTEXT = 16


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One random checkpoint exported twice: fused with its (buffer) step graph, and torchscript (the portable
    window graph alone, so its streams recompute the window every step)."""
    d = tmp_path_factory.mktemp("slots")
    ck = save_random_checkpoint(d / "tiny.pt", config=TINY, seed=5)
    fused = export_checkpoint(ck, d / "f.onnx", context=CONTEXT, streaming=d / "f_step.onnx")
    with pytest.raises(ExportError, match="window graph only"):
        export_checkpoint(ck, d / "t.onnx", context=CONTEXT, streaming=d / "ts.onnx", exporter="torchscript")
    traced = export_checkpoint(ck, d / "t.onnx", context=CONTEXT, exporter="torchscript")
    return OnnxPredictor(fused.full_path, fused.step_path), OnnxPredictor(traced.full_path, find_step=False)


def walk(seed: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(0, 0.2, (t, 4)), axis=0).astype(np.float32)
    return x, rng.normal(0, 1, (t, 1)).astype(np.float32)


def test_the_fused_export_writes_the_buffer_layout(layouts):
    buf, window_only = layouts
    assert buf.step_meta.step_cache == "buffer" and isinstance(buf.new_slots(2), BufferSlots)
    assert window_only.step_sess is None and window_only.meta.op_domains == ()


@pytest.mark.parametrize("shadow", [False, True])
def test_buffer_streams_agree_with_the_full_window(layouts, shadow):
    """Every cached step equals the full-window graph over the stream's history; the portable window-only
    stream (a full window every step) predicts the same to float tolerance."""
    buf, window_only = layouts
    x, u = walk(1, 4 * CONTEXT + 3)
    a, b = buf.stream(shadow=shadow), window_only.stream(shadow=shadow)
    for t in range(x.shape[0]):
        pa, pb = a.step(x[t], u[t]), b.step(x[t], u[t])
        ref = buf.predict(x[None, a.start : t + 1], u[None, a.start : t + 1])[0, -1]
        assert rel_err(pa, ref) <= 1e-4, t
        ref_b = window_only.predict(x[None, b.start : t + 1], u[None, b.start : t + 1])[0, -1]
        assert rel_err(pb, ref_b) <= 1e-4, t
    assert a.primes >= 3


def test_shadow_stream_on_a_buffer_graph_is_one_call_per_step(layouts):
    """Live and shadow caches advance in one batch-2 call, in place: one step-graph run per step, no prime."""
    buf, _ = layouts
    x, u = walk(2, 5 * CONTEXT)
    stream = buf.stream(shadow=True)
    stream.step(x[0], u[0])  # the first step primes from a one-step window
    sess = stream.slots.sess
    counts = {"step": 0, "prime": 0}

    class Counting:
        def run_with_iobinding(self, io):
            counts["step"] += 1
            return sess.run_with_iobinding(io)

    stream.slots.sess = Counting()
    real_prime = buf.prime
    buf.prime = lambda *a: counts.__setitem__("prime", counts["prime"] + 1) or real_prime(*a)
    try:
        kb = stream.slots.bufs[0][0]
        for t in range(1, x.shape[0]):
            stream.step(x[t], u[t])
            assert stream.slots.bufs[0][0] is kb  # the buffers are never replaced
        assert counts == {"step": x.shape[0] - 1, "prime": 0}
        assert stream.primes >= 4
    finally:
        del buf.prime


def test_batch_two_step_equals_two_single_steps(layouts):
    """Rows of different lengths in one call == each row alone (per-row positions and masks)."""
    buf, _ = layouts
    me = buf.meta
    x, u = walk(3, 12)
    both, single = buf.new_slots(2), buf.new_slots(2)
    for slots in (both, single):
        for row, length in ((0, 9), (1, 3)):
            _, k, v = buf.prime(x[None, :length], u[None, :length], np.ones((1, length), np.float32))
            slots.load(row, k, v)
    xw, uw = x[9 - me.patch + 1 : 10], u[9 - me.patch + 1 : 10]
    out2 = both.step((0, 1), xw, uw)
    out1 = {r: single.step((r,), xw, uw)[r] for r in (0, 1)}
    for r in (0, 1):
        assert rel_err(out2[r], out1[r]) <= 1e-5
    assert both.length(0) == 10 and both.length(1) == 4
    for (kb2, _), (kb1, _) in zip(both.bufs, single.bufs, strict=True):
        assert rel_err(kb2[0, :, :10], kb1[0, :, :10]) <= 1e-5
        assert rel_err(kb2[1, :, :4], kb1[1, :, :4]) <= 1e-5
    # row 0 continued alone equals the full window over its 11 steps
    pred = both.step((0,), x[11 - me.patch : 11], u[11 - me.patch : 11])[0]
    ref = buf.predict(x[None, :11], u[None, :11])[0, -1]
    assert rel_err(pred, ref) <= 1e-4


def test_full_slot_and_oversized_cache_are_refused(layouts):
    buf, _ = layouts
    me = buf.meta
    slots = buf.new_slots(1)
    x, u = walk(4, me.context + 1)
    _, k, v = buf.prime(x[None, : me.context], u[None, : me.context], np.ones((1, me.context), np.float32))
    slots.load(0, k, v)
    with pytest.raises(ValueError, match="cache full"):
        slots.step((0,), x[-me.patch :], u[-me.patch :])
    _, k, v = buf.prime(x[None], u[None], np.ones((1, me.context + 1), np.float32))
    with pytest.raises(ValueError, match="exceeds the slot capacity"):
        slots.load(0, k, v)
