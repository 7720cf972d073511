"""Unit tests of the virtual rig's parts: fault-injection accounting, the pty port, the firmware logic."""

from __future__ import annotations

import os
import select

import numpy as np
import pytest
import serial

import rigs
from hardware import protocol as proto
from hardware.serial_faults import ByteFaultInjector, FaultConfig
from hardware.serial_pty import PtyPort
from hardware.virtual_firmware import VirtualFirmware

F = proto.StatusFlags


def _states(n: int) -> list[tuple[int, bytes]]:
    out = []
    for seq in range(n):
        msg = proto.State(seq * 1000, (seq * 7, -seq), 12.5, 1.0, F.CONNECTED)
        out.append((seq, proto.encode(msg, seq)))
    return out


def _run_injector(
    cfg: FaultConfig, n: int = 4000, seed: int = 3
) -> tuple[ByteFaultInjector, proto.FrameDecoder, list[int]]:
    inj = ByteFaultInjector(cfg, seed=seed)
    dec = proto.FrameDecoder()
    got: list[int] = []
    t = 0.0
    for seq, frame in _states(n):
        t += 0.002
        inj.process(frame, seq, now=t)
        got += [s for s, _ in dec.feed(inj.due(now=t + 1.0))]
    inj.pass_clean(proto.DELIMITER, now=t)
    got += [s for s, _ in dec.feed(inj.due(flush=True))]
    return inj, dec, got


@pytest.mark.parametrize(
    "cfg",
    [
        FaultConfig(ber=1e-3),
        FaultConfig(ber=1e-2),
        FaultConfig(drop_rate=2e-3),
        FaultConfig(garbage_rate_hz=40.0),
        FaultConfig(ber=1e-3, drop_rate=1e-3, garbage_rate_hz=20.0),
    ],
    ids=["ber1e-3", "ber1e-2", "drop", "garbage", "all"],
)
def test_injector_accounting_matches_the_real_decoder_exactly(cfg):
    inj, dec, got = _run_injector(cfg)
    st = inj.stats
    errors = (
        dec.crc_errors + dec.framing_errors + dec.length_errors + dec.version_errors + dec.unknown_messages
    )
    assert st.lost_frames > 10, "the fault settings should corrupt a fair number of frames"
    assert errors == st.bad_segments
    assert dec.frames_ok == st.frames - st.lost_frames
    assert sorted(set(range(st.frames)) - set(got)) == st.lost_seqs


def test_injector_latency_delays_bytes_and_clean_is_untouched():
    inj = ByteFaultInjector(FaultConfig(latency_s=0.01))
    frame = _states(1)[0][1]
    inj.process(frame, 0, now=1.0)
    assert inj.due(now=1.005) == b""
    assert inj.next_due_time() == pytest.approx(1.01)
    assert inj.due(now=1.0101) == frame
    assert inj.stats.lost_frames == 0


def test_fault_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ber"):
        FaultConfig(ber=1.5)
    with pytest.raises(ValueError, match="latency_s"):
        FaultConfig(latency_s=-1)


def test_pty_port_round_trip_link_and_unplug(tmp_path):
    link = tmp_path / "rig0"
    port = PtyPort(link)
    path = port.open()
    assert os.path.realpath(link) == path
    host = serial.Serial(str(link), 1_000_000, timeout=0.5)
    try:
        port.write(b"hello\x00")
        assert host.read(6) == b"hello\x00"
        host.write(b"cmd")
        select.select([port.fileno()], [], [], 1.0)
        assert port.read() == b"cmd"
        port.close()  # unplug: the host sees an error, never a hang
        with pytest.raises(serial.SerialException):
            for _ in range(3):
                host.read(1)
                host.write(b"x")
    finally:
        host.close()
    new_path = port.open()  # replug: the link follows the new pty
    assert os.path.realpath(link) == new_path
    port.close()
    port.remove_link()
    assert not link.exists()


def test_pty_write_never_blocks_without_a_reader():
    port = PtyPort()
    port.open()
    try:
        for _ in range(2000):
            port.write(b"x" * 64)
        assert port.tx_dropped_bytes > 0
    finally:
        port.close()


class _Recorder:
    def __init__(self):
        self.msgs: list[object] = []

    def __call__(self, msg):
        self.msgs.append(msg)

    def of(self, cls):
        return [m for m in self.msgs if isinstance(m, cls)]


@pytest.fixture
def fw():
    cfg = rigs.load_config("cartpole")
    sim = rigs.RigSimulator(cfg, seed=0)
    rec = _Recorder()
    return VirtualFirmware(cfg, sim, rec), rec


def test_firmware_needs_hello_then_streams(fw):
    fw, rec = fw
    fw.on_message(0, proto.Command(1.0))
    assert rec.of(proto.Nack)[0].reason == proto.NackReason.NOT_CONNECTED
    for _ in range(10):
        fw.tick()
    assert not rec.of(proto.State)
    fw.on_message(1, proto.Hello())
    reply = rec.of(proto.HelloReply)[0]
    assert reply.rig_kind == proto.RigKind.CARTPOLE and reply.counts_per_rev == (4096, 4096)
    for _ in range(10):
        fw.tick()
    assert len(rec.of(proto.State)) == 10 // fw.divider


def test_firmware_watchdog_trips_exactly_after_timeout(fw):
    fw, rec = fw
    fw.on_message(0, proto.Hello())
    fw.on_message(1, proto.Command(3.0))
    t_cmd = fw.time_us
    while not fw.watchdog_tripped:
        assert fw.output == 3.0 or fw.time_us == t_cmd
        fw.tick()
    assert fw.time_us - t_cmd == fw.watchdog_ms * 1000 + fw.tick_us
    assert fw.output == 0.0
    assert rec.of(proto.Fault)[-1].code == proto.FaultCode.WATCHDOG
    fw.on_message(2, proto.Command(1.0))  # the next command re-arms it
    fw.tick()
    assert not fw.watchdog_tripped and fw.output == 1.0


def test_firmware_estop_latch_and_clear(fw):
    fw, rec = fw
    fw.on_message(0, proto.Hello())
    fw.on_message(1, proto.Command(2.0))
    fw.tick()
    fw.on_message(2, proto.Estop())
    assert rec.of(proto.Ack)[-1].acked_seq == 2
    fw.on_message(3, proto.Command(2.0))
    fw.tick()
    assert fw.output == 0.0 and fw.flags & F.ESTOP_LATCHED and not fw.flags & F.MOTOR_ENABLED
    fw.on_message(4, proto.ClearEstop())
    fw.tick()
    assert fw.output == 0.0 and not fw.flags & F.ESTOP_LATCHED  # stays 0 V until a COMMAND
    fw.on_message(5, proto.Command(2.0))
    fw.tick()
    assert fw.output == 2.0


def test_firmware_config_validation_and_clamp(fw):
    fw, rec = fw
    fw.on_message(0, proto.Hello())
    fw.on_message(1, proto.Config(voltage_limit=50.0, watchdog_ms=50))
    assert rec.of(proto.Nack)[-1].reason == proto.NackReason.VOLTAGE_LIMIT_RANGE
    fw.on_message(2, proto.Config(voltage_limit=5.0, watchdog_ms=2))
    assert rec.of(proto.Nack)[-1].reason == proto.NackReason.WATCHDOG_RANGE
    fw.on_message(3, proto.Config(voltage_limit=5.0, watchdog_ms=40, pos_min=10, pos_max=-10))
    assert rec.of(proto.Nack)[-1].reason == proto.NackReason.POSITION_LIMITS
    fw.on_message(4, proto.Config(voltage_limit=5.0, watchdog_ms=40, state_divider=4))
    assert rec.of(proto.Ack)[-1].acked_seq == 4 and fw.flags & F.CONFIGURED
    fw.on_message(5, proto.Command(9.0))
    fw.tick()
    assert fw.output == 5.0 and fw.flags & F.VOLTAGE_CLAMPED
    fw.on_message(6, proto.Command(float("nan")))
    assert rec.of(proto.Nack)[-1].reason == proto.NackReason.NOT_FINITE
    fw.tick()
    assert fw.output == 0.0


def test_firmware_position_limit_zeroes_outward_voltage_only(fw):
    fw, rec = fw
    fw.on_message(0, proto.Hello())
    fw.on_message(1, proto.Config(voltage_limit=10.0, watchdog_ms=1000, pos_min=-200, pos_max=200))
    fw.on_message(2, proto.Command(6.0))
    for _ in range(400):
        fw.tick()
        if fw.limit_hit:
            break
    assert fw.limit_hit and rec.of(proto.Fault)[-1].code == proto.FaultCode.LIMIT
    fw.tick()
    assert fw.output == 0.0  # pushing outward: zeroed
    fw.on_message(3, proto.Command(-2.0))
    fw.tick()
    assert fw.output == -2.0  # pulling back in: allowed
    assert np.isfinite(fw.sim.state).all()


def test_firmware_session_rules_from_the_protocol_doc(fw):
    fw, rec = fw
    fw.on_message(0, proto.Heartbeat(7))  # nothing but NACK(NOT_CONNECTED) before HELLO
    assert not rec.of(proto.Heartbeat) and rec.of(proto.Nack)[-1].reason == proto.NackReason.NOT_CONNECTED
    fw.on_message(1, proto.Hello())
    assert fw.divider == 1  # default: STATE every tick
    for _ in range(200):  # the watchdog is armed by the first COMMAND only
        fw.tick()
    assert not fw.watchdog_tripped
    fw.on_message(2, proto.Heartbeat(7))
    assert rec.of(proto.Heartbeat)[-1].token == 7
    fw.on_message(3, proto.Command(1.0))
    fw.on_message(4, proto.Estop())
    for _ in range(200):  # nor does it trip while the motor is disabled by the e-stop
        fw.tick()
    assert not fw.watchdog_tripped and fw.output == 0.0
    fw.tick(overrun_us=7000)
    assert rec.of(proto.Fault)[-1] == proto.Fault(proto.FaultCode.LOOP_OVERRUN, 7000)
    assert rec.of(proto.State)[-1].flags & F.LOOP_OVERRUN
    fw.on_message(5, proto.Command(1.0))  # ignored while latched
    assert fw.counters.commands_ignored == 1
