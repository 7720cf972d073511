"""Export a rigfm checkpoint to ONNX: the full-window graph and the streaming KV-cache step graph.

The only torch user of the ``export`` package. Graph contracts (input/output names, shapes, metadata keys) are
documented in docs/predictor.md and read back by the torch-free :mod:`export.onnx_runtime`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from export.onnx_runtime import (
    DEFAULT_EXPORTER,
    EXPORTERS,
    FORMAT,
    FULL_INPUTS,
    FULL_OUTPUTS,
    ROLLOUT_MODES,
    op_domains,
    run_step_graph,
)
from export.shipped import file_sha256

DEFAULT_CONTEXT = 64
MAX_BATCH = 4096
PARITY_TOL = 1e-4  # max relative error vs torch accepted at export time


class ExportError(RuntimeError):
    """Export failed: bad checkpoint, bad option or a graph that does not validate."""


# -------------------------------------------------------------------------------------------- wrappers
class FullWindowGraph(nn.Module):
    """x (B,T,n), u (B,T,m), obs (B,T) -> pred (B,T,n), present_k, present_v (L,B,H,T,dh) (raw units).

    The cache outputs let the predictor prime a stream from a window in one call; callers that do not fetch
    them only pay for pred (onnxruntime prunes unused outputs' tails).
    """

    def __init__(self, system: nn.Module) -> None:
        super().__init__()
        self.system = system

    def forward(self, x: Tensor, u: Tensor, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.system
        xn, un = s._norm(x, u)
        obs = obs.to(xn.dtype)
        xn = torch.where(obs.unsqueeze(-1) > 0.5, xn, torch.zeros_like(xn))
        pred, cache = s.core.forward_with_cache(xn, un, obs, s.state_mask, s.input_mask)
        return s._denorm(pred), cache.k, cache.v


class StepGraph(nn.Module):
    """x_win (B,p,n), u_win (B,p,m), obs_win (B,p), past_k/v (L,B,H,S,dh) -> pred (B,n), present_k/v (S+1)."""

    def __init__(self, system: nn.Module) -> None:
        super().__init__()
        self.system = system

    def forward(
        self, x_win: Tensor, u_win: Tensor, obs_win: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        pred, k, v = self.system.step_tensors(x_win, u_win, obs_win, past_k, past_v)
        return pred[:, 0, :], k, v


# ------------------------------------------------------------------------------------------ checkpoint
@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to export: the fixed-system module plus what goes into the ONNX metadata."""

    system: nn.Module
    config: dict[str, int]
    meta: dict[str, Any]
    sha256: str
    path: str
    extra: dict[str, Any] = field(default_factory=dict)


def load_for_export(
    path: str | Path, *, n: int | None = None, m: int | None = None, dt: float | None = None
) -> LoadedCheckpoint:
    """Load a ``rigfm-ckpt-v1`` checkpoint (fm_core.checkpoint, weights_only) as an eval-mode ``SystemModel``.

    ``n``, ``m``, ``dt`` override (or supply, for a synthetic pretraining checkpoint) the meta values.
    Raises ExportError naming the file and the missing/invalid field.
    """
    from fm_core.checkpoint import CheckpointError, load_checkpoint

    path = str(path)
    try:
        core, meta = load_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    meta = dict(meta)
    for key, val in (("n", n), ("m", m), ("dt", dt)):
        if val is not None:
            meta[key] = val
    for key in ("n", "m"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
            raise ExportError(f"{path}: meta.{key} must be an int, got {meta.get(key)!r} (pass --{key})")
    n, m = meta["n"], meta["m"]
    try:
        system = core.for_system(n, m).eval()
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}") from None
    dtv = meta.get("dt")
    if not isinstance(dtv, (int, float)) or isinstance(dtv, bool) or not np.isfinite(dtv) or dtv <= 0:
        raise ExportError(f"{path}: meta.dt must be a positive number, got {dtv!r} (pass --dt)")
    names_x = list(meta.get("state_names") or [f"x{i}" for i in range(n)])
    names_u = list(meta.get("input_names") or [f"u{i}" for i in range(m)])
    if len(names_x) != n or len(names_u) != m:
        raise ExportError(
            f"{path}: meta.state_names/input_names must have n={n}/m={m} entries, got {names_x} / {names_u}"
        )
    angles, raw_names = _angle_meta(path, meta, n)
    clean = {
        "n": n,
        "angle_channels": angles,
        "raw_state_names": raw_names,
        "m": m,
        "dt": float(dtv),
        "rig": str(meta.get("rig") or ""),
        "state_names": [str(v) for v in names_x],
        "input_names": [str(v) for v in names_u],
        "x_mean": core.x_mean[:n].tolist(),
        "x_std": core.x_std[:n].tolist(),
        "u_mean": core.u_mean[:m].tolist(),
        "u_std": core.u_std[:m].tolist(),
        "rollout_mode": _rollout_mode(path, meta),
    }
    return LoadedCheckpoint(system, core.cfg.to_dict(), clean, file_sha256(path), path)


def _rollout_mode(path: str, meta: dict[str, Any]) -> str:
    """How the checkpoint makes multi-step predictions: ``meta.train.config.rollout_mode`` ("masked" when
    absent: checkpoints from before autoregressive fine-tuning)."""
    mode = meta.get("rollout_mode") or ((meta.get("train") or {}).get("config") or {}).get("rollout_mode")
    mode = mode or "masked"
    if mode not in ROLLOUT_MODES:
        raise ExportError(f"{path}: meta rollout_mode must be one of {ROLLOUT_MODES}, got {mode!r}")
    return str(mode)


def _angle_meta(path: str, meta: dict[str, Any], n: int) -> tuple[list[int], list[str]]:
    """A sin/cos checkpoint's ``angle_channels`` (raw state indices) and ``raw_state_names``, validated.

    Its ``n`` / ``state_names`` are the graph's (each angle as two channels); the raw state has
    ``n - len(angle_channels)`` channels. Plain checkpoints give ``([], [])``."""
    angles = meta.get("angle_channels") or []
    if not angles:
        return [], []
    nraw = n - len(angles)
    ok = isinstance(angles, list) and all(isinstance(a, int) and not isinstance(a, bool) for a in angles)
    if not ok or len(set(angles)) != len(angles) or any(not 0 <= a < nraw for a in angles):
        raise ExportError(
            f"{path}: meta.angle_channels must list distinct raw state indices in [0, {nraw}), got {angles!r}"
        )
    names = [str(v) for v in meta.get("raw_state_names") or [f"x{i}" for i in range(nraw)]]
    if len(names) != nraw:
        raise ExportError(f"{path}: meta.raw_state_names must have {nraw} entries, got {names}")
    return sorted(angles), names


def save_random_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    n: int = 4,
    m: int = 1,
    dt: float = 0.01,
    rig: str = "synthetic",
    config: dict[str, int] | None = None,
    normalization: bool = True,
) -> Path:
    """Write a randomly initialised ``rigfm-ckpt-v1`` checkpoint (tests, benches, before weights exist).

    ``config`` overrides ModelConfig fields (e.g. a tiny model for fast tests). With ``normalization`` the
    checkpoint carries non-trivial normalisation statistics so the raw-unit path is exercised.
    """
    from fm_core.model import DynamicsFM, ModelConfig

    torch.manual_seed(seed)
    core = DynamicsFM(ModelConfig(**(config or {})))
    rng = np.random.default_rng(seed)
    if normalization:
        core.set_normalization(
            rng.normal(0, 0.5, n), rng.uniform(0.5, 2.0, n), rng.normal(0, 0.5, m), rng.uniform(0.5, 2.0, m)
        )
    from fm_core.checkpoint import save_checkpoint

    meta = {
        "n": n,
        "m": m,
        "dt": dt,
        "rig": rig,
        "state_names": [f"x{i}" for i in range(n)],
        "input_names": [f"u{i}" for i in range(m)],
        "train": {"random_init": True, "seed": seed},
    }
    return save_checkpoint(path, core, meta)


# ---------------------------------------------------------------------------------------------- export
def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("rigfm")
    except Exception:  # noqa: BLE001 - not installed: fall back
        return "0+unknown"


def _metadata(ck: LoadedCheckpoint, graph: str, context: int, exporter: str, opset: int) -> dict[str, str]:
    c = ck.config
    m = ck.meta
    angles = m.get("angle_channels") or []
    # callers see raw states (docs/predictor.md): n / state_names without the (sin, cos) split
    return {
        "rigfm.format": FORMAT,
        "rigfm.graph": graph,
        "rigfm.n": str(m["n"] - len(angles)),
        "rigfm.m": str(m["m"]),
        "rigfm.state_names": json.dumps(m["raw_state_names"] if angles else m["state_names"]),
        "rigfm.angle_channels": json.dumps(angles),
        "rigfm.rollout_mode": m.get("rollout_mode", "masked"),
        # the graph's own x / x_win / pred channels, in order: each angle as (sin, cos) (docs/predictor.md)
        "rigfm.input_layout": json.dumps(m["state_names"]),
        "rigfm.input_names": json.dumps(m["input_names"]),
        "rigfm.dt": repr(m["dt"]),
        "rigfm.rig": m["rig"],
        "rigfm.x_mean": json.dumps(m["x_mean"]),
        "rigfm.x_std": json.dumps(m["x_std"]),
        "rigfm.u_mean": json.dumps(m["u_mean"]),
        "rigfm.u_std": json.dumps(m["u_std"]),
        "rigfm.patch": str(c["patch"]),
        "rigfm.context": str(context),
        "rigfm.max_len": str(c["max_len"]),
        "rigfm.max_batch": str(MAX_BATCH),
        "rigfm.n_layers": str(c["n_layers"]),
        "rigfm.n_heads": str(c["n_heads"]),
        "rigfm.d_head": str(c["d_model"] // c["n_heads"]),
        "rigfm.model_config": json.dumps(c, sort_keys=True),
        "rigfm.model_version": _package_version(),
        "rigfm.checkpoint_sha256": ck.sha256,
        "rigfm.exporter": exporter,
        "rigfm.opset": str(opset),
    } | ({"rigfm.step_cache": "buffer"} if graph == "step" else {})


def _dummy_full(ck: LoadedCheckpoint, b: int = 2, t: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    n, m = ck.meta["n"], ck.meta["m"]
    return torch.randn(b, t, n, generator=g), torch.randn(b, t, m, generator=g), torch.ones(b, t)


def _dummy_step(ck: LoadedCheckpoint, b: int = 2, s: int = 5) -> tuple[Tensor, ...]:
    c = ck.config
    g = torch.Generator().manual_seed(1)
    n, m, p = ck.meta["n"], ck.meta["m"], c["patch"]
    cache = (c["n_layers"], b, c["n_heads"], s, c["d_model"] // c["n_heads"])
    return (
        torch.randn(b, p, n, generator=g),
        torch.randn(b, p, m, generator=g),
        torch.ones(b, p),
        torch.randn(*cache, generator=g),
        torch.randn(*cache, generator=g),
    )


def _write_graph(ck: LoadedCheckpoint, graph: str, path: Path, exporter: str, opset: int) -> None:
    """Write the ``full`` or ``step`` graph of ``ck``: fused (both) or traced by torch.onnx (full only)."""
    if exporter == "fused":
        from export.fused_graph import save_fused

        save_fused(ck.system, graph, path)
        return
    axes = {n: {0: "B", 1: "T"} for n in ("x", "u", "obs", "pred")}
    axes |= {n: {1: "B", 3: "T"} for n in ("present_k", "present_v")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(FullWindowGraph(ck.system).eval(), _dummy_full(ck), str(path),
                          input_names=list(FULL_INPUTS), output_names=list(FULL_OUTPUTS), dynamic_axes=axes,
                          dynamo=False, opset_version=opset)


def check_parity(ck: LoadedCheckpoint, graph: str, path: Path, tol: float = PARITY_TOL) -> float:
    """Run the exported graph in onnxruntime against torch on fixed random inputs (with hidden steps and,
    for the step graph, a non-empty cache); returns the max relative error, ExportError above ``tol``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if graph == "step":
        args = _dummy_step(ck, b=2, s=5)
        module: nn.Module = StepGraph(ck.system).eval()
    else:
        x, u, obs = _dummy_full(ck, b=2, t=11)
        obs[:, 7:] = 0.0
        args, module = (x, u, obs), FullWindowGraph(ck.system).eval()
    with torch.no_grad():
        ref = [t.numpy() for t in module(*args)]
    if graph == "step":
        got = list(run_step_graph(sess, *(a.numpy() for a in args)))
    else:
        got = sess.run(None, {k: a.numpy() for k, a in zip(FULL_INPUTS, args, strict=True)})
    err = max(
        float(np.abs(g - r).max() / max(float(np.abs(r).max()), 1e-6)) for g, r in zip(got, ref, strict=True)
    )
    if not err <= tol:
        raise ExportError(f"{path}: {graph} graph differs from torch by {err:.3g} (relative, > {tol:g})")
    return err


def _finalise(path: Path, metadata: dict[str, str]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    metadata["rigfm.op_domains"] = json.dumps(op_domains(model))
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    model.doc_string = "rigfm dynamics model (docs/predictor.md)"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote, with timings and node counts."""

    full_path: Path
    step_path: Path | None
    export_s: dict[str, float]
    nodes: dict[str, int]
    metadata: dict[str, str]
    parity: dict[str, float] = field(default_factory=dict)  # max relative error vs torch per graph


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    context: int = DEFAULT_CONTEXT,
    streaming: str | Path | None = None,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    n: int | None = None,
    m: int | None = None,
    dt: float | None = None,
) -> ExportResult:
    """Export CHECKPOINT to the full-window graph at OUTPUT (and the step graph at STREAMING).

    ``context``: predictor window (rollout history, stream re-priming); patch <= context <= max_len.
    """
    ck = load_for_export(checkpoint, n=n, m=m, dt=dt)
    return export_loaded(ck, output, context=context, streaming=streaming, exporter=exporter, opset=opset)


def export_loaded(
    ck: LoadedCheckpoint,
    output: str | Path,
    *,
    context: int = DEFAULT_CONTEXT,
    streaming: str | Path | None = None,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
) -> ExportResult:
    """Export an already loaded checkpoint (see :func:`export_checkpoint`)."""
    c = ck.config
    if not (c["patch"] <= context <= c["max_len"]):
        raise ExportError(f"--context {context} must be in [patch={c['patch']}, max_len={c['max_len']}]")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; use one of {EXPORTERS}")
    opset = opset or 17
    if exporter == "fused" and opset != 17:
        raise ExportError(f"the fused exporter writes opset 17 graphs, got --opset {opset}")
    if exporter != "fused" and streaming is not None:
        raise ExportError(f"the {exporter} exporter writes the window graph only (standard operators, "
                          "portable); the streaming step graph runs on onnxruntime's in-place KV buffers: "
                          "--exporter fused")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    nodes: dict[str, int] = {}
    step_path = None
    graphs: list[tuple[str, Path]] = []
    if streaming is not None:
        step_path = Path(streaming)
        step_path.parent.mkdir(parents=True, exist_ok=True)
        graphs.append(("step", step_path))
    graphs.append(("full", out))
    parity: dict[str, float] = {}
    meta: dict[str, str] = {}
    for graph, path in graphs:
        t0 = time.perf_counter()
        _write_graph(ck, graph, path, exporter, opset)
        meta = _metadata(ck, graph, context, exporter, opset)
        if graph == "full" and step_path is not None:
            meta["rigfm.step_file"] = step_path.name
        _finalise(path, meta)
        parity[graph] = check_parity(ck, graph, path)
        times[graph] = time.perf_counter() - t0
        nodes[graph] = len(onnx.load(str(path)).graph.node)
    return ExportResult(out, step_path, times, nodes, meta, parity)
