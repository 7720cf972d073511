"""``rigfm run --foxglove``: a real WebSocket client (the ``websockets`` package) speaking the Foxglove
WebSocket protocol connects to a real run, sees the log's channels advertised with the log's own schemas
and receives /state messages. foxglove-sdk names the protocol ``foxglove.sdk.v1`` (the same protocol as
``foxglove.websocket.v1`` under a new name; it refuses the old name): the client offers both, as current
Foxglove and Lichtblick clients do."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hardware.live_view import LiveViewError, is_loopback, parse_address
from hardware.log_schema import LOG_TOPIC, TOPICS, from_file, schema_bytes

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import connect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUBPROTOCOLS = ["foxglove.sdk.v1", "foxglove.websocket.v1"]


def test_parse_address_defaults_to_loopback_and_names_bad_input():
    assert parse_address("8765") == ("127.0.0.1", 8765)
    assert parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    bad_cases = (("x", "not a number"), ("70000", "out of range"), ("[::1", "IPv6"), (":80", "empty host"))
    for bad, why in bad_cases:
        with pytest.raises(LiveViewError, match=why):
            parse_address(bad)


def test_bad_foxglove_address_is_a_one_line_error():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "controllers.cli", "run", "cartpole", "--virtual",
                           "--duration", "1", "--foxglove", "127.0.0.1:99999", "--quiet"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rigfm run: --foxglove '127.0.0.1:99999': port 99999 is out of range 0-65535"]


async def _watch(url: str, want_states: int = 5) -> tuple[str, dict[str, dict], list[tuple[int, dict]]]:
    async with connect(url, subprotocols=SUBPROTOCOLS, open_timeout=10) as ws:
        channels: dict[str, dict] = {}
        info = None
        deadline = time.monotonic() + 20
        while not ({"/state", LOG_TOPIC} <= channels.keys()) and time.monotonic() < deadline:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["op"] == "serverInfo":
                info = msg
            elif msg["op"] == "advertise":
                channels.update({c["topic"]: c for c in msg["channels"]})
        assert info is not None and "/state" in channels, channels
        await ws.send(json.dumps({"op": "subscribe",
                                  "subscriptions": [{"id": 7, "channelId": channels["/state"]["id"]}]}))
        states = []
        while len(states) < want_states and time.monotonic() < deadline:
            frame = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(frame, bytes) and frame[0] == 0x01:  # MessageData
                sub_id, log_time = struct.unpack_from("<IQ", frame, 1)
                assert sub_id == 7
                states.append((log_time, json.loads(frame[13:])))
        return ws.subprotocol, channels, states


def test_rigfm_run_foxglove_serves_the_log_channels_live(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "controllers.cli", "run", "cartpole", "--virtual",
                             "--controller", "lqr", "--init", "upright", "--duration", "8", "--quiet",
                             "--stale-ms", "1000", "--foxglove", "127.0.0.1:0", "--log", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        url = None
        lines = []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Foxglove live view on (ws://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
        assert url is not None, "".join(lines)
        subprotocol, channels, states = asyncio.run(_watch(url))
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert subprotocol == "foxglove.sdk.v1"
    assert set(channels) == {*TOPICS, LOG_TOPIC}
    for topic in TOPICS:  # the same schemas as the MCAP log
        c = channels[topic]
        assert (c["encoding"], c["schemaEncoding"]) == ("json", "jsonschema")
        assert json.loads(c["schema"]) == json.loads(schema_bytes(topic))
    log_ch = channels[LOG_TOPIC]
    assert (log_ch["schemaName"], log_ch["encoding"]) == ("foxglove.Log", "protobuf")
    assert len(states) >= 5
    seqs = []
    for log_time, rec in states:
        api = from_file("/state", rec)
        assert api["host_time_ns"] == log_time and len(api["positions"]) == 2 and "rx_index" in rec
        seqs.append(api["seq"])
    assert seqs == sorted(seqs)
    assert "live view" not in out  # the status goes to stderr; the summary table to stdout
