"""The virtual rig: a simulated cart-pole / Furuta pendulum behind a real pseudo-terminal.

``python -m hardware.virtual_rig cartpole [--link /tmp/x/rig0] [--ber 1e-3] ...`` (same as
``rigfm virtual-rig``) creates a pty, prints ``PORT /dev/pts/N`` (flushed) as its first stdout line and
runs the plant (rigs.RigSimulator) in real time at the firmware loop rate with the firmware semantics of
hardware/virtual_firmware.py. When the process is late (a loaded machine) it catches up with several
loop ticks instead of drifting (at most ``MAX_CATCHUP_TICKS`` per wake-up; beyond that device time skips).

Signals: SIGTERM/SIGINT exit (motor 0 V, stats written, link removed); SIGUSR1 unplugs the virtual cable
(the pty is closed, the driver sees EIO; a new pty appears after ``--replug-after`` seconds and is
announced by another ``PORT`` line and the ``--link``); SIGUSR2 quiesces the output (the delay line is
flushed, a final clean frame is sent, then nothing more) so tests can compare fault accounting exactly.

For tests and demos use ``VirtualRigProcess`` (re-exported here), which runs this as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

from hardware import protocol as proto
from hardware.serial_faults import ByteFaultInjector, FaultConfig
from hardware.serial_pty import PtyPort
from hardware.virtual_firmware import VirtualFirmware
from hardware.virtual_rig_args import add_virtual_rig_arguments
from hardware.virtual_rig_process import VirtualRigError, VirtualRigProcess

__all__ = ["VirtualRigProcess", "VirtualRigError", "VirtualRig", "run_virtual_rig", "main"]

MAX_CATCHUP_TICKS = 200
TICKS_PER_SERVICE = 10  # when catching up, read/write the pty at least every this many ticks
OVERRUN_TICKS = 5  # lateness beyond this many ticks is reported as a loop overrun
STATS_INTERVAL_S = 0.25


class VirtualRig:
    """Real-time loop: pty I/O, fault injection, firmware ticks, unplug/replug, stats."""

    def __init__(self, args: argparse.Namespace) -> None:
        import rigs

        self.args = args
        self.cfg = rigs.load_config(args.rig)
        params = dict(args.overrides)
        self.sim = rigs.RigSimulator(self.cfg, seed=args.seed, param_overrides=params or None)
        x0 = self.sim.model.upright() if args.init == "upright" else self.sim.model.hanging()
        self.sim.reset(x0)
        self.faults = FaultConfig(
            ber=args.ber,
            drop_rate=args.drop_rate,
            garbage_rate_hz=args.garbage_rate,
            latency_s=args.latency_ms * 1e-3,
        )
        self.injector = ByteFaultInjector(self.faults, seed=args.seed + 7919)
        self.wire_version = int(getattr(args, "protocol_version", proto.PROTOCOL_VERSION))
        self.fw = VirtualFirmware(
            self.cfg,
            self.sim,
            self._emit,
            default_divider=args.telemetry_divider,
            protocol_version=self.wire_version,
        )
        self.pty = PtyPort(args.link)
        self.decoder = proto.FrameDecoder()
        self.tx_seq = 0
        self.frames_sent = 0
        # fault injection starts with the first CONFIG of a session (or at once with --faults-from-start)
        self.armed = bool(getattr(args, "faults_from_start", False)) and self.faults.active
        self.muted = False
        self.quiesced = False
        self.unplugs = 0
        self.overruns = 0
        self.skipped_ticks = 0
        self.max_lateness_ms = 0.0
        self._late = False
        self._stop = False
        self._unplug_request = False
        self._quiesce_request = False
        self._replug_at: float | None = None
        self.stats_path = Path(args.stats) if args.stats else None
        # --voltage-log: one line per change of the applied output between zero and non-zero (a rig-side
        # record of when the motor was really off; CLOCK_MONOTONIC is shared by the processes of a machine)
        vlog = getattr(args, "voltage_log", None)
        self._vlog = open(vlog, "a", buffering=1) if vlog else None  # noqa: SIM115 - closed in run()
        self._out_on = False
        self._last_cmd_ns = 0

    # ----------------------------------------------------------------------------- output
    def _emit(self, msg: object) -> None:
        seq = self.tx_seq
        self.tx_seq = proto.next_seq(seq)
        if not self.pty.is_open or self.muted:
            return
        frame = proto.encode(msg, seq)
        if self.wire_version != proto.PROTOCOL_VERSION:
            frame = proto.reencode_version(frame, self.wire_version)
        self.frames_sent += 1
        if self.armed:
            self.injector.process(frame, seq)
        else:
            self.injector.pass_clean(frame)

    def _arm_on_config(self, msg: object) -> None:
        if isinstance(msg, proto.Config) and not self.armed and self.faults.active:
            self.armed = True
            self.injector.reset_stats()

    # ------------------------------------------------------------------------------- plug
    def _announce(self, path: str) -> None:
        print(f"PORT {path}", flush=True)

    def _unplug(self) -> None:
        self.unplugs += 1
        self.pty.close()
        self.injector.clear()
        self.decoder.reset()
        self.fw.power_cycle()
        replug = self.args.replug_after
        self._replug_at = time.monotonic() + replug if replug is not None and replug >= 0 else None
        print(f"virtual rig: unplugged (replug in {replug} s)", file=sys.stderr, flush=True)

    def _replug(self) -> None:
        self._replug_at = None
        self._announce(self.pty.open())

    # ------------------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Everything worth comparing with the driver's counters."""
        c = self.fw.counters
        return {
            "rig": self.cfg.name,
            "port": self.pty.path,
            "link": str(self.pty.link) if self.pty.link else None,
            "pid": os.getpid(),
            "connected": self.fw.connected,
            "frames_sent": self.frames_sent,
            "tx_seq": self.tx_seq,
            "armed": self.armed,
            "quiesced": self.quiesced,
            "unplugs": self.unplugs,
            "pty_opens": self.pty.opens,
            "tx_dropped_bytes": self.pty.tx_dropped_bytes,
            "overruns": self.overruns,
            "skipped_ticks": self.skipped_ticks,
            "max_lateness_ms": round(self.max_lateness_ms, 3),
            "device_time_us": self.fw.time_us,
            "estop_latched": self.fw.estop_latched,
            "watchdog_tripped": self.fw.watchdog_tripped,
            "output_voltage": self.fw.output,
            "voltage_limit": self.fw.voltage_limit,
            "watchdog_ms": self.fw.watchdog_ms,
            "state_divider": self.fw.divider,
            "firmware": dict(c.__dict__),
            "rx_decoder": self.decoder.stats(),
            "injected": self.injector.stats.as_dict(),
            "true_state": [float(v) for v in self.sim.state],
        }

    def write_stats(self) -> None:
        """Atomically replace the stats file (if one was requested)."""
        if self.stats_path is None:
            return
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(self.stats()))
        os.replace(tmp, self.stats_path)

    # ------------------------------------------------------------------------------- loop
    def _install_signals(self) -> None:
        def stop(signum, frame):
            self._stop = True

        def unplug(signum, frame):
            self._unplug_request = True

        def quiesce(signum, frame):
            self._quiesce_request = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, unplug)
        signal.signal(signal.SIGUSR2, quiesce)

    def _quiesce(self, now: float) -> None:
        self._quiesce_request = False
        if self.quiesced:
            return
        self.pty.write(self.injector.due(now, flush=True))
        seq = self.tx_seq
        self.tx_seq = proto.next_seq(seq)
        frame = proto.encode(proto.Heartbeat(0), seq)
        self.injector.pass_clean(proto.DELIMITER + frame, now)  # ends any broken segment, then a clean frame
        self.frames_sent += 1
        self.pty.write(self.injector.due(now, flush=True))
        self.muted = self.quiesced = True
        self.write_stats()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or --duration); returns the exit code."""
        self._install_signals()
        self._announce(self.pty.open())
        tick = 1.0 / self.fw.loop_rate_hz
        start = time.monotonic()
        next_tick = start + tick
        next_stats = start
        disconnect_at = start + self.args.disconnect_after if self.args.disconnect_after is not None else None
        end_at = start + self.args.duration if self.args.duration is not None else None
        try:
            while not self._stop:
                now = time.monotonic()
                if end_at is not None and now >= end_at:
                    break
                if disconnect_at is not None and now >= disconnect_at:
                    disconnect_at = None
                    self._unplug_request = True
                if self._unplug_request:
                    self._unplug_request = False
                    if self.pty.is_open:
                        self._unplug()
                if self._replug_at is not None and now >= self._replug_at:
                    self._replug()
                if self._quiesce_request:
                    self._quiesce(now)
                # host -> device
                data = self.pty.read()
                if data:
                    errors0 = self._decoder_errors()
                    msgs = self.decoder.feed(data)
                    for _ in range(self._decoder_errors() - errors0):
                        self.fw.on_rx_error()
                    for seq, msg in msgs:
                        self._arm_on_config(msg)
                        if isinstance(msg, proto.Command):
                            self._last_cmd_ns = time.monotonic_ns()
                        self.fw.on_message(seq, msg)
                # firmware loop ticks, catching up when late
                late_ticks = int((now - next_tick) / tick)
                if late_ticks >= MAX_CATCHUP_TICKS:
                    skip = late_ticks - MAX_CATCHUP_TICKS + 1
                    self.skipped_ticks += skip
                    next_tick += skip * tick
                lateness = now - next_tick
                if lateness > 0:
                    self.max_lateness_ms = max(self.max_lateness_ms, lateness * 1e3)
                late = lateness > OVERRUN_TICKS * tick
                overrun = late and not self._late  # one overrun per late episode
                self._late = late
                self.overruns += int(overrun)
                overrun_us = int(lateness * 1e6) if overrun else 0
                n = 0
                while next_tick <= now and n < TICKS_PER_SERVICE:  # serve the link between chunks
                    self.fw.tick(overrun_us=overrun_us)
                    if self._vlog is not None and (self.fw.output != 0.0) != self._out_on:
                        self._log_voltage()
                    overrun_us = 0
                    next_tick += tick
                    n += 1
                # device -> host (including what these ticks emitted)
                if self.pty.is_open and not self.muted:
                    out = self.injector.due(time.monotonic())
                    if out:
                        self.pty.write(out)
                if self.stats_path is not None and now >= next_stats:
                    next_stats = now + STATS_INTERVAL_S
                    self.write_stats()
                wake = next_tick
                due = self.injector.next_due_time()
                if due is not None and not self.muted:
                    wake = min(wake, due)
                timeout = max(0.0, wake - time.monotonic())
                if self.pty.is_open:
                    try:
                        select.select([self.pty.fileno()], [], [], timeout)
                    except InterruptedError:
                        pass
                else:
                    time.sleep(min(timeout, 0.01))
        finally:
            self.fw.setpoint = 0.0
            self.fw.output = 0.0
            self.sim.apply(0.0)
            if self._vlog is not None:
                if self._out_on:
                    self._log_voltage()
                self._vlog.close()
            self.write_stats()
            self.pty.close()
            self.pty.remove_link()
        return 0

    def _log_voltage(self) -> None:
        """``<monotonic ns> <applied V> <monotonic ns of the last COMMAND received> <watchdog tripped>``."""
        self._out_on = self.fw.output != 0.0
        assert self._vlog is not None
        self._vlog.write(f"{time.monotonic_ns()} {self.fw.output:.6g} {self._last_cmd_ns} "
                         f"{int(self.fw.watchdog_tripped)}\n")

    def _decoder_errors(self) -> int:
        d = self.decoder
        return d.crc_errors + d.framing_errors + d.length_errors + d.version_errors + d.unknown_messages


def run_virtual_rig(args: argparse.Namespace) -> int:
    """Entry point shared by ``rigfm virtual-rig`` and ``python -m hardware.virtual_rig``."""
    import rigs

    try:
        rig = VirtualRig(args)
    except (rigs.RigConfigError, ValueError, KeyError) as exc:
        print(f"virtual-rig: {exc}", file=sys.stderr)
        return 2
    return rig.run()


def main(argv: list[str] | None = None) -> int:
    """``python -m hardware.virtual_rig RIG [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m hardware.virtual_rig", description=__doc__.split("\n")[0]
    )
    add_virtual_rig_arguments(parser)
    parser.add_argument(
        "--protocol-version", type=int, default=proto.PROTOCOL_VERSION, help=argparse.SUPPRESS
    )
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parent_pid is not None and not _die_with_parent(args.parent_pid):
        return 1
    return run_virtual_rig(args)


def _die_with_parent(parent_pid: int) -> bool:
    """Linux: get SIGTERM when the spawning process dies (no orphans); False if it is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return os.getppid() == parent_pid


if __name__ == "__main__":
    sys.exit(main())
