"""Tiny random-weight ONNX models for `rigfm run` tests, exported in a subprocess (tests stay torch-free).

``export_run_models(d)`` -> ``{"cartpole", "furuta", "dt02", "names", "corrupt"}`` paths: a cart-pole model
(rig, state names and dt of rigs/cartpole.toml; with its step graph), a Furuta one, a cart-pole one at
dt = 0.02 s, one with other state names, and a text file named ``.onnx``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_CODE = r"""
import sys
from pathlib import Path
import torch
from export.onnx_export import export_checkpoint, save_random_checkpoint
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 64}
d = Path(sys.argv[1])
CART = ["p", "theta", "p_dot", "theta_dot"]
FUR = ["theta", "alpha", "theta_dot", "alpha_dot"]
for name, rig, names, dt in (("cartpole", "cartpole", CART, 0.01), ("furuta", "furuta", FUR, 0.01),
                             ("dt02", "cartpole", CART, 0.02), ("names", "cartpole", list("abcd"), 0.01)):
    ck = save_random_checkpoint(d / f"{name}.pt", config=TINY, seed=1, dt=dt, rig=rig)
    c = torch.load(ck, weights_only=True)
    c["meta"]["state_names"] = names
    torch.save(c, ck)
    step = d / f"{name}_step.onnx" if name == "cartpole" else None
    export_checkpoint(ck, d / f"{name}.onnx", context=16, streaming=step)
"""


def export_run_models(d: Path) -> dict[str, Path]:
    """Export the models into ``d`` (skips the test when torch is missing)."""
    pytest.importorskip("torch", reason="exporting the test models needs torch")
    r = subprocess.run([sys.executable, "-c", _CODE, str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (d / "corrupt.onnx").write_text("this is not an onnx file\n")
    return {k: d / f"{k}.onnx" for k in ("cartpole", "furuta", "dt02", "names", "corrupt")}
