"""Torch-free onnxruntime wrapper for rigfm ONNX graphs: metadata, predict, rollout and streaming.

Graph contracts (names and shapes) are in docs/predictor.md; :mod:`export.onnx_export` writes them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.kv_slots import STEP_CACHES, BufferSlots, RolloutBuffers, buffer_step_io
from fm_core.angle_features import SinCosCodec
from fm_core.train_configs import ROLLOUT_MODE_NAMES

FORMAT = "rigfm-onnx-v1"
# how a model makes multi-step predictions: "masked" = one window pass with hidden future states (obs = 0),
# "ar" = autoregressive, every prediction fed back as the next observed state (KV-cached steps)
ROLLOUT_MODES = ROLLOUT_MODE_NAMES
# rigfm export --exporter: fused (onnxruntime's fused operators, the fast default) or torchscript (standard
# ONNX operators only, portable to other runtimes; window graph only) -- docs/predictor.md
EXPORTERS = ("fused", "torchscript")
DEFAULT_EXPORTER = "fused"
FULL_INPUTS = ("x", "u", "obs")
FULL_OUTPUTS = ("pred", "present_k", "present_v")
# rows per autoregressive rollout chunk: bounds the KV buffers one request allocates (rows x tokens x layers)
AR_CHUNK_ROWS = 256


# every state / input value the predictor accepts, raw units: |v| <= MAX_ABS_INPUT (float32 models overflow to
# NaN near 3e38; 1e6 leaves six orders of magnitude of headroom above any rig's physical range)
MAX_ABS_INPUT = 1e6


class ModelFileError(ValueError):
    """An ONNX file is missing, unreadable, or its metadata/graph does not match the rigfm contract."""


class InputError(ValueError):
    """Arrays passed to the predictor have the wrong shape or contain NaN/Inf (message names the array).

    ``kind`` is ``"shape"`` or ``"value"``.
    """

    def __init__(self, message: str, kind: str = "shape") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ModelMeta:
    """Metadata embedded in a rigfm ONNX file (``metadata_props``, keys ``rigfm.*``).

    ``n`` and ``state_names`` describe the states callers send and get back (raw, angles unwrapped). A model
    trained with ``--angle-features sincos`` lists the raw indices of its angle channels in
    ``angle_channels``: its graph sees each of them as (sin, cos), so the graph's state width is ``n_model``
    (``x_mean`` / ``x_std`` have that length); :class:`OnnxPredictor` encodes and decodes at its boundary.
    """

    graph: str
    n: int
    m: int
    state_names: tuple[str, ...]
    input_names: tuple[str, ...]
    dt: float
    rig: str
    patch: int
    context: int
    max_len: int
    max_batch: int
    n_layers: int
    n_heads: int
    d_head: int
    x_mean: tuple[float, ...]
    x_std: tuple[float, ...]
    u_mean: tuple[float, ...]
    u_std: tuple[float, ...]
    model_version: str
    checkpoint_sha256: str
    exporter: str
    quantized: str
    step_file: str = ""
    angle_channels: tuple[int, ...] = ()
    step_cache: str = ""  # step graphs: "buffer" (in-place KV buffers, export.kv_slots)
    rollout_mode: str = "masked"  # ROLLOUT_MODES; files without the key were trained for "masked"
    input_layout: tuple[str, ...] = ()  # the graph's x / pred channels, e.g. (p, sin(theta), cos(theta), ...)
    op_domains: tuple[str, ...] = ()  # operator domains beyond the ONNX standard, e.g. ("com.microsoft",)

    @property
    def n_model(self) -> int:
        """State channels of the graph: ``n`` plus one per (sin, cos) angle channel."""
        return self.n + len(self.angle_channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (for the ``info`` reply)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
        out["n_model"] = self.n_model
        return out


def op_domains(model: Any) -> list[str]:
    """Operator domains of an ``onnx.ModelProto`` beyond the ONNX standard (``[]``: any ONNX runtime runs
    it; ``["com.microsoft"]``: the fused graphs' onnxruntime contrib operators). Written as
    ``rigfm.op_domains``."""
    return sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def _get(props: dict[str, str], key: str, path: str) -> str:
    full = f"rigfm.{key}"
    if full not in props:
        raise ModelFileError(f"{path}: metadata key {full!r} missing (not a rigfm export?)")
    return props[full]


def parse_metadata(props: dict[str, str], path: str = "<model>") -> ModelMeta:
    """Validate and parse ``rigfm.*`` metadata props; raises ModelFileError naming the file and key."""
    fmt = props.get("rigfm.format")
    if fmt != FORMAT:
        raise ModelFileError(f"{path}: metadata 'rigfm.format' is {fmt!r}, expected {FORMAT!r}")

    def integer(key: str, lo: int = 1) -> int:
        raw = _get(props, key, path)
        try:
            val = int(raw)
        except ValueError:
            raise ModelFileError(f"{path}: metadata 'rigfm.{key}' must be an int, got {raw!r}") from None
        if val < lo:
            raise ModelFileError(f"{path}: metadata 'rigfm.{key}' must be >= {lo}, got {val}")
        return val

    def js(key: str, length: int, kind: type) -> tuple:
        raw = _get(props, key, path)
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            raise ModelFileError(f"{path}: metadata 'rigfm.{key}' is not JSON: {raw!r}") from None
        if not isinstance(val, list) or len(val) != length:
            raise ModelFileError(f"{path}: metadata 'rigfm.{key}' must be a list of {length}, got {raw!r}")
        try:
            out = tuple(kind(v) for v in val)
        except (TypeError, ValueError):
            raise ModelFileError(f"{path}: metadata 'rigfm.{key}' has invalid entries: {raw!r}") from None
        if kind is float and not all(np.isfinite(out)):
            raise ModelFileError(f"{path}: metadata 'rigfm.{key}' has NaN/Inf: {raw!r}")
        return out

    n, m = integer("n"), integer("m")
    angles = _angle_channels(props.get("rigfm.angle_channels", "[]"), n, path)
    nz = n + len(angles)
    try:
        dt = float(_get(props, "dt", path))
    except ValueError:
        raise ModelFileError(f"{path}: metadata 'rigfm.dt' is not a number") from None
    if not (np.isfinite(dt) and dt > 0):
        raise ModelFileError(f"{path}: metadata 'rigfm.dt' must be > 0, got {dt}")
    meta = ModelMeta(
        graph=_get(props, "graph", path),
        n=n,
        m=m,
        state_names=js("state_names", n, str),
        input_names=js("input_names", m, str),
        dt=dt,
        rig=props.get("rigfm.rig", ""),
        patch=integer("patch"),
        context=integer("context"),
        max_len=integer("max_len"),
        max_batch=integer("max_batch"),
        n_layers=integer("n_layers"),
        n_heads=integer("n_heads"),
        d_head=integer("d_head"),
        x_mean=js("x_mean", nz, float),
        x_std=js("x_std", nz, float),
        u_mean=js("u_mean", m, float),
        u_std=js("u_std", m, float),
        model_version=props.get("rigfm.model_version", ""),
        checkpoint_sha256=props.get("rigfm.checkpoint_sha256", ""),
        exporter=props.get("rigfm.exporter", ""),
        quantized=props.get("rigfm.quantized", ""),
        step_file=props.get("rigfm.step_file", ""),
        angle_channels=angles,
        step_cache=props.get("rigfm.step_cache", "") if props.get("rigfm.graph") == "step" else "",
        rollout_mode=props.get("rigfm.rollout_mode", "masked"),
        # both optional: files exported before they were written lack them
        input_layout=js("input_layout", nz, str) if "rigfm.input_layout" in props else (),
        op_domains=_str_list(props.get("rigfm.op_domains", "[]"), "op_domains", path),
    )
    if meta.rollout_mode not in ROLLOUT_MODES:
        raise ModelFileError(
            f"{path}: metadata 'rigfm.rollout_mode' must be one of {ROLLOUT_MODES}, got {meta.rollout_mode!r}"
        )
    if meta.graph not in ("full", "step"):
        raise ModelFileError(f"{path}: metadata 'rigfm.graph' must be 'full' or 'step', got {meta.graph!r}")
    if meta.graph == "step" and meta.step_cache not in STEP_CACHES:
        raise ModelFileError(
            f"{path}: metadata 'rigfm.step_cache' must be one of {STEP_CACHES}, got {meta.step_cache!r} "
            "(a step graph of an older layout: export the checkpoint again with rigfm export)"
        )
    if not (meta.patch <= meta.context <= meta.max_len):
        raise ModelFileError(
            f"{path}: metadata context={meta.context} outside [patch, max_len={meta.max_len}]"
        )
    return meta


def _str_list(raw: str, key: str, path: str) -> tuple[str, ...]:
    """Parse a JSON list of strings (any length) from ``rigfm.<key>``."""
    try:
        val = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: metadata 'rigfm.{key}' is not JSON: {raw!r}") from None
    if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
        raise ModelFileError(f"{path}: metadata 'rigfm.{key}' must be a JSON list of strings, got {raw!r}")
    return tuple(val)


def _angle_channels(raw: str, n: int, path: str) -> tuple[int, ...]:
    """Parse ``rigfm.angle_channels``: a JSON list of distinct state indices in [0, n)."""
    try:
        val = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: metadata 'rigfm.angle_channels' is not JSON: {raw!r}") from None
    ok = isinstance(val, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in val)
    if not ok or len(set(val)) != len(val) or any(not 0 <= v < n for v in val):
        raise ModelFileError(
            f"{path}: metadata 'rigfm.angle_channels' must list distinct state indices in [0, {n}), "
            f"got {raw!r}"
        )
    return tuple(sorted(val))


def make_session(path: str | Path, threads: int = 1, sequential: bool = True, mem_arena: bool = True) -> Any:
    """An onnxruntime CPU InferenceSession (1 intra-op thread and sequential execution by default);
    ``mem_arena=False``: no CPU memory arena (every buffer malloc'd and freed per run)."""
    import onnxruntime as ort

    path = str(path)
    if not Path(path).is_file():
        raise ModelFileError(f"model file not found: {path}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = bool(mem_arena)
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelFileError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc


def _check_io(sess: Any, path: str, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != list(inputs):
        raise ModelFileError(f"{path}: graph inputs {got_in}, expected {list(inputs)}")
    if got_out != list(outputs):
        raise ModelFileError(f"{path}: graph outputs {got_out}, expected {list(outputs)}")


def _f32(
    name: str, a: Any, shape: tuple[int | None, ...], lo: float = -MAX_ABS_INPUT, hi: float = MAX_ABS_INPUT
) -> np.ndarray:
    """float32 C-contiguous view/copy of ``a`` with the given shape pattern (None = any); every value finite
    and inside [lo, hi] (default: |value| <= MAX_ABS_INPUT)."""
    arr = np.ascontiguousarray(a, dtype=np.float32)
    if arr.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, arr.shape, strict=True)):
        want = "(" + ",".join("*" if s is None else str(s) for s in shape) + ")"
        raise InputError(f"{name} must have shape {want}, got {arr.shape}")
    if arr.size <= 64:  # a control loop's x_t / u_t: Python comparisons (NaN fails them) beat two reductions
        ok = all(lo <= v <= hi for v in arr.ravel().tolist())
    else:
        ok = bool(lo <= arr.min()) and bool(arr.max() <= hi)  # NaN propagates into min / max
    if not ok:
        a_min, a_max = float(arr.min()), float(arr.max())
        if not (np.isfinite(a_min) and np.isfinite(a_max)):
            raise InputError(f"{name} contains NaN or Inf", kind="value")
        raise InputError(
            f"{name} has values in [{a_min:.6g}, {a_max:.6g}], outside the accepted range [{lo:g}, {hi:g}]",
            kind="value",
        )
    return arr


def check_output(name: str, out: np.ndarray) -> np.ndarray:
    """``out`` if all finite, else InputError (kind "value"): inputs the model cannot represent."""
    if not np.isfinite(out).all():
        raise InputError(
            f"{name}: the model's output is not finite (NaN/Inf) for these inputs", kind="value"
        )
    return out


def _fill_window(xw: np.ndarray, uw: np.ndarray, xs: np.ndarray, u: np.ndarray, t: int) -> None:
    """The step graph's x and u windows for the token of step ``t`` into xw (K,p,n) and uw (K,p,m): the last
    ``p`` steps of xs (K,T,n) and u (K,T,m) up to ``t``, zero-padded at the front."""
    p = xw.shape[1]
    lo = max(0, t - p + 1)
    pad = p - (t + 1 - lo)
    if pad:
        xw[:, :pad] = 0.0
        uw[:, :pad] = 0.0
    xw[:, pad:] = xs[:, lo : t + 1]
    uw[:, pad:] = u[:, lo : t + 1]


def run_step_graph(
    sess: Any, x_win: np.ndarray, u_win: np.ndarray, obs_win: np.ndarray, k: np.ndarray, v: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One call of the step graph with stacked caches k, v (L,B,H,S,dh): returns pred (B,·) and the caches
    grown to S+1 (the graph runs in place on a copy with one free position)."""
    import onnxruntime as ort

    nl, b, _, s, _ = k.shape
    grown = []
    for c in (k, v):
        g = np.zeros((*c.shape[:3], s + 1, c.shape[4]), np.float32)
        g[..., :s, :] = c
        grown.append(g)
    io = sess.io_binding()
    keep: list[Any] = []
    feeds = (("x_win", x_win), ("u_win", u_win), ("obs_win", obs_win), ("past_len", np.full(b, s, np.int32)))
    for name, arr in feeds:
        keep.append(np.ascontiguousarray(arr))
        io.bind_cpu_input(name, keep[-1])
    io.bind_output("pred")
    for i in range(nl):
        for kind, g in zip("kv", grown, strict=True):
            ov = ort.OrtValue.ortvalue_from_numpy(g[i])  # a contiguous view: updated in place
            keep.append(ov)
            io.bind_ortvalue_input(f"past_{kind}_{i}", ov)
            io.bind_ortvalue_output(f"present_{kind}_{i}", ov)
    sess.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0], grown[0], grown[1]


class OnnxPredictor:
    """The full-window graph (and optionally the step graph) with validated numpy entry points."""

    def __init__(
        self,
        full_path: str | Path,
        step_path: str | Path | None = None,
        threads: int = 1,
        sequential: bool = True,
        self_test: bool = True,
        find_step: bool = False,
        mem_arena: bool = True,
    ) -> None:
        """Load ``full_path`` (and ``step_path``; with ``find_step`` the step graph named in the full graph's
        ``rigfm.step_file`` metadata, next to it, when it exists). Raises ModelFileError naming the file."""
        self.full_path = str(full_path)
        self._local = threading.local()  # per-thread autoregressive rollout buffers (server + batch worker)
        self.full = make_session(self.full_path, threads, sequential, mem_arena)
        self.meta = parse_metadata(self.full.get_modelmeta().custom_metadata_map, self.full_path)
        if self.meta.graph != "full":
            raise ModelFileError(
                f"{self.full_path}: is a {self.meta.graph!r} graph, expected the full-window graph"
            )
        _check_io(self.full, self.full_path, FULL_INPUTS, FULL_OUTPUTS)
        me = self.meta
        self.codec = SinCosCodec(me.n, me.angle_channels) if me.angle_channels else None
        if step_path is None and find_step and self.meta.step_file:
            cand = Path(self.full_path).parent / Path(self.meta.step_file).name
            step_path = cand if cand.is_file() else None
        self.step_path: str | None = None
        self.step_sess: Any = None
        self.step_meta: ModelMeta | None = None
        if step_path is not None:
            self.step_path = str(step_path)
            self.step_sess = make_session(self.step_path, threads, sequential)
            smeta = parse_metadata(self.step_sess.get_modelmeta().custom_metadata_map, self.step_path)
            if smeta.graph != "step":
                raise ModelFileError(f"{self.step_path}: is a {smeta.graph!r} graph, expected the step graph")
            _check_io(self.step_sess, self.step_path, *buffer_step_io(smeta.n_layers))
            self.step_meta = smeta
            if smeta.checkpoint_sha256 != me.checkpoint_sha256 or (
                smeta.n,
                smeta.m,
                smeta.angle_channels,
            ) != (me.n, me.m, me.angle_channels):
                raise ModelFileError(
                    f"{self.step_path}: step graph comes from checkpoint {smeta.checkpoint_sha256[:12]} "
                    f"but {self.full_path} from {self.meta.checkpoint_sha256[:12]}"
                )
        if self_test:
            self._self_test()

    def _self_test(self) -> None:
        """One tiny inference per graph: a file that loads but cannot run is rejected here."""
        n, m = self.meta.n, self.meta.m
        t = min(4, self.meta.max_len)
        x = np.zeros((1, t, n), np.float32)
        u = np.zeros((1, t, m), np.float32)
        try:
            pred = self.predict(x, u, np.ones((1, t), np.float32))
            if self.step_sess is not None:
                self.stream().step(x[0, 0], u[0, 0])
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{self.full_path}: self-test inference failed: {exc}") from exc
        if not np.isfinite(pred).all():
            raise ModelFileError(f"{self.full_path}: self-test produced NaN/Inf")

    @property
    def has_step(self) -> bool:
        return self.step_sess is not None

    # ---------------------------------------------------------------------------------------- full window
    def check_window(self, x: Any, u: Any, obs: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate x (B,T,n), u (B,T,m), obs (B,T) (ones when None) against the model limits."""
        me = self.meta
        x = _f32("x", x, (None, None, me.n))
        b, t = x.shape[:2]
        u = _f32("u", u, (b, t, me.m))
        obs = np.ones((b, t), np.float32) if obs is None else _f32("obs", obs, (b, t), 0.0, 1.0)
        if not 1 <= b <= me.max_batch:
            raise InputError(f"batch size {b} outside [1, {me.max_batch}]")
        if not 1 <= t <= me.max_len:
            raise InputError(f"window length T={t} outside [1, max_len={me.max_len}]")
        return x, u, obs

    def predict(self, x: Any, u: Any, obs: Any | None = None) -> np.ndarray:
        """pred (B,T,n): the model's estimate of x[t+1] at every position t (raw units)."""
        return self.predict_checked(*self.check_window(x, u, obs))

    def predict_checked(self, x: np.ndarray, u: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """:meth:`predict` of arrays :meth:`check_window` accepted (the server runs big batches in chunks);
        InputError (kind "value") if the model's output is not finite."""
        pred = check_output("predict", self._run_full(self.encode(x), u, obs))
        if self.codec is None or (obs > 0).all():
            return self.decode(pred, x)
        return self._decode_hidden(pred, x, obs)

    # ---------------------------------------------------------------------------- angle (sin, cos) codec
    def encode(self, x: np.ndarray) -> np.ndarray:
        """Raw states (..., n) as the graph sees them (..., n_model); the identity without angle channels."""
        if self.codec is None:
            return x
        return np.ascontiguousarray(self.codec.encode(x), dtype=np.float32)

    def decode(self, pz: np.ndarray, x_prev: np.ndarray) -> np.ndarray:
        """Graph predictions (..., n_model) -> raw states (..., n), each angle the turn of ``atan2(sin, cos)``
        nearest to the angle in ``x_prev`` (..., n), the state it follows; the identity without angles."""
        if self.codec is None:
            return pz
        return self.codec.decode_step(pz, self._angles(x_prev)).astype(np.float32)

    def _angles(self, x: np.ndarray) -> np.ndarray:
        return x[..., list(self.meta.angle_channels)]

    def _decode_hidden(self, pz: np.ndarray, x: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """:meth:`decode` of a window with hidden steps (obs = 0): there an angle follows the decoded
        prediction before it (0 at a hidden first step), as along a rollout."""
        c = self.codec
        assert c is not None
        out = np.empty((*pz.shape[:-1], self.meta.n), np.float32)
        prev = np.zeros((x.shape[0], len(c.channels)), np.float64)
        for t in range(pz.shape[1]):
            prev = np.where(obs[:, t, None] > 0, self._angles(x[:, t]), prev)
            out[:, t] = c.decode_step(pz[:, t], prev)
            prev = self._angles(out[:, t])
        return out

    def _run_full(self, xz: np.ndarray, u: np.ndarray, obs: np.ndarray) -> np.ndarray:
        return self.full.run(["pred"], {"x": xz, "u": u, "obs": obs})[0]

    def prime(
        self, x: np.ndarray, u: np.ndarray, obs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Full window that also returns the KV cache (L,B,H,T,dh) to continue streaming from."""
        pred, k, v = self.full.run(list(FULL_OUTPUTS), {"x": x, "u": u, "obs": obs})
        return pred, k, v

    def rollout(self, x_hist: Any, u_hist: Any, u_plan: Any) -> np.ndarray:
        """Open-loop rollout, batched over K plans: returns (K,H,n).

        ``x_hist[-1]`` is the current state and ``u_plan[k, 0]`` the input applied at it; ``out[k, j]`` is the
        predicted state right after applying ``u_plan[k, j]``. ``u_hist`` holds the inputs applied at
        ``x_hist[0..L-2]``: its last L-1 rows are used (L rows, as logged "input that led to x_hist[i]", are
        fine: the first row, applied before the window, is ignored). History older than ``context`` (or than
        what fits into max_len with the horizon) is dropped from the front.
        """
        return self.rollout_checked(*self.check_rollout(x_hist, u_hist, u_plan))

    def check_rollout(
        self, x_hist: Any, u_hist: Any, u_plan: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate a rollout's arrays; returns (x_hist, u_hist, u_plan) with the history trimmed to what the
        window uses (L rows of x_hist, L-1 of u_hist): the model runs K x (L-1+H) window steps."""
        me = self.meta
        x_hist = _f32("x_hist", x_hist, (None, me.n))
        u_hist = _f32("u_hist", u_hist, (None, me.m))
        u_plan = _f32("u_plan", u_plan, (None, None, me.m))
        lx, lu = x_hist.shape[0], u_hist.shape[0]
        k, h = u_plan.shape[:2]
        if lx < 1:
            raise InputError("x_hist must have at least one row (the current state)")
        if lu < lx - 1:
            raise InputError(f"u_hist needs at least len(x_hist)-1 = {lx - 1} rows, got {lu}")
        if not 1 <= k <= me.max_batch:
            raise InputError(f"u_plan batch K={k} outside [1, {me.max_batch}]")
        if not 1 <= h <= me.max_len:
            raise InputError(f"u_plan horizon H={h} outside [1, max_len={me.max_len}]")
        lx = min(lx, me.context, me.max_len - h + 1)
        x_hist = x_hist[x_hist.shape[0] - lx :]
        u_hist = u_hist[lu - (lx - 1) :] if lx > 1 else u_hist[:0]
        return x_hist, u_hist, u_plan

    def rollout_checked(self, x_hist: np.ndarray, u_hist: np.ndarray, u_plan: np.ndarray) -> np.ndarray:
        """:meth:`rollout` of arrays :meth:`check_rollout` returned (any slice of the K plans); InputError
        (kind "value") if the model's output is not finite."""
        lx, k = x_hist.shape[0], u_plan.shape[0]
        xz = np.broadcast_to(self.encode(x_hist), (k, lx, self.meta.n_model))
        u = np.concatenate([np.broadcast_to(u_hist, (k, lx - 1, self.meta.m)), u_plan], 1)
        pred = self._rollout_encoded(xz, np.ascontiguousarray(u, np.float32), u_plan.shape[1], shared=True)
        return self._decode_rollout(pred, x_hist[-1])

    def rollout_windows(self, x_ctx: np.ndarray, u_ctx: np.ndarray, u_future: np.ndarray) -> np.ndarray:
        """Open-loop rollouts of B windows, each from its own history, in the model's rollout mode (the
        semantics of ``fm_core.finetune.rollout`` / ``rollout_ar``): x_ctx (B,L,n) observed states, u_ctx
        (B,L-1,m) the inputs applied at x_ctx[:, :-1], u_future (B,H,m) the plan -> (B,H,n) raw states."""
        lx, h = x_ctx.shape[1], u_future.shape[1]
        if lx + h - 1 > self.meta.max_len:
            raise InputError(f"context + horizon - 1 = {lx + h - 1} exceeds max_len={self.meta.max_len}")
        xz = self.encode(np.ascontiguousarray(x_ctx, np.float32))
        u = np.ascontiguousarray(np.concatenate([u_ctx, u_future], 1), np.float32)
        return self._decode_rollout(self._rollout_encoded(xz, u, h), x_ctx[:, -1])

    def _rollout_encoded(self, xz: np.ndarray, u: np.ndarray, h: int, shared: bool = False) -> np.ndarray:
        """Rollout in the graph's units by the model's rollout mode: xz (K,L,n_model) observed states, u
        (K,L-1+h,m) -> (K,h,n_model), checked finite. ``shared``: every row has the same history (MPC)."""
        k, lx = xz.shape[:2]
        if self.meta.rollout_mode == "ar":
            pred = np.empty((k, h, self.meta.n_model), np.float32)
            for i in range(0, k, AR_CHUNK_ROWS):  # rows are independent: chunks bound the cache memory
                j = min(k, i + AR_CHUNK_ROWS)
                if shared and lx >= 2 and self.step_sess is not None:
                    pred[i:j] = self._rollout_ar_shared(xz[0], u[i:j], h)
                else:
                    pred[i:j] = self._rollout_ar(np.ascontiguousarray(xz[i:j]), u[i:j], h)
        else:
            x = np.zeros((k, lx - 1 + h, self.meta.n_model), np.float32)
            x[:, :lx] = xz
            obs = np.zeros((k, lx - 1 + h), np.float32)
            obs[:, :lx] = 1.0
            pred = np.ascontiguousarray(self._run_full(x, u, obs)[:, lx - 1 :])
        check_output("rollout", pred)
        return pred

    def _decode_rollout(self, pred: np.ndarray, x_last: np.ndarray) -> np.ndarray:
        """Graph-unit rollout (K,h,n_model) -> raw states; angles unwrapped from x_last ((n,) or (K,n))."""
        if self.codec is None:
            return pred
        start = np.broadcast_to(self._angles(x_last), (pred.shape[0], len(self.meta.angle_channels)))
        return self.codec.decode_sequence(pred, start).astype(np.float32)

    def _rollout_ar_shared(self, xz: np.ndarray, u: np.ndarray, h: int) -> np.ndarray:
        """:meth:`_rollout_ar` of K plans from ONE history xz (L,n_model) (an MPC request): the L-1 history
        tokens are primed once at batch 1 and their KV cache shared by the K plans, which differ from the
        token of the current state on (its input is the plan's first). u (K,L-1+h,m) -> (K,h,n_model)."""
        k, lx = u.shape[0], xz.shape[0]
        u1 = np.ascontiguousarray(u[:1, : lx - 1])
        _, kc, vc = self.prime(np.ascontiguousarray(xz[None, : lx - 1]), u1, np.ones((1, lx - 1), np.float32))
        xs = np.empty((k, lx + h - 1, xz.shape[1]), np.float32)
        xs[:, :lx] = xz
        out = np.empty((k, h, xz.shape[1]), np.float32)
        self._step_rollout(xs, u, out, 0, kc, vc)
        return out

    def _step_rollout(
        self, xs: np.ndarray, u: np.ndarray, out: np.ndarray, j0: int, kc: np.ndarray, vc: np.ndarray
    ) -> None:
        """Fill out[:, j0:] (K,h,n_model) through the step graph, feeding every prediction back into xs
        (K,·,n_model): kc, vc (L,B,H,S,dh) hold the S tokens before the one of state t = S (B = K, or 1 for a
        history the K rows share), the token of state S + j - j0 predicts out[:, j]. The steps run in place
        (:class:`RolloutBuffers`, one binding for all steps)."""
        k, h = out.shape[:2]
        s = kc.shape[3]
        rb = self._rollout_buffers(k, s + h - j0)
        rb.load(kc, vc)
        for j in range(j0, h):
            t = s + j - j0  # the newest state (observed or predicted); its token predicts x[t+1]
            _fill_window(rb.x, rb.u, xs, u, t)
            out[:, j] = rb.step()
            if t + 1 < xs.shape[1]:
                xs[:, t + 1] = out[:, j]

    def _rollout_buffers(self, rows: int, tokens: int) -> RolloutBuffers:
        """This thread's in-place buffers for ``rows`` rollouts of ``tokens`` cache tokens (the two most
        recent shapes are kept: allocating and binding costs milliseconds)."""
        cap = min(self.meta.max_len, -(-tokens // 16) * 16)
        cache: dict[tuple[int, int], RolloutBuffers] | None = getattr(self._local, "ar", None)
        if cache is None:
            cache = self._local.ar = {}
        rb = cache.pop((rows, cap), None)
        if rb is None:
            while len(cache) >= 2:
                cache.pop(next(iter(cache)))
            rb = RolloutBuffers(self.step_sess, self.meta, rows, cap)
        cache[(rows, cap)] = rb  # most recently used last
        return rb

    def _rollout_ar(self, xz: np.ndarray, u: np.ndarray, h: int) -> np.ndarray:
        """Autoregressive rollout in the graph's (encoded) units: the history window primes the KV cache,
        then every prediction is fed back as the next observed state through the step graph (a full window
        per step without one). xz (K,L,n_model), u (K,L-1+h,m) -> (K,h,n_model)."""
        k, lx = xz.shape[:2]
        pred, kc, vc = self.prime(xz, np.ascontiguousarray(u[:, :lx]), np.ones((k, lx), np.float32))
        xs = np.concatenate([xz, np.empty((k, h - 1, xz.shape[2]), np.float32)], 1)
        out = np.empty((k, h, xz.shape[2]), np.float32)
        out[:, 0] = pred[:, -1]
        if h > 1:
            xs[:, lx] = pred[:, -1]
        if self.step_sess is not None:
            self._step_rollout(xs, u, out, 1, kc, vc)
            return out
        for j in range(1, h):
            t = lx - 1 + j  # the newest (predicted) state; its token predicts x[t+1]
            res = self._run_full(xs[:, : t + 1], np.ascontiguousarray(u[:, : t + 1]),
                                 np.ones((k, t + 1), np.float32))[:, -1]
            out[:, j] = res
            if t + 1 < xs.shape[1]:
                xs[:, t + 1] = res
        return out

    # ---------------------------------------------------------------------------------------- streaming
    def step(
        self, x_win: np.ndarray, u_win: np.ndarray, obs_win: np.ndarray, k: np.ndarray, v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step-graph call: pred (B,n_model) and the caches k, v (L,B,H,S,dh) grown by one position.

        The graph runs on a copy of the cache with one free position; streams use :meth:`new_slots` instead,
        which keeps the cache in place.
        """
        if self.step_sess is None or self.step_meta is None:
            raise ModelFileError(f"{self.full_path}: no streaming step graph loaded")
        return run_step_graph(self.step_sess, x_win, u_win, obs_win, k, v)

    def new_slots(self, rows: int) -> BufferSlots:
        """``rows`` (1 or 2) empty KV-cache slots of ``context`` tokens for a stream (export.kv_slots)."""
        if self.step_sess is None or self.step_meta is None:
            raise ModelFileError(f"{self.full_path}: no streaming step graph loaded")
        return BufferSlots(self.step_sess, self.meta, rows, self.meta.context)

    def stream(self, shadow: bool = False) -> StreamState:
        """A new, empty incremental stream (see :class:`StreamState`)."""
        return StreamState(self, shadow=shadow)


def _check_cache(pred: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """InputError (kind "value") unless a prime's prediction and KV cache are all finite."""
    if not (np.isfinite(pred).all() and np.isfinite(k).all() and np.isfinite(v).all()):
        raise InputError("stream: the model's output is not finite (NaN/Inf) for this history", kind="value")


class StreamState:
    """Incremental next-state prediction for one stream of (x_t, u_t) steps.

    With the step graph each step is one KV-cache token. When the cache holds ``context`` tokens the stream is
    re-primed to the last ``keep = context // 2`` steps. ``shadow=False``: one full-window call over those
    steps (cheap on average, but that step costs a window of ``keep`` tokens). ``shadow=True``: a second
    cache slot is grown one token per step over the ``keep`` steps before the re-prime and swapped in, so no
    step ever costs a full window. Both slots advance in one batch-2 call, in place (export.kv_slots).
    Without a step graph every step recomputes the full window over the last ``context`` steps.
    The prediction after a step equals the full-window prediction over ``history[start:]`` (``self.start``).
    """

    def __init__(self, predictor: OnnxPredictor, shadow: bool = False) -> None:
        me = predictor.meta
        self.pred_ = predictor
        self.shadow = bool(shadow)
        self.keep = max(me.patch, me.context // 2)
        # the last `context` steps as the graph sees them (angles as sin, cos), oldest first
        self.x = np.zeros((me.context, me.n_model), np.float32)
        self.u = np.zeros((me.context, me.m), np.float32)
        self.slots = predictor.new_slots(2 if self.shadow else 1) if predictor.has_step else None
        self.primes = 0
        self._clear()

    def reset(self) -> None:
        """Forget the history (keeps the cache buffers for reuse)."""
        self._clear()
        self.primes = 0

    def _clear(self) -> None:
        self.t = 0  # steps seen in total
        self.start = 0  # absolute index of the first step inside the current cache / window
        self.live = 0  # slot holding the live cache; the other one (shadow mode) holds the shadow
        self.primed = False  # the live slot holds the cache of history[start:]
        self.sh_start: int | None = None  # absolute index of the shadow cache's first step
        if self.slots is not None:
            for r in range(2 if self.shadow else 1):
                self.slots.clear(r)

    def _append(self, x_t: np.ndarray, u_t: np.ndarray) -> None:
        c = self.x.shape[0]
        if self.t < c:
            self.x[self.t], self.u[self.t] = x_t, u_t
        else:
            self.x[:-1], self.u[:-1] = self.x[1:], self.u[1:]
            self.x[-1], self.u[-1] = x_t, u_t
        self.t += 1

    def _window(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        end = min(self.t, self.x.shape[0])
        return self.x[end - length : end], self.u[end - length : end]

    def step(self, x_t: Any, u_t: Any) -> np.ndarray:
        """Feed the measured x_t (n,) and the input u_t (m,) applied at it; returns the x[t+1] estimate."""
        p = self.pred_
        me = p.meta
        x_t = _f32("x_t", x_t, (me.n,))
        u_t = _f32("u_t", u_t, (me.m,))
        saved = self._save()
        try:
            return check_output("stream_step", p.decode(self._step_encoded(p.encode(x_t), u_t), x_t))
        except BaseException:
            self._restore(saved)  # a failed step never enters the history or the cache
            raise

    def _save(self) -> tuple[Any, ...]:
        """What a step changes: counters, the history window and the slots' lengths (a step writes the cache
        only at positions past them; a re-prime loads a slot only after its output was found finite)."""
        sl = None if self.slots is None else self.slots.save()
        return (self.t, self.start, self.live, self.primed, self.sh_start, self.primes, self.x.copy(),
                self.u.copy(), sl)

    def _restore(self, saved: tuple[Any, ...]) -> None:
        self.t, self.start, self.live, self.primed, self.sh_start, self.primes, x, u, sl = saved
        self.x[:], self.u[:] = x, u
        if self.slots is not None:
            self.slots.restore(sl)

    def _step_encoded(self, z_t: np.ndarray, u_t: np.ndarray) -> np.ndarray:
        p = self.pred_
        me = p.meta
        self._append(z_t, u_t)
        if self.slots is None:
            length = min(self.t, me.context)
            self.start = self.t - length
            xw, uw = self._window(length)
            xw, uw = np.ascontiguousarray(xw[None]), np.ascontiguousarray(uw[None])
            return p._run_full(xw, uw, np.ones((1, length), np.float32))[0, -1]
        sl, live = self.slots, self.live
        cached = sl.length(live) if self.primed else 0
        shadow_due = self.shadow and self.primed and self._shadow_due()
        if self.primed and cached < me.context:
            rows = tuple(sorted((live, 1 - live))) if shadow_due else (live,)
            return sl.step(rows, *self._step_window())[live]
        if shadow_due:  # live cache full: only the shadow steps, then takes over
            sh = 1 - live
            pred = sl.step((sh,), *self._step_window())[sh]
            if sl.length(sh) == self.keep:  # the shadow holds exactly the last `keep` steps
                assert self.sh_start is not None
                self.start, self.live, self.sh_start = self.sh_start, sh, None
                sl.clear(live)
                self.primes += 1
                return pred
        self.sh_start = None
        length = min(self.t, self.keep) if self.primed else 1
        self.start = self.t - length
        xw, uw = self._window(length)
        pred, k, v = p.prime(
            np.ascontiguousarray(xw[None]),
            np.ascontiguousarray(uw[None]),
            np.ones((1, length), np.float32),
        )
        _check_cache(pred, k, v)  # before the load overwrites the live cache
        sl.load(live, k, v)
        if self.primed:
            self.primes += 1
        self.primed = True
        return pred[0, -1]

    def _step_window(self) -> tuple[np.ndarray, np.ndarray]:
        """The step graph's window: the last ``patch`` steps (rows before the history start are zeros)."""
        me = self.pred_.meta
        pw = me.patch
        xw = np.zeros((pw, me.n_model), np.float32)
        uw = np.zeros((pw, me.m), np.float32)
        take = min(pw, self.t, self.x.shape[0])
        xs, us = self._window(take)
        xw[pw - take :], uw[pw - take :] = xs, us
        return xw, uw

    def _shadow_due(self) -> bool:
        """Whether the shadow slot takes the current step: once the step falls inside the next re-prime's
        window (re-prime at index ``start + context``, keeping ``keep`` steps, so the shadow starts at index
        ``start + context + 1 - keep``). The step graph ignores window rows before the shadow's own start (its
        cache position decides), exactly like a full-window prime."""
        assert self.slots is not None
        me = self.pred_.meta
        i = self.t - 1  # index of the step just appended
        first = self.start + me.context + 1 - self.keep
        if i < first:
            return False
        sh = 1 - self.live
        if self.sh_start is None:
            if i != first:  # started late (e.g. primed mid-way): the full re-prime covers it
                return False
            self.slots.clear(sh)
            self.sh_start = first
        if self.slots.length(sh) != i - self.sh_start:
            self.sh_start = None
            return False
        return True

    def prime_history(self, x_hist: Any, u_hist: Any) -> None:
        """Start the stream from a history (L,n)/(L,m) of steps (each u applied at its x); no output."""
        me = self.pred_.meta
        x_hist = _f32("x_hist", x_hist, (None, me.n))
        u_hist = _f32("u_hist", u_hist, (x_hist.shape[0], me.m))
        x_hist = self.pred_.encode(x_hist)
        self._clear()
        for xt, ut in zip(x_hist[-me.context :], u_hist[-me.context :], strict=True):
            self._append(xt, ut)
        if self.t and self.slots is not None:
            length = min(self.t, self.keep if self.t > me.context - 1 else self.t)
            self.start = self.t - length
            xw, uw = self._window(length)
            pred, k, v = self.pred_.prime(
                np.ascontiguousarray(xw[None]),
                np.ascontiguousarray(uw[None]),
                np.ones((1, length), np.float32),
            )
            try:
                _check_cache(pred, k, v)
            except InputError:
                self._clear()  # an empty stream rather than a poisoned one
                raise
            self.slots.load(self.live, k, v)
            self.primed = True
