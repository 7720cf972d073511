"""What a request inside the predictor's limits costs the server, and what stream clients see meanwhile.

Starts the real predictor process (``python -m export.server``) on the shipped cart-pole model (or --model),
sends one ``predict`` per B x T shape and prints the server's RSS before, its peak while the request ran
(sampled from /proc every 5 ms) and after, with the wall time. Then runs ``--stream-clients`` stream_step
clients paced at ``--rate-hz`` (one thread each), first alone, then while one B x T ``--batch`` predict runs,
(after opening ``--streams`` streams: RSS with the stream limit reached)
and prints their round-trip latency percentiles, how many steps took longer than one control period and how
many timed out (``--stream-timeout-ms``; a late step does not make the next ones early, as in a control loop).

    PYTHONPATH=$PWD python bench/bench_predictor_limits.py
    PYTHONPATH=$PWD python bench/bench_predictor_limits.py --no-ort-arena       # onnxruntime arena off
    PYTHONPATH=$PWD python bench/bench_predictor_limits.py --server-src /work/main --shapes 16x256,64x256
        # the same requests against another checkout's server (before / after)
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.client import PredictorError, PredictorProcess  # noqa: E402
from export.shipped import shipped_onnx  # noqa: E402


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


class Sampler:
    """Peak VmRSS of a process, sampled every ``period_s`` in a thread, between start() and stop()."""

    def __init__(self, pid: int, period_s: float = 0.005) -> None:
        self.pid, self.period_s, self.peak = pid, period_s, 0.0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(self.period_s)

    def __enter__(self) -> Sampler:
        self._th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._th.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def window(b: int, t: int, n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.1, (b, t, n)).astype(np.float32)
    return x, rng.normal(0, 0.5, (b, t, m)).astype(np.float32)


def shapes_table(proc: PredictorProcess, shapes: list[tuple[int, int]], n: int, m: int) -> None:
    print(f"{'B x T':>12} {'steps':>7} {'wall s':>7} {'RSS before':>10} {'peak':>7} {'after':>7}  reply")
    with proc.client(600_000) as c:
        for b, t in shapes:
            x, u = window(b, t, n, m)
            before = rss_mb(proc.pid)
            t0 = time.perf_counter()
            with Sampler(proc.pid) as s:
                try:
                    c.predict(x, u)
                    what = "ok"
                except PredictorError as exc:
                    what = str(exc)[:60]
            wall = time.perf_counter() - t0
            after = rss_mb(proc.pid)
            print(f"{f'{b} x {t}':>12} {b * t:>7} {wall:>7.2f} {before:>8.0f} MB {s.peak:>4.0f} MB "
                  f"{after:>4.0f} MB  {what}")


def stream_clients(proc: PredictorProcess, k: int, rate_hz: float, duration_s: float, n: int, m: int,
                   timeout_ms: float) -> tuple[np.ndarray, int]:
    """k paced stream_step clients for duration_s: all round-trip latencies (ms) and the timeouts."""
    lat: list[list[float]] = [[] for _ in range(k)]
    timeouts = [0] * k
    go = threading.Barrier(k)

    def run(i: int) -> None:
        with proc.client(timeout_ms) as c:
            try:
                c.stream_reset()
            except PredictorError:
                timeouts[i] += 1  # stream_step re-primes the stream (stream_unknown) once the server answers
            go.wait()
            period = 1.0 / rate_hz
            nxt = time.perf_counter()
            end = nxt + duration_s
            step = 0
            while nxt < end:
                xt = np.sin(np.arange(n) + 0.01 * step).astype(np.float32) * 0.1
                t0 = time.perf_counter()
                try:
                    c.stream_step(xt, np.zeros(m, np.float32))
                    lat[i].append((time.perf_counter() - t0) * 1e3)
                except PredictorError:
                    timeouts[i] += 1
                step += 1
                nxt = max(nxt + period, time.perf_counter())  # a late step does not make the next ones early
                time.sleep(max(0.0, nxt - time.perf_counter()))

    ths = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return np.concatenate([np.asarray(v) for v in lat]), sum(timeouts)


def report(name: str, lat: np.ndarray, timeouts: int, period_ms: float) -> None:
    if lat.size == 0:
        print(f"{name}: no step answered, {timeouts} timeouts")
        return
    p50, p99 = np.percentile(lat, (50, 99))
    late = int((lat > period_ms).sum())
    print(f"{name}: {lat.size} steps, p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lat.max():.1f} ms, "
          f"> {period_ms:g} ms: {late} ({100 * late / lat.size:.1f} %), timeouts {timeouts}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="full-window ONNX (default: the shipped cart-pole model)")
    ap.add_argument("--shapes", default="1x256,16x256,64x256,256x256,1024x64,4096x16",
                    help="comma-separated BxT predict shapes")
    ap.add_argument("--batch", default="256x256", help="the BxT predict run beside the stream clients")
    ap.add_argument("--stream-clients", type=int, default=8)
    ap.add_argument("--rate-hz", type=float, default=100.0, help="each stream client's step rate")
    ap.add_argument("--stream-timeout-ms", type=float, default=1000.0)
    ap.add_argument("--streams", type=int, default=300,
                    help="streams to open (0: skip); the server keeps the newest 256")
    ap.add_argument("--no-ort-arena", action="store_true", help="pass --no-ort-arena to the server")
    ap.add_argument("--server-src", default=None, help="PYTHONPATH of the server process (another checkout)")
    ap.add_argument("--server-args", default="", help="extra server arguments, space-separated")
    args = ap.parse_args()
    model = str(Path(args.model).resolve()) if args.model else str(shipped_onnx("cartpole"))
    extra = args.server_args.split() + (["--no-ort-arena"] if args.no_ort_arena else [])
    env = {"PYTHONPATH": args.server_src} if args.server_src else None
    if args.server_src:  # `python -m` puts the working directory first on sys.path
        os.chdir(args.server_src)
    with PredictorProcess(model, extra_args=extra, env=env) as proc:
        with proc.client(10_000) as c:
            info = c.info()
        n, m = info["n"], info["m"]
        print(f"model {model}: n {n}, m {m}, max_len {info['max_len']}; server src "
              f"{os.getcwd()}; limits {info.get('limits', 'none (older server)')}")
        print(f"server RSS after load {rss_mb(proc.pid):.0f} MB")
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
        shapes_table(proc, shapes, n, m)
        print(f"server peak RSS over all requests (VmHWM) {rss_mb(proc.pid, 'VmHWM'):.0f} MB")

        if args.streams:
            before = rss_mb(proc.pid)
            for _ in range(args.streams):
                with proc.client(10_000) as c:
                    c.stream_reset()
                    c.stream_step(np.zeros(n, np.float32), np.zeros(m, np.float32))
            with proc.client(10_000) as c:
                held = c.health()["streams"]
            cap = info.get("limits", {}).get("max_streams")
            print(f"{args.streams} streams opened ({held} held, at most {cap}): server RSS {before:.0f} -> "
                  f"{rss_mb(proc.pid):.0f} MB")

        period_ms = 1e3 / args.rate_hz
        lat, to = stream_clients(proc, args.stream_clients, args.rate_hz, 3.0, n, m, args.stream_timeout_ms)
        report(f"{args.stream_clients} stream clients at {args.rate_hz:g} Hz, alone", lat, to, period_ms)
        b, t = (int(v) for v in args.batch.split("x"))
        x, u = window(b, t, n, m, seed=1)
        done: dict[str, float] = {}

        def batch() -> None:
            with proc.client(600_000) as bc:
                t0 = time.perf_counter()
                try:
                    bc.predict(x, u)
                except PredictorError as exc:
                    print(f"batch: {exc}")
                done["s"] = time.perf_counter() - t0

        th = threading.Thread(target=batch)
        th.start()
        time.sleep(0.05)
        dur = 3.0
        lat, to = stream_clients(proc, args.stream_clients, args.rate_hz, dur, n, m, args.stream_timeout_ms)
        th.join()
        report(f"{args.stream_clients} stream clients at {args.rate_hz:g} Hz, during a B{b} x T{t} predict "
               f"({done.get('s', float('nan')):.1f} s)", lat, to, period_ms)
        if done.get("s", 0) < dur:
            print(f"(the batch ended after {done.get('s', 0):.1f} s of the {dur:g} s window)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
