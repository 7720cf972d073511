"""The reference firmware's semantics in Python, driving a rigs.RigSimulator (used by the virtual rig).

One ``tick()`` is one firmware loop iteration (1/loop_rate s of device time). Messages from the host go
to ``on_message``; everything the device sends goes through the ``emit`` callback. Semantics (same as
``hardware/firmware`` and docs/protocol.md):

* no STATE before HELLO (anything but HELLO -> NACK NOT_CONNECTED); HELLO (re)starts the session:
  HELLO_REPLY, config back to defaults, motor 0 V, then STATE every ``state_divider`` ticks (default 1);
* COMMAND before HELLO -> NACK NOT_CONNECTED; non-finite -> NACK NOT_FINITE + FAULT BAD_COMMAND, motor 0 V;
  |V| > limit -> clamped, VOLTAGE_CLAMPED; every valid COMMAND feeds the watchdog;
* watchdog (device time, armed by the first COMMAND of a session, checked while the motor is enabled):
  no COMMAND for ``watchdog_ms`` -> 0 V, WATCHDOG_TRIPPED, FAULT WATCHDOG once; the next COMMAND clears it;
* ESTOP -> ACK, latched (motor 0 V, COMMANDs ignored) until CLEAR_ESTOP (ACK; 0 V until a COMMAND);
  the latch survives HELLO (a reconnecting host must clear it explicitly), not a power cycle;
* channel-0 counts outside [pos_min, pos_max] -> LIMIT_HIT, outward voltage zeroed (positive voltage raises
  counts), FAULT LIMIT on entry; a late loop tick -> LOOP_OVERRUN flag + FAULT LOOP_OVERRUN (lateness us);
* CONFIG -> validated (NACK with the reason, nothing applied) or ACK + CONFIGURED;
* HEARTBEAT -> echoed with the same token;
* TRUTH_REQUEST (v2.1) -> ACK; with ``enable`` a TRUTH (the simulator's true state at the sample and the
  voltage acting on the plant) follows every STATE until disabled, HELLO or a power cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from hardware import protocol as proto

F = proto.StatusFlags
FIRMWARE_VERSION = (1, 0, 0)
_RIG_KIND = {"cartpole": proto.RigKind.CARTPOLE, "furuta": proto.RigKind.FURUTA}


@dataclass
class FirmwareCounters:
    """What the firmware saw and did (reported in the virtual rig's stats file)."""

    ticks: int = 0
    hellos: int = 0
    commands: int = 0
    commands_ignored: int = 0  # while e-stopped / faulted / not connected
    states_sent: int = 0
    watchdog_trips: int = 0
    estops: int = 0
    limit_hits: int = 0
    configs_ok: int = 0
    nacks: int = 0
    heartbeats: int = 0
    rx_errors: int = 0
    last_command_us: int = -1  # device time of the last valid COMMAND
    last_watchdog_trip_us: int = -1  # device time of the last watchdog trip
    last_voltage: float = 0.0


class VirtualFirmware:
    """Firmware state machine around a rigs.RigSimulator."""

    def __init__(
        self,
        cfg,
        sim,
        emit: Callable[[object], None],
        default_divider: int | None = None,
        protocol_version: int = proto.PROTOCOL_VERSION,
        uid: int = 0x5249474D0001,
    ) -> None:
        self.cfg = cfg
        self.sim = sim
        self.emit = emit
        self.loop_rate_hz = int(cfg.sample_rate_hz)
        self.tick_us = 1_000_000 // self.loop_rate_hz
        self.max_voltage = float(cfg.limits.voltage_max)
        self.default_divider = int(default_divider or 1)  # docs/protocol.md: STATE every tick by default
        self.protocol_version = protocol_version
        self.uid = uid
        self.counters = FirmwareCounters()
        self.time_us = 0
        self.power_cycle()

    # ------------------------------------------------------------------------------ state
    def power_cycle(self) -> None:
        """MCU reset (e.g. the USB cable was replugged): no session, defaults, motor off."""
        self.connected = False
        self.have_cmd = False
        self.estop_latched = False
        self.fault_latched = False
        self.watchdog_tripped = False
        self.limit_hit = False
        self.clamped = False
        self.configured = False
        self.rx_error = False
        self.overrun = False
        self.setpoint = 0.0
        self.output = 0.0
        self.truth = False
        self._defaults()
        self.last_cmd_us = self.time_us
        self._tick_in_period = 0
        self.sim.apply(0.0)

    def _defaults(self) -> None:
        self.voltage_limit = self.max_voltage
        self.watchdog_ms = int(self.cfg.watchdog_ms)
        self.pos_min, self.pos_max = proto.INT32_MIN, proto.INT32_MAX
        self.divider = self.default_divider

    @property
    def flags(self) -> int:
        """Current STATE flags."""
        f = 0
        if self.estop_latched:
            f |= F.ESTOP_LATCHED
        if self.watchdog_tripped:
            f |= F.WATCHDOG_TRIPPED
        if self.limit_hit:
            f |= F.LIMIT_HIT
        if self.fault_latched:
            f |= F.FAULT
        if self.connected and not (self.estop_latched or self.fault_latched or self.watchdog_tripped):
            f |= F.MOTOR_ENABLED
        if self.connected:
            f |= F.CONNECTED
        if self.clamped:
            f |= F.VOLTAGE_CLAMPED
        if self.overrun:
            f |= F.LOOP_OVERRUN
        if self.rx_error:
            f |= F.RX_ERROR
        if self.configured:
            f |= F.CONFIGURED
        return f

    # ---------------------------------------------------------------------------- messages
    def on_rx_error(self) -> None:
        """A corrupted frame arrived from the host."""
        self.counters.rx_errors += 1
        self.rx_error = True

    def _nack(self, seq: int, msg: object, reason: proto.NackReason) -> None:
        self.counters.nacks += 1
        self.emit(proto.Nack(seq, type(msg).TYPE, reason))

    def on_message(self, seq: int, msg: object) -> None:
        """Handle one decoded host frame."""
        if type(msg) not in proto.HOST_TO_DEVICE:
            self._nack(seq, msg, proto.NackReason.UNKNOWN_TYPE)
            return
        if self.protocol_version != proto.PROTOCOL_VERSION:  # test mode: a device of another version
            self._nack(seq, msg, proto.NackReason.VERSION_MISMATCH)
            return
        if isinstance(msg, proto.Hello):
            self._hello()
            return
        if isinstance(msg, proto.Heartbeat) and self.connected:
            self.counters.heartbeats += 1
            self.emit(proto.Heartbeat(msg.token))
            return
        if not self.connected:
            self.counters.commands_ignored += isinstance(msg, proto.Command)
            self._nack(seq, msg, proto.NackReason.NOT_CONNECTED)
            return
        if isinstance(msg, proto.Command):
            self._command(seq, msg)
        elif isinstance(msg, proto.Estop):
            self._estop(0)
            self.emit(proto.Ack(seq, msg.TYPE))
        elif isinstance(msg, proto.ClearEstop):
            self.estop_latched = self.fault_latched = False
            self.setpoint = 0.0  # 0 V until the next COMMAND, which also re-arms the watchdog
            self.have_cmd = False
            self.emit(proto.Ack(seq, msg.TYPE))
        elif isinstance(msg, proto.Config):
            self._config(seq, msg)
        elif isinstance(msg, proto.TruthRequest):
            self.truth = bool(msg.enable)
            self.emit(proto.Ack(seq, msg.TYPE))

    def _hello(self) -> None:
        self.counters.hellos += 1
        self.connected = True
        self.truth = False
        self.configured = False
        self._defaults()
        self.setpoint = 0.0
        self.have_cmd = False
        self.last_cmd_us = self.time_us
        self.watchdog_tripped = False
        self._tick_in_period = 0
        enc = self.cfg.encoders
        self.emit(
            proto.HelloReply(
                protocol_version=self.protocol_version,
                rig_kind=_RIG_KIND[self.cfg.kind],
                firmware_version=FIRMWARE_VERSION,
                counts_per_rev=(int(enc.counts_per_rev[0]), int(enc.counts_per_rev[1])),
                loop_rate_hz=self.loop_rate_hz,
                max_voltage=self.max_voltage,
                watchdog_ms=self.watchdog_ms,
                uid=self.uid,
            )
        )

    def _command(self, seq: int, msg: proto.Command) -> None:
        v = msg.voltage
        if not math.isfinite(v):
            self.setpoint = 0.0
            self._nack(seq, msg, proto.NackReason.NOT_FINITE)
            self.emit(proto.Fault(proto.FaultCode.BAD_COMMAND, 0))
            return
        if self.estop_latched or self.fault_latched:
            self.counters.commands_ignored += 1
            return
        self.counters.commands += 1
        self.clamped = abs(v) > self.voltage_limit
        self.setpoint = max(-self.voltage_limit, min(self.voltage_limit, v))
        self.last_cmd_us = self.counters.last_command_us = self.time_us
        self.have_cmd = True
        self.watchdog_tripped = False

    def _estop(self, detail: int) -> None:
        if not self.estop_latched:
            self.counters.estops += 1
            self.emit(proto.Fault(proto.FaultCode.ESTOP, detail))
        self.estop_latched = True
        self.setpoint = 0.0

    def _config(self, seq: int, msg: proto.Config) -> None:
        R = proto.NackReason
        if not proto.is_finite_f32(msg.voltage_limit):
            return self._nack(seq, msg, R.NOT_FINITE)
        if not 0.0 < msg.voltage_limit <= self.max_voltage + 1e-6:
            return self._nack(seq, msg, R.VOLTAGE_LIMIT_RANGE)
        if not proto.WATCHDOG_MS_MIN <= msg.watchdog_ms <= proto.WATCHDOG_MS_MAX:
            return self._nack(seq, msg, R.WATCHDOG_RANGE)
        if not msg.pos_min < msg.pos_max:
            return self._nack(seq, msg, R.POSITION_LIMITS)
        if not 1 <= msg.state_divider <= proto.STATE_DIVIDER_MAX:
            return self._nack(seq, msg, R.DIVIDER_RANGE)
        self.voltage_limit = float(msg.voltage_limit)
        self.watchdog_ms = int(msg.watchdog_ms)
        self.pos_min, self.pos_max = int(msg.pos_min), int(msg.pos_max)
        self.divider = int(msg.state_divider)
        self.configured = True
        self.counters.configs_ok += 1
        self.emit(proto.Ack(seq, msg.TYPE))
        return None

    # -------------------------------------------------------------------------------- loop
    def tick(self, overrun_us: int = 0) -> None:
        """One firmware loop iteration: read encoders, safety checks, set the motor, maybe send STATE.

        ``overrun_us`` > 0: this tick is late by that much (LOOP_OVERRUN flag + FAULT)."""
        self.time_us += self.tick_us
        self.counters.ticks += 1
        if overrun_us > 0:
            self.overrun = True
            if self.connected:
                self.emit(proto.Fault(proto.FaultCode.LOOP_OVERRUN, self._clamp32(overrun_us)))
        counts = self.sim.read_counts()
        # watchdog (device time): armed by the first COMMAND, only while the motor is enabled
        if (
            self.connected
            and self.have_cmd
            and not (self.watchdog_tripped or self.estop_latched or self.fault_latched)
            and self.time_us - self.last_cmd_us > self.watchdog_ms * 1000
        ):
            self.watchdog_tripped = True
            self.counters.watchdog_trips += 1
            self.counters.last_watchdog_trip_us = self.time_us
            self.emit(proto.Fault(proto.FaultCode.WATCHDOG, (self.time_us - self.last_cmd_us) // 1000))
        # output
        v = self.setpoint
        if not self.connected or self.estop_latched or self.fault_latched or self.watchdog_tripped:
            v = 0.0
        c0 = counts[0]
        outside = c0 > self.pos_max or c0 < self.pos_min
        if outside and not self.limit_hit:
            self.counters.limit_hits += 1
            self.emit(proto.Fault(proto.FaultCode.LIMIT, int(max(proto.INT32_MIN, min(proto.INT32_MAX, c0)))))
        self.limit_hit = outside
        if outside:
            if (c0 > self.pos_max and v > 0) or (c0 < self.pos_min and v < 0):  # positive V raises counts
                v = 0.0
        self.output = v
        self.counters.last_voltage = v
        self.sim.apply(v)
        if self.connected:
            self._tick_in_period += 1
            if self._tick_in_period >= self.divider:
                self._tick_in_period = 0
                self._send_state(counts)
        self.sim.advance(self.tick_us * 1e-6)

    @staticmethod
    def _clamp32(c: int) -> int:
        return int(max(proto.INT32_MIN, min(proto.INT32_MAX, c)))

    def _send_state(self, counts: tuple[int, ...]) -> None:
        self.emit(
            proto.State(
                timestamp_us=self.time_us,
                counts=(self._clamp32(counts[0]), self._clamp32(counts[1])),
                current_ma=float(self.sim.read_current()) * 1000.0,
                applied_voltage=float(self.output),
                flags=proto.StatusFlags(self.flags),
            )
        )
        self.counters.states_sent += 1
        self.rx_error = self.overrun = False
        if self.truth:  # the same instant as the counts: read before this tick's advance
            x = self.sim.state
            self.emit(proto.Truth(self.time_us, (float(x[0]), float(x[1]), float(x[2]), float(x[3])),
                                  float(self.sim.voltage)))
