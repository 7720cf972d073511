"""RigConnection vs a real virtual-rig subprocess over a real pty: handshake, streaming, commands, safety."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time

import pytest

from hardware import protocol as proto
from hardware.driver import (
    CommandRejected,
    ConfigRejected,
    HandshakeError,
    ProtocolMismatch,
    RigConnection,
    RigMismatch,
)
from hardware.serial_ports import PortNotFound, check_latency_timer, find_port_by_serial_number
from hardware.virtual_rig import VirtualRigProcess

F = proto.StatusFlags


@pytest.fixture(scope="module")
def vrig(tmp_path_factory):
    with VirtualRigProcess("cartpole", link=str(tmp_path_factory.mktemp("vr") / "rig0")) as vr:
        yield vr


def _connect(vrig, **kw) -> RigConnection:
    """Connect and clear the e-stop that a previous test's close() latched (the latch survives HELLO)."""
    rig = RigConnection(port=vrig.port, rig_config="cartpole", clear_estop_on_connect=True, **kw)
    assert not rig.wait_state(timeout=1.0).estopped
    return rig


def _inward(rig: RigConnection, volts: float) -> float:
    """``volts`` with the sign that drives channel 0 toward the centre (tests share one rig: no drift)."""
    s = rig.wait_state(timeout=2.0)
    return -abs(volts) if s is not None and s.positions[0] > 0 else abs(volts)


def _collect(rig: RigConnection, n: int, command: float | None = None) -> list:
    """The next n STATE samples (sending ``command`` after each one if given)."""
    out, s = [], None
    while len(out) < n:
        if command is not None:
            rig.send_command(command)
        s = rig.wait_state(s.seq if s else None, timeout=2.0)
        assert s is not None, "STATE stream stopped"
        out.append(s)
    return out


def test_handshake_and_state_streaming(vrig):
    every: list[int] = []
    with RigConnection(port=vrig.port, rig_config="cartpole", on_state=lambda s: every.append(s.seq)) as rig:
        info = rig.device_info
        assert info.protocol_version == proto.PROTOCOL_VERSION and info.rig_kind == "cartpole"
        assert info.counts_per_rev == (4096, 4096) and info.loop_rate_hz == 1000
        samples = _collect(rig, 100)
        assert len(samples) >= 10
        s = samples[-1]
        assert s.has(F.CONNECTED) and s.has(F.CONFIGURED)
        assert s.positions[1] == pytest.approx(
            math.pi, abs=0.05
        )  # hanging pendulum, SI via the rigs conversion
        assert rig.cfg.counts_to_positions(s.counts)[0] == pytest.approx(s.positions[0])
        seqs = [x.seq for x in samples]
        assert all(proto.seq_gap(a, b) < 100 for a, b in zip(seqs, seqs[1:], strict=False))
        dts = {b.device_time_us - a.device_time_us for a, b in zip(samples, samples[1:], strict=False)}
        assert min(dts) > 0 and all(dt % 2000 == 0 for dt in dts)  # 500 Hz telemetry, divider 2
        assert all(b.host_time_ns >= a.host_time_ns for a, b in zip(samples, samples[1:], strict=False))
        rtt = rig.ping()
        assert rtt is not None and rtt > 0
        st = rig.stats()
        assert st.connected and st.rx_errors == 0 and st.frames_missed == 0 and st.states >= len(samples)
        assert dict(st)["heartbeats_received"] >= 1 and st.last_rtt_us > 0
    assert len(every) == rig.stats().states and set(seqs) <= set(every)  # on_state saw every sample


def test_commands_move_the_cart_and_are_reported_applied(vrig):
    with _connect(vrig) as rig:
        s0 = rig.wait_state(timeout=1.0)
        v = _inward(rig, 1.5)
        samples = _collect(rig, 100, command=v)
        assert samples[-1].applied_voltage == pytest.approx(v)
        assert samples[-1].has(F.MOTOR_ENABLED)
        assert (samples[-1].positions[0] - s0.positions[0]) * v > 1e-4  # moved the commanded way


def test_command_rejection_names_value_and_limit(vrig):
    with RigConnection(port=vrig.port, rig_config="cartpole") as rig:
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(CommandRejected, match="not finite"):
                rig.send_command(bad)
        with pytest.raises(CommandRejected, match=r"12.5 V.*limit \+-10 V"):
            rig.send_command(12.5)
        with pytest.raises(CommandRejected, match="not a number"):
            rig.send_command("fast")
        rig.configure(voltage_limit=4.0)
        with pytest.raises(CommandRejected, match=r"limit \+-4 V"):
            rig.send_command(4.5)
        assert rig.send_command(-4.0)
        assert rig.stats().commands_sent == 1


def test_configure_nack_is_a_clear_error(vrig):
    with RigConnection(port=vrig.port, rig_config="cartpole") as rig:
        with pytest.raises(ConfigRejected, match="WATCHDOG_RANGE"):
            rig.configure(watchdog_ms=2)
        with pytest.raises(ConfigRejected, match="VOLTAGE_LIMIT_RANGE"):
            rig.configure(voltage_limit=99.0)
        rig.configure(state_divider=5)
        a = rig.wait_state(timeout=1.0)
        b = rig.wait_state(a.seq, timeout=1.0)
        assert (b.device_time_us - a.device_time_us) % 5000 == 0


def test_watchdog_zeroes_the_motor_when_commands_stop(vrig):
    with _connect(vrig) as rig:
        rig.configure(watchdog_ms=30)
        _collect(rig, 60, command=_inward(rig, 1.0))
        last_cmd_us = None
        for _ in range(50):  # the rig's own record of when it got the last command (device time)
            st = vrig.stats()
            fw = st.get("firmware", {})
            if st.get("watchdog_tripped") and fw.get("last_watchdog_trip_us", -1) > fw.get(
                "last_command_us", 0
            ):
                last_cmd_us, trip_us = fw["last_command_us"], fw["last_watchdog_trip_us"]
                break
            time.sleep(0.05)
        assert last_cmd_us is not None, "watchdog never tripped"
        assert trip_us - last_cmd_us <= 30_000 + 1000  # within the timeout + one loop tick (device time)
        after = _collect(rig, 50)
        late = [s for s in after if s.device_time_us > last_cmd_us + 31_000]
        assert late and all(s.applied_voltage == 0.0 and s.watchdog_tripped for s in late)
        assert any(f.code == proto.FaultCode.WATCHDOG for _, f in rig.faults())
        rig.send_command(0.5)  # the next command re-arms it
        s = rig.wait_state(timeout=1.0)
        s = rig.wait_state(s.seq, timeout=1.0)
        assert not s.watchdog_tripped


def test_estop_latches_until_cleared(vrig, caplog):
    events = []
    with _connect(vrig, on_event=lambda n, i: events.append((n, i))) as rig:
        v = _inward(rig, 1.0)
        _collect(rig, 20, command=v)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hardware.driver"):
            assert rig.estop()
            latched = _collect(rig, 60, command=v)[-1]  # commands are ignored while latched
        assert latched.estopped and latched.applied_voltage == 0.0
        assert any(n == "fault" and i["code"] == "ESTOP" for n, i in events)
        # our own e-stop's FAULT(ESTOP) answer is expected: logged at INFO, not as a warning
        estop_logs = [r for r in caplog.records if "ESTOP" in r.getMessage()]
        assert estop_logs and all(r.levelno == logging.INFO for r in estop_logs)
        rig.clear_estop()
        s = _collect(rig, 60, command=v)[-1]
        assert not s.estopped and s.applied_voltage == pytest.approx(v)


def test_estop_latch_survives_a_new_session(vrig):
    with _connect(vrig) as rig:
        rig.estop()
    with RigConnection(port=vrig.port, rig_config="cartpole") as rig:
        s = _collect(rig, 20, command=_inward(rig, 1.0))[-1]
        assert s.estopped and s.applied_voltage == 0.0


def test_close_zeroes_the_motor_and_latches_estop(vrig):
    rig = _connect(vrig)
    _collect(rig, 20, command=_inward(rig, 2.0))
    rig.close()
    rig.close()  # idempotent
    for _ in range(40):
        st = vrig.stats()
        if st.get("estop_latched") and st.get("output_voltage") == 0.0:
            break
        time.sleep(0.05)
    assert st["estop_latched"] and st["output_voltage"] == 0.0
    assert rig.wait_state(timeout=0.05) is None and not rig.connected


def test_rig_kind_mismatch_is_refused(vrig):
    with pytest.raises(RigMismatch, match="cartpole rig but the rig config 'furuta'"):
        RigConnection(port=vrig.port, rig_config="furuta")


def test_protocol_version_mismatch_is_refused(tmp_path):
    with VirtualRigProcess("cartpole", protocol_version=1) as vr:
        with pytest.raises(ProtocolMismatch, match="protocol version"):
            RigConnection(port=vr.port, rig_config="cartpole", handshake_timeout_s=0.5)


def test_silent_port_times_out_with_a_clear_error(tmp_path):
    from hardware.serial_pty import PtyPort

    silent = PtyPort(tmp_path / "silent")
    silent.open()
    try:
        with pytest.raises(HandshakeError, match="no HELLO_REPLY within 0.3 s"):
            RigConnection(port=str(tmp_path / "silent"), rig_config="cartpole", handshake_timeout_s=0.3)
    finally:
        silent.close()


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="exactly one of port= or serial_number="):
        RigConnection(rig_config="cartpole")
    with pytest.raises(PortNotFound, match="no serial port with USB serial number 'NOPE-123'"):
        find_port_by_serial_number("NOPE-123")


def test_latency_timer_warning(tmp_path, caplog):
    sysfs = tmp_path / "sys"
    for name, value in (("ttyUSB0", "16\n"), ("ttyUSB1", "1\n")):
        d = sysfs / "bus" / "usb-serial" / "devices" / name
        d.mkdir(parents=True)
        (d / "latency_timer").write_text(value)
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "ttyUSB0").touch()
    (dev / "by-id-link").symlink_to(dev / "ttyUSB0")
    with caplog.at_level(logging.WARNING, logger="hardware.serial_ports"):
        assert check_latency_timer(str(dev / "by-id-link"), sysfs) == 16
    assert "latency timer of 16 ms" in caplog.text and "ttyUSB0/latency_timer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hardware.serial_ports"):
        assert check_latency_timer("/dev/ttyUSB1", sysfs) == 1
        assert check_latency_timer("/dev/pts/3", sysfs) is None
    assert caplog.text == ""


def test_cli_virtual_rig_prints_port_first(tmp_path):
    # `virtual-rig` as hardware/rig_commands.py registers it (what `rigfm virtual-rig` runs)
    code = (
        "import argparse, sys; from hardware import rig_commands; p = argparse.ArgumentParser(); "
        "rig_commands.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "virtual-rig", "furuta", "--duration", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("PORT /dev/pts/"), (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        with RigConnection(port=line.split()[1], rig_config="furuta") as rig:
            assert rig.device_info.rig_kind == "furuta"
            assert rig.wait_state(timeout=1.0) is not None
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_cli_bad_param_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "hardware.virtual_rig", "cartpole", "--set", "nonsense=2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "nonsense" in out.stderr


def test_connection_warns_about_a_slow_usb_latency_timer(vrig, tmp_path, caplog):
    """The check runs on connect; here the pty's name stands in for ttyUSBn in a fake sysfs."""
    import os

    name = os.path.basename(os.path.realpath(vrig.port))
    d = tmp_path / "bus" / "usb-serial" / "devices" / name
    d.mkdir(parents=True)
    (d / "latency_timer").write_text("16\n")
    with caplog.at_level(logging.WARNING, logger="hardware.serial_ports"):
        with RigConnection(port=vrig.port, rig_config="cartpole", sysfs_root=tmp_path) as rig:
            assert rig.connected
    assert f"{name}) has a USB latency timer of 16 ms" in caplog.text
