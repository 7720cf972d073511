"""Fixed topics and JSON schemas of rigfm run logs (MCAP, message encoding "json").

Field names are a contract (docs/logging.md): readers (``rigfm logs check``, ``rigfm dataset build``,
Foxglove layouts) depend on them. Add optional fields freely; never rename or drop required ones."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SCHEMA_ENCODING = "jsonschema"
MESSAGE_ENCODING = "json"
LOG_FORMAT = "rigfm-log-v1"
METADATA_NAME = "rigfm.run"
END_METADATA_NAME = "rigfm.run_end"
RECOVERY_METADATA_NAME = "rigfm.recovery"

_INT = {"type": "integer"}
_NUM = {"type": ["number", "null"]}
_STR = {"type": "string"}
_NUM_LIST = {"type": "array", "items": _NUM}
_INT_LIST = {"type": "array", "items": _INT}

_PROPERTIES: dict[str, dict[str, dict[str, Any]]] = {
    "/state": {
        "seq": {**_INT, "description": "device sample sequence number"},
        "device_time_us": {**_INT, "description": "firmware clock at sampling (us)"},
        "host_time_ns": {**_INT, "description": "host clock when the sample was received (ns)"},
        "positions": {**_NUM_LIST, "description": "SI: cart-pole [p, theta], Furuta [theta, alpha]"},
        "velocities": {**_NUM_LIST, "description": "SI velocities as estimated by the control loop"},
        "counts": {**_INT_LIST, "description": "raw encoder counts"},
        "flags": {**_INT, "description": "device status flags (protocol bit field)"},
        "current": {**_NUM, "description": "motor current (A), optional"},
        "applied_voltage": {**_NUM, "description": "voltage the firmware actually applied (V), optional"},
    },
    "/command": {
        "seq": {**_INT, "description": "host command sequence number"},
        "host_time_ns": {**_INT, "description": "host clock when the command was sent (ns)"},
        "voltage": {**_NUM, "description": "commanded motor voltage (V) after safety clipping"},
        "requested": {**_NUM, "description": "voltage requested by the controller before clipping, optional"},
        "state_seq": {**_INT, "description": "seq of the state the command was computed from, optional"},
    },
    "/prediction": {
        "host_time_ns": {**_INT, "description": "host clock when the prediction was received (ns)"},
        "ref_seq": {**_INT, "description": "seq of the last observed state the prediction starts from"},
        "ref_host_time_ns": {**_INT, "description": "host_time_ns of that state; predicted[0] is at +dt"},
        "dt": {**_NUM, "description": "model time step (s)"},
        "horizon": {**_INT, "description": "number of predicted steps"},
        "predicted": {
            "type": "array",
            "items": _NUM_LIST,
            "description": "horizon x n predicted states",
        },
        "latency_us": {**_NUM, "description": "predictor round trip (us), optional"},
    },
    "/mode": {
        "host_time_ns": _INT,
        "mode": {**_STR, "description": "new mode, e.g. idle, swingup, balance, estop, fault"},
        "previous": {**_STR, "description": "previous mode"},
        "reason": {**_STR, "description": "why the mode changed"},
    },
    "/fault": {
        "host_time_ns": _INT,
        "code": {**_STR, "description": "short fault code, e.g. watchdog, limit, crc, predictor_timeout"},
        "message": {**_STR, "description": "human readable description"},
        "flags": {**_INT, "description": "device status flags at the fault, optional"},
    },
    "/event": {
        "host_time_ns": _INT,
        "name": {**_STR, "description": "event name, e.g. run_start, param_change"},
        "data": {"type": "object", "description": "free-form payload, optional"},
    },
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "/state": ("seq", "device_time_us", "host_time_ns", "positions", "velocities", "counts", "flags"),
    "/command": ("seq", "host_time_ns", "voltage"),
    "/prediction": ("host_time_ns", "ref_seq", "ref_host_time_ns", "dt", "horizon", "predicted"),
    "/mode": ("host_time_ns", "mode"),
    "/fault": ("host_time_ns", "code"),
    "/event": ("host_time_ns", "name"),
}

TOPICS: tuple[str, ...] = tuple(_PROPERTIES)

SCHEMA_NAMES: dict[str, str] = {
    "/state": "rigfm.State",
    "/command": "rigfm.Command",
    "/prediction": "rigfm.Prediction",
    "/mode": "rigfm.Mode",
    "/fault": "rigfm.Fault",
    "/event": "rigfm.Event",
}


def json_schema(topic: str) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of one topic's messages."""
    if topic not in _PROPERTIES:
        raise KeyError(f"unknown log topic {topic!r}; topics are {', '.join(TOPICS)}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": SCHEMA_NAMES[topic],
        "type": "object",
        "properties": _PROPERTIES[topic],
        "required": list(REQUIRED[topic]),
    }


def schema_bytes(topic: str) -> bytes:
    """The encoded schema stored in the MCAP schema record."""
    return json.dumps(json_schema(topic), sort_keys=True).encode()


def missing_fields(topic: str, record: dict[str, Any]) -> list[str]:
    """Required fields of ``topic`` absent from ``record`` (empty when complete)."""
    return [k for k in REQUIRED[topic] if k not in record]


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
