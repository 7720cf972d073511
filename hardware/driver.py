"""Host-side rig driver: serial connection, handshake, telemetry reader thread, commands, reconnection.

```python
with RigConnection(port="/dev/pts/5", rig_config="cartpole") as rig:
    s = rig.wait_state(timeout=1.0)          # StateSample (positions in SI via the rig config)
    rig.send_command(1.5)                    # volts; CommandRejected on NaN/Inf or |V| > limit
    rig.stats()                              # RigStats: frames, crc/framing errors, seq gaps, reconnects, RTT
```

A reader thread timestamps every frame (``time.monotonic_ns``) and keeps the latest sample. Serial errors
never propagate to the caller's thread: the connection marks itself disconnected, reconnects with
exponential backoff (re-handshake, re-configure) and reports through ``on_event`` and ``stats()``.

Frames go out with one non-blocking ``os.write`` on the port's file descriptor (``_write_frame``), not
``serial.Serial.write``: with a write timeout set, pyserial follows every write with a ``select`` for
writability, which on a pty (and a loaded machine) waits for the kernel's flip-buffer worker and took
0.1 ms typically, 1-6 ms at worst -- inside a 2 ms control period.  The timeout only applies when the
OS buffer is really full.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import glob
import logging
import math
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serial

from hardware import protocol as proto
from hardware.serial_ports import DEFAULT_SYSFS_ROOT, check_latency_timer, find_port_by_serial_number

log = logging.getLogger(__name__)

_RIG_KINDS = {"cartpole": proto.RigKind.CARTPOLE, "furuta": proto.RigKind.FURUTA}
_INT32 = (proto.INT32_MIN, proto.INT32_MAX)


# ------------------------------------------------------------------------------------------- errors
class RigError(Exception):
    """Base class of driver errors."""


class HandshakeError(RigError):
    """The device did not complete the HELLO exchange."""


class ProtocolMismatch(HandshakeError):
    """The device speaks another protocol version than this host."""


class RigMismatch(HandshakeError):
    """The device is a different rig (kind or encoder resolution) than the rig config says."""


class PortError(RigError):
    """The serial port cannot be opened or is not a serial port; the message says what to check."""


class CommandRejected(RigError, ValueError):
    """A command was refused on the host before sending (non-finite or beyond the voltage limit)."""


class ConfigRejected(RigError):
    """The device answered CONFIG / CLEAR_ESTOP with NACK, or did not answer."""


class RigDisconnected(RigError):
    """The operation needs a connected device."""


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True, slots=True)
class StateSample:
    """One STATE frame as seen by the host."""

    seq: int  # device sequence number (u16, wraps)
    device_time_us: int  # device clock at the sample
    host_time_ns: int  # time.monotonic_ns() when the bytes were read
    counts: tuple[int, ...]  # raw encoder counts per channel
    positions: tuple[float, ...]  # SI (m / rad) via the rig config's encoder conversion
    current: float  # motor current in A (NaN without a sensor)
    applied_voltage: float  # V actually applied by the firmware
    flags: int  # protocol.StatusFlags bits

    def has(self, flag: proto.StatusFlags) -> bool:
        """Whether a status flag is set."""
        return bool(self.flags & flag)

    @property
    def estopped(self) -> bool:
        """E-stop latched or a latching fault active: the motor is held at 0 V."""
        return self.has(proto.StatusFlags.ESTOP_LATCHED) or self.has(proto.StatusFlags.FAULT)

    @property
    def watchdog_tripped(self) -> bool:
        """The device watchdog has zeroed the motor (no COMMAND recently)."""
        return self.has(proto.StatusFlags.WATCHDOG_TRIPPED)


@dataclass(frozen=True, slots=True)
class TruthSample:
    """One TRUTH frame (protocol v2.1, virtual rig only): the plant's true state at a STATE sample."""

    device_time_us: int  # equals the device_time_us of the STATE sample it belongs to
    host_time_ns: int  # time.monotonic_ns() when the bytes were read
    state: tuple[float, ...]  # SI [q0, q1, q0_dot, q1_dot]
    voltage: float  # V acting on the plant at that instant


@dataclass(frozen=True)
class DeviceInfo:
    """Identity and capabilities from HELLO_REPLY."""

    protocol_version: int
    firmware_version: tuple[int, int, int]
    rig_kind: str
    counts_per_rev: tuple[int, ...]
    loop_rate_hz: int
    max_voltage: float
    watchdog_ms: int
    uid: int
    port: str


@dataclass
class RigStats:
    """Counters of one RigConnection (cumulative over reconnects)."""

    connected: bool = False
    frames: int = 0  # good frames decoded
    states: int = 0
    crc_errors: int = 0
    framing_errors: int = 0  # COBS/length/over-long/version/unknown-type errors
    seq_gaps: int = 0  # number of gaps in the device sequence
    frames_missed: int = 0  # frames missing in those gaps
    seq_reorders: int = 0  # duplicate / out-of-order frames
    bytes_rx: int = 0
    bytes_tx: int = 0
    commands_sent: int = 0
    commands_dropped: int = 0  # send_command while disconnected or on a write timeout
    write_timeouts: int = 0
    faults: int = 0
    nacks: int = 0
    disconnects: int = 0
    reconnects: int = 0  # successful re-handshakes after a disconnect
    reconnect_attempts: int = 0
    heartbeats_sent: int = 0
    heartbeats_received: int = 0
    last_rtt_us: float = math.nan  # HEARTBEAT round trip
    min_rtt_us: float = math.nan
    mean_rtt_us: float = math.nan
    last_latency_us: float = math.nan  # host receive time - device time, minus the smallest seen (jitter)
    last_error: str = ""

    @property
    def rx_errors(self) -> int:
        """All corrupted frames (CRC + framing)."""
        return self.crc_errors + self.framing_errors

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for logs)."""
        d = dataclasses.asdict(self)
        d["rx_errors"] = self.rx_errors
        return d

    def keys(self) -> list[str]:
        """Mapping protocol, so ``dict(rig.stats())`` works."""
        return list(self.as_dict())

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    reply: Any = None


# ------------------------------------------------------------------------------------------- driver
def port_problem(path: str, exc: BaseException) -> str:
    """One line naming why ``path`` could not be opened as a serial port, and what to check."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if not os.path.exists(path):
        found = sorted(glob.glob("/dev/ttyUSB*") + glob.glob("/dev/ttyACM*"))
        seen = ", ".join(found) if found else "none"
        return (f"{path}: no such device: is the rig plugged in and powered, and the path right? "
                f"(USB serial ports here: {seen}; `rigfm run ... --virtual` for a simulated rig)")
    if code in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError) or "Permission denied" in text:
        try:
            import grp

            group = grp.getgrgid(os.stat(path).st_gid).gr_name
        except (KeyError, OSError, ImportError):
            group = "dialout"
        return (f"{path}: permission denied: add your user to the {group!r} group "
                f"(sudo usermod -aG {group} $USER), then log in again")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode and not stat.S_ISCHR(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "a socket"
        kind = kind if stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode) else "not a tty"
        return f"{path}: not a serial port ({kind}); give the rig's tty, e.g. /dev/ttyUSB0 or /dev/ttyACM0"
    if code == errno.ENOTTY or "Inappropriate ioctl" in text:
        return (f"{path}: not a serial port (a character device but not a tty); give the rig's tty, e.g. "
                "/dev/ttyUSB0 or /dev/ttyACM0")
    if code == errno.EBUSY or "busy" in text.lower():
        return f"{path}: port busy: another program has it open (a serial monitor, another rigfm run?)"
    return f"{path}: cannot open the serial port: {text}"


class RigConnection:
    """A connection to one rig over a serial port (real USB-serial or a virtual rig's pty)."""

    def __init__(
        self,
        port: str | None = None,
        serial_number: str | None = None,
        rig_config: Any = "cartpole",
        baud: int | None = None,
        *,
        on_event: Callable[[str, dict], None] | None = None,
        auto_configure: bool = True,
        heartbeat_interval_s: float = 0.2,
        reconnect: bool = True,
        max_backoff_s: float = 2.0,
        handshake_timeout_s: float | None = None,
        sysfs_root: str | Path = DEFAULT_SYSFS_ROOT,
        clear_estop_on_connect: bool = False,
        on_state: Callable[[StateSample], None] | None = None,
        truth: bool = False,
    ) -> None:
        """Open ``port`` (or the USB port with ``serial_number``), handshake and start the reader thread.

        Raises ProtocolMismatch / RigMismatch / HandshakeError if the device does not answer correctly,
        PortError if the port cannot be opened (missing, permissions, not a tty, busy; the message says what
        to check), PortNotFound for an unknown serial number.
        The device's e-stop latch survives a new session; ``clear_estop_on_connect=True`` clears it once
        after the first handshake (never after a reconnect: an e-stop during a link glitch stays latched).
        ``on_state(sample)`` is called on the reader thread for every STATE (e.g. a logger); keep it short.
        ``truth=True`` asks the device for TRUTH frames (protocol v2.1) after every handshake; a device
        without a truth source (real firmware) NACKs and ``truth_available`` stays False."""
        import rigs

        if (port is None) == (serial_number is None):
            raise ValueError("RigConnection: give exactly one of port= or serial_number=")
        self.cfg = rigs.load_config(rig_config)
        if self.cfg.kind not in _RIG_KINDS:
            raise RigMismatch(f"rig config {self.cfg.name!r}: unsupported rig kind {self.cfg.kind!r}")
        self._port_arg, self._serial_number = port, serial_number
        self.baud = int(baud or self.cfg.serial.baud)
        self._sysfs_root = sysfs_root
        self._on_event = on_event
        self._on_state = on_state
        self._estop_requested = False  # set by estop(), cleared by clear_estop()
        self._auto_configure = auto_configure
        self._hb_interval = heartbeat_interval_s
        self._reconnect_enabled = reconnect
        self._max_backoff = max_backoff_s
        self._handshake_timeout = handshake_timeout_s or self.cfg.serial.handshake_timeout_s

        self._decoder = proto.FrameDecoder()
        self._stats = RigStats()
        self._lock = threading.Lock()  # stats, latest, pending
        self._write_lock = threading.Lock()
        self._state_cv = threading.Condition(self._lock)
        self._ser: serial.Serial | None = None
        self._tx_seq = 0
        self._rx_seq: int | None = None
        self._latest: StateSample | None = None
        self._state_count = 0
        self._pending: dict[int, _Pending] = {}
        self._hb_pending: dict[int, tuple[int, _Pending | None]] = {}
        self._hb_token = 0
        self._rtt_sum = 0.0
        self._min_offset_us: float | None = None
        self._faults: collections.deque[tuple[int, proto.Fault]] = collections.deque(maxlen=256)
        self._config: proto.Config | None = None
        self._closing = threading.Event()
        self._latency_checked: set[str] = set()
        self._closed = False
        self._want_truth = bool(truth)
        self.truth_available = False
        self._truths: collections.deque[TruthSample] = collections.deque(maxlen=4096)
        self.device_info: DeviceInfo | None = None
        self.voltage_limit = self.cfg.limits.voltage_max

        self._open_and_handshake()  # errors propagate to the caller on the first connect
        if clear_estop_on_connect:
            try:
                self.clear_estop()
            except BaseException:
                self._close_port()
                raise
        self._thread = threading.Thread(
            target=self._reader_loop, name=f"rig-reader-{self.cfg.name}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------------------ public API
    @property
    def port(self) -> str:
        """The port path currently (or last) used."""
        return self.device_info.port if self.device_info else str(self._port_arg)

    @property
    def connected(self) -> bool:
        """Whether the device is connected and handshaken."""
        return self._ser is not None and not self._closed

    def latest_state(self) -> StateSample | None:
        """The most recent STATE sample (None before the first)."""
        return self._latest

    def wait_state(self, after_seq: int | None = None, timeout: float = 1.0) -> StateSample | None:
        """Block until a STATE newer than ``after_seq`` arrives (any new one if None); None on timeout.

        "Newer" means: a different sequence number than ``after_seq`` (robust to wrap-around and to the
        device restarting its sequence after a reconnect)."""
        deadline = time.monotonic() + timeout
        with self._state_cv:
            start = self._state_count
            while True:
                s = self._latest
                if s is not None and (
                    s.seq != after_seq if after_seq is not None else self._state_count > start
                ):
                    return s
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._state_cv.wait(remaining)

    def send_command(self, volts: float) -> bool:
        """Send a motor voltage. Returns False if it could not be sent (disconnected / write timeout).

        Raises CommandRejected (naming the value and the limit) for non-finite values or |V| > limit."""
        try:
            v = float(volts)
        except (TypeError, ValueError):
            raise CommandRejected(f"command {volts!r} is not a number (volts)") from None
        if not math.isfinite(v):
            raise CommandRejected(f"command {v!r} V rejected: not finite")
        if abs(v) > self.voltage_limit:
            raise CommandRejected(
                f"command {v:g} V rejected: exceeds the voltage limit +-{self.voltage_limit:g} V "
                f"(rig {self.cfg.name}: limits.voltage_max / device max_voltage / configure())"
            )
        ok = self._send(proto.Command(v)) is not None
        with self._lock:
            if ok:
                self._stats.commands_sent += 1
            else:
                self._stats.commands_dropped += 1
        return ok

    def estop(self) -> bool:
        """Latch the device e-stop (best effort; returns whether it was sent); 0 V until clear_estop()."""
        # set before sending: the reader thread may see the device's FAULT(ESTOP) answer before _send returns,
        # and that answer is expected (logged at INFO), not a warning
        before, self._estop_requested = self._estop_requested, True
        sent = self._send(proto.Estop()) is not None
        if not sent:
            self._estop_requested = before
        return sent

    def clear_estop(self, timeout: float = 0.5) -> None:
        """Clear the e-stop latch and latched faults; raises ConfigRejected on NACK or no answer."""
        self._request(proto.ClearEstop(), timeout, retries=3)
        self._estop_requested = False

    def configure(
        self,
        voltage_limit: float | None = None,
        watchdog_ms: int | None = None,
        position_limits: tuple[float, float] | None = None,
        state_divider: int | None = None,
        timeout: float = 0.5,
    ) -> None:
        """Send CONFIG (unspecified fields keep their current values) and wait for ACK.

        ``position_limits`` is (min, max) of channel 0 in SI units; the device zeroes outward voltage beyond
        them. Raises ConfigRejected naming the NACK reason. Re-applied automatically after a reconnect."""
        cur = self._config or self._default_config()
        pos_min, pos_max = cur.pos_min, cur.pos_max
        if position_limits is not None:
            lo, hi = (float(x) for x in position_limits)
            if not lo < hi:
                raise ValueError(
                    f"configure: position_limits must satisfy min < max, got {position_limits!r}"
                )
            c = [int(self.cfg.positions_to_counts([p, 0.0])[0]) for p in (lo, hi)]
            pos_min, pos_max = min(c), max(c)
        new = proto.Config(
            voltage_limit=float(cur.voltage_limit if voltage_limit is None else voltage_limit),
            watchdog_ms=int(cur.watchdog_ms if watchdog_ms is None else watchdog_ms),
            pos_min=pos_min,
            pos_max=pos_max,
            state_divider=int(cur.state_divider if state_divider is None else state_divider),
        )
        self._request(new, timeout, retries=3)
        self._config = new
        self._apply_voltage_limit()

    def ping(self, timeout: float = 0.5) -> float | None:
        """Send a HEARTBEAT and wait for its echo; returns the round trip in seconds (None on timeout)."""
        pend = _Pending()
        token = self._send_heartbeat(pend)
        if token is None:
            return None
        if not self._wait(pend, timeout):
            with self._lock:
                self._hb_pending.pop(token, None)
            return None
        return pend.reply / 1e9

    def drain_truth(self) -> list[TruthSample]:
        """Every TRUTH sample received since the last call, oldest first (at most the newest 4096)."""
        dq = self._truths
        out = []
        while dq:
            out.append(dq.popleft())
        return out

    def faults(self) -> list[tuple[int, proto.Fault]]:
        """Recent FAULT messages as (host_time_ns, Fault), oldest first."""
        with self._lock:
            return list(self._faults)

    def stats(self) -> RigStats:
        """A snapshot of the counters."""
        with self._lock:
            d = self._decoder
            self._stats.crc_errors = d.crc_errors
            self._stats.framing_errors = (
                d.framing_errors + d.length_errors + d.version_errors + d.unknown_messages
            )
            self._stats.bytes_rx = d.bytes_received
            self._stats.connected = self.connected
            return dataclasses.replace(self._stats)

    def close(self) -> None:
        """Zero the motor and latch the e-stop (best effort), stop the reader thread, close the port."""
        if self._closed:
            return
        try:
            if self._ser is not None:
                self._send(proto.Command(0.0))
                self._send(proto.Estop())
        finally:
            self._closing.set()
            thread = getattr(self, "_thread", None)
            if thread is not None and threading.current_thread() is not thread:
                thread.join(timeout=5.0)
            self._closed = True
            self._close_port()
            with self._state_cv:
                self._state_cv.notify_all()

    def __enter__(self) -> RigConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------- internals
    def _default_config(self) -> proto.Config:
        limits = self.cfg.limits
        vmax = limits.voltage_max
        if self.device_info is not None:
            vmax = min(vmax, self.device_info.max_voltage)
        c = [
            int(self.cfg.positions_to_counts([p, 0.0])[0])
            for p in (-limits.position_soft, limits.position_soft)
        ]
        loop = self.device_info.loop_rate_hz if self.device_info else self.cfg.sample_rate_hz
        divider = max(1, round(loop / self.cfg.control_rate_hz))
        return proto.Config(float(vmax), int(self.cfg.watchdog_ms), min(c), max(c), int(divider))

    def _apply_voltage_limit(self) -> None:
        v = self.cfg.limits.voltage_max
        if self.device_info is not None:
            v = min(v, self.device_info.max_voltage)
        if self._config is not None:
            v = min(v, self._config.voltage_limit)
        self.voltage_limit = v

    def _event(self, name: str, **info: Any) -> None:
        expected = info.get("code") == "LOOP_OVERRUN" or (
            name == "fault" and info.get("code") == "ESTOP" and self._estop_requested
        )
        if name in ("disconnected", "reconnect_failed", "fault", "nack") and not expected:
            log.warning("rig %s: %s %s", self.cfg.name, name, info)
        else:
            log.info("rig %s: %s %s", self.cfg.name, name, info)
        if self._on_event is not None:
            try:
                self._on_event(name, info)
            except Exception:  # a faulty callback must not kill the reader thread
                log.exception("on_event callback failed for %s", name)

    def _resolve_port(self) -> str:
        if self._serial_number is not None:
            return find_port_by_serial_number(self._serial_number)
        return str(self._port_arg)

    def _open_and_handshake(self) -> None:
        path = self._resolve_port()
        if path not in self._latency_checked:
            self._latency_checked.add(path)
            check_latency_timer(path, self._sysfs_root)
        try:
            ser = serial.Serial(
                path,
                self.baud,
                timeout=self.cfg.serial.timeout_s,
                write_timeout=self.cfg.serial.write_timeout_s,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortError(port_problem(path, exc)) from exc
        try:
            reply = self._handshake(ser, path)
        except BaseException:
            ser.close()
            raise
        if self._closing.is_set():  # close() was called while we were reconnecting
            ser.close()
            raise RigDisconnected("connection closed during the handshake")
        self._ser = ser
        if self._auto_configure or self._config is not None:
            cfg = self._config or self._default_config()
            try:
                self._request(cfg, timeout=0.4, retries=5)
            except RigError:
                self._ser = None
                ser.close()
                raise
            self._config = cfg
        if self._want_truth:
            self._request_truth()
        self._apply_voltage_limit()
        self._event("connected", port=path, firmware=reply.firmware_version, uid=reply.uid)

    def _request_truth(self) -> None:
        """TRUTH_REQUEST(1): ACK -> ``truth_available``; NACK / no answer -> no truth (not an error)."""
        try:
            self._request(proto.TruthRequest(1), timeout=0.3, retries=2)
        except ConfigRejected:
            self.truth_available = False
        else:
            self.truth_available = True

    def _handshake(self, ser: serial.Serial, path: str) -> proto.HelloReply:
        """Send HELLO (repeated every 0.2 s) until HELLO_REPLY; check version, rig kind and encoders."""
        dec = self._decoder
        dec.reset()
        version_errors0 = dec.version_errors
        deadline = time.monotonic() + self._handshake_timeout
        next_hello = 0.0
        ser.write(proto.DELIMITER)  # docs/protocol.md: a lone 0x00 flushes any partial frame at the device
        reply: proto.HelloReply | None = None
        seq_reply = 0
        leftovers: list[tuple[int, Any, int]] = []
        while reply is None:
            now = time.monotonic()
            if self._closing.is_set():
                raise RigDisconnected(f"{path}: connection closed during the handshake")
            if now >= deadline:
                if dec.version_errors > version_errors0:
                    raise ProtocolMismatch(
                        f"{path}: device speaks another protocol version ({dec.last_error}); this host "
                        f"speaks protocol v{proto.PROTOCOL_VERSION}: update the firmware or the host software"
                    )
                raise HandshakeError(
                    f"{path}: no HELLO_REPLY within {self._handshake_timeout:g} s: is the rigfm firmware "
                    f"flashed (hardware/firmware/README.md), the board powered, and its baud rate "
                    f"{self.baud} (serial.baud of the rig config)?"
                )
            if now >= next_hello:
                ser.write(proto.encode(proto.Hello(), self._next_tx_seq()))
                next_hello = now + 0.2
            data = ser.read(max(1, ser.in_waiting))
            t_ns = time.monotonic_ns()
            for seq, msg in dec.feed(data):
                if reply is not None:  # frames after the reply belong to the new session
                    leftovers.append((seq, msg, t_ns))
                    continue
                if isinstance(msg, proto.HelloReply):
                    reply, seq_reply = msg, seq
                    continue
                if isinstance(msg, proto.Nack) and msg.reason == proto.NackReason.VERSION_MISMATCH:
                    raise ProtocolMismatch(
                        f"{path}: device refused HELLO: protocol version mismatch "
                        f"(host speaks v{proto.PROTOCOL_VERSION})"
                    )
        if reply.protocol_version != proto.PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"{path}: device protocol v{reply.protocol_version}, host protocol v{proto.PROTOCOL_VERSION}"
            )
        kind = _RIG_KINDS[self.cfg.kind]
        if int(reply.rig_kind) != int(kind):
            got = reply.rig_kind.name.lower() if isinstance(reply.rig_kind, proto.RigKind) else reply.rig_kind
            raise RigMismatch(
                f"{path}: device is a {got} rig but the rig config {self.cfg.name!r} is a {self.cfg.kind} "
                f"(wrong port, or run with the {got} rig config)"
            )
        want_cpr = tuple(self.cfg.encoders.counts_per_rev)
        if tuple(reply.counts_per_rev) != want_cpr:
            raise RigMismatch(
                f"{path}: device encoders have {tuple(reply.counts_per_rev)} counts/rev, rig config "
                f"{self.cfg.name!r} says encoders.counts_per_rev = {want_cpr}"
            )
        self.device_info = DeviceInfo(
            protocol_version=reply.protocol_version,
            firmware_version=tuple(reply.firmware_version),
            rig_kind=self.cfg.kind,
            counts_per_rev=tuple(reply.counts_per_rev),
            loop_rate_hz=reply.loop_rate_hz,
            max_voltage=reply.max_voltage,
            watchdog_ms=reply.watchdog_ms,
            uid=reply.uid,
            port=path,
        )
        self._rx_seq = seq_reply
        for seq, msg, t_ns in leftovers:
            self._dispatch(seq, msg, t_ns)
        return reply

    def _next_tx_seq(self) -> int:
        seq = self._tx_seq
        self._tx_seq = proto.next_seq(seq)
        return seq

    def _send(self, msg: Any, pending: _Pending | None = None) -> int | None:
        """Encode and write one message; returns its seq, or None if not sent. Never raises serial errors."""
        ser = self._ser
        if ser is None:
            return None
        failure: BaseException | None = None
        with self._write_lock:
            seq = self._next_tx_seq()
            frame = proto.encode(msg, seq)
            if pending is not None:
                with self._lock:
                    self._pending[seq] = pending
            try:
                self._write_frame(ser, frame)
            except serial.SerialTimeoutException:
                with self._lock:
                    self._stats.write_timeouts += 1
                    self._pending.pop(seq, None)
                return None
            except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
                with self._lock:
                    self._pending.pop(seq, None)
                failure = exc
        if failure is not None:  # outside the write lock: the event callback may send
            self._mark_disconnected(ser, failure)
            return None
        with self._lock:
            self._stats.bytes_tx += len(frame)
        return seq

    def _write_frame(self, ser: serial.Serial, frame: bytes) -> None:
        """Write ``frame`` with non-blocking ``os.write`` on the port's fd (no select, no drain).

        Only when the OS buffer is full does it wait (select) for room, up to ``serial.write_timeout_s``,
        then raises serial.SerialTimeoutException.  Ports without a POSIX fd use ``ser.write``."""
        fd = getattr(ser, "fd", None)
        if not isinstance(fd, int):  # closed (pyserial raises PortNotOpenError) or not POSIX
            ser.write(frame)
            return
        view = memoryview(frame)
        deadline: float | None = None
        while view:
            try:
                n = os.write(fd, view)  # pyserial opens the fd O_NONBLOCK
            except (BlockingIOError, InterruptedError):
                n = 0
            view = view[n:]
            if not view:
                return
            if deadline is None:
                deadline = time.monotonic() + self.cfg.serial.write_timeout_s
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise serial.SerialTimeoutException(
                    f"write timeout: {len(view)} of {len(frame)} bytes unsent after "
                    f"serial.write_timeout_s = {self.cfg.serial.write_timeout_s:g} s")
            select.select([], [fd], [], remaining)

    def _request(self, msg: Any, timeout: float, retries: int = 1) -> proto.Ack:
        """Send a message that the device answers with ACK/NACK; raise ConfigRejected otherwise.

        Retries re-send the (idempotent) message; a late answer to any earlier try counts."""
        name = type(msg).__name__
        pend = _Pending()
        seqs: list[int] = []
        try:
            for _ in range(max(1, retries)):
                seq = self._send(msg, pend)
                if seq is None:
                    raise RigDisconnected(f"{name}: rig {self.cfg.name} is not connected")
                seqs.append(seq)
                if self._wait(pend, timeout):
                    break
        finally:
            with self._lock:
                for seq in seqs:
                    self._pending.pop(seq, None)
        if pend.reply is None:
            if self._ser is None:
                raise RigDisconnected(f"{name}: rig {self.cfg.name} disconnected while waiting for ACK")
            raise ConfigRejected(f"{name}: no ACK from the device within {timeout:g} s ({len(seqs)} tries)")
        if isinstance(pend.reply, proto.Nack):
            reason = pend.reply.reason
            rname = reason.name if isinstance(reason, proto.NackReason) else str(reason)
            raise ConfigRejected(f"{name} rejected by the device: NACK {rname} ({msg})")
        return pend.reply

    def _wait(self, pend: _Pending, timeout: float) -> bool:
        """Wait for a reply; on the reader thread itself (or before it runs) read and dispatch meanwhile."""
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            return pend.event.wait(timeout)
        deadline = time.monotonic() + timeout
        while not pend.event.is_set():
            ser = self._ser
            if ser is None or time.monotonic() >= deadline:
                return pend.event.is_set()
            data = ser.read(max(1, ser.in_waiting))  # serial errors propagate to the (re)connect logic
            if data:
                t_ns = time.monotonic_ns()
                with self._lock:
                    msgs = self._decoder.feed(data)
                for seq, msg in msgs:
                    self._dispatch(seq, msg, t_ns)
        return True

    def _send_heartbeat(self, pend: _Pending | None = None) -> int | None:
        with self._lock:
            self._hb_token = (self._hb_token + 1) & 0xFFFFFFFF
            token = self._hb_token
            self._hb_pending[token] = (time.monotonic_ns(), pend)
            if len(self._hb_pending) > 64:  # echoes lost: forget the oldest
                self._hb_pending.pop(next(iter(self._hb_pending)))
        if self._send(proto.Heartbeat(token)) is None:
            with self._lock:
                self._hb_pending.pop(token, None)
            return None
        with self._lock:
            self._stats.heartbeats_sent += 1
        return token

    def _close_port(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:
                pass

    def _mark_disconnected(self, ser: serial.Serial | None, exc: BaseException) -> None:
        with self._lock:
            if ser is not self._ser or self._ser is None:
                return  # already handled
            self._stats.disconnects += 1
            self._stats.last_error = f"{type(exc).__name__}: {exc}"
            for p in self._pending.values():
                p.event.set()
            self._pending.clear()
        self._close_port()
        self._event("disconnected", error=str(exc))

    # ------------------------------------------------------------------------------ reader thread
    def _reader_loop(self) -> None:
        backoff = 0.05
        next_hb = time.monotonic() + self._hb_interval
        while not self._closing.is_set():
            ser = self._ser
            if ser is None:
                if not self._reconnect_enabled:
                    self._closing.wait(0.1)
                    continue
                with self._lock:
                    self._stats.reconnect_attempts += 1
                try:
                    self._open_and_handshake()
                except Exception as exc:  # noqa: BLE001 - keep trying whatever went wrong
                    with self._lock:
                        self._stats.last_error = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, HandshakeError):
                        self._event("reconnect_failed", error=str(exc))
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
                    continue
                backoff = 0.05
                with self._lock:
                    self._stats.reconnects += 1
                self._event("reconnected", port=self.port)
                continue
            try:
                data = ser.read(max(1, ser.in_waiting))
            except Exception as exc:  # noqa: BLE001 - EIO/EOF on unplug, EBADF on close
                if self._closing.is_set():
                    break
                self._mark_disconnected(ser, exc)
                continue
            t_ns = time.monotonic_ns()
            if data:
                with self._lock:
                    msgs = self._decoder.feed(data)
                for seq, msg in msgs:
                    self._dispatch(seq, msg, t_ns)
            if self._hb_interval > 0 and time.monotonic() >= next_hb:
                next_hb = time.monotonic() + self._hb_interval
                self._send_heartbeat()

    def _dispatch(self, seq: int, msg: Any, t_ns: int) -> None:
        """Account one decoded frame and route it (reader thread, or the thread pumping a request)."""
        sample: StateSample | None = None
        event: tuple[str, dict] | None = None
        with self._lock:
            st = self._stats
            st.frames += 1
            if self._rx_seq is not None:
                gap = proto.seq_gap(self._rx_seq, seq)
                if gap >= proto.SEQ_MODULO // 2:
                    st.seq_reorders += 1
                elif gap:
                    st.seq_gaps += 1
                    st.frames_missed += gap
            self._rx_seq = seq
            if isinstance(msg, proto.State):
                sample = self._store_state(seq, msg, t_ns)
            elif isinstance(msg, proto.Truth):
                self._truths.append(TruthSample(msg.timestamp_us, t_ns, tuple(msg.state), msg.voltage))
            elif isinstance(msg, proto.Heartbeat):
                self._on_heartbeat(msg, t_ns)
            elif isinstance(msg, proto.Ack | proto.Nack):
                pend = self._pending.pop(msg.acked_seq, None)
                if pend is not None:
                    pend.reply = msg
                    pend.event.set()
                if isinstance(msg, proto.Nack):
                    st.nacks += 1
                    if pend is None:
                        event = (
                            "nack",
                            {
                                "acked_seq": msg.acked_seq,
                                "acked_type": int(msg.acked_type),
                                "reason": int(msg.reason),
                            },
                        )
            elif isinstance(msg, proto.Fault):
                st.faults += 1
                self._faults.append((t_ns, msg))
                code = msg.code.name if isinstance(msg.code, proto.FaultCode) else msg.code
                event = ("fault", {"code": code, "detail": msg.detail})
        if sample is not None and self._on_state is not None:
            try:
                self._on_state(sample)
            except Exception:  # a faulty callback must not kill the reader thread
                log.exception("on_state callback failed")
        if event is not None:
            self._event(event[0], **event[1])

    def _on_heartbeat(self, msg: proto.Heartbeat, t_ns: int) -> None:
        """Called with self._lock held: match an echo to its request, update the RTT statistics."""
        entry = self._hb_pending.pop(msg.token, None)
        if entry is None:
            return
        t0, pend = entry
        st = self._stats
        rtt_us = (t_ns - t0) / 1e3
        st.heartbeats_received += 1
        st.last_rtt_us = rtt_us
        st.min_rtt_us = rtt_us if math.isnan(st.min_rtt_us) else min(st.min_rtt_us, rtt_us)
        self._rtt_sum += rtt_us
        st.mean_rtt_us = self._rtt_sum / st.heartbeats_received
        if pend is not None:
            pend.reply = t_ns - t0
            pend.event.set()

    def _store_state(self, seq: int, msg: proto.State, t_ns: int) -> StateSample:
        """Called with self._lock held: build the sample, publish it, wake waiters."""
        pos = self.cfg.counts_to_positions(msg.counts)
        sample = StateSample(
            seq=seq,
            device_time_us=msg.timestamp_us,
            host_time_ns=t_ns,
            counts=tuple(msg.counts),
            positions=(float(pos[0]), float(pos[1])),
            current=msg.current_ma / 1000.0,
            applied_voltage=msg.applied_voltage,
            flags=int(msg.flags),
        )
        offset = t_ns / 1e3 - msg.timestamp_us
        if self._min_offset_us is None or offset < self._min_offset_us:
            self._min_offset_us = offset
        self._stats.last_latency_us = offset - self._min_offset_us
        self._stats.states += 1
        self._latest = sample
        self._state_count += 1
        self._state_cv.notify_all()
        return sample
