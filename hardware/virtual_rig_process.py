"""Start a virtual rig as a real subprocess (``python -m hardware.virtual_rig``) for tests and demos."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class VirtualRigError(RuntimeError):
    """The virtual rig process failed to start or died."""


_FLAG_OPTIONS = {
    "seed": "--seed",
    "init": "--init",
    "link": "--link",
    "telemetry_divider": "--telemetry-divider",
    "ber": "--ber",
    "drop_rate": "--drop-rate",
    "garbage_rate": "--garbage-rate",
    "latency_ms": "--latency-ms",
    "disconnect_after": "--disconnect-after",
    "replug_after": "--replug-after",
    "stats": "--stats",
    "duration": "--duration",
    "protocol_version": "--protocol-version",
    "faults_from_start": "--faults-from-start",
    "voltage_log": "--voltage-log",
}


class VirtualRigProcess:
    """Context manager around a virtual-rig subprocess.

    ``VirtualRigProcess("cartpole", ber=1e-3, params={"pole_mass_scale": 1.4})`` spawns the rig, waits
    for its ``PORT`` line and exposes ``.port`` (the stable link path if ``link`` was given, else the pty)
    and ``.pty`` (the current ``/dev/pts/N``). A stats file is always requested (``.stats()`` reads it).
    The process is terminated (then killed) on exit, and the temporary files removed."""

    def __init__(
        self,
        rig: str = "cartpole",
        *,
        params: dict[str, float] | None = None,
        start_timeout: float = 30.0,
        workdir: str | os.PathLike | None = None,
        **opts: Any,
    ) -> None:
        unknown = set(opts) - set(_FLAG_OPTIONS)
        if unknown:
            raise TypeError(
                f"VirtualRigProcess: unknown option(s) {sorted(unknown)}; known: {sorted(_FLAG_OPTIONS)}"
            )
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="rigfm-vrig-")
        self.workdir = Path(workdir or self._tmp.name)
        opts.setdefault("stats", str(self.workdir / "stats.json"))
        self.stats_path = Path(opts["stats"])
        self.link = opts.get("link")
        # --parent-pid: the rig terminates itself when this process dies (no orphans)
        cmd = [sys.executable, "-u", "-m", "hardware.virtual_rig", rig, "--parent-pid", str(os.getpid())]
        for key, value in opts.items():
            if value is True:
                cmd.append(_FLAG_OPTIONS[key])  # a switch
            elif value is not None and value is not False:
                cmd += [_FLAG_OPTIONS[key], str(value)]
        for key, value in (params or {}).items():
            cmd += ["--set", f"{key}={value}"]
        self.cmd = cmd
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.pty: str | None = None
        self.port_lines: list[str] = []
        self._stderr_path = self.workdir / "stderr.txt"
        self._port_event = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def port(self) -> str:
        """Path a driver should open: the stable link if any, else the current pty."""
        if self.link:
            return str(self.link)
        if self.pty is None:
            raise VirtualRigError("virtual rig not started")
        return self.pty

    def start(self) -> VirtualRigProcess:
        """Spawn the process and wait for its first ``PORT`` line."""
        self._stderr = open(self._stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.start_timeout
        line = b""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                self.stop()
                raise VirtualRigError(
                    f"virtual rig did not print its PORT line: {self.stderr_text()[-2000:]}"
                )
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
            if ready:
                chunk = os.read(fd, 1)
                if not chunk:
                    continue
                line += chunk
        self._on_line(line.decode().strip())
        if not self.pty:
            self.stop()
            raise VirtualRigError(f"unexpected first line from virtual rig: {line!r}")
        self._reader = threading.Thread(target=self._read_stdout, name="vrig-stdout", daemon=True)
        self._reader.start()
        return self

    def _on_line(self, text: str) -> None:
        if text.startswith("PORT "):
            with self._port_event:
                self.pty = text.split(None, 1)[1]
                self.port_lines.append(self.pty)
                self._port_event.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                self._on_line(raw.decode(errors="replace").strip())
        except (ValueError, OSError):  # stdout closed by stop()
            pass

    def wait_port_lines(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` PORT lines were printed in total (count=2: one replug happened)."""
        with self._port_event:
            return self._port_event.wait_for(lambda: len(self.port_lines) >= count, timeout)

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr so far."""
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stats(self) -> dict:
        """The latest statistics the rig wrote (written every ~0.25 s and on exit)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def signal(self, sig: int) -> None:
        """Send a signal to the rig (SIGUSR1: unplug; SIGUSR2: quiesce; SIGSTOP/SIGCONT: stall)."""
        if self.proc is None or self.proc.poll() is not None:
            raise VirtualRigError("virtual rig is not running")
        self.proc.send_signal(sig)

    def unplug(self) -> None:
        """Pull the virtual USB cable now (a new pty appears after ``replug_after``)."""
        self.signal(signal.SIGUSR1)

    def quiesce(self, timeout: float = 5.0) -> dict:
        """Stop the rig's output after a final clean frame; return the stats written at that moment."""
        self.signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.stats()
            if st.get("quiesced"):
                return st
            time.sleep(0.02)
        raise VirtualRigError("virtual rig did not quiesce: " + self.stderr_text()[-2000:])

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate (SIGTERM, then SIGKILL) and reap the process; returns its exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.kill(self.proc.pid, signal.SIGCONT)  # a stalled (SIGSTOPped) rig must see SIGTERM
                    self.proc.terminate()
                    rc = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    rc = self.proc.wait(timeout)
                except ProcessLookupError:
                    pass
            rc = self.proc.returncode
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None
        return rc

    def __enter__(self) -> VirtualRigProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
