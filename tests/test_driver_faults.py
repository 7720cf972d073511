"""Fault injection on a real pty between a virtual-rig subprocess and RigConnection.

The virtual rig counts what it corrupted (serial_faults.ByteFaultInjector); after a quiesce (final clean
frame, then silence) the driver's counters must match exactly: every bad segment is one CRC/framing error
and every lost frame is one missed sequence number.
"""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from hardware import protocol as proto
from hardware.driver import RigConnection
from hardware.virtual_rig import VirtualRigProcess


def _drain(rig: RigConnection, quiet_s: float = 0.3, timeout: float = 10.0) -> None:
    """Wait until the driver has read everything (no new bytes for quiet_s)."""
    end = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        n = rig.stats().bytes_rx
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.05)
    raise AssertionError("driver never went quiet")


def _run_loop(rig: RigConnection, n: int, volts: float = 0.3, timeout: float = 60.0) -> int:
    """A control loop in the caller's thread: a command on every new state until n states were seen."""
    seen, s = 0, None
    end = time.monotonic() + timeout
    while seen < n and time.monotonic() < end:
        s2 = rig.wait_state(s.seq if s else None, timeout=0.2)
        if s2 is not None:
            s, seen = s2, seen + 1
        rig.send_command(volts)
    return seen


@pytest.mark.parametrize(
    "faults",
    [dict(ber=1e-3), dict(drop_rate=1e-3, garbage_rate=30.0, latency_ms=3.0)],
    ids=["ber1e-3", "drop+garbage+latency"],
)
def test_driver_counters_account_for_every_corrupted_frame(faults):
    with VirtualRigProcess("cartpole", seed=11, **faults) as vr:
        with RigConnection(port=vr.port, rig_config="cartpole") as rig:
            rig.clear_estop() if rig.latest_state() and rig.latest_state().estopped else None
            seen = _run_loop(rig, 800)
            inj = vr.quiesce()["injected"]
            _drain(rig)
            st = rig.stats()
            final = vr.stats()
        assert final["armed"] and final["tx_dropped_bytes"] == 0
        assert inj["lost_frames"] >= 5, inj  # the faults really happened
        assert seen == 800 and st.connected and st.disconnects == 0
        assert st.rx_errors == inj["bad_segments"], (st, inj)
        assert st.frames_missed == inj["lost_frames"], (st, inj)
        assert st.seq_reorders == 0


def test_handshake_and_configure_survive_corruption_from_the_first_byte():
    with VirtualRigProcess("cartpole", seed=3, ber=2e-3, garbage_rate=20.0, faults_from_start=True) as vr:
        for _ in range(3):
            with RigConnection(port=vr.port, rig_config="cartpole") as rig:
                assert rig.device_info.rig_kind == "cartpole"
                assert rig.wait_state(timeout=1.0) is not None
                assert rig.stats().connected
        assert vr.quiesce()["injected"]["lost_frames"] > 0


def test_unplug_replug_reconnects_without_disturbing_the_caller(tmp_path):
    events: list[str] = []
    errors: list[BaseException] = []
    link = tmp_path / "rig0"
    holder: list[RigConnection] = []

    def on_event(name: str, info: dict) -> None:
        events.append(name)
        if name == "disconnected":  # a callback may call back into the driver (no deadlock)
            events.append(f"send->{holder[0].send_command(0.0)}")

    with VirtualRigProcess("cartpole", link=str(link), disconnect_after=1.0, replug_after=0.3) as vr:
        with RigConnection(port=str(link), rig_config="cartpole", on_event=on_event) as rig:
            holder.append(rig)
            rig.configure(state_divider=4)
            stop = threading.Event()

            def control():  # the caller's control thread must never see an exception
                try:
                    while not stop.is_set():
                        rig.send_command(0.2)
                        rig.wait_state(timeout=0.01)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            t = threading.Thread(target=control)
            t.start()
            try:
                assert vr.wait_port_lines(2, timeout=10), "the virtual rig never replugged"
                deadline = time.monotonic() + 10
                while "reconnected" not in events and time.monotonic() < deadline:
                    time.sleep(0.05)
                s0 = rig.wait_state(timeout=1.0)
                s = rig.wait_state(s0.seq, timeout=1.0)
            finally:
                stop.set()
                t.join(5)
            st = rig.stats()
            assert vr.port_lines[0] != vr.port_lines[1] or len(vr.port_lines) == 2
        assert not errors, errors
        plug = [e for e in events if e in ("connected", "disconnected", "reconnected")]
        assert plug == ["connected", "disconnected", "connected", "reconnected"], events
        assert "send->False" in events
        assert st.disconnects == 1 and st.reconnects == 1 and st.connected
        assert st.commands_dropped >= 1  # commands during the outage were reported, not raised
        assert s is not None and s.has(proto.StatusFlags.CONFIGURED)
        assert (s.device_time_us - s0.device_time_us) % 4000 == 0  # CONFIG re-applied after the re-handshake


def test_stalled_peer_times_out_then_recovers_with_watchdog(tmp_path):
    with VirtualRigProcess("cartpole") as vr:
        with RigConnection(port=vr.port, rig_config="cartpole") as rig:
            _run_loop(rig, 80, volts=0.5)
            vr.signal(signal.SIGSTOP)
            try:
                s = rig.latest_state()
                for _ in range(50):  # drain what was in flight, then: no new states
                    s2 = rig.wait_state(s.seq, timeout=0.3)
                    if s2 is None:
                        break
                    s = s2
                assert s2 is None, "states kept coming from a stopped process"
                assert rig.send_command(0.5) in (True, False)  # never raises
            finally:
                vr.signal(signal.SIGCONT)
            states = []
            s = rig.wait_state(timeout=2.0)
            while s is not None and len(states) < 100:
                states.append(s)
                s = rig.wait_state(s.seq, timeout=1.0)
            assert len(states) == 100 and rig.connected
            assert any(x.watchdog_tripped and x.applied_voltage == 0.0 for x in states)
            assert rig.stats().disconnects == 0
            _run_loop(rig, 40, volts=0.5)
            assert not rig.latest_state().watchdog_tripped


def test_rig_process_killed_driver_keeps_retrying_and_closes_promptly(tmp_path):
    events: list[str] = []
    link = tmp_path / "rig0"
    with VirtualRigProcess("furuta", link=str(link)) as vr:
        rig = RigConnection(
            port=str(link), rig_config="furuta", on_event=lambda n, i: events.append(n), max_backoff_s=0.2
        )
        assert rig.wait_state(timeout=1.0) is not None
        vr.proc.kill()
        vr.proc.wait(5)
        deadline = time.monotonic() + 5
        while rig.stats().reconnect_attempts < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        st = rig.stats()
        assert "disconnected" in events and not st.connected and st.reconnect_attempts >= 3
        assert rig.send_command(1.0) is False
        assert rig.wait_state(timeout=0.1) is None
        t0 = time.monotonic()
        rig.close()
        assert time.monotonic() - t0 < 3.0


@pytest.mark.slow
@pytest.mark.parametrize("rig_name", ["cartpole", "furuta"])
def test_long_run_all_faults_exact_accounting(rig_name):
    faults = dict(ber=1e-3, drop_rate=5e-4, garbage_rate=10.0, latency_ms=2.0)
    with VirtualRigProcess(rig_name, seed=21, **faults) as vr:
        with RigConnection(port=vr.port, rig_config=rig_name) as rig:
            assert _run_loop(rig, 5000, volts=0.0) == 5000
            inj = vr.quiesce()["injected"]
            _drain(rig)
            st = rig.stats()
        assert inj["lost_frames"] > 100
        assert st.rx_errors == inj["bad_segments"] and st.frames_missed == inj["lost_frames"]


def test_host_side_garbage_is_flagged_by_the_rig_and_harmless():
    import serial

    with VirtualRigProcess("cartpole") as vr:
        with RigConnection(port=vr.port, rig_config="cartpole", clear_estop_on_connect=True) as rig:
            rng = np.random.default_rng(0)
            states: list = []
            done = threading.Event()

            def collect():  # every STATE, so the one carrying RX_ERROR is not missed
                s = None
                while not done.is_set():
                    s = rig.wait_state(s.seq if s else None, timeout=0.5) or s
                    states.append(s)

            t = threading.Thread(target=collect)
            t.start()
            noise = serial.Serial(vr.pty, 1_000_000)  # a second writer on the same line
            try:
                for _ in range(5):
                    noise.write(rng.integers(1, 256, 40, dtype=np.uint8).tobytes() + b"\x00")
                    time.sleep(0.02)
            finally:
                noise.close()
                time.sleep(0.05)
                done.set()
                t.join(5)
            assert any(s is not None and s.has(proto.StatusFlags.RX_ERROR) for s in states)
            rig.configure(watchdog_ms=100)  # the link still works both ways
            assert _run_loop(rig, 20, volts=0.2) == 20
        assert vr.quiesce()["firmware"]["rx_errors"] >= 5


@pytest.mark.slow
def test_repeated_unplugs_under_corruption(tmp_path):
    link = tmp_path / "rig0"
    events: list[str] = []
    opts = dict(ber=2e-3, garbage_rate=10.0, faults_from_start=True, link=str(link), replug_after=0.2)
    with VirtualRigProcess("furuta", seed=5, **opts) as vr:
        with RigConnection(
            port=str(link), rig_config="furuta", on_event=lambda n, i: events.append(n)
        ) as rig:
            for k in range(3):
                _run_loop(rig, 200, volts=0.0)
                vr.unplug()
                assert vr.wait_port_lines(k + 2, timeout=10)
                deadline = time.monotonic() + 15
                while events.count("reconnected") < k + 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
            assert _run_loop(rig, 200, volts=0.0) == 200
            st = rig.stats()
        assert st.disconnects == 3 and st.reconnects == 3 and st.rx_errors > 0
