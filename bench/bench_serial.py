"""Serial-link benchmark over a real pty: a virtual-rig subprocess and RigConnection.

Prints:
  * raw pty echo round trip (pyserial host end <-> pty master in this process): the floor;
  * HEARTBEAT round trip through the virtual rig (driver ping): p50 / p99;
  * command -> STATE latency: time from send_command(v) until a STATE reports applied_voltage == v
    (telemetry every loop tick, 1 kHz): p50 / p99;
  * closed loop at 1 kHz telemetry: state -> command turnaround in the driver's caller (p50 / p99), the
    implied maximum loop rate, the fraction of states answered, frames missed, and the rig's lateness.

Usage: python bench/bench_serial.py [--rig cartpole] [--n 2000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import time

import numpy as np
import serial

from hardware.driver import RigConnection
from hardware.serial_pty import PtyPort
from hardware.virtual_rig import VirtualRigProcess


def _pct(xs: list[float]) -> str:
    a = np.asarray(xs)
    return (
        f"p50 {np.percentile(a, 50):8.1f} us   p99 {np.percentile(a, 99):8.1f} us   "
        f"max {a.max():8.1f} us   (n={a.size})"
    )


def raw_pty_echo(n: int) -> list[float]:
    """Round trip host write -> master read -> master write -> host read, 16-byte frames."""
    port = PtyPort()
    path = port.open()
    host = serial.Serial(path, 1_000_000, timeout=1.0)
    out = []
    msg = bytes(range(1, 16)) + b"\x00"
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            host.write(msg)
            got = b""
            while len(got) < len(msg):
                select.select([port.fileno()], [], [], 1.0)
                got += port.read()
            port.write(got)
            host.read(len(msg))
            out.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        host.close()
        port.close()
    return out


def heartbeat_rtt(rig: RigConnection, n: int) -> list[float]:
    out = []
    for _ in range(n):
        rtt = rig.ping(timeout=0.5)
        if rtt is not None:
            out.append(rtt * 1e6)
    return out


def command_to_state(rig: RigConnection, n: int) -> list[float]:
    """send_command(v) -> first STATE with applied_voltage == v (distinct v each time)."""
    out = []
    for i in range(n):
        v = round(0.01 * (1 + i % 50), 2) * (1 if i % 2 else -1)
        s = rig.wait_state(timeout=0.5)
        t0 = time.monotonic_ns()
        rig.send_command(v)
        while s is not None:
            s = rig.wait_state(s.seq, timeout=0.5)
            if s is not None and abs(s.applied_voltage - v) < 1e-6:
                out.append((s.host_time_ns - t0) / 1e3)
                break
    return out


def closed_loop(rig: RigConnection, seconds: float) -> dict:
    """React to every STATE with a command as fast as possible."""
    turn, states, cmds = [], 0, 0
    st0 = rig.stats()
    s = rig.wait_state(timeout=1.0)
    end = time.monotonic() + seconds
    while time.monotonic() < end and s is not None:
        s = rig.wait_state(s.seq, timeout=0.5)
        if s is None:
            break
        states += 1
        rig.send_command(0.0)
        cmds += 1
        turn.append((time.monotonic_ns() - s.host_time_ns) / 1e3)
    st1 = rig.stats()
    return {
        "turnaround_us": turn,
        "states": states,
        "commands": cmds,
        "device_states": st1.states - st0.states,
        "missed": st1.frames_missed - st0.frames_missed,
        "rx_errors": st1.rx_errors - st0.rx_errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rig", default="cartpole")
    ap.add_argument("--n", type=int, default=2000, help="samples per latency measurement")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of the closed-loop run")
    args = ap.parse_args()
    print(f"bench_serial: rig={args.rig} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    print(f"raw pty echo (16 B)            {_pct(raw_pty_echo(args.n))}")
    with VirtualRigProcess(args.rig, telemetry_divider=1) as vr:
        with RigConnection(port=vr.port, rig_config=args.rig, heartbeat_interval_s=0) as rig:
            rig.configure(state_divider=1, watchdog_ms=1000)
            rig.clear_estop()
            print(f"HEARTBEAT round trip           {_pct(heartbeat_rtt(rig, args.n))}")
            print(f"command -> applied in STATE    {_pct(command_to_state(rig, args.n // 2))}")
            r = closed_loop(rig, args.seconds)
            t = r["turnaround_us"]
            p99 = float(np.percentile(t, 99))
            print(f"closed loop turnaround         {_pct(t)}")
            p50 = statistics.median(t)
            print(f"  implied max loop rate (1/p50) {1e6 / p50:9.0f} Hz   (1/p99) {1e6 / p99:9.0f} Hz")
            rate = r["states"] / args.seconds
            print(
                f"  at 1 kHz telemetry: answered {r['states']}/{r['device_states']} states "
                f"({rate:.0f}/s), missed frames {r['missed']}, rx errors {r['rx_errors']}"
            )
        st = vr.stats()
        print(
            f"virtual rig: max lateness {st['max_lateness_ms']:.2f} ms, overruns {st['overruns']}, "
            f"skipped ticks {st['skipped_ticks']}, ticks {st['firmware']['ticks']}"
        )


if __name__ == "__main__":
    main()
