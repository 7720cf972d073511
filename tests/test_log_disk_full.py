"""A full disk is no silent data loss: lost messages are counted and named, no empty parts appear, the part
already written stays a valid MCAP file, and ``rigfm run`` exits non-zero naming the problem (a real small
tmpfs when the test runs as root; a fault-injecting part file otherwise and in addition)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hardware.log_check import check_file, recover_file
from hardware.logger import PartFile, RunLogger

ROOT = Path(__file__).resolve().parents[1]


def state(i: int) -> dict:
    return {"seq": i % 65536, "device_time_us": 2000 * i, "host_time_ns": 18 * 10**17 + i * 2_000_000,
            "positions": [0.01 * i, 3.0], "velocities": [0.1, -0.2], "counts": [i, -i], "flags": 0}


class FullDisk:
    """Part files sharing a byte budget, as one small disk: past it every write raises ENOSPC."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def __call__(self, path: Path) -> PartFile:
        disk = self

        class _File(PartFile):
            def write(self, data: bytes) -> int:
                if len(data) > disk.left:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.left -= len(data)
                return super().write(data)

            def truncate(self, size: int) -> None:
                disk.left += self.offset - size
                super().truncate(size)

        return _File(path)


def test_write_errors_are_counted_named_and_leave_a_valid_file(tmp_path):
    log = RunLogger(tmp_path, {"rig": "cartpole"}, run_name="full", chunk_ms=20,
                    file_factory=FullDisk(40_000))
    i = 0
    t_end = time.monotonic() + 3.0  # past the 1 s retry: reopening must not leave empty parts behind
    while time.monotonic() < t_end:
        log.write("/state", state(i))
        i += 1
        if i % 20 == 0:
            time.sleep(0.004)
    st = log.close()
    assert st["error"] and "No space left on device" in st["error"] and "full_0000.mcap" in st["error"]
    assert st["write_errors"] > 0 and st["dropped"] == st["dropped_queue"] + st["write_errors"]
    assert st["written"] + st["dropped"] == i  # every message is either in the file or counted as lost
    files = sorted(tmp_path.glob("*.mcap"))
    assert [str(f) for f in files] == st["files"] and files[0].name == "full_0000.mcap"
    reports = [check_file(f) for f in files]
    for rep in reports:  # no empty part; each one cut back to its last chunk and closed with a footer
        assert rep.ok and rep.scan.messages > 0, rep.format()
    assert sum(r.counts["/state"] for r in reports) == st["written"]
    # the end metadata names the error when it fitted beside the footer (here the disk keeps no slack)
    for rep in reports:
        if rep.run_end:
            assert "No space left on device" in rep.run_end["error"] and "LOGGING FAILED" in rep.format()


def test_a_part_that_cannot_even_hold_its_footer_stays_readable_to_its_last_chunk(tmp_path):
    disk = FullDisk(30_000)
    log = RunLogger(tmp_path, {"rig": "cartpole"}, run_name="tight", chunk_ms=20, file_factory=disk)
    for i in range(3000):
        log.write("/state", state(i))
        if disk.left < 10_000:  # almost full: the failing chunk then leaves no room for the footer
            disk.left = 0
        time.sleep(0.0005)
    st = log.close()
    assert st["error"]
    rep = check_file(tmp_path / "tight_0000.mcap")
    assert rep.scan.lost_bytes == 0  # truncated exactly at a chunk boundary: nothing half-written
    assert rep.counts["/state"] == st["written"] > 0
    assert not rep.scan.complete  # no byte left for a footer ...
    out, n = recover_file(rep.path)  # ... and `rigfm logs check --recover` restores every message
    assert n == rep.scan.messages and check_file(out).ok


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """Mount a real tmpfs of ``size`` at ``path`` (root only), or skip."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the fault-injecting tests above cover the logic)")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _run(log_dir: Path, summary: Path, *extra: str, duration: str = "8") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "controllers.cli", "run", "cartpole", "--virtual",
                           "--controller", "swingup", "--duration", duration, "--log", str(log_dir),
                           "--quiet", "--stale-ms", "2000", "--summary-json", str(summary), *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_rigfm_run_on_a_full_tmpfs_exits_non_zero_and_names_the_problem(tmp_path, policy):
    with small_tmpfs(tmp_path / "disk", "128k") as disk:
        proc = _run(disk, tmp_path / "summary.json", "--on-log-error", policy)
        out = json.loads((tmp_path / "summary.json").read_text())
        files = sorted(disk.glob("*.mcap"))
        reports = [check_file(f) for f in files]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "LOGGING FAILED" in proc.stderr and "No space left on device" in proc.stderr
    assert "LOGGING FAILED" in proc.stdout  # the summary table has the row too
    lg = out["logger"]
    assert lg["write_errors"] > 0 and "No space left on device" in out["log_error"]
    assert files and all(r.scan.messages > 0 for r in reports)  # no empty parts
    assert all(r.scan.lost_bytes == 0 for r in reports)  # complete, or cut exactly at a chunk boundary
    if policy == "stop":  # default: a run that cannot record stops (fault, motor 0 V), well before the end
        assert out["fault"].startswith("log_write: logging failed")
        assert out["stats"]["ticks"] < 0.9 * 8 * 500
    else:  # degrade: the run goes on to its end without a complete log
        assert out["fault"] is None
        assert sum(r.scan.messages for r in reports) < lg["written"] + lg["dropped"]
