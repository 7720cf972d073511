"""An ONNX stand-in for a learned model whose one-step map is exactly linear: ``x' = Ad x + Bd u``.

Built with ``onnx.helper`` (no torch), with the same I/O contract and ``rigfm.*`` metadata as the exported
full-window graphs (docs/predictor.md): inputs ``x (B,T,n)``, ``u (B,T,m)``, ``obs (B,T)``; outputs ``pred
(B,T,n)`` (the estimate of x[t+1] at every position) and ``present_k``/``present_v`` (L,B,H,T,dh), here
zeros of shape (1,B,1,T,1).  It is Markov (ignores the context) and computes in float64 inside, so the
only rounding is the float32 I/O.  ``rollout_mode`` is ``ar`` so rollouts feed predictions back (a masked
rollout would predict from the hidden zeros).  Served by the real predictor process in the tests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def write_linear_onnx(path: str | Path, ad: np.ndarray, bd: np.ndarray, *, dt: float, rig: str,
                      state_names: list[str], input_names: list[str] | None = None, context: int = 32,
                      max_len: int = 256) -> Path:
    """Write the stand-in graph for ``(Ad, Bd)`` (at step ``dt``) to ``path``; returns the path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ad = np.asarray(ad, np.float64)
    bd = np.asarray(bd, np.float64)
    n, m = bd.shape
    inits = [numpy_helper.from_array(np.ascontiguousarray(ad.T), "AdT"),
             numpy_helper.from_array(np.ascontiguousarray(bd.T), "BdT"),
             numpy_helper.from_array(np.array([0, 2], np.int64), "axes02"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([1], np.int64), "s1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["u"], ["ud"], to=TensorProto.DOUBLE),
        helper.make_node("MatMul", ["xd", "AdT"], ["ax"]),
        helper.make_node("MatMul", ["ud", "BdT"], ["bu"]),
        helper.make_node("Add", ["ax", "bu"], ["predd"]),
        helper.make_node("Cast", ["predd"], ["pred"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["x", "s0", "s1", "ax2"], ["x0"]),       # (B,T,1)
        helper.make_node("Mul", ["x0", "zero"], ["z"]),
        helper.make_node("Unsqueeze", ["z", "axes02"], ["present_k"]),     # (1,B,1,T,1)
        helper.make_node("Identity", ["present_k"], ["present_v"]),
        helper.make_node("Mul", ["obs", "zero"], ["obs_unused"]),
    ]
    graph = helper.make_graph(
        nodes, "linear_standin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", n]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, ["B", "T", m]),
         helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["B", "T"])],
        [helper.make_tensor_value_info("pred", TensorProto.FLOAT, ["B", "T", n]),
         helper.make_tensor_value_info("present_k", TensorProto.FLOAT, [1, "B", 1, "T", 1]),
         helper.make_tensor_value_info("present_v", TensorProto.FLOAT, [1, "B", 1, "T", 1])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sha = hashlib.sha256(ad.tobytes() + bd.tobytes()).hexdigest()
    meta = {
        "rigfm.format": "rigfm-onnx-v1", "rigfm.graph": "full", "rigfm.n": str(n), "rigfm.m": str(m),
        "rigfm.state_names": json.dumps(list(state_names)),
        "rigfm.input_names": json.dumps(list(input_names or [f"u{j}" for j in range(m)])),
        "rigfm.dt": repr(float(dt)), "rigfm.rig": rig, "rigfm.patch": "1", "rigfm.context": str(context),
        "rigfm.max_len": str(max_len), "rigfm.max_batch": "4096", "rigfm.n_layers": "1",
        "rigfm.n_heads": "1", "rigfm.d_head": "1",
        "rigfm.x_mean": json.dumps([0.0] * n), "rigfm.x_std": json.dumps([1.0] * n),
        "rigfm.u_mean": json.dumps([0.0] * m), "rigfm.u_std": json.dumps([1.0] * m),
        "rigfm.model_version": "linear-standin", "rigfm.checkpoint_sha256": sha,
        "rigfm.exporter": "onnx.helper", "rigfm.quantized": "", "rigfm.rollout_mode": "ar",
    }
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def physics_standin(path: str | Path, rig: str = "cartpole", overrides: dict | None = None,
                    bd_scale: float = 1.0) -> tuple[Path, np.ndarray, np.ndarray]:
    """The stand-in for the rig physics' ZOH linearisation at upright (model_dt), optionally with plant
    overrides and ``Bd`` scaled; returns ``(path, Ad, Bd)``."""
    import rigs
    from controllers.lqr import linearize_upright

    cfg = rigs.load_config(rig)
    model = rigs.make_model(cfg, overrides)
    ad, bd = linearize_upright(model, cfg.model_dt)
    bd = bd * bd_scale
    p = write_linear_onnx(path, ad, bd, dt=cfg.model_dt, rig=cfg.name, state_names=list(cfg.state_names))
    return p, ad, bd
