"""RunLogger: round trip through the official mcap reader, non-blocking drops, rotation, bad input."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from mcap.reader import make_reader
from mcap_protobuf.decoder import DecoderFactory

from hardware.log_check import check_file
from hardware.log_reader import LogFileError, scan_file
from hardware.log_schema import LOG_TOPIC, METADATA_NAME, TOPICS, decode_metadata, from_file, json_schema
from hardware.logger import RunLogger

META = {
    "rig": "cartpole",
    "rig_config": {"name": "cartpole", "model_dt": 0.01, "watchdog_ms": 50},
    "firmware_version": "1.2.3",
    "protocol_version": 1,
    "model_sha256": "ab" * 32,
    "controller": "lqr",
    "controller_params": {"K": [1.0, 2.0, 3.0, 4.0]},
}


def state(i: int) -> dict:
    return {
        "seq": i,
        "device_time_us": 1000 * i,
        "host_time_ns": 1_700_000_000_000_000_000 + 1_000_000 * i,
        "positions": [0.001 * i, 3.14159 - 0.0001 * i],
        "velocities": [0.5, -0.25],
        "counts": [i, -i],
        "flags": i % 3,
        "current": 0.125,
    }


def records(i: int) -> dict[str, dict]:
    t = 1_700_000_000_000_000_000 + 1_000_000 * i
    return {
        "/state": state(i),
        "/command": {"seq": i, "host_time_ns": t, "voltage": 0.5 * (i % 7) - 1.0, "requested": 2.0},
        "/prediction": {
            "host_time_ns": t,
            "ref_seq": i,
            "ref_host_time_ns": t - 10,
            "dt": 0.01,
            "horizon": 2,
            "predicted": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]],
        },
        "/mode": {"host_time_ns": t, "mode": "balance", "previous": "swingup", "reason": f"r{i}"},
        "/fault": {"host_time_ns": t, "code": "limit", "message": "cart at soft limit", "flags": 4},
        "/truth": {"host_time_ns": t, "device_time_us": 2000 * i, "state": [0.01, 0.02 * i, -0.5, 1.5],
                   "voltage": 0.25, "estimate": [0.01, 0.02 * i, -0.49, 1.4],
                   "error": [0.0, 0.0, 0.01, -0.1]},
        "/event": {"host_time_ns": t, "name": "param_change", "data": {"k": i, "s": "x"}},
    }


def read_all(path: Path, validate: bool = True) -> tuple[dict[str, list[dict]], dict, list]:
    """Every message through the official mcap reader: JSON ones checked against their own schema with
    ``jsonschema`` and returned as API records; /log decoded by mcap-protobuf-support (foxglove.Log)."""
    out: dict[str, list[dict]] = {t: [] for t in (*TOPICS, LOG_TOPIC)}
    proto = DecoderFactory()
    validators: dict[int, jsonschema.Draft202012Validator] = {}
    with open(path, "rb") as f:
        reader = make_reader(f)
        meta = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
        for schema, channel, message in reader.iter_messages(log_time_order=False):
            if channel.topic == LOG_TOPIC:
                assert (schema.name, schema.encoding, channel.message_encoding) == (
                    "foxglove.Log", "protobuf", "protobuf")
                out[LOG_TOPIC].append(proto.decoder_for("protobuf", schema)(message.data))
                continue
            assert schema.encoding == "jsonschema" and channel.message_encoding == "json"
            if schema.id not in validators:
                file_schema = json.loads(schema.data)
                assert file_schema == json_schema(channel.topic)
                jsonschema.Draft202012Validator.check_schema(file_schema)
                validators[schema.id] = jsonschema.Draft202012Validator(file_schema)
            rec = json.loads(message.data)
            if validate:
                validators[schema.id].validate(rec)
            out[channel.topic].append(from_file(channel.topic, rec))
        summary = reader.get_summary()
    return out, meta, summary


def test_round_trip_all_topics_and_metadata(tmp_path):
    n = 300
    with RunLogger(tmp_path, META, run_name="rt", compression="lz4") as log:
        for i in range(n):
            for topic, rec in records(i).items():
                assert log.write(topic, rec)
    st = log.stats()
    assert st["written"] == n * len(TOPICS) and st["dropped"] == 0
    assert st["write_errors"] == 0 and st["encode_errors"] == 0
    assert st["files"] == [str(tmp_path / "rt_0000.mcap")]
    got, meta, summary = read_all(tmp_path / "rt_0000.mcap")
    for topic in TOPICS:
        assert got[topic] == [records(i)[topic] for i in range(n)], topic
    run = decode_metadata(meta[METADATA_NAME])
    for key, value in META.items():
        assert run[key] == value, key
    assert run["run_id"] == "rt" and run["part"] == 0 and run["git_revision"]
    # /log: one foxglove.Log line per /mode, /fault and /event record, at the record's host time
    assert len(got[LOG_TOPIC]) == 3 * n
    assert {m.name for m in got[LOG_TOPIC]} == {"/mode", "/fault", "/event"}
    fault = next(m for m in got[LOG_TOPIC] if m.name == "/fault")
    assert fault.message == "fault limit: cart at soft limit" and fault.level == 4  # ERROR
    t0 = records(0)["/fault"]["host_time_ns"]
    assert (fault.timestamp.seconds, fault.timestamp.nanos) == divmod(t0, 10**9)
    assert summary.statistics.message_count == n * len(TOPICS) + 3 * n
    assert all(c.compression == "lz4" for c in summary.chunk_indexes)
    assert check_file(tmp_path / "rt_0000.mcap").ok


def test_numpy_and_nonfinite_values_are_encoded_as_valid_json(tmp_path):
    np = pytest.importorskip("numpy")
    rec = state(0)
    rec["positions"] = np.array([0.5, np.nan])
    rec["velocities"] = [np.float32(1.5), float("inf")]
    with RunLogger(tmp_path, META, run_name="np") as log:
        assert log.write("/state", rec)
    got, _, _ = read_all(tmp_path / "np_0000.mcap", validate=False)  # null inside arrays (documented)
    assert got["/state"][0]["positions"] == [0.5, None]
    assert got["/state"][0]["velocities"] == [1.5, None]


def test_write_rejects_unknown_topic_and_missing_fields(tmp_path):
    with RunLogger(tmp_path, META, run_name="bad") as log:
        with pytest.raises(ValueError, match="/nope"):
            log.write("/nope", {"host_time_ns": 1})
        rec = state(0)
        del rec["velocities"], rec["flags"]
        with pytest.raises(ValueError, match="flags, velocities"):
            log.write("/state", rec)
        with pytest.raises(TypeError, match="/command record must be a dict"):
            log.write("/command", [1, 2, 3])
    with pytest.raises(ValueError, match="metadata key 7"):
        RunLogger(tmp_path, {"rig": "x", 7: "seven"}, run_name="bad2")


def _stall_writer(log: RunLogger) -> tuple[threading.Event, threading.Event]:
    """Make the writer thread block on its next record, like a stuck disk: (release, entered) events."""
    release, entered = threading.Event(), threading.Event()
    original = log._add

    def stalled_add(*args):
        entered.set()
        release.wait()
        original(*args)

    log._add = stalled_add
    return release, entered


def test_stalled_writer_drops_without_blocking(tmp_path):
    log = RunLogger(tmp_path, META, run_name="stall", queue_size=100)
    release, entered = _stall_writer(log)
    results: list[bool] = []

    def producer() -> None:
        for i in range(1, 2001):
            results.append(log.write("/state", state(i)))

    assert log.write("/state", state(0))
    assert entered.wait(30)  # the writer holds record 0 and is stuck; the queue is empty
    t = threading.Thread(target=producer)
    t.start()
    t.join(30)
    try:
        assert not t.is_alive(), "write() blocked while the writer was stalled"
        st = log.stats()
        assert results == [True] * 100 + [False] * 1900  # exactly the queue capacity is accepted
        assert st["dropped"] == 1900 == st["dropped_by_topic"]["/state"] and st["queued"] == 100
    finally:
        release.set()
        st = log.close()
    assert st["written"] == 101 and st["dropped"] == 1900
    seqs = [r["seq"] for r in read_all(tmp_path / "stall_0000.mcap")[0]["/state"]]
    assert seqs == list(range(101))
    assert log.write("/state", state(0)) is False  # closed: counted as a drop, never raises
    assert log.stats()["dropped"] == 1901


def test_chunk_age_counts_from_write_so_a_late_writer_flushes_at_once(tmp_path):
    """Records queued while the writer was stalled are flushed as soon as it catches up, not a full chunk
    period later: the SIGKILL loss bound (chunk_ms) holds from the caller's write(), not from the encode."""
    log = RunLogger(tmp_path, META, run_name="late", chunk_ms=4000)  # flush once a record is 2 s old
    release, entered = _stall_writer(log)
    try:
        assert log.write("/state", state(0))
        assert entered.wait(30)
        for i in range(1, 50):
            assert log.write("/state", state(i))
        time.sleep(2.2)  # record 0 is now older than chunk_ms / 2
        release.set()
        deadline = time.monotonic() + 1.0  # well inside the 2 s a timer started at encode time would need
        while log.stats()["written"] < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.stats()["written"] == 50, log.stats()
    finally:
        release.set()
        log.close()


def _seqs_across(files: list[Path]) -> list[int]:
    seqs: list[int] = []
    for f in files:
        rep = check_file(f)
        assert rep.ok, rep.format()
        got, meta, _ = read_all(f)
        assert METADATA_NAME in meta  # every part carries the run metadata
        seqs += [r["seq"] for r in got["/state"]]
    return seqs


def test_rotation_by_size(tmp_path):
    with RunLogger(tmp_path, META, run_name="rs", rotate_bytes=30_000, chunk_ms=20) as log:
        for i in range(3000):
            log.write("/state", state(i))
            if i % 100 == 99:
                time.sleep(0.03)  # let chunks close so the size check runs between them
    files = log.files
    assert len(files) >= 3
    assert [f.name for f in files] == [f"rs_{k:04d}.mcap" for k in range(len(files))]
    assert _seqs_across(files) == list(range(3000))
    parts = [scan_file(f).run_metadata()["part"] for f in files]
    assert parts == list(range(len(files)))


def test_rotation_by_time(tmp_path):
    with RunLogger(tmp_path, META, run_name="rtime", rotate_s=0.15, chunk_ms=20) as log:
        for i in range(100):
            log.write("/state", state(i))
            time.sleep(0.006)
    files = log.files
    assert len(files) >= 2
    assert _seqs_across(files) == list(range(100))


def test_write_errors_are_counted_when_the_directory_disappears(tmp_path):
    d = tmp_path / "gone"
    log = RunLogger(d, META, run_name="err", rotate_s=0.05, chunk_ms=10)
    log.write("/state", state(0))
    time.sleep(0.1)
    while d.exists():  # the next rotation cannot open a new part (retry: a rotation may race rmtree)
        shutil.rmtree(d, ignore_errors=True)
    deadline = time.monotonic() + 10
    i = 1
    while log.stats()["write_errors"] == 0 and time.monotonic() < deadline:
        log.write("/state", state(i))
        i += 1
        time.sleep(0.005)
    st = log.close()
    assert st["write_errors"] > 0
    assert "cannot open a new log part" in st["last_error"] and "gone" in st["last_error"]


def test_bad_files_give_clear_errors(tmp_path):
    junk = tmp_path / "notes.mcap"
    junk.write_text("hello, not mcap")
    with pytest.raises(LogFileError, match="notes.mcap.*not an MCAP file"):
        scan_file(junk)
    with pytest.raises(LogFileError, match="missing.mcap"):
        scan_file(tmp_path / "missing.mcap")
    with pytest.raises(OSError):
        RunLogger(junk / "sub", META)  # a file where the directory should be


def test_check_reports_sequence_gaps_and_part_continuity(tmp_path):
    from hardware.log_check import check_run_continuity

    seqs = [s for s in range(200) if not (50 <= s < 53 or s == 120)]
    with RunLogger(tmp_path, META, run_name="gaps", rotate_bytes=4000, chunk_ms=10) as log:
        for i, s in enumerate(seqs):
            log.write("/state", state(s))
            log.write("/command", {"seq": i, "host_time_ns": 1, "voltage": 0.0})
            if i % 20 == 19:
                time.sleep(0.02)
    reports = [check_file(f) for f in log.files]
    assert len(reports) >= 2 and all(r.ok for r in reports)
    gaps = [g for r in reports for g in r.seq["/state"].gaps]
    missing = sum(r.seq["/state"].missing for r in reports)
    assert all(r.seq["/command"].n_gaps == 0 for r in reports)
    lines = check_run_continuity(reports)
    assert len(lines) == 1 and lines[0].startswith("run gaps: parts 0..")
    # a gap that falls on a part boundary is reported by the continuity line instead of a per-file gap
    boundary = [ln for ln in lines[0].split("; ") if ln.startswith("/state")]
    assert len(gaps) + len(boundary) == 2 and missing + sum(
        int(b.split()[1].split("->")[1]) - int(b.split()[1].split("->")[0]) - 1 for b in boundary
    ) == 4
    assert set(gaps) <= {(49, 53), (119, 121)}
    assert ("DISCONTINUOUS" in lines[0]) == bool(boundary)
    text = reports[0].format()
    assert "/state" in text and "gap(s)" in text


def test_seq_stats_unwrap_the_u16_device_counter():
    from hardware.log_check import SeqStats

    st = SeqStats()
    for s in [65533, 65534, 65535, 0, 1, 3, 4, 2]:
        st.add(s)
    assert (st.first, st.last) == (65533, 2)
    assert st.n_gaps == 1 and st.missing == 1 and st.gaps == [(1, 3)]
    assert st.resets == 1  # 4 -> 2 went backwards


def _cli(argv: list[str]) -> int:
    import argparse

    from hardware.log_commands import register

    parser = argparse.ArgumentParser(prog="rigfm")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _chunked_file(tmp_path: Path, name: str, n: int = 600) -> Path:
    with RunLogger(tmp_path, META, run_name=name, chunk_ms=10) as log:
        for i in range(n):
            log.write("/state", state(i))
            if i % 100 == 99:  # several chunks: wait until this batch is in a closed chunk
                deadline = time.monotonic() + 30
                while log.stats()["written"] < i + 1 and time.monotonic() < deadline:
                    time.sleep(0.005)
    return log.files[0]


def test_logs_check_cli_truncated_and_corrupt_files(tmp_path, capsys):
    from hardware.log_check import recovered_path_for

    trunc = _chunked_file(tmp_path, "trunc")
    data = trunc.read_bytes()
    trunc.write_bytes(data[: int(len(data) * 0.6)])  # the writer "died" mid-file
    assert _cli(["logs", "check", str(trunc)]) == 1
    assert "TRUNCATED" in capsys.readouterr().out
    assert _cli(["logs", "check", "--recover", str(trunc)]) == 0
    assert "recovered" in capsys.readouterr().out
    rec = check_file(recovered_path_for(trunc))
    assert rec.ok and rec.seq["/state"].first == 0 and rec.seq["/state"].n_gaps == 0
    assert 0 < rec.counts["/state"] < 600

    corrupt = _chunked_file(tmp_path, "corrupt")
    scan = scan_file(corrupt)
    assert scan.ok and scan.chunks >= 3
    _, _, summary = read_all(corrupt)
    chunk = summary.chunk_indexes[1]
    data = bytearray(corrupt.read_bytes())
    data[chunk.chunk_start_offset + chunk.chunk_length - 20] ^= 0xFF  # inside the second chunk's data
    corrupt.write_bytes(bytes(data))
    rep = check_file(corrupt)
    assert not rep.ok and rep.scan.complete and rep.scan.bad_chunks == 1
    assert "CORRUPT" in rep.format() and "unreadable" in rep.format()
    assert _cli(["logs", "check", "--recover", "--json", str(corrupt)]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["ok"] is False and out["recovered"].endswith("corrupt_0000.recovered.mcap")
    rec = check_file(out["recovered"])
    assert rec.ok and 0 < rec.counts["/state"] <= 600


def test_metadata_accepts_dataclasses_and_numpy(tmp_path):
    import dataclasses

    np = pytest.importorskip("numpy")

    @dataclasses.dataclass
    class Cfg:
        name: str = "cartpole"
        model_dt: float = 0.01
        gains: tuple = (1.0, 2.0)

    with RunLogger(tmp_path, {"rig": "cartpole", "rig_config": Cfg(), "K": np.array([1.5, 2.5])},
                   run_name="dc") as log:
        log.write("/event", {"host_time_ns": 1, "name": "x"})
    run = scan_file(log.files[0]).run_metadata()
    assert run["rig_config"] == {"name": "cartpole", "model_dt": 0.01, "gains": [1.0, 2.0]}
    assert run["K"] == [1.5, 2.5]
