"""Versioned wire format of the rigfm predictor (ZeroMQ multipart, no pickle). Torch-free, numpy only.

Request  (client -> server): ``[b"" (optional delimiter), header, array frame 0, array frame 1, ...]``
Reply    (server -> client): ``[b"" (echoed when the request had it), header, array frames ...]``

The header is UTF-8 JSON::

    {"v": 1, "id": "<request id>", "method": "predict",
     "arrays": [{"name": "x", "shape": [B, T, n], "dtype": "float32"}, ...], "params": {...}}

Each array frame holds the raw little-endian, C-order bytes of the array declared at the same position.
A reply header has ``"ok": true`` and the result arrays / ``"result"`` dict, or ``"ok": false`` and
``"error": {"code": ..., "message": ...}``. See docs/predictor.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # the C escaper json.dumps uses
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
DTYPES = {"float32": np.dtype("<f4")}
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 8
MAX_NDIM = 4
MAX_ARRAY_BYTES = 256 * 1024 * 1024
MAX_ID_LEN = 128
METHODS = ("info", "health", "stats", "predict", "rollout", "stream_reset", "stream_step", "reload")
COPY_THRESHOLD = 64 * 1024  # frames smaller than this are copied by zmq (faster than zero-copy tracking)

# Error codes (stable strings clients can branch on).
E_MALFORMED = "malformed"  # envelope / header frame cannot be parsed
E_VERSION = "bad_version"
E_METHOD = "unknown_method"
E_ARRAYS = "bad_arrays"  # array declarations vs frames mismatch, wrong dtype / shape / names
E_VALUE = "bad_value"  # NaN / Inf or out-of-range values
E_PARAMS = "bad_params"
E_STREAM = "stream_unknown"  # stream_step without stream state (after restart / reload / reset needed)
E_BUSY = "busy"  # e.g. a reload already in progress, the batch queue full
E_TOO_LARGE = "too_large"  # the request exceeds the server's element budget (--max-elements)
E_RELOAD = "reload_failed"
E_INTERNAL = "internal"  # unexpected server-side failure (the server stays up)


def max_frame_bytes(n: int, m: int, max_elements: int) -> int:
    """The ZeroMQ frame-size limit (``ZMQ_MAXMSGSIZE``) of a server with ``max_elements``: twice the largest
    legal array frame (``max_elements`` rows of max(n, m, 1) float32), so a request up to twice the budget
    still gets the named ``too_large`` reply; anything bigger is dropped by ZeroMQ, which disconnects the
    peer. Never below :data:`MAX_HEADER_BYTES`, never above :data:`MAX_ARRAY_BYTES`."""
    legal = 4 * int(max_elements) * max(int(n), int(m), 1)
    return int(min(MAX_ARRAY_BYTES, max(MAX_HEADER_BYTES, 2 * legal)))


class SchemaError(ValueError):
    """A message violates the wire format; ``code`` is one of the ``E_*`` constants."""

    def __init__(self, code: str, message: str, req_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.req_id = req_id


@dataclass
class Message:
    """A decoded request or reply."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    delimiter: bool = True

    @property
    def id(self) -> str | None:
        return self.header.get("id")

    @property
    def method(self) -> str | None:
        return self.header.get("method")

    @property
    def params(self) -> dict[str, Any]:
        return self.header.get("params") or {}


def _frame_bytes(frame: Any) -> memoryview:
    """A memoryview of a zmq.Frame / bytes / memoryview without copying."""
    buf = getattr(frame, "buffer", frame)
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def _declare(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {"name": name, "shape": list(arr.shape), "dtype": "float32"}


def _arrays(arrays: dict[str, Any] | None) -> tuple[str, list[np.ndarray]]:
    """The header's ``"arrays"`` JSON and the C-order float32 buffers, in insertion order.

    A control loop sends the same few (name, shape) pairs over and over: their JSON is built once and cached.
    """
    if not arrays:
        return "[]", []
    decls, bufs = [], []
    for name, a in arrays.items():
        arr = np.ascontiguousarray(a, dtype=_F32)
        key = (name, arr.shape)
        d = _DECL_JSON.get(key)
        if d is None:
            if len(_DECL_JSON) >= _DECL_CACHE_MAX:
                _DECL_JSON.clear()
            d = _DECL_JSON[key] = _JSON_ENCODER.encode(_declare(name, arr))
        decls.append(d)
        bufs.append(arr)
    return "[" + ",".join(decls) + "]", bufs


def _json_value(v: Any) -> str:
    """JSON text of one header value (strings through the C escaper: any id or name stays valid JSON)."""
    return _json_str(v) if type(v) is str else _JSON_ENCODER.encode(v)


def encode(header: dict[str, Any], arrays: dict[str, Any] | None = None, delimiter: bool = True) -> list[Any]:
    """Frames for ``header`` plus float32 ``arrays`` (declared in the header in insertion order)."""
    decls, bufs = _arrays(arrays)
    hdr = {k: v for k, v in header.items() if k != "arrays"}
    hdr["v"] = header.get("v", PROTOCOL_VERSION)
    body = _JSON_ENCODER.encode(hdr)
    frames: list[Any] = [b""] if delimiter else []
    frames.append((body[:-1] + ("," if len(hdr) else "") + '"arrays":' + decls + "}").encode())
    frames.extend(bufs)
    return frames


def encode_request(
    method: str, req_id: str, arrays: dict[str, Any] | None = None, params: dict[str, Any] | None = None
) -> list[Any]:
    """Request frames (with the empty delimiter, as a DEALER or REQ socket sends them).

    The header JSON is assembled from pre-escaped pieces (what :func:`encode` would write, ~10x cheaper: this
    runs on every control-loop request)."""
    decls, bufs = _arrays(arrays)
    head = f'{{"v":{PROTOCOL_VERSION},"id":{_json_value(req_id)},"method":{_json_value(method)}'
    if params:
        stream = params.get("stream")
        if len(params) == 1 and type(stream) is str:  # stream_step / stream_reset
            head += ',"params":{"stream":' + _json_str(stream) + "}"
        else:
            head += ',"params":' + _JSON_ENCODER.encode(params)
    return [b"", (head + ',"arrays":' + decls + "}").encode(), *bufs]


def encode_reply(
    req_id: str | None,
    method: str | None,
    arrays: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    delimiter: bool = True,
    server_us: float | None = None,
    compute_us: float | None = None,
) -> list[Any]:
    """A success reply; ``server_us``: server-side handling time (splits transport from the server's work),
    ``compute_us``: the part of it spent inside the model call (splits inference from decoding/validation)."""
    decls, bufs = _arrays(arrays)
    head = f'{{"v":{PROTOCOL_VERSION},"id":{_json_value(req_id)},"method":{_json_value(method)},"ok":true'
    if result is not None:
        head += ',"result":' + _JSON_ENCODER.encode(result)
    for key, value in (("server_us", server_us), ("compute_us", compute_us)):
        if value is not None:
            us = float(value)
            if not math.isfinite(us):
                raise ValueError(f"{key} must be finite, got {us}")
            head += f',"{key}":' + repr(us)
    frames: list[Any] = [b""] if delimiter else []
    frames.append((head + ',"arrays":' + decls + "}").encode())
    frames.extend(bufs)
    return frames


def encode_error(req_id: str | None, code: str, message: str, delimiter: bool = True) -> list[Any]:
    """An error reply naming the problem."""
    hdr = {
        "v": PROTOCOL_VERSION,
        "id": req_id,
        "ok": False,
        "error": {"code": code, "message": message[:2000]},
    }
    return encode(hdr, None, delimiter)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite JSON constant {name}")


# built once: json.dumps / json.loads with options construct a new encoder / decoder on every call
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_F32 = DTYPES["float32"]
_INT_ONLY = frozenset({int})  # shape entries: exactly int (JSON true / 1.0 are refused)
_DECL_JSON: dict[tuple[Any, tuple[int, ...]], str] = {}  # (name, shape) -> its declaration's JSON
_DECL_CACHE_MAX = 1024


def _parse_header(raw: memoryview, req_id_hint: str | None = None) -> dict[str, Any]:
    if raw.nbytes > MAX_HEADER_BYTES:
        raise SchemaError(E_MALFORMED, f"header frame is {raw.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        hdr = _JSON_DECODER.decode(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise SchemaError(E_MALFORMED, f"header frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(hdr, dict):
        raise SchemaError(E_MALFORMED, f"header must be a JSON object, got {type(hdr).__name__}")
    req_id = hdr.get("id")
    if not isinstance(req_id, str) or not 0 < len(req_id) <= MAX_ID_LEN:
        raise SchemaError(E_MALFORMED, f"header 'id' must be a non-empty string of <= {MAX_ID_LEN} chars")
    if hdr.get("v") != PROTOCOL_VERSION:
        raise SchemaError(
            E_VERSION,
            f"protocol version {hdr.get('v')!r} not supported (server speaks {PROTOCOL_VERSION})",
            req_id,
        )
    return hdr


def _decode_arrays(hdr: dict[str, Any], frames: Sequence[Any], req_id: str | None) -> dict[str, np.ndarray]:
    decls = hdr.get("arrays", [])
    if not isinstance(decls, list):
        raise SchemaError(E_ARRAYS, "header 'arrays' must be a list", req_id)
    if len(decls) > MAX_ARRAYS:
        raise SchemaError(E_ARRAYS, f"{len(decls)} arrays declared, limit {MAX_ARRAYS}", req_id)
    if len(decls) != len(frames):
        raise SchemaError(
            E_ARRAYS, f"header declares {len(decls)} array(s) but {len(frames)} array frame(s) follow", req_id
        )
    out: dict[str, np.ndarray] = {}
    for i, (d, frame) in enumerate(zip(decls, frames, strict=True)):
        # one cheap test for a well-formed declaration; anything else gets the check that names the problem
        try:
            name, shape = d["name"], d["shape"]
            ok = (
                d["dtype"] == "float32"
                and type(name) is str
                and 0 < len(name) <= 64
                and name not in out
                and type(shape) is list
                and len(shape) <= MAX_NDIM
                and _INT_ONLY.issuperset(map(type, shape))
                and min(shape, default=0) >= 0
            )
        except (TypeError, KeyError):
            ok = False
        if not ok:
            _bad_declaration(i, d, out, req_id)
        nbytes = math.prod(shape) * 4
        if nbytes > MAX_ARRAY_BYTES:
            raise SchemaError(
                E_ARRAYS, f"array {name!r}: {nbytes} bytes exceeds limit {MAX_ARRAY_BYTES}", req_id
            )
        buf = _frame_bytes(frame)
        if buf.nbytes != nbytes:
            raise SchemaError(
                E_ARRAYS,
                f"array {name!r}: shape {shape} float32 needs {nbytes} bytes, frame has {buf.nbytes}",
                req_id,
            )
        out[name] = np.frombuffer(buf, dtype=_F32).reshape(shape)
    return out


def _bad_declaration(i: int, d: Any, seen: dict[str, Any], req_id: str | None) -> None:
    """Raise the SchemaError that names what is wrong with declaration ``arrays[i]``."""
    if not isinstance(d, dict):
        raise SchemaError(E_ARRAYS, f"arrays[{i}] must be an object", req_id)
    name, shape, dtype = d.get("name"), d.get("shape"), d.get("dtype")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise SchemaError(E_ARRAYS, f"arrays[{i}].name must be a non-empty string", req_id)
    if name in seen:
        raise SchemaError(E_ARRAYS, f"array {name!r} declared twice", req_id)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SchemaError(E_ARRAYS, f"array {name!r}: dtype {dtype!r} not supported (use 'float32')", req_id)
    raise SchemaError(
        E_ARRAYS,
        f"array {name!r}: shape must be a list of <= {MAX_NDIM} non-negative ints, got {shape!r}",
        req_id,
    )


def split_envelope(frames: Sequence[Any]) -> tuple[bool, Sequence[Any]]:
    """(had_delimiter, frames after the optional empty delimiter)."""
    if frames and _frame_bytes(frames[0]).nbytes == 0:
        return True, frames[1:]
    return False, frames


def decode(frames: Sequence[Any]) -> Message:
    """Decode request or reply frames (without the ROUTER identity). Raises SchemaError."""
    delim, body = split_envelope(frames)
    if not body:
        raise SchemaError(E_MALFORMED, "message has no header frame")
    hdr = _parse_header(_frame_bytes(body[0]))
    return Message(hdr, _decode_arrays(hdr, body[1:], hdr["id"]), delim)


def decode_request(frames: Sequence[Any]) -> Message:
    """Decode and check a request: known method and params object. Raises SchemaError."""
    msg = decode(frames)
    method = msg.header.get("method")
    if method not in METHODS:
        raise SchemaError(E_METHOD, f"unknown method {method!r}; known: {', '.join(METHODS)}", msg.id)
    if not isinstance(msg.header.get("params", {}), dict):
        raise SchemaError(E_PARAMS, "header 'params' must be an object", msg.id)
    return msg


def require(msg: Message, names: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The named arrays of a request; extra or missing names raise SchemaError (E_ARRAYS)."""
    missing = [n for n in names if n not in msg.arrays]
    extra = [n for n in msg.arrays if n not in names and n not in optional]
    if missing or extra:
        raise SchemaError(
            E_ARRAYS,
            f"method {msg.method!r} takes arrays {list(names)}"
            f"{' (+ optional ' + str(list(optional)) + ')' if optional else ''}; "
            f"missing {missing}, unexpected {extra}",
            msg.id,
        )
    return msg.arrays
