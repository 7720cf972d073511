"""VirtualRigProcess lifecycle: start, PORT line, errors, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hardware.virtual_rig import VirtualRigError, VirtualRigProcess


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_start_stop_and_link(tmp_path):
    link = tmp_path / "rig0"
    with VirtualRigProcess("furuta", link=str(link), seed=3) as vr:
        assert vr.pty.startswith("/dev/pts/") and vr.port == str(link)
        assert os.path.realpath(link) == vr.pty
        pid = vr.proc.pid
    assert not _alive(pid) and not link.exists()  # terminated, link removed on exit


def test_unknown_option_and_bad_rig_are_clear_errors():
    with pytest.raises(TypeError, match="unknown option.*'baud_rate'"):
        VirtualRigProcess("cartpole", baud_rate=9600)
    with pytest.raises(VirtualRigError, match="unknown rig 'nope'"):
        VirtualRigProcess("nope", start_timeout=20).start()


def test_rig_dies_with_its_parent(tmp_path):
    code = (
        "import os; from hardware.virtual_rig import VirtualRigProcess; "
        "vr = VirtualRigProcess('cartpole').start(); print(vr.proc.pid, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):  # pragma: no cover - clean up before failing
        os.kill(pid, signal.SIGKILL)
        pytest.fail("virtual rig outlived the process that spawned it")
