"""Logs written in the old format (rigfm-log-v1: ``host_time_ns`` ints, nested ``predicted``, dict ``data``,
nullable schemas; states stamped with the monotonic clock) still check, read and build into datasets; the
check names the schemas Foxglove cannot load."""

from __future__ import annotations

import json
import math

from mcap.writer import CompressionType, Writer

from fm_core.trajfile import load_trajectories
from hardware.dataset_build import build_dataset
from hardware.log_check import check_file
from hardware.log_reader import read_topics
from hardware.log_schema import encode_metadata

NUM = {"type": ["number", "null"]}
V1_SCHEMAS = {
    "/state": {"type": "object", "properties": {"seq": {"type": "integer"}, "current": NUM,
                                                "positions": {"type": "array", "items": NUM}}},
    "/command": {"type": "object", "properties": {"seq": {"type": "integer"}, "voltage": NUM}},
    "/prediction": {"type": "object", "properties": {
        "predicted": {"type": "array", "items": {"type": "array", "items": NUM}}}},
    "/event": {"type": "object", "properties": {"name": {"type": "string"}, "data": {"type": "object"}}},
}
WALL0 = 1_700_000_000_000_000_000
MONO0 = 12_345_000_000_000


def write_v1(path, seconds: float = 4.0) -> None:
    with open(path, "wb") as f:
        w = Writer(f, compression=CompressionType.ZSTD)
        w.start(profile="", library="rigfm-logger")
        w.add_metadata("rigfm.run", encode_metadata({
            "rig": "cartpole", "log_format": "rigfm-log-v1", "run_id": "old", "part": 0,
            "rig_config": {"name": "cartpole", "model_dt": 0.01}}))
        ch = {}
        for topic, schema in V1_SCHEMAS.items():
            sid = w.register_schema(f"rigfm.{topic[1:].title()}", "jsonschema", json.dumps(schema).encode())
            ch[topic] = w.register_channel(topic, "json", sid)
        for k in range(int(seconds * 500)):
            t = k / 500
            wall = WALL0 + k * 2_000_000
            state = {"seq": k, "device_time_us": k * 2000, "host_time_ns": MONO0 + k * 2_000_000,
                     "positions": [t, math.sin(t)], "velocities": [1.0, math.cos(t)], "counts": [k, k],
                     "flags": 0, "current": None}
            w.add_message(ch["/state"], wall + 100_000, json.dumps(state).encode(), wall + 100_000, k)
            cmd = {"seq": k, "host_time_ns": wall + 300_000, "voltage": math.cos(t), "requested": None}
            w.add_message(ch["/command"], wall + 300_000, json.dumps(cmd).encode(), wall + 300_000, k)
            if k % 50 == 0:
                pred = {"host_time_ns": wall + 400_000, "ref_seq": k,
                        "ref_host_time_ns": MONO0 + k * 2_000_000, "dt": 0.01, "horizon": 2,
                        "predicted": [[t, 0.0, 1.0, 0.0], [t + 0.01, 0.0, 1.0, 0.0]]}
                w.add_message(ch["/prediction"], wall + 400_000, json.dumps(pred).encode(), wall + 400_000, k)
        ev = {"host_time_ns": WALL0, "name": "run_start", "data": {"rate_hz": 500}}
        w.add_message(ch["/event"], WALL0, json.dumps(ev).encode(), WALL0, 0)
        w.finish()


def test_v1_logs_check_read_and_build(tmp_path):
    path = tmp_path / "old_0000.mcap"
    write_v1(path)
    rep = check_file(path)
    assert rep.ok and rep.counts["/state"] == 2000 and rep.bad_messages == 0
    assert not rep.state_loss.known  # no rx_index / link_lost: the report says it cannot tell
    assert "cannot be told apart" in rep.format()
    problems = " | ".join(rep.foxglove_problems)
    assert "rigfm.State" in problems and "nullable union" in problems
    assert "nested array" in problems and "without properties" in problems
    _, msgs = read_topics(path, {"/state", "/prediction", "/event"})
    assert msgs["/state"][0][1]["host_time_ns"] == MONO0
    pred = msgs["/prediction"][0][1]
    assert pred["predicted"] == [[0.0, 0.0, 1.0, 0.0], [0.01, 0.0, 1.0, 0.0]]
    assert msgs["/event"][0][1]["data"] == {"rate_hz": 500}
    out = tmp_path / "old.npz"
    report = build_dataset([path], out, window=50, stride=50)
    assert "MCAP log time" in report["runs"]["old"]["clock"]  # the monotonic state stamps are detected
    ts = load_trajectories(out)
    assert ts.has_provenance and set(ts.run_id.tolist()) == {"old"}
    t0 = ts.timestamps()[:, 0] - ts.x[:, 0, 0]  # p == time since the first state
    assert abs(t0 - (WALL0 + 100_000) / 1e9).max() < 1e-3  # wall time, from the log times
