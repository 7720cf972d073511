"""Benchmark of hardware.logger.RunLogger with realistic /state (+ /command) records.

Prints: (0) the writer thread's encode cost per /state record, log format v1 (plain ``json.dumps`` of the
record) vs v2 (``log_schema.to_file`` + ``json.dumps``: {sec, nsec} times) measured side by side in this run,
(1) end-to-end drain throughput (msgs/s from first write() to the finished file), (2) a paced run at the
target rate with the default queue: drops (must be 0), (3) the caller-side cost of write() (us), (4) bytes
per message on disk. Target: >= 20,000 msgs/s with zero loss (the control loop needs 1-2 k/s).

    python bench/bench_logger.py [--seconds 3] [--rate 20000] [--compression zstd]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

from hardware.log_check import check_file
from hardware.logger import RunLogger, encode_record

TARGET = 20_000
META = {"rig": "cartpole", "controller": "bench"}


def state(i: int) -> dict:
    t = i * 0.0005
    return {
        "seq": i,
        "device_time_us": i * 500,
        "host_time_ns": time.time_ns(),
        "positions": [0.1234567 * math.sin(t), math.pi + 0.05 * math.cos(3 * t)],
        "velocities": [0.3456789 * math.cos(t), -0.15 * math.sin(3 * t)],
        "counts": [int(1e4 * math.sin(t)), 2048 + int(80 * math.cos(3 * t))],
        "flags": 0,
        "current": 0.0123,
    }


def encode_cost(n: int) -> tuple[float, float]:
    """us per /state record: v1 encoding (json.dumps of the record as written) vs v2 (encode_record)."""
    recs = [state(i) for i in range(n)]
    best = [float("inf"), float("inf")]
    for _ in range(3):  # best of three, alternating, so both see the same machine load
        t0 = time.perf_counter()
        for r in recs:
            json.dumps(r, separators=(",", ":"), allow_nan=False).encode()
        best[0] = min(best[0], (time.perf_counter() - t0) / n * 1e6)
        t0 = time.perf_counter()
        for r in recs:
            encode_record(r, "/state")
        best[1] = min(best[1], (time.perf_counter() - t0) / n * 1e6)
    return best[0], best[1]


def drain_throughput(n: int, compression: str) -> tuple[float, dict]:
    recs = [state(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        log = RunLogger(d, META, run_name="burst", queue_size=n + 1, compression=compression)
        for r in recs:
            log.write("/state", r)
        st = log.close(timeout=600.0)  # a loaded machine drains 100 k records slowly
        dt = time.perf_counter() - t0
        assert check_file(st["files"][0]).ok
    return n / dt, st


def paced(rate: float, seconds: float, compression: str) -> tuple[float, dict, list[float]]:
    batch = max(1, int(rate / 1000))  # one batch per millisecond
    lat: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        log = RunLogger(d, META, run_name="paced", compression=compression)
        i = 0
        t_start = time.perf_counter()
        t_next = t_start
        while time.perf_counter() - t_start < seconds:
            for _ in range(batch):
                r = state(i)
                a = time.perf_counter_ns()
                log.write("/state", r)
                lat.append((time.perf_counter_ns() - a) / 1e3)
                i += 1
            t_next += batch / rate
            delay = t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        achieved = i / (time.perf_counter() - t_start)
        st = log.close()
        rep = [check_file(f) for f in st["files"]]
        assert all(r.ok for r in rep)
        st["gaps"] = sum(r.seq["/state"].n_gaps for r in rep)
        st["bytes_per_msg"] = st["bytes"] / max(st["written"], 1)
    return achieved, st, lat


def loop_lateness(rate_hz: float, seconds: float, log: RunLogger | None) -> list[float]:
    """A fixed-rate sleep loop (like controllers/loop.py) logging /state + /command each tick: wake-up
    lateness in us. Compare with and without the logger's writer thread competing for the GIL."""
    period = 1.0 / rate_hz
    late: list[float] = []
    t_next = time.perf_counter() + period
    for i in range(int(seconds * rate_hz)):
        delay = t_next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        late.append((time.perf_counter() - t_next) * 1e6)
        if log is not None:
            log.write("/state", state(i))
            log.write("/command", {"seq": i, "host_time_ns": time.time_ns(), "voltage": 0.5})
        t_next += period
    return late


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rates", default=f"{TARGET},{2 * TARGET}", help="paced rates to try (msgs/s)")
    ap.add_argument("--burst", type=int, default=100_000)
    ap.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "none"])
    a = ap.parse_args()

    v1, v2 = encode_cost(20_000)
    print(f"encode /state record: v1 {v1:.2f} us, v2 {v2:.2f} us (v2/v1 {v2 / v1:.2f}x)")
    thr, st = drain_throughput(a.burst, a.compression)
    print(f"drain throughput ({a.burst} /state records, {a.compression}): {thr:,.0f} msgs/s "
          f"= {thr / TARGET:.2f} x target; dropped {st['dropped']}, {st['bytes'] / a.burst:.1f} B/msg")
    best, best_drops = 0.0, None
    for rate in (float(r) for r in a.rates.split(",")):
        achieved, st, lat = paced(rate, a.seconds, a.compression)
        print(f"paced {rate:,.0f}/s for {a.seconds} s: achieved {achieved:,.0f} msgs/s; "
              f"written {st['written']}, "
              f"dropped {st['dropped']}, seq gaps {st['gaps']}, write errors {st['write_errors']}, "
              f"{st['bytes_per_msg']:.1f} B/msg")
        print(f"  write() caller cost: p50 {pct(lat, 0.5):.2f} us, p99 {pct(lat, 0.99):.2f} us, "
              f"p99.9 {pct(lat, 0.999):.2f} us, max {max(lat):.1f} us")
        if st["dropped"] == 0 and st["gaps"] == 0 and st["write_errors"] == 0 and achieved > best:
            best, best_drops = achieved, st["dropped"]
    for label, with_log in (("without logger", False), ("with logger", True)):
        with tempfile.TemporaryDirectory() as d:
            log = RunLogger(d, META, run_name="loop") if with_log else None
            late = loop_lateness(1000.0, a.seconds, log)
            if log is not None:
                log.close()
        print(f"1 kHz loop {label}: wake-up lateness p50 {pct(late, 0.5):.0f} us, "
              f"p99 {pct(late, 0.99):.0f} us, "
              f"p99.9 {pct(late, 0.999):.0f} us, max {max(late):.0f} us")
    verdict = "PASS" if best >= 0.95 * TARGET else "BELOW TARGET"
    print(f"RESULT sustained {best:,.0f} msgs/s with {best_drops} drops (target {TARGET:,}): "
          f"ratio {best / TARGET:.2f} {verdict}")


if __name__ == "__main__":
    main()
