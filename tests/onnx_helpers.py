"""Helpers shared by the ONNX export / streaming tests."""

from __future__ import annotations

import numpy as np

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 64}  # a seconds-fast model config


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (the parity measure of docs/predictor.md)."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
