"""Crash safety: a process logging at ~2 kHz is SIGKILLed; check/recover keep all but <= chunk_ms of data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from mcap.reader import make_reader

from hardware.log_check import check_file, recover_file, recovered_path_for

CHILD = r"""
import sys, time
from hardware.logger import RunLogger

directory, side_path = sys.argv[1], sys.argv[2]
log = RunLogger(directory, {"rig": "cartpole"}, run_name="crash", chunk_ms=100)
side = open(side_path, "w", buffering=1)  # line buffered: each report is one write() syscall
print("READY", flush=True)
seq, last_ok, last_report = 0, -1, 0
period = 0.0005
t_next = time.perf_counter()
while True:
    now = time.time_ns()
    rec = {"seq": seq, "device_time_us": seq * 500, "host_time_ns": now, "positions": [0.1, 3.0],
           "velocities": [0.0, 0.1], "counts": [seq, 2 * seq], "flags": 0}
    if log.write("/state", rec):
        last_ok = seq
    if seq % 2 == 0:
        log.write("/command", {"seq": seq // 2, "host_time_ns": now, "voltage": 0.5})
    seq += 1
    if now - last_report >= 10_000_000:
        side.write(f"{now} {last_ok}\n")
        last_report = now
    t_next += period
    delay = t_next - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
"""


def _side_channel(path: Path) -> list[tuple[int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # the last line may be cut by the kill
            rows.append((int(parts[0]), int(parts[1])))
    return rows


def test_sigkill_loses_at_most_the_open_chunk(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    side = tmp_path / "side.txt"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "logs"), str(side)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        time.sleep(1.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    rows = _side_channel(side)
    assert len(rows) > 20
    t_last, seq_last = rows[-1]
    # everything the child had written 100 ms before its last report must be in the file
    required = max(seq for t, seq in rows if t <= t_last - 100_000_000)

    log_file = tmp_path / "logs" / "crash_0000.mcap"
    report = check_file(log_file)
    assert not report.scan.complete and not report.ok
    assert "no footer" in report.format() or "truncated" in report.format()
    assert report.bad_messages == 0
    st = report.seq["/state"]
    assert st.first == 0 and st.n_gaps == 0 and st.resets == 0
    assert report.seq["/command"].n_gaps == 0
    lost_ms = (seq_last - st.last) * 0.5
    print(f"last reported seq {seq_last}, last readable {st.last}: ~{lost_ms:.0f} ms lost at 2 kHz")
    assert st.last >= required, f"lost state seq {st.last + 1}..{seq_last} (needed up to {required})"

    out, n = recover_file(log_file)
    assert out == recovered_path_for(log_file) == tmp_path / "logs" / "crash_0000.recovered.mcap"
    rec_report = check_file(out)
    assert rec_report.ok, rec_report.format()
    assert rec_report.counts == report.counts and n == sum(report.counts.values())
    with open(out, "rb") as f:  # the official reader opens the recovered file and its summary
        reader = make_reader(f)
        assert reader.get_summary().statistics.message_count == n
        msgs = reader.iter_messages(topics=["/state"], log_time_order=False)
        seqs = [json.loads(m.data)["seq"] for _, _, m in msgs]
        assert {m.name for m in reader.iter_metadata()} >= {"rigfm.run", "rigfm.recovery"}
    assert seqs == list(range(st.last + 1))
