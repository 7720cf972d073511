"""Helpers shared by the ONNX export / streaming tests."""

from __future__ import annotations

import numpy as np

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 64}  # a seconds-fast model config


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (the parity measure of docs/predictor.md)."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def stepped_ar_rollout(pred, x: np.ndarray, uc: np.ndarray, uf: np.ndarray) -> np.ndarray:
    """An autoregressive rollout through ``OnnxPredictor.prime`` + ``.step`` (the step graph on grown copies
    of the cache, one call per horizon step): the in-place rollout buffers' reference (no angle channels)."""
    from export.onnx_runtime import _fill_window

    k, lx, n = x.shape
    h, p = uf.shape[1], pred.meta.patch
    u = np.concatenate([uc, uf], 1).astype(np.float32)
    ones = np.ones((k, lx), np.float32)
    pr, kc, vc = pred.prime(x.astype(np.float32), np.ascontiguousarray(u[:, :lx]), ones)
    xs = np.concatenate([x, np.zeros((k, h - 1, n))], 1).astype(np.float32)
    out = [pr[:, -1]]
    xw, uw = np.empty((k, p, n), np.float32), np.empty((k, p, u.shape[2]), np.float32)
    for j in range(1, h):
        t = lx - 1 + j
        xs[:, t] = out[-1]
        _fill_window(xw, uw, xs, u, t)
        res, kc, vc = pred.step(xw, uw, np.ones((k, p), np.float32), kc, vc)
        out.append(res.reshape(k, n))
    return np.stack(out, 1)
