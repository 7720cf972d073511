"""Soak: control loop + predictor + logger on a virtual rig for minutes, with fuzz traffic at the predictor.

    python bench/soak.py [--minutes 10] [--rig cartpole] [--controller swingup] [--model model.onnx]
                         [--fuzz-rate 200] [--out DIR] [--no-realtime]

One predictor process (``rigfm serve``) serves both the loop (``rigfm run``'s session with ``--endpoint``:
one-step stream + k-step monitor, MPC with ``--controller mpc``) and a second process that sends it
malformed messages (random bytes, bad JSON, wrong versions/methods/ids, bad array declarations, NaN payloads,
huge headers) at ``--fuzz-rate`` per second, each expecting an error reply, plus a valid ``info`` now and
then.  Prints, measured in this one run: RSS of the loop process and of the predictor (after 10 s of warm-up,
at the end, growth, peak), loop overruns, late predictions, predictor failures, logged / dropped frames and
the fuzz counts.  Without ``--model`` the shipped checkpoint of the rig is exported (needs torch, in a
subprocess).  The machine is shared: the figures are this run's, not a bound.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process (MB), from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ------------------------------------------------------------------------------------------ fuzz traffic
def _malformed(rng, i: int) -> list[bytes]:
    import numpy as np

    from export import schema

    kind = i % 9
    delim = [b""]
    hdr = {"v": 1, "id": f"f{i}", "method": "predict"}
    if kind == 0:
        return delim + [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
    if kind == 1:
        return delim + [b"\xff\xfe" + rng.bytes(8)]
    if kind == 2:
        return delim + [json.dumps([1, 2, 3]).encode()]
    if kind == 3:
        return delim + [json.dumps({**hdr, "v": int(rng.integers(2, 99))}).encode()]
    if kind == 4:
        return delim + [json.dumps({**hdr, "method": "m" + rng.bytes(3).hex()}).encode()]
    if kind == 5:
        h = {**hdr, "arrays": [{"name": "x", "shape": [1, 2, 4], "dtype": "float32"}]}
        return delim + [json.dumps(h).encode(), rng.bytes(int(rng.integers(0, 31)))]
    if kind == 6:
        h = {**hdr, "arrays": [{"name": "x", "shape": [[-1], [1 << 40], ["a"]][i % 3], "dtype": "float32"}]}
        return delim + [json.dumps(h).encode(), b"\0" * 4]
    if kind == 7:
        x = np.full((1, 3, 4), [np.nan, np.inf][i % 2], np.float32)
        return schema.encode_request("predict", f"n{i}", {"x": x, "u": np.zeros((1, 3, 1), np.float32)})
    return delim + [b"{" + b" " * (60 * 1024) + b"}"]


def fuzz_child(endpoint: str, rate: float, seconds: float, out: str) -> int:
    """The fuzz process: malformed messages at ``rate``/s for ``seconds``; counts into ``out`` (JSON)."""
    import numpy as np
    import zmq

    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))  # the soak ended early: report
    rng = np.random.default_rng(0)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent = replies = errors = info_ok = refused = 0
    period = 1.0 / rate
    t_end = time.monotonic() + seconds
    nxt = time.monotonic()
    i = 0
    while time.monotonic() < t_end and not stop[0]:
        msg = ([b"", json.dumps({"v": 1, "id": f"i{i}", "method": "info"}).encode()] if i % 50 == 49
               else _malformed(rng, i))
        i += 1
        try:
            sock.send_multipart(msg, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:  # the server's queue is full (it is busy): counted, never blocks this process
            refused += 1
        while sock.poll(0):
            frames = sock.recv_multipart()
            replies += 1
            try:
                head = json.loads(frames[1] if frames and frames[0] == b"" else frames[0])
            except (ValueError, IndexError):
                continue
            if head.get("ok") is False or "error" in head:
                errors += 1
            elif str(head.get("id", "")).startswith("i"):
                info_ok += 1
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and sock.poll(100):
        sock.recv_multipart()
        replies += 1
    Path(out).write_text(json.dumps({"sent": sent, "replies": replies, "error_replies": errors,
                                     "info_ok": info_ok, "refused_hwm": refused}))
    return 0


# ------------------------------------------------------------------------------------------------- soak
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    ap.add_argument("--rig", default="cartpole")
    ap.add_argument("--controller", choices=("lqr", "swingup", "mpc"), default="swingup")
    ap.add_argument("--model", default=None, help=".onnx (default: export the rig's shipped checkpoint)")
    ap.add_argument("--fuzz-rate", type=float, default=200.0, help="malformed messages per second")
    ap.add_argument("--out", default=None, help="folder for the run log (default: a temporary one)")
    ap.add_argument("--no-realtime", action="store_true", help="no SCHED_FIFO for the loop (default: on, "
                                                               "as `rigfm run --realtime`, if permitted)")
    ap.add_argument("--fuzz-child", nargs=4, metavar=("ENDPOINT", "RATE", "SECONDS", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fuzz_child:
        ep, rate, secs, out = args.fuzz_child
        return fuzz_child(ep, float(rate), float(secs), out)
    if not (args.minutes > 0 and args.fuzz_rate > 0):
        ap.error("--minutes and --fuzz-rate must be > 0")

    from controllers.demo import export_default_model
    from controllers.session import RunOptions, run_session
    from export.client import PredictorProcess

    tmp = tempfile.TemporaryDirectory(prefix="rigfm-soak-")
    work = Path(tmp.name)
    model = args.model or str(export_default_model(work, args.rig)[0])
    seconds = args.minutes * 60.0
    out = Path(args.out) if args.out else work / "logs"
    fuzz_out = work / "fuzz.json"
    samples: list[tuple[float, float, float]] = []  # (t, loop MB, predictor MB)
    with PredictorProcess(model) as pred:
        fuzz = subprocess.Popen([sys.executable, __file__, "--fuzz-child", pred.endpoint, str(args.fuzz_rate),
                                 str(seconds), str(fuzz_out)])
        stop = threading.Event()
        t0 = time.monotonic()  # RSS times below: seconds since the predictor was up (setup included)

        def sample() -> None:
            while not stop.wait(5.0):
                try:
                    samples.append((time.monotonic() - t0, rss_mb(), rss_mb(pred.pid)))
                except OSError as exc:  # the predictor died: the summary says so
                    print(f"soak: RSS sample failed: {exc}", file=sys.stderr)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            res = run_session(RunOptions(rig=args.rig, controller=args.controller, virtual=True,
                                         endpoint=pred.endpoint, duration_s=seconds, log_dir=str(out),
                                         status=False, stale_ms=200.0, realtime=not args.no_realtime))
        finally:
            stop.set()
            sampler.join()
            if fuzz.poll() is None:
                fuzz.terminate()  # the fuzzer writes its counts and exits
            try:
                fuzz.wait(timeout=30)
            except subprocess.TimeoutExpired:
                fuzz.kill()
                fuzz.wait()
        samples.append((time.monotonic() - t0, rss_mb(), rss_mb(pred.pid)))
        pred_alive = pred.proc is not None and pred.proc.poll() is None
    fz = json.loads(fuzz_out.read_text()) if fuzz_out.exists() else {}
    warm = [r for r in samples if r[0] >= 10.0] or samples
    s, p, lg = res.stats, res.predictor, res.logger
    print(f"soak: {args.minutes:g} min, {args.rig} {args.controller}, predictor {model}, "
          f"fuzz {args.fuzz_rate:g}/s")
    for name, col in (("loop process", 1), ("predictor", 2)):
        first, last, peak = warm[0][col], warm[-1][col], max(r[col] for r in warm)
        print(f"RSS {name:<12} {first:8.1f} MB at {warm[0][0]:.0f} s -> {last:8.1f} MB at "
              f"{warm[-1][0]:.0f} s: growth {last - first:+.1f} MB, peak {peak:.1f} MB")
    print(f"loop: {s['ticks']} ticks at {s['rate_hz']:.1f} Hz, overruns {s['overruns']} "
          f"({s['overrun_pct']:.3f} %), period err p99 {s['period_err_p99_us']:.0f} us, "
          f"max {s['period_err_max_us']:.0f} us; fault {res.fault}")
    print(f"predictions: requests {p.get('pred_requests')}, late (steps skipped) {p.get('pred_late')}, "
          f"late predictions {p.get('late_predictions')}, failures {p.get('pred_failures')}, "
          f"down events {len(p.get('pred_down_events', []))}")
    print(f"log: frames logged {lg.get('written')}, dropped {lg.get('dropped')}, files {len(res.log_files)}")
    print(f"fuzz: sent {fz.get('sent')}, refused (queue full) {fz.get('refused_hwm')}, replies "
          f"{fz.get('replies')}, error replies {fz.get('error_replies')}, info ok {fz.get('info_ok')}; "
          f"predictor alive at the end: {pred_alive}")
    tmp.cleanup()
    return 0 if res.ok and pred_alive else 1


if __name__ == "__main__":
    sys.exit(main())
