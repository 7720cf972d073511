"""Predictor latency of a deployed model on this machine, torch-free: ``rigfm latency model.onnx``.

Starts the predictor process the controllers use (``python -m export.server``), then times at batch 1:

* ``predict`` of a T-step window: in-process onnxruntime vs the ZeroMQ round trip,
* ``stream_step`` (the control loop's call): in-process stream vs round trip, back to back,
* ``stream_step`` paced at the loop rate (idle between calls, the 500 Hz loop's pattern),

and checks them against the targets of docs/predictor.md: round trip p99 <= 1.5 ms, ZMQ overhead (round
trip minus in-process onnxruntime, p50) <= 0.15 ms. "transport" is the round trip minus the handling time the
server reports in each reply. The comparison with torch eager needs torch: ``bench/bench_predictor.py``.
The timing helpers here are shared with that bench.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fm_core.cli_types import call_with_args, finite_float, int_range

TARGET_RTT_P99_MS = 1.5
TARGET_OVERHEAD_MS = 0.15


# ------------------------------------------------------------------------------------------------ timing
def timeit(fn: Callable[[], object], iters: int, warmup: int = 20) -> np.ndarray:
    """Per-call wall times in ms, ``iters`` calls back to back after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def timeit_interleaved(
    fns: list[Callable[[], object]], iters: int, warmup: int = 10, block: int = 50
) -> list[np.ndarray]:
    """Call the functions in alternating blocks (A*block, B*block, C*block, A*block, ...).

    Blocks keep each path warm (the steady state a control loop sees) while the alternation spreads
    machine-load drift over all of them. ``block=1`` interleaves call by call (every path then finds caches
    evicted by the others).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    out = [np.empty(iters) for _ in fns]
    for start in range(0, iters, block):
        stop = min(iters, start + block)
        for fn, ts in zip(fns, out, strict=True):
            for i in range(start, stop):
                t0 = time.perf_counter()
                fn()
                ts[i] = (time.perf_counter() - t0) * 1e3
    return out


def paced(fn: Callable[[], object], rate_hz: float, iters: int, spin_s: float = 0.0003) -> np.ndarray:
    """Call ``fn`` once per period at ``rate_hz``, idle in between the way the real-time loop is
    (controllers.loop.FixedRateRunner: sleep until ``spin_s`` before each tick, then spin); ms per call."""
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
    period = 1.0 / rate_hz
    out = np.empty(iters)
    nxt = time.perf_counter()
    for i in range(iters):
        nxt += period
        rest = nxt - time.perf_counter() - spin_s
        if rest > 0:
            time.sleep(rest)
        while time.perf_counter() < nxt:
            pass
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def pct(ts: np.ndarray) -> tuple[float, float]:
    """(p50, p99) of ``ts``."""
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` (Linux) to one CPU, e.g. the predictor on its own core."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Case:
    """One measured call path: round trips, the server's reported handling times, an in-process reference."""

    name: str
    rtt_ms: np.ndarray
    server_ms: np.ndarray
    local_ms: np.ndarray | None = None
    period_ms: float | None = None  # paced cases: the loop period
    compute_ms: np.ndarray | None = None  # the part of server_ms inside the model call (reply's compute_us)

    def summary(self) -> dict[str, Any]:
        """Percentiles (ms) of the round trip, transport and in-process reference; ticks over the period."""
        rtt50, rtt99 = pct(self.rtt_ms)
        tr50, tr99 = pct(self.rtt_ms - self.server_ms)
        out: dict[str, Any] = {
            "case": self.name,
            "calls": int(self.rtt_ms.size),
            "rtt_p50_ms": rtt50,
            "rtt_p99_ms": rtt99,
            "rtt_max_ms": float(self.rtt_ms.max()),
            "server_p50_ms": pct(self.server_ms)[0],
            "transport_p50_ms": tr50,
            "transport_p99_ms": tr99,
        }
        if self.compute_ms is not None and self.compute_ms.size == self.server_ms.size:
            out.update(
                server_compute_p50_ms=pct(self.compute_ms)[0],
                server_other_p50_ms=pct(self.server_ms - self.compute_ms)[0],
            )
        if self.local_ms is not None:
            loc50, loc99 = pct(self.local_ms)
            out.update(local_p50_ms=loc50, local_p99_ms=loc99, overhead_p50_ms=rtt50 - loc50)
        if self.period_ms is not None:
            out.update(period_ms=self.period_ms, over_period=int((self.rtt_ms > self.period_ms).sum()))
        return out


@dataclass
class Report:
    """Everything ``rigfm latency`` measured, with the machine it ran on."""

    machine: dict[str, Any]
    model: dict[str, Any]
    cases: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_rtt_p99_ms: float = TARGET_RTT_P99_MS
    max_overhead_ms: float = TARGET_OVERHEAD_MS

    def verdicts(self) -> list[dict[str, Any]]:
        """One line per (case, target): the measured value, the limit and whether it is met."""
        return verdicts(self.cases, self.max_rtt_p99_ms, self.max_overhead_ms)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: machine, model, limits, case summaries, verdicts, notes."""
        return {
            "machine": self.machine,
            "model": self.model,
            "targets": {"rtt_p99_ms": self.max_rtt_p99_ms, "overhead_p50_ms": self.max_overhead_ms},
            "cases": self.cases,
            "verdicts": self.verdicts(),
            "notes": self.notes,
        }


def verdicts(
    cases: list[dict[str, Any]],
    max_rtt_p99_ms: float = TARGET_RTT_P99_MS,
    max_overhead_ms: float = TARGET_OVERHEAD_MS,
) -> list[dict[str, Any]]:
    """Check case summaries against the limits: round trip p99, and the ZMQ overhead p50 (round trip minus
    in-process onnxruntime where the case has that reference, else the transport: round trip minus server)."""
    out = []
    for c in cases:
        checks = [("rtt_p99_ms", max_rtt_p99_ms)]
        checks.append(("overhead_p50_ms" if "overhead_p50_ms" in c else "transport_p50_ms", max_overhead_ms))
        for key, limit in checks:
            value = float(c[key])
            out.append(
                {"case": c["case"], "metric": key, "value": value, "limit": limit, "ok": value <= limit}
            )
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, CPUs this process may run on, load and library versions: the context of the numbers."""
    import onnxruntime
    import zmq

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus_online": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["affinity"] = sorted(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    return info


# ------------------------------------------------------------------------------------------------ measure
def measure(
    model_path: str | Path,
    *,
    window: int = 16,
    iters: int = 1000,
    rate_hz: float = 500.0,
    endpoint: str | None = None,
    server_cpu: int | None = None,
    stream_reprime: str = "shadow",
    progress: bool = True,
) -> Report:
    """Start the predictor for ``model_path`` and time its batch-1 paths (see the module docstring)."""
    from tqdm import tqdm

    from export.client import PredictorProcess
    from export.onnx_runtime import OnnxPredictor

    if iters < 10:
        raise ValueError(f"iters must be >= 10 (percentiles of fewer calls mean nothing), got {iters}")
    local = OnnxPredictor(model_path, find_step=True)
    me = local.meta
    if not 1 <= window <= me.max_len:
        raise ValueError(f"window must be in 1..{me.max_len} (the model's max_len), got {window}")
    report = Report(
        machine_info(),
        {
            "path": str(model_path),
            "step_path": local.step_path,
            "sha256": me.checkpoint_sha256,
            "n": me.n,
            "m": me.m,
            "context": me.context,
            "patch": me.patch,
            "step_cache": local.step_meta.step_cache if local.step_meta is not None else "",
        },
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, window, me.n)).astype(np.float32)
    u = rng.normal(size=(1, window, me.m)).astype(np.float32)
    seq_x = rng.normal(size=(iters + 64, me.n)).astype(np.float32)
    seq_u = rng.normal(size=(iters + 64, me.m)).astype(np.float32)
    phases = 3 if local.has_step and rate_hz > 0 else (2 if local.has_step else 1)
    bar = tqdm(total=phases, desc="latency", unit="phase", disable=not progress, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rigfm-latency-") as tmp:
        ep = endpoint or f"ipc://{tmp}/latency.sock"
        with (
            PredictorProcess(model_path, ep, extra_args=["--stream-reprime", stream_reprime]) as proc,
            proc.client(30_000) as client,
        ):
            if server_cpu is not None and proc.pid is not None:
                pin_process(proc.pid, server_cpu)
                report.machine["server_cpu"] = server_cpu
            served: list[float] = []
            computed: list[float] = []

            def record() -> None:
                served.append(client.last_server_us / 1e3)
                computed.append((client.last_compute_us or float("nan")) / 1e3)

            def remote_predict() -> None:
                client.predict(x, u)
                record()

            bar.set_postfix_str(f"predict T={window}")
            t_loc, t_rem = timeit_interleaved(
                [lambda: local.predict(x, u), remote_predict], iters, block=max(10, iters // 4)
            )
            report.cases.append(
                Case(
                    f"predict B1 T{window}", t_rem, np.asarray(served[-iters:]), t_loc,
                    compute_ms=np.asarray(computed[-iters:]),
                ).summary()
            )
            bar.update()
            if local.has_step:
                stream = local.stream(shadow=stream_reprime == "shadow")
                client.stream_reset()
                served.clear()
                computed.clear()
                idx = {"local": 0, "remote": 0}

                def local_step() -> None:
                    i = idx["local"] = (idx["local"] + 1) % len(seq_x)
                    stream.step(seq_x[i], seq_u[i])

                def remote_step() -> None:
                    i = idx["remote"] = (idx["remote"] + 1) % len(seq_x)
                    client.stream_step(seq_x[i], seq_u[i])
                    record()

                bar.set_postfix_str("stream_step")
                t_loc, t_rem = timeit_interleaved([local_step, remote_step], iters, block=max(10, iters // 4))
                report.cases.append(
                    Case(
                        "stream_step B1", t_rem, np.asarray(served[-iters:]), t_loc,
                        compute_ms=np.asarray(computed[-iters:]),
                    ).summary()
                )
                bar.update()
                if rate_hz > 0:
                    bar.set_postfix_str(f"stream_step @{rate_hz:g} Hz")
                    client.stream_reset()
                    served.clear()
                    computed.clear()
                    t_paced = paced(remote_step, rate_hz, iters)
                    case = Case(
                        f"stream_step @{rate_hz:g}Hz", t_paced, np.asarray(served),
                        period_ms=1e3 / rate_hz, compute_ms=np.asarray(computed),
                    )
                    report.cases.append(case.summary())
                    bar.update()
            else:
                report.notes.append("no step graph next to the model: stream_step not measured")
    bar.close()
    return report


# ------------------------------------------------------------------------------------------------ output
def format_report(report: Report) -> str:
    """The human-readable table printed by ``rigfm latency``."""
    m, mod = report.machine, report.model
    lines = [
        f"machine: {m['cpu']}; {m.get('cpus_online')} CPUs online, this process on {m.get('affinity', '?')}"
        + (f", predictor pinned to CPU {m['server_cpu']}" if "server_cpu" in m else "")
        + f"; load {m.get('loadavg', '?')}",
        f"         python {m['python']}, onnxruntime {m['onnxruntime']}, pyzmq {m['pyzmq']} "
        f"(libzmq {m['libzmq']})",
        f"model:   {mod['path']} (sha256 {str(mod['sha256'])[:12]}, context {mod['context']}, "
        f"step graph: {mod['step_cache'] or 'none'})",
        "",
        f"{'case':<22s} {'round trip p50':>14s} {'p99':>8s} {'in-process p50':>15s} {'overhead p50':>13s}"
        f" {'transport p50':>14s}",
    ]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for c in report.cases:
        lines.append(
            f"{c['case']:<22s} {ms(c['rtt_p50_ms']):>11s} ms {ms(c['rtt_p99_ms']):>8s} "
            f"{ms(c.get('local_p50_ms')):>15s} {ms(c.get('overhead_p50_ms')):>13s} "
            f"{ms(c['transport_p50_ms']):>14s}"
            + (f"   ({c['over_period']} of {c['calls']} over the {c['period_ms']:g} ms period)"
               if "period_ms" in c else "")
        )
    split = [c for c in report.cases if "server_compute_p50_ms" in c]
    if split:
        lines += ["", "where the round trip goes (p50, ms): transport + server decode/encode + inference"]
        for c in split:
            line = (
                f"  {c['case']:<22s} {c['transport_p50_ms']:.3f} + {c['server_other_p50_ms']:.3f}"
                f" + {c['server_compute_p50_ms']:.3f}"
            )
            if "local_p50_ms" in c:
                line += f"   (the same inference in-process: {c['local_p50_ms']:.3f})"
            lines.append(line)
    lines += [
        "",
        f"targets: round trip p99 <= {report.max_rtt_p99_ms:g} ms, "
        f"ZMQ overhead p50 <= {report.max_overhead_ms:g} ms",
    ]
    for v in report.verdicts():
        lines.append(
            f"  {'ok ' if v['ok'] else 'NO '} {v['case']:<22s} {v['metric']:<17s} {v['value']:.3f} ms"
            f" (limit {v['limit']:g})"
        )
    lines += [f"note: {n}" for n in report.notes]
    lines.append("torch eager vs onnxruntime needs torch: python bench/bench_predictor.py")
    return "\n".join(lines)


def run(args: Any) -> int:
    """Handler of ``rigfm latency``: 0, or 1 with ``--check`` when a target is missed, 2 on bad input."""
    from export.client import PredictorError
    from export.onnx_runtime import ModelFileError

    if args.client_cpu is not None:
        if not hasattr(os, "sched_setaffinity"):
            print("rigfm latency: --client-cpu needs Linux (sched_setaffinity)", file=sys.stderr)
            return 2
        try:
            os.sched_setaffinity(0, {args.client_cpu})  # before any zmq I/O thread exists: it inherits it
        except OSError as exc:
            print(f"rigfm latency: --client-cpu {args.client_cpu}: {exc}", file=sys.stderr)
            return 2
    limits = (("--max-rtt-p99-ms", args.max_rtt_p99_ms), ("--max-overhead-ms", args.max_overhead_ms))
    for flag, value in limits:
        if not value >= 0:  # also NaN
            print(f"rigfm latency: {flag} must be >= 0, got {value}", file=sys.stderr)
            return 2
    if not Path(args.model).is_file():
        print(f"rigfm latency: model file not found: {args.model}", file=sys.stderr)
        return 2
    if args.server_cpu is not None and args.server_cpu not in range(os.cpu_count() or 1):
        print(f"rigfm latency: --server-cpu {args.server_cpu}: no such CPU", file=sys.stderr)
        return 2
    try:
        report = call_with_args(measure, args, model_path=args.model, endpoint=args.bind,
                                progress=not args.no_progress)
    except (ValueError, ModelFileError) as exc:
        print(f"rigfm latency: {exc}", file=sys.stderr)
        return 2
    except PredictorError as exc:
        print(f"rigfm latency: the predictor failed: {exc}", file=sys.stderr)
        return 2
    report.max_rtt_p99_ms, report.max_overhead_ms = args.max_rtt_p99_ms, args.max_overhead_ms
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.check and not all(v["ok"] for v in report.verdicts()):
        return 1
    return 0


def add_arguments(p: Any) -> None:
    """Arguments of ``rigfm latency``."""
    p.add_argument("model", help="full-window ONNX file (its step graph is found through the metadata)")
    p.add_argument("--window", type=int_range(1, 65_536), default=16,
                   help="predict window length T in steps (default 16)")
    p.add_argument("--iters", type=int_range(10, 10**8), default=1000,
                   help="calls per measurement (default 1000)")
    p.add_argument(
        "--rate-hz", type=finite_float(0, 10_000, unit="Hz"), default=500.0,
        help="paced stream_step rate (default 500; 0: skip)"
    )
    p.add_argument("--bind", default=None, help="predictor endpoint (default: an ipc socket in a temp dir)")
    p.add_argument("--client-cpu", type=int_range(0, 65_535), default=None,
                   help="pin this process (the client) to one CPU")
    p.add_argument("--server-cpu", type=int_range(0, 65_535), default=None,
                   help="pin the predictor process to one CPU")
    p.add_argument(
        "--stream-reprime", choices=("shadow", "full"), default="shadow", help="the server's --stream-reprime"
    )
    p.add_argument(
        "--max-rtt-p99-ms", type=finite_float(0, 1e9, unit="ms"), default=TARGET_RTT_P99_MS,
        help=f"round-trip p99 limit (default {TARGET_RTT_P99_MS}: the 500 Hz loop's budget)",
    )
    p.add_argument(
        "--max-overhead-ms", type=finite_float(0, 1e9, unit="ms"), default=TARGET_OVERHEAD_MS,
        help=f"ZMQ overhead p50 limit (default {TARGET_OVERHEAD_MS})",
    )
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 when a limit is missed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
