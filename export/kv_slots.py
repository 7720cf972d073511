"""Where a stream's KV caches live between step-graph calls (torch-free).

A stream (``export.onnx_runtime.StreamState``) has one or two cache *slots*: the live cache and, with shadow
re-priming, the shadow cache grown next to it. :class:`BufferSlots` keeps both as rows of fixed-capacity
per-layer buffers that onnxruntime updates in place (the step graph's present outputs are bound to its past
inputs with IOBinding: the ``buffer`` layout, ``rigfm.step_cache``), so a step writes one token per row and
copies nothing else, and the live and the shadow slot advance in **one** call (batch 2).

:class:`RolloutBuffers` is the same in-place layout for an autoregressive rollout request: K rows of one
length, loaded once from the priming window's cache and advanced by one bound call per horizon step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STEP_CACHES = ("buffer",)  # the one step-graph cache layout (rigfm.step_cache)


def buffer_step_io(n_layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of a ``buffer`` step graph with ``n_layers`` layers."""
    ins = ["x_win", "u_win", "obs_win", "past_len"]
    outs = ["pred"]
    for i in range(n_layers):
        ins += [f"past_k_{i}", f"past_v_{i}"]
        outs += [f"present_k_{i}", f"present_v_{i}"]
    return tuple(ins), tuple(outs)


class _Binding:
    """One IOBinding over a fixed set of buffer rows, with its own input and output arrays."""

    def __init__(self, sess: Any, rows: tuple[int, ...], bufs: list[tuple[np.ndarray, np.ndarray]], p: int,
                 nz: int, m: int) -> None:
        import onnxruntime as ort

        b = len(rows)
        self.rows = list(rows)
        self.x = np.zeros((b, p, nz), np.float32)
        self.u = np.zeros((b, p, m), np.float32)
        self.plen = np.zeros(b, np.int32)
        self.pred = np.zeros((b, nz), np.float32)
        self.io = sess.io_binding()
        obs = np.ones((b, p), np.float32)
        self._keep: list[Any] = [obs]  # every array an OrtValue points into stays alive with the binding
        lo, hi = rows[0], rows[-1] + 1
        if list(range(lo, hi)) != self.rows:
            raise ValueError(f"buffer rows must be consecutive, got {rows}")
        for name, arr in (("x_win", self.x), ("u_win", self.u), ("obs_win", obs), ("past_len", self.plen)):
            self._bind_in(ort, name, arr)
        self._bind_out(ort, "pred", self.pred)
        for i, (kb, vb) in enumerate(bufs):
            for kind, buf in (("k", kb), ("v", vb)):
                view = buf[lo:hi]  # leading-axis slice of a C-contiguous buffer: contiguous, same memory
                ov = ort.OrtValue.ortvalue_from_numpy(view)
                self._keep += [view, ov]
                self.io.bind_ortvalue_input(f"past_{kind}_{i}", ov)
                self.io.bind_ortvalue_output(f"present_{kind}_{i}", ov)  # in place: the cache is updated

    def _bind_in(self, ort: Any, name: str, arr: np.ndarray) -> None:
        ov = ort.OrtValue.ortvalue_from_numpy(arr)
        self._keep.append(ov)
        self.io.bind_ortvalue_input(name, ov)

    def _bind_out(self, ort: Any, name: str, arr: np.ndarray) -> None:
        ov = ort.OrtValue.ortvalue_from_numpy(arr)
        self._keep.append(ov)
        self.io.bind_ortvalue_output(name, ov)


class BufferSlots:
    """``rows`` cache slots in per-layer (rows, H, capacity, dh) buffers, stepped in place by a ``buffer``
    step graph; any subset of the slots advances in one call."""

    def __init__(self, sess: Any, meta: Any, rows: int, capacity: int) -> None:
        if not 1 <= rows <= 2:
            raise ValueError(f"rows must be 1 or 2, got {rows}")
        self.sess = sess
        self.capacity = int(capacity)
        shape = (rows, meta.n_heads, self.capacity, meta.d_head)
        self.bufs = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(meta.n_layers)]
        self.len = np.zeros(rows, np.int32)
        subsets = [(r,) for r in range(rows)] + ([(0, 1)] if rows == 2 else [])
        self._bind = {s: _Binding(sess, s, self.bufs, meta.patch, meta.n_model, meta.m) for s in subsets}

    def length(self, row: int) -> int:
        """Tokens in the slot's cache."""
        return int(self.len[row])

    def clear(self, row: int) -> None:
        """Empty the slot (its buffer rows are simply overwritten later)."""
        self.len[row] = 0

    def save(self) -> np.ndarray:
        """The slots' lengths: restoring them undoes any step (a step writes only past a slot's length)."""
        return self.len.copy()

    def restore(self, saved: np.ndarray) -> None:
        self.len[:] = saved

    def load(self, row: int, k: np.ndarray, v: np.ndarray) -> None:
        """Fill the slot from a full-window cache k, v (L,1,H,T,dh)."""
        t = k.shape[3]
        if t > self.capacity:
            raise ValueError(f"cache of {t} tokens exceeds the slot capacity {self.capacity}")
        for i, (kb, vb) in enumerate(self.bufs):
            kb[row, :, :t] = k[i, 0]
            vb[row, :, :t] = v[i, 0]
        self.len[row] = t

    def step(self, rows: tuple[int, ...], x_win: np.ndarray, u_win: np.ndarray) -> dict[int, np.ndarray]:
        """One step-graph call advancing ``rows`` (sorted) by the window x_win (p, nz), u_win (p, m), both
        rows seeing the same steps; returns each row's prediction (nz,)."""
        bd = self._bind[rows]
        if (self.len[bd.rows] >= self.capacity).any():
            raise ValueError(f"stream cache full ({self.capacity} tokens): re-prime first")
        bd.x[:] = x_win
        bd.u[:] = u_win
        bd.plen[:] = self.len[bd.rows]
        self.sess.run_with_iobinding(bd.io)
        self.len[bd.rows] += 1
        return {r: bd.pred[j].copy() for j, r in enumerate(bd.rows)}


class RolloutBuffers:
    """In-place KV buffers for batched autoregressive rollouts on a ``buffer`` step graph: ``rows`` caches of
    one common length in per-layer (rows, H, capacity, dh) buffers and one IOBinding reused for every step.

    Fill :attr:`x` (rows, p, n_model) and :attr:`u` (rows, p, m) with the step windows, then :meth:`step`.
    Not thread-safe: one instance per thread (``OnnxPredictor`` keeps them thread-local).
    """

    def __init__(self, sess: Any, meta: Any, rows: int, capacity: int) -> None:
        if rows < 1 or capacity < 1:
            raise ValueError(f"rows and capacity must be >= 1, got {rows}, {capacity}")
        self.rows, self.capacity = int(rows), int(capacity)
        shape = (self.rows, meta.n_heads, self.capacity, meta.d_head)
        bufs = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(meta.n_layers)]
        self.bufs = bufs
        self._bd = _Binding(sess, tuple(range(self.rows)), bufs, meta.patch, meta.n_model, meta.m)
        self.sess = sess
        self.x, self.u = self._bd.x, self._bd.u
        self.len = 0

    def load(self, k: np.ndarray, v: np.ndarray) -> None:
        """Start every row from the cache k, v (L,B,H,T,dh) of a full window; B = rows, or 1 (all rows share
        that history)."""
        t, b = k.shape[3], k.shape[1]
        if t > self.capacity:
            raise ValueError(f"cache of {t} tokens exceeds the rollout capacity {self.capacity}")
        if b not in (1, self.rows):
            raise ValueError(f"cache batch {b} is neither 1 nor the {self.rows} rollout rows")
        for i, (kb, vb) in enumerate(self.bufs):
            kb[:, :, :t] = k[i]
            vb[:, :, :t] = v[i]
        self.len = t

    def step(self) -> np.ndarray:
        """One step-graph call on the current windows: every row's next prediction (rows, n_model), a view
        that the next call overwrites."""
        if self.len >= self.capacity:
            raise ValueError(f"rollout cache full ({self.capacity} tokens)")
        self._bd.plen[:] = self.len
        self.sess.run_with_iobinding(self._bd.io)
        self.len += 1
        return self._bd.pred
