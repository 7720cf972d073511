"""A real ``rigfm run --virtual --log`` read by independent tools: the official Python ``mcap`` reader with
``jsonschema`` (every JSON message against its own schema) and mcap-protobuf-support (``/log``), the
Foxglove JSON-schema parser's rules, ``@mcap/core`` in node; plus the clock rule, the metadata, every
received state frame logged, and the shutdown command in ``/command``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from mcap.reader import make_reader
from mcap_protobuf.decoder import DecoderFactory

from hardware.foxglove_rules import schema_problems
from hardware.log_check import check_file
from hardware.log_schema import LOG_TOPIC, METADATA_NAME, decode_metadata, from_file

ROOT = Path(__file__).resolve().parents[1]
JS_SAFE = 2**53 - 1


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "controllers.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One real virtual run (swing-up) logged by the real CLI; --stale-ms is generous for a loaded CI box."""
    d = tmp_path_factory.mktemp("real_run")
    proc = run_cli("run", "cartpole", "--virtual", "--controller", "swingup", "--duration", "3",
                   "--log", str(d / "logs"), "--quiet", "--stale-ms", "1000",
                   "--summary-json", str(d / "summary.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted((d / "logs").glob("*.mcap"))
    assert len(files) == 1, files
    return files[0], json.loads((d / "summary.json").read_text())


def read_with_official_readers(path: Path) -> tuple[dict[str, list], dict[str, dict], list]:
    """{topic: [(log_time, publish_time, file record or foxglove.Log)]}, {topic: schema}, metadata."""
    out: dict[str, list] = {}
    schemas: dict[str, dict] = {}
    validators: dict[str, jsonschema.Draft202012Validator] = {}
    proto = DecoderFactory()
    with open(path, "rb") as f:
        reader = make_reader(f)
        metadata = list(reader.iter_metadata())
        for schema, channel, msg in reader.iter_messages(log_time_order=False):
            if channel.message_encoding == "json":
                assert schema.encoding == "jsonschema"
                if channel.topic not in validators:
                    schemas[channel.topic] = json.loads(schema.data)
                    jsonschema.Draft202012Validator.check_schema(schemas[channel.topic])
                    validators[channel.topic] = jsonschema.Draft202012Validator(schemas[channel.topic])
                rec = json.loads(msg.data)
                validators[channel.topic].validate(rec)
            else:
                assert (channel.message_encoding, schema.encoding, schema.name) == (
                    "protobuf", "protobuf", "foxglove.Log")
                rec = proto.decoder_for("protobuf", schema)(msg.data)
            out.setdefault(channel.topic, []).append((msg.log_time, msg.publish_time, rec))
    return out, schemas, metadata


def _ints(value, where=""):
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _ints(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _ints(v, f"{where}[{i}]")


def test_every_channel_decodes_and_every_schema_loads_in_foxglove(real_run):
    path, _ = real_run
    msgs, schemas, _ = read_with_official_readers(path)
    assert {"/state", "/command", "/mode", "/truth", LOG_TOPIC} <= set(msgs)  # /truth: the virtual rig's
    assert len(msgs["/state"]) > 100 and len(msgs["/command"]) > 100 and len(msgs["/truth"]) > 100
    for topic, schema in schemas.items():
        assert schema_problems(schema, topic) == [], topic
    # no integer a JavaScript JSON reader would round (host times are {sec, nsec})
    for topic, items in msgs.items():
        if topic == LOG_TOPIC:
            continue
        for _, _, rec in items:
            for where, v in _ints(rec, topic):
                assert abs(v) <= JS_SAFE, where
    # /log: the mode change as a foxglove.Log line
    assert any(m.name == "/mode" and "swingup" in m.message for _, _, m in msgs[LOG_TOPIC])


def test_foxglove_rules_reject_what_the_v1_schemas_had():
    """The checker fails on the three constructs of the old schemas (so the test above can fail)."""
    v1 = {"type": "object", "properties": {
        "current": {"type": ["number", "null"]},
        "predicted": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "data": {"type": "object"},
        "ok": {"type": "array", "items": {"type": "integer"}},
    }}
    problems = schema_problems(v1, "rigfm.Old")
    assert len(problems) == 3
    assert any("current" in p and "nullable union" in p for p in problems)
    assert any("predicted" in p and "nested array" in p for p in problems)
    assert any("data" in p and "without properties" in p for p in problems)


def test_one_clock_in_every_message(real_run):
    """Every message's time is host wall time on one clock; MCAP log time = publish time = that time."""
    path, _ = real_run
    msgs, _, meta = read_with_official_readers(path)
    run = decode_metadata(next(m.metadata for m in meta if m.name == METADATA_NAME))
    assert run["log_format"] == "rigfm-log-v2" and isinstance(run["clock_offset_ns"], int)
    times = []
    for topic, items in msgs.items():
        for log_time, publish_time, rec in items:
            assert log_time == publish_time
            if topic == LOG_TOPIC:
                t = rec.timestamp.seconds * 10**9 + rec.timestamp.nanos
            else:
                t = from_file(topic, rec)["host_time_ns"]
            assert t == log_time, topic
            times.append(t)
    started = run["started_utc"]
    span = (max(times) - min(times)) / 1e9
    assert 2.0 < span < 30.0
    # wall clock: the first message is within a minute of the metadata's start time
    import datetime

    t0 = datetime.datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(min(times) / 1e9 - t0.timestamp()) < 60
    # a command is never stamped before the state it was computed from
    state_t = {from_file("/state", r)["seq"]: lt for lt, _, r in msgs["/state"]}
    for lt, _, r in msgs["/command"]:
        if r.get("source") == "controller" and r.get("state_seq") in state_t:
            assert 0 <= lt - state_t[r["state_seq"]] < 2e9


def test_metadata_is_complete(real_run):
    path, _ = real_run
    run = check_file(path).run

    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)

    assert "unknown" not in list(strings(run)), {k: v for k, v in run.items() if "unknown" in str(v)}
    assert run["rig_config"]["name"] == "cartpole" and run["rig_config"]["model_dt"] == 0.01
    assert re.fullmatch(r"\d+\.\d+\.\d+", run["firmware_version"])
    assert isinstance(run["protocol_version"], int)
    assert run["device"]["rig_kind"] == "cartpole"
    assert re.fullmatch(r"[0-9a-f]{40}", run["git_revision"])
    assert "--virtual" in run["command_line"] and "swingup" in run["command_line"]
    params = run["controller_params"]
    assert params["controller"] == "swingup" and len(params["lqr_K"][0]) == 4 and params["tuning"]
    assert run["model_sha256"].startswith("none")  # no learned model in this run, and it says so


def test_every_received_state_frame_is_logged_with_applied_voltage(real_run):
    path, summary = real_run
    rep = check_file(path)
    assert rep.ok
    loss = rep.state_loss
    assert loss.known and loss.not_logged == 0 and loss.link_lost == 0
    st = rep.seq["/state"]
    assert st.missing == loss.other_frames  # every seq gap is a non-STATE device frame, not a loss
    msgs, _, _ = read_with_official_readers(path)
    recs = [r for _, _, r in msgs["/state"]]
    rx = [r["rx_index"] for r in recs]
    assert rx == list(range(rx[0], rx[0] + len(rx)))  # contiguous: nothing received was left out
    assert all("applied_voltage" in r and "current" in r for r in recs)
    assert summary["logger"]["state_frames_received"] >= len(recs)
    assert summary["logger"]["state_feed_overflow"] == 0


def test_shutdown_zero_volts_and_estop_are_in_the_command_log(real_run):
    path, _ = real_run
    msgs, _, _ = read_with_official_readers(path)
    cmds = [r for _, _, r in msgs["/command"]]
    assert all(r["source"] in ("controller", "shutdown") for r in cmds)
    tail = cmds[-2:]
    assert [(r["source"], r["voltage"], r.get("estop", False)) for r in tail] == [
        ("shutdown", 0.0, False), ("shutdown", 0.0, True)]
    assert [r["seq"] for r in cmds] == list(range(1, len(cmds) + 1))


def _node_reader_dir() -> Path:
    """A cache dir with @mcap/core + fzstd installed (npm), or skip when node/npm are missing or offline."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node/npm not installed")
    cache = Path(os.environ.get("RIGFM_NODE_CACHE", Path.home() / ".cache" / "rigfm-node"))
    mods = cache / "node_modules"
    if not (mods / "@mcap" / "core").is_dir() or not (mods / "fzstd").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["npm", "install", "--prefix", str(cache), "--no-audit", "--no-fund",
                               "@mcap/core@2", "fzstd@0.1"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"npm install @mcap/core failed: {proc.stderr.strip()[-300:]}")
    shutil.copy(Path(__file__).with_name("mcap_node_reader.mjs"), cache / "mcap_node_reader.mjs")
    return cache


def test_node_mcap_core_reads_the_file_and_gets_exact_integers(real_run):
    path, _ = real_run
    cache = _node_reader_dir()
    proc = subprocess.run(["node", str(cache / "mcap_node_reader.mjs"), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    msgs, _, _ = read_with_official_readers(path)
    assert got["counts"] == {t: len(v) for t, v in msgs.items()}
    assert got["nUnsafe"] == 0, got["unsafe"]
    assert got["channels"]["/state"] == {"messageEncoding": "json", "schemaName": "rigfm.State",
                                         "schemaEncoding": "jsonschema"}
    assert got["channels"][LOG_TOPIC]["schemaName"] == "foxglove.Log"
    assert {"rigfm.run", "rigfm.run_end"} <= set(got["metadata"])
