"""Fixed topics and JSON schemas of rigfm run logs (MCAP, message encoding "json", log format v2).

Two shapes of one record (docs/logging.md):

* the **API record** that callers hand to ``RunLogger.write`` and that ``hardware.log_reader`` returns:
  times as ``host_time_ns`` ints, ``/prediction.predicted`` as a horizon x n list of lists, ``/event.data``
  as a dict;
* the **file record** (``to_file``): what the MCAP message holds, shaped for Foxglove's JSON-schema parser
  and JavaScript readers: times as Foxglove ``Time`` objects ``{"sec", "nsec"}`` (no integer above 2^53),
  ``predicted`` flattened row-major with ``n`` beside it (no nested arrays), ``data`` as a list of
  ``{"key", "value"}`` pairs with JSON-text values (no object without ``properties``). The schemas use no
  ``"type": [.., "null"]`` unions; a non-finite optional number is left out, one inside an array is written
  as ``null``.

``from_file`` turns a file record of either format (v1 files have ``host_time_ns`` in the file) back into
an API record. Field names are a contract: add optional fields freely; never rename or drop required ones."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from hardware.log_clock import from_time, to_time

SCHEMA_ENCODING = "jsonschema"
MESSAGE_ENCODING = "json"
LOG_FORMAT = "rigfm-log-v2"
METADATA_NAME = "rigfm.run"
END_METADATA_NAME = "rigfm.run_end"
RECOVERY_METADATA_NAME = "rigfm.recovery"
LOG_TOPIC = "/log"  # foxglove.Log (protobuf) mirror of /mode, /fault and /event, written by the logger

CLOCK_NOTE = ("host wall clock (ns since the Unix epoch as of process start, advanced by the monotonic "
              "clock: hardware.log_clock)")
_TIME = {
    "type": "object",
    "properties": {
        "sec": {"type": "integer", "minimum": 0, "description": "whole seconds"},
        "nsec": {"type": "integer", "minimum": 0, "maximum": 999_999_999, "description": "nanoseconds"},
    },
    "required": ["sec", "nsec"],
}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NUM_LIST = {"type": "array", "items": _NUM}
_INT_LIST = {"type": "array", "items": _INT}
_KV_LIST = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"key": _STR, "value": {**_STR, "description": "JSON text of the value"}},
        "required": ["key", "value"],
    },
}


def _time(what: str) -> dict[str, Any]:
    return {**_TIME, "description": f"{what}: {CLOCK_NOTE}"}


_PROPERTIES: dict[str, dict[str, dict[str, Any]]] = {
    "/state": {
        "timestamp": _time("when the host received the sample"),
        "seq": {**_INT, "description": "device frame sequence number (u16, shared by all device frames)"},
        "device_time_us": {**_INT, "description": "firmware clock at sampling (us, wraps at 2^32)"},
        "positions": {**_NUM_LIST, "description": "SI: cart-pole [p, theta], Furuta [theta, alpha]"},
        "velocities": {**_NUM_LIST, "description": "SI velocities as estimated by the control loop"},
        "estimated": {**_BOOL, "description": "true: the loop's velocity estimate was updated from this "
                                              "frame (the newest of a tick); false: a frame between ticks, "
                                              "logged with the held estimate"},
        "counts": {**_INT_LIST, "description": "raw encoder counts"},
        "flags": {**_INT, "description": "device status flags (hardware.protocol.StatusFlags bits)"},
        "current": {**_NUM, "description": "motor current (A), optional"},
        "applied_voltage": {**_NUM, "description": "voltage the firmware applied (V), optional"},
        "rx_index": {**_INT, "description": "host count of STATE frames received (0, 1, 2, ...): a gap "
                                            "here is a frame the host received but did not log"},
        "link_lost": {**_INT, "description": "device frames lost on the serial link so far (cumulative, "
                                             "from the driver's sequence check)"},
    },
    "/command": {
        "timestamp": _time("when the command was sent"),
        "seq": {**_INT, "description": "host command sequence number"},
        "voltage": {**_NUM, "description": "commanded motor voltage (V) after safety clipping"},
        "requested": {**_NUM, "description": "voltage requested by the controller before clipping"},
        "state_seq": {**_INT, "description": "seq of the state the command was computed from"},
        "source": {**_STR, "description": "controller | fault (0 V on a trip) | shutdown (0 V at exit)"},
        "estop": {**_BOOL, "description": "an e-stop was sent with this command"},
    },
    "/prediction": {
        "timestamp": _time("when the prediction was received"),
        "ref_seq": {**_INT, "description": "seq of the last observed state the prediction starts from"},
        "ref_timestamp": _time("host time of that state; predicted step k is at ref_timestamp + (k+1) dt"),
        "dt": {**_NUM, "description": "model time step (s)"},
        "horizon": {**_INT, "description": "number of predicted steps"},
        "n": {**_INT, "description": "state dimension: predicted holds horizon x n values"},
        "predicted": {**_NUM_LIST, "description": "predicted states, row-major horizon x n"},
        "latency_us": {**_NUM, "description": "predictor round trip (us)"},
    },
    "/mode": {
        "timestamp": _time("when the mode changed"),
        "mode": {**_STR, "description": "new mode, e.g. idle, swingup, balance, estop, fault"},
        "previous": {**_STR, "description": "previous mode"},
        "reason": {**_STR, "description": "why the mode changed"},
    },
    "/fault": {
        "timestamp": _time("when the fault was detected"),
        "code": {**_STR, "description": "short fault code, e.g. limit, stale_state, command, log_write"},
        "message": {**_STR, "description": "human readable description"},
        "flags": {**_INT, "description": "device status flags at the fault"},
    },
    "/truth": {
        "timestamp": _time("when the host received the TRUTH frame"),
        "device_time_us": {**_INT, "description": "firmware clock of the STATE sample this is the truth of "
                                                  "(join with /state.device_time_us)"},
        "state": {**_NUM_LIST, "description": "true continuous state (SI) of the virtual rig's plant: "
                                              "cart-pole [p, theta, p_dot, theta_dot], Furuta [theta, alpha, "
                                              "theta_dot, alpha_dot]"},
        "voltage": {**_NUM, "description": "voltage acting on the plant then (after the actuation delay)"},
        "estimate": {**_NUM_LIST, "description": "the loop's state estimate from that sample, optional"},
        "error": {**_NUM_LIST, "description": "estimate - state (pendulum angle wrapped), optional"},
    },
    "/event": {
        "timestamp": _time("when the event happened"),
        "name": {**_STR, "description": "event name, e.g. run_start, run_end, prediction_monitor"},
        "data": {**_KV_LIST, "description": "payload as key / JSON-text value pairs"},
    },
}

# required fields of the API record (RunLogger.write checks them; readers guarantee them)
REQUIRED: dict[str, tuple[str, ...]] = {
    "/state": ("seq", "device_time_us", "host_time_ns", "positions", "velocities", "counts", "flags"),
    "/command": ("seq", "host_time_ns", "voltage"),
    "/prediction": ("host_time_ns", "ref_seq", "ref_host_time_ns", "dt", "horizon", "predicted"),
    "/mode": ("host_time_ns", "mode"),
    "/fault": ("host_time_ns", "code"),
    "/truth": ("host_time_ns", "device_time_us", "state", "voltage"),
    "/event": ("host_time_ns", "name"),
}
_FILE_NAMES = {"host_time_ns": "timestamp", "ref_host_time_ns": "ref_timestamp"}
FILE_REQUIRED: dict[str, tuple[str, ...]] = {
    t: tuple(_FILE_NAMES.get(k, k) for k in req) + (("n",) if t == "/prediction" else ())
    for t, req in REQUIRED.items()
}

TOPICS: tuple[str, ...] = tuple(_PROPERTIES)

SCHEMA_NAMES: dict[str, str] = {
    "/state": "rigfm.State",
    "/command": "rigfm.Command",
    "/prediction": "rigfm.Prediction",
    "/mode": "rigfm.Mode",
    "/fault": "rigfm.Fault",
    "/truth": "rigfm.Truth",
    "/event": "rigfm.Event",
}


def json_schema(topic: str) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of one topic's file records."""
    if topic not in _PROPERTIES:
        raise KeyError(f"unknown log topic {topic!r}; topics are {', '.join(TOPICS)}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": SCHEMA_NAMES[topic],
        "type": "object",
        "properties": _PROPERTIES[topic],
        "required": list(FILE_REQUIRED[topic]),
    }


def schema_bytes(topic: str) -> bytes:
    """The encoded schema stored in the MCAP schema record."""
    return json.dumps(json_schema(topic), sort_keys=True).encode()


def missing_fields(topic: str, record: dict[str, Any]) -> list[str]:
    """Required fields of ``topic`` absent from the API ``record`` (empty when complete)."""
    return [k for k in REQUIRED[topic] if k not in record]


# ------------------------------------------------------------------------------ API <-> file records
def _finite(v: Any) -> Any:
    """Non-finite floats -> None, numpy -> Python, recursively (for values inside arrays)."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def _flat(rows: Any) -> tuple[list[Any], int]:
    """horizon x n (list of lists or a 2-d array) -> (row-major list, n)."""
    if hasattr(rows, "tolist"):
        rows = rows.tolist()
    rows = list(rows)
    if rows and isinstance(rows[0], (list, tuple)):
        n = len(rows[0])
        return [x for r in rows for x in r], n
    return rows, (1 if rows else 0)


def to_file(topic: str, record: dict[str, Any]) -> dict[str, Any]:
    """API record -> file record (see the module docstring). The input is not modified."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in _FILE_NAMES:
            out[_FILE_NAMES[key]] = to_time(value)
            continue
        value = _finite(value)
        if value is None:
            continue  # a non-finite (or None) optional scalar is left out; required ones are checked below
        out[key] = value
    if topic == "/prediction" and "predicted" in out:
        flat, n = _flat(out["predicted"])
        out["predicted"] = flat
        out.setdefault("n", n)
    elif topic == "/event" and "data" in record:
        data = record["data"] if isinstance(record["data"], dict) else {"value": record["data"]}
        out["data"] = [{"key": str(k), "value": json.dumps(_finite(v), sort_keys=True, default=str)}
                       for k, v in data.items()]
    for key in FILE_REQUIRED.get(topic, ()):
        out.setdefault(key, None)  # a required number that was NaN stays visible as null
    return out


def from_file(topic: str, record: dict[str, Any]) -> dict[str, Any]:
    """File record (v1 or v2) -> API record. v1 records already are API records and come back as they are."""
    if "timestamp" not in record and "ref_timestamp" not in record:
        return record
    out = dict(record)
    for api, file in _FILE_NAMES.items():
        t = out.pop(file, None)
        if isinstance(t, dict) and "sec" in t and "nsec" in t:
            out[api] = from_time(t)
    if topic == "/prediction" and isinstance(out.get("predicted"), list) and isinstance(out.get("n"), int):
        n = out["n"]
        flat = out["predicted"]
        if n > 0 and not (flat and isinstance(flat[0], list)):
            out["predicted"] = [flat[i : i + n] for i in range(0, len(flat), n)]
            del out["n"]  # implied by the shape
    elif topic == "/event" and isinstance(out.get("data"), list):
        data: dict[str, Any] = {}
        for kv in out["data"]:
            if isinstance(kv, dict) and "key" in kv:
                try:
                    data[str(kv["key"])] = json.loads(kv.get("value", "null"))
                except (TypeError, ValueError):
                    data[str(kv["key"])] = kv.get("value")
        out["data"] = data
    return out


# ------------------------------------------------------------------------------------------ metadata
_JSON_KEYS = "_json_keys"


def _jsonable(obj: Any) -> Any:
    """JSON fallback for metadata: dataclasses (e.g. RigConfig) as dicts, numpy via tolist, else str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """MCAP metadata is str -> str: strings stay as they are (readable in Foxglove), other values are JSON
    encoded and their keys listed under ``_json_keys`` so :func:`decode_metadata` restores them exactly."""
    out: dict[str, str] = {}
    json_keys: list[str] = []
    for key, value in meta.items():
        if not isinstance(key, str) or key == _JSON_KEYS:
            raise ValueError(f"metadata key {key!r} is not allowed (keys must be str, not {_JSON_KEYS!r})")
        if isinstance(value, str):
            out[key] = value
        else:
            try:
                out[key] = json.dumps(value, sort_keys=True, default=_jsonable)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata value of {key!r} is not JSON serialisable: {exc}") from exc
            json_keys.append(key)
    if json_keys:
        out[_JSON_KEYS] = ",".join(json_keys)
    return out


def decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Inverse of :func:`encode_metadata` (tolerates metadata written by other tools)."""
    json_keys = set(filter(None, raw.get(_JSON_KEYS, "").split(",")))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == _JSON_KEYS:
            continue
        if key in json_keys:
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    return out
