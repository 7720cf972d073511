"""A virtual rig stepped in lock-step in this process: deterministic for a seed (the gymnasium env's default).

``LockstepRig`` runs the virtual rig's firmware (:mod:`hardware.virtual_firmware`) around its plant
(``rigs.RigSimulator``) on simulated device time: every host and device message is encoded to a protocol frame
and decoded again (:mod:`hardware.protocol`), the session starts with HELLO and the driver's default CONFIG,
and STATE samples carry the same fields as ``RigConnection``'s. What it leaves out is the pty, the threads and
the wall clock: time advances only in :meth:`advance` (and in :meth:`wait_state`, by firmware ticks until the
next STATE), so the same seed and the same commands give the same samples, bit for bit.

It offers the part of the ``RigConnection`` API that ``hardware.gym_env.RigEnv`` uses (``cfg``,
``voltage_limit``, ``port``, ``connected``, ``latest_state``, ``wait_state``, ``send_command``, ``estop``,
``clear_estop``, ``close``) plus ``advance(seconds)``, ``time_s`` and ``power_on(seed)``.
"""

from __future__ import annotations

import math
from typing import Any

from hardware import protocol as proto
from hardware.driver import CommandRejected, ConfigRejected, StateSample
from hardware.virtual_firmware import VirtualFirmware


class LockstepRig:
    """Firmware + plant of a virtual rig, in-process, advanced explicitly (no pty, no wall clock)."""

    lockstep = True

    def __init__(
        self,
        rig_config: Any = "cartpole",
        *,
        seed: int = 0,
        init: str = "hanging",
        param_overrides: dict[str, float] | None = None,
    ) -> None:
        """``init``: ``"hanging"`` or ``"upright"`` (the plant's state at every :meth:`power_on`)."""
        import rigs

        if init not in ("hanging", "upright"):
            raise ValueError(f"LockstepRig: init must be 'hanging' or 'upright', got {init!r}")
        self.cfg = rigs.load_config(rig_config)
        self._init = init
        self._params = dict(param_overrides or {})
        self._closed = False
        self.power_on(seed)

    # ------------------------------------------------------------------------------- device
    def power_on(self, seed: int) -> None:
        """A fresh device and plant: the simulator seeded with ``seed`` at the initial state, firmware power
        cycle (e-stop latch cleared, device time 0), then HELLO and the driver's default CONFIG."""
        import rigs

        if self._closed:
            raise RuntimeError("LockstepRig.power_on: the rig is closed")
        self.sim = rigs.RigSimulator(self.cfg, seed=int(seed), param_overrides=self._params or None)
        model = self.sim.model
        self.sim.reset(model.upright() if self._init == "upright" else model.hanging())
        self._host_rx = proto.FrameDecoder()
        self._dev_rx = proto.FrameDecoder()
        self._host_seq = self._dev_seq = 0
        self._latest: StateSample | None = None
        self._states = 0
        self._replies: list[Any] = []
        self.faults: list[proto.Fault] = []
        self.fw = VirtualFirmware(self.cfg, self.sim, self._device_emit)
        hello = self._request(proto.Hello())
        if not isinstance(hello, proto.HelloReply):
            raise RuntimeError(f"LockstepRig: HELLO answered with {hello!r}")
        self.device_info = hello
        limits = self.cfg.limits
        counts = [int(self.cfg.positions_to_counts([p, 0.0])[0]) for p in (-limits.position_soft,
                                                                           limits.position_soft)]
        divider = max(1, round(hello.loop_rate_hz / self.cfg.control_rate_hz))
        vmax = min(float(limits.voltage_max), float(hello.max_voltage))
        ack = self._request(proto.Config(vmax, int(self.cfg.watchdog_ms), min(counts), max(counts), divider))
        if not isinstance(ack, proto.Ack):
            raise ConfigRejected(f"LockstepRig: default CONFIG answered with {ack!r}")
        self.voltage_limit = vmax

    def _device_emit(self, msg: object) -> None:
        frame = proto.encode(msg, self._dev_seq)
        self._dev_seq = proto.next_seq(self._dev_seq)
        for seq, decoded in self._host_rx.feed(frame):
            self._on_host_rx(seq, decoded)

    def _on_host_rx(self, seq: int, msg: Any) -> None:
        if isinstance(msg, proto.State):
            pos = self.cfg.counts_to_positions(msg.counts)
            self._latest = StateSample(
                seq=seq,
                device_time_us=msg.timestamp_us,
                host_time_ns=msg.timestamp_us * 1000,  # simulated time: the host reads each frame at once
                counts=tuple(msg.counts),
                positions=(float(pos[0]), float(pos[1])),
                current=msg.current_ma / 1000.0,
                applied_voltage=msg.applied_voltage,
                flags=int(msg.flags),
            )
            self._states += 1
        elif isinstance(msg, proto.Fault):
            self.faults.append(msg)
        else:
            self._replies.append(msg)

    def _send(self, msg: Any) -> None:
        if self._closed:
            raise RuntimeError(f"LockstepRig: rig {self.cfg.name} is closed")
        frame = proto.encode(msg, self._host_seq)
        self._host_seq = proto.next_seq(self._host_seq)
        for seq, decoded in self._dev_rx.feed(frame):
            self.fw.on_message(seq, decoded)

    def _request(self, msg: Any) -> Any:
        """Send ``msg``; the device answers synchronously (ACK / NACK / HELLO_REPLY)."""
        self._replies.clear()
        self._send(msg)
        return self._replies[-1] if self._replies else None

    # ------------------------------------------------------------------------------- clock
    @property
    def time_s(self) -> float:
        """Device time in seconds."""
        return self.fw.time_us * 1e-6

    def advance(self, seconds: float) -> None:
        """Run the firmware loop for ``seconds`` of device time (rounded to whole loop ticks)."""
        if self._closed:
            raise RuntimeError(f"LockstepRig: rig {self.cfg.name} is closed")
        for _ in range(max(0, round(seconds * self.fw.loop_rate_hz))):
            self.fw.tick()

    # ---------------------------------------------------------------------- RigConnection API
    @property
    def port(self) -> str:
        """A name for messages (there is no serial port)."""
        return f"lockstep:{self.cfg.name}"

    @property
    def connected(self) -> bool:
        """True until :meth:`close`."""
        return not self._closed

    def latest_state(self) -> StateSample | None:
        """The most recent STATE sample."""
        return self._latest

    def wait_state(self, after_seq: int | None = None, timeout: float = 1.0) -> StateSample | None:
        """The newest STATE if its seq differs from ``after_seq``, else run firmware ticks until a new one
        (at most ``timeout`` s of device time; None then, or when closed)."""
        if self._closed:
            return None
        if after_seq is not None and self._latest is not None and self._latest.seq != after_seq:
            return self._latest
        start = self._states
        for _ in range(max(1, math.ceil(timeout * self.fw.loop_rate_hz))):
            self.fw.tick()
            if self._states > start:
                return self._latest
        return None

    def send_command(self, volts: float) -> bool:
        """Send a motor voltage (CommandRejected for non-finite or out-of-limit values, as the driver)."""
        v = float(volts)
        if not math.isfinite(v):
            raise CommandRejected(f"command {v!r} V rejected: not finite")
        if abs(v) > self.voltage_limit:
            raise CommandRejected(f"command {v:g} V rejected: exceeds the voltage limit "
                                  f"+-{self.voltage_limit:g} V (rig {self.cfg.name})")
        if self._closed:
            return False
        self._send(proto.Command(v))
        return True

    def estop(self) -> bool:
        """Latch the device e-stop."""
        if self._closed:
            return False
        self._request(proto.Estop())
        return True

    def clear_estop(self, timeout: float = 0.5) -> None:
        """Clear the e-stop latch and latched faults."""
        reply = self._request(proto.ClearEstop())
        if not isinstance(reply, proto.Ack):
            raise ConfigRejected(f"LockstepRig: CLEAR_ESTOP answered with {reply!r}")

    def close(self) -> None:
        """Zero the motor and latch the e-stop, as RigConnection.close(); idempotent."""
        if self._closed:
            return
        self._send(proto.Command(0.0))
        self._request(proto.Estop())
        self._closed = True

    def __enter__(self) -> LockstepRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
