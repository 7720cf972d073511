"""Benchmark: protocol.py hot path (STATE encode/decode, stream decoding) and, with the host firmware, the
HEARTBEAT round trip over a real pty and the received STATE rate.

    python hardware/firmware/bench_protocol.py [--fw PATH_TO_host_fw] [--seconds 3]

Without --fw the host firmware is built into a temporary directory with make (needs gcc).
Prints percentiles; asserts nothing (timing is machine dependent)."""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import tty
from pathlib import Path

import serial

from hardware import protocol as p

FW_DIR = Path(__file__).resolve().parent


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs)
    q = [xs[int(f * (len(xs) - 1))] for f in (0.5, 0.9, 0.99)]
    return f"median {q[0]:.2f}  p90 {q[1]:.2f}  p99 {q[2]:.2f}  max {xs[-1]:.2f}"


def bench_codec(n: int = 20000) -> None:
    state = p.State(
        123456789, (1234, -5678), 150.0, 2.5, p.StatusFlags.CONNECTED | p.StatusFlags.MOTOR_ENABLED
    )
    frame = p.encode(state, 7)
    enc, dec = [], []
    for i in range(n):
        t0 = time.perf_counter_ns()
        p.encode(state, i & 0xFFFF)
        t1 = time.perf_counter_ns()
        p.decode_frame(frame[:-1])
        t2 = time.perf_counter_ns()
        enc.append((t1 - t0) / 1e3)
        dec.append((t2 - t1) / 1e3)
    print(f"STATE encode us: {percentiles(enc)}")
    print(f"STATE decode us: {percentiles(dec)}")
    stream = frame * 1000
    t0 = time.perf_counter()
    out = p.FrameDecoder().feed(stream)
    dt = time.perf_counter() - t0
    print(f"FrameDecoder.feed: {dt / len(out) * 1e6:.2f} us/frame ({len(out)} frames in one chunk)")


def bench_fil(fw: Path, seconds: float) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    proc = subprocess.Popen([str(fw), "--fd", str(master)], pass_fds=[master], stderr=subprocess.DEVNULL)
    os.close(master)
    try:
        ser = serial.Serial(os.ttyname(slave), timeout=0.05)
        dec = p.FrameDecoder()
        ser.write(b"\x00" + p.encode(p.Hello(), 0))
        rtts: list[float] = []
        n_state = 0
        ts: list[int] = []
        seq = 1
        t_end = time.monotonic() + seconds
        t_start = time.monotonic()
        while time.monotonic() < t_end:
            token = seq
            t0 = time.perf_counter_ns()
            ser.write(p.encode(p.Heartbeat(token), seq))
            seq = p.next_seq(seq)
            got = False
            while not got and time.monotonic() < t_end:
                for _, msg in dec.feed(ser.read(max(1, ser.in_waiting))):
                    if isinstance(msg, p.State):
                        n_state += 1
                        ts.append(msg.timestamp_us)
                    elif isinstance(msg, p.Heartbeat) and msg.token == token:
                        rtts.append((time.perf_counter_ns() - t0) / 1e3)
                        got = True
        elapsed = time.monotonic() - t_start
        ser.close()
        print(
            f"FIL heartbeat RTT us ({len(rtts)} samples): {percentiles(rtts)}" if rtts else "no RTT samples"
        )
        print(f"FIL STATE received: {n_state / elapsed:.0f} Hz; decoder {dec.stats()}")
        if len(ts) > 1:
            dts = [b - a for a, b in zip(ts, ts[1:], strict=False)]
            print(f"device STATE interval us: {percentiles([float(d) for d in dts])}")
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        os.close(slave)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fw", type=Path, help="path of a built host_fw (default: build one)")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    bench_codec()
    with tempfile.TemporaryDirectory() as tmp:
        fw = args.fw
        if fw is None:
            subprocess.run(["make", "-s", "-C", str(FW_DIR), "host", f"BUILD={tmp}"], check=True)
            fw = Path(tmp) / "host_fw"
        bench_fil(fw, args.seconds)


if __name__ == "__main__":
    main()
