"""Predictor latency: ZeroMQ round trip vs in-process onnxruntime vs torch eager, on the same model.

    python bench/bench_predictor.py                      # default checkpoint (or random default-config model)
    python bench/bench_predictor.py --windows 64 16 --iters 1000
    python bench/bench_predictor.py --compare-exporters  # fused / torchscript: export, nodes, latency

Everything runs on one thread (torch.set_num_threads(1), ORT intra_op_num_threads=1, one server thread).
Pin the whole bench to one core (`taskset -c 0 python bench/...`) to measure the issue's "on one core" case;
the predictor process inherits the pinning.
Prints p50/p99 in ms and the ratios against the targets in docs/predictor.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.latency import paced, pct, pin_process, timeit, timeit_interleaved

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = ROOT / "fm_core" / "weights" / "default.pt"


def paced_stream(client: Any, seq_x: np.ndarray, seq_u: np.ndarray, rate_hz: float, iters: int) -> np.ndarray:
    """stream_step at a fixed rate, idle between ticks the way the real-time loop is (sleep, then spin)."""
    client.stream_reset()
    server: list[float] = []
    it = iter(range(10**9))

    def step() -> None:
        i = next(it) % len(seq_x)
        client.stream_step(seq_x[i], seq_u[i])
        server.append(client.last_server_us / 1e3)

    out = paced(step, rate_hz, iters)
    print(f"\nstream_step paced at {rate_hz:g} Hz ({iters} ticks; sleep, then spin to each tick)")
    row("ZeroMQ stream_step round trip", out)
    row("  server-side handling", np.asarray(server))
    row("  transport (round trip - server)", out - np.asarray(server))
    return out


def fixed_step(pred: Any, k: np.ndarray, xw: np.ndarray, uw: np.ndarray) -> Callable[[], None]:
    """One stream step at a fixed cache length S = k.shape[3], the way a stream calls the predictor's step
    graph (in place)."""
    slots = pred.new_slots(1)
    slots.load(0, k, k)
    s = k.shape[3]

    def run() -> None:
        slots.step((0,), xw, uw)
        slots.len[0] = s  # rewind: the buffer is reused

    return run


def drop_block_starts(ts: np.ndarray, block: int = 50) -> np.ndarray:
    """The calls of :func:`timeit_interleaved` without the first one of each block (the cold one)."""
    return ts[np.arange(len(ts)) % block != 0]


def steady(remote: Callable[[], None], server_ms: list[float], iters: int) -> float:
    """The ZMQ path alone, ``iters`` calls back to back with nothing else in between; prints p50/p99 of the
    round trip and of the transport, returns the round-trip p99 (ms)."""
    t = timeit(remote, iters)
    row("ZeroMQ round trip, steady", t)
    row("  transport, steady", t - np.asarray(server_ms[-iters:]))
    return float(np.percentile(t, 99))


def row(name: str, ts: np.ndarray) -> tuple[str, float, float]:
    p50, p99 = pct(ts)
    print(f"  {name:<34s} p50 {p50:8.3f} ms   p99 {p99:8.3f} ms")
    return name, p50, p99


def get_checkpoint(arg: str | None, tmp: Path) -> tuple[Path, str]:
    from export.onnx_export import save_random_checkpoint

    if arg:
        return Path(arg), arg
    if DEFAULT_CKPT.is_file():
        return DEFAULT_CKPT, str(DEFAULT_CKPT.relative_to(ROOT))
    return save_random_checkpoint(
        tmp / "random_default.pt"
    ), "random default-config model (no default.pt yet)"


def system_overrides(ckpt: Path) -> dict[str, float | int]:
    """n/m/dt for a synthetic pretraining checkpoint (meta n = m = dt = None): the cart-pole sizes."""
    from fm_core.checkpoint import read_checkpoint

    meta = read_checkpoint(ckpt)["meta"]
    if meta.get("n") is None or meta.get("m") is None or meta.get("dt") is None:
        return {"n": 4, "m": 1, "dt": 0.01}
    return {}


def bench_latency(
    ckpt: Path,
    tmp: Path,
    windows: list[int],
    iters: int,
    big_iters: int,
    server_args: list[str],
    server_cpu: int | None = None,
    rate_hz: float = 500.0,
    client_spin_us: float = 0.0,
) -> None:
    from export.client import PredictorProcess
    from export.onnx_export import export_checkpoint, load_for_export
    from export.onnx_runtime import OnnxPredictor

    over = system_overrides(ckpt)
    res = export_checkpoint(ckpt, tmp / "model.onnx", streaming=tmp / "model_step.onnx", **over)
    system = load_for_export(ckpt, **over).system
    local = OnnxPredictor(res.full_path, res.step_path)
    me = local.meta
    rng = np.random.default_rng(0)
    summary: list[tuple[str, float, float, float, float, bool]] = []
    with (
        PredictorProcess(res.full_path, f"ipc://{tmp}/bench.sock", extra_args=server_args) as proc,
        proc.client(30_000, spin_us=client_spin_us) as client,
    ):
        if server_cpu is not None:
            pin_process(proc.pid, server_cpu)
            print(f"predictor process pinned to CPU {server_cpu}; bench on {sorted(os.sched_getaffinity(0))}")
        for t in windows:
            for b, n_it in ((1, iters), (256, big_iters)):
                if n_it <= 0:
                    continue
                x = rng.normal(size=(b, t, me.n)).astype(np.float32)
                u = rng.normal(size=(b, t, me.m)).astype(np.float32)
                obs = np.ones((b, t), np.float32)
                xt, ut, ot = torch.from_numpy(x), torch.from_numpy(u), torch.from_numpy(obs)
                print(f"\npredict  batch {b}  window T={t}  ({n_it} calls)")

                def eager(xt=xt, ut=ut, ot=ot) -> None:
                    with torch.no_grad():
                        system(xt, ut, ot)

                server_ms: list[float] = []

                def remote(x=x, u=u, o=obs, server_ms=server_ms) -> None:
                    client.predict(x, u, o)
                    server_ms.append(client.last_server_us / 1e3)

                t_e, t_o, t_z = timeit_interleaved(
                    [eager, lambda x=x, u=u, o=obs: local.predict(x, u, o), remote], n_it
                )
                _, te, te99 = row("torch eager (1 thread)", t_e)
                _, to, to99 = row("onnxruntime in-process", t_o)
                _, tz, tz99 = row("ZeroMQ round trip (ipc)", t_z)
                row("  same, each block's first call left out", drop_block_starts(t_z))
                over = t_z - np.asarray(server_ms[-n_it:])
                _, ov, ov99 = row("  transport (round trip - server)", over)
                print(
                    f"  ratios: torch/ort p50 {te / to:5.1f}x   ZMQ overhead p50 {ov:6.3f} p99 {ov99:6.3f} ms"
                    f"   round-trip p99 {tz99:6.3f} ms"
                )
                steady99 = steady(remote, server_ms, n_it)
                summary.append((f"predict B{b} T{t}", steady99, tz99, tz - to, ov, te / to, b == 1))
        print("\ntransport only: predict B1 T1 back to back (server stays hot)")
        x1 = np.zeros((1, 1, me.n), np.float32)
        u1 = np.zeros((1, 1, me.m), np.float32)
        b2b: list[float] = []

        def hot() -> None:
            client.predict(x1, u1)
            b2b.append(client.last_server_us / 1e3)

        t_hot = timeit(hot, iters)
        row("ZeroMQ round trip", t_hot)
        row("  transport (round trip - server)", t_hot - np.asarray(b2b[-iters:]))
        print(f"\nstreaming step  batch 1  (context {me.context}, shadow re-prime, keep {me.context // 2})")
        seq_x = rng.normal(size=(iters + 50, me.n)).astype(np.float32)
        seq_u = rng.normal(size=(iters + 50, me.m)).astype(np.float32)
        streams = {"shadow": local.stream(shadow=True), "full": local.stream(shadow=False)}
        its = {k: iter(range(10**9)) for k in streams}

        def local_step(mode: str = "shadow") -> None:  # "shadow" is the server's default --stream-reprime
            i = next(its[mode]) % len(seq_x)
            streams[mode].step(seq_x[i], seq_u[i])

        client.stream_reset()
        it2 = iter(range(10**9))

        step_server_ms: list[float] = []

        def zmq_step() -> None:
            i = next(it2) % len(seq_x)
            client.stream_step(seq_x[i], seq_u[i])
            step_server_ms.append(client.last_server_us / 1e3)

        p = me.patch
        xw = torch.from_numpy(seq_x[None, :p])
        uw = torch.from_numpy(seq_u[None, :p])
        ow = torch.ones(1, p)
        state = {"cache": None}

        def torch_step() -> None:
            with torch.no_grad():
                if state["cache"] is not None and state["cache"].pos >= me.context:
                    state["cache"] = None
                _, state["cache"] = system.step(xw, uw, ow, state["cache"])

        t_st, t_full, t_so, t_sz = timeit_interleaved(
            [torch_step, lambda: local_step("full"), local_step, zmq_step], iters
        )
        _, st, _ = row("torch eager step (KV cache)", t_st)
        _, sf, _ = row("onnxruntime stream in-process, full", t_full)
        _, so, so99 = row("onnxruntime stream in-process, shadow", t_so)
        _, sz, sz99 = row("ZeroMQ stream_step (shadow)", t_sz)
        row("  same, each block's first call left out", drop_block_starts(t_sz))
        _, sov, _ = row("  transport (round trip - server)", t_sz - np.asarray(step_server_ms[-iters:]))
        # one-token calls compared: torch's step vs the full-mode stream's p50 (a single step-graph call)
        print(f"  ratios: torch/ort one-token step p50 {st / sf:5.1f}x   ZMQ overhead p50 {sov:6.3f} ms")
        steady99 = steady(zmq_step, step_server_ms, iters)
        summary.append(("stream_step B1", steady99, sz99, sz - so, sov, st / sf, True))
        if rate_hz > 0:
            paced = paced_stream(client, seq_x, seq_u, rate_hz, iters)
            summary.append(
                (
                    f"stream_step @{rate_hz:g}Hz",
                    float(np.percentile(paced, 99)),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    True,
                )
            )
        h = client.health()
        print(f"\nserver-side handling latency per method (µs): {h['latency_by_method']}")
    print("\ntargets: round trip p99 <= 1.5 ms at batch 1; overhead <= 0.15 ms; ORT >= 5x torch eager")
    print("  RTT p99: steady = the path called on its own, back to back (a control loop's steady state);")
    print("  interleaved = in the alternating blocks above, where each block's first calls find cold caches")
    heads = ("case", "RTT p99 steady", "interleaved", "RTT-ORT p50", "transport p50", "torch/ORT")
    print(
        f"  {heads[0]:<18s} {heads[1]:>14s}     {heads[2]:>11s}  {heads[3]:>11s}      {heads[4]:>13s}"
        f"      {heads[5]:>9s}"
    )

    def mark(ok: bool) -> str:
        return "ok " if ok else "NO "

    for name, rtt99, inter99, ovh, trans, ratio, b1 in summary:
        ok_rtt = mark(rtt99 <= 1.5) if b1 else "-  "
        if np.isnan(ovh):
            print(f"  {name:<18s} {rtt99:10.3f} ms {ok_rtt}")
            continue
        print(
            f"  {name:<18s} {rtt99:10.3f} ms {ok_rtt} {inter99:9.3f} ms  {ovh:8.3f} ms {mark(ovh <= 0.15)}  "
            f"{trans:10.3f} ms {mark(trans <= 0.15)}  {ratio:7.1f}x {mark(ratio >= 5)}"
        )


def _echo_server(endpoint: str, framed: bool) -> None:
    """ROUTER echo (raw) or schema-framed reply without a model (framing + pyzmq only)."""
    import zmq

    from export import schema

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    pred = np.zeros((1, 1, 4), np.float32)
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        if not framed:
            sock.send_multipart(frames, copy=False)
            continue
        t0 = time.perf_counter()
        delim, _ = schema.split_envelope(frames[1:])
        msg = schema.decode_request(frames[1:])
        us = round((time.perf_counter() - t0) * 1e6, 1)
        sock.send_multipart(
            [frames[0], *schema.encode_reply(msg.id, msg.method, {"pred": pred}, None, delim, us)]
        )
    sock.close(0)


def transport_floor(tmp: Path, iters: int) -> None:
    """Round trip of the same request frames through a raw pyzmq echo and a framed no-model server."""
    import multiprocessing as mp

    import zmq

    from export import schema
    from export.client import PredictorClient

    x = np.zeros((1, 1, 4), np.float32)
    u = np.zeros((1, 1, 1), np.float32)
    print("\ntransport floor (same-machine processes, ipc, B1 T1 predict frames):")
    for framed in (False, True):
        ep = f"ipc://{tmp}/floor{int(framed)}.sock"
        proc = mp.get_context("fork").Process(target=_echo_server, args=(ep, framed))
        proc.start()
        if framed:
            client = PredictorClient(ep, timeout_ms=5000)
            ts = timeit(lambda c=client: c.predict(x, u), iters, warmup=200)
            row("framed server, no model (client)", ts)
            client.close()
        else:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.connect(ep)
            frames = schema.encode_request("predict", "bench-1", {"x": x, "u": u})

            def echo(s=sock, f=frames) -> None:
                s.send_multipart(f)
                s.recv_multipart(copy=False)

            row("raw pyzmq echo", timeit(echo, iters, warmup=200))
            sock.close(0)
        stop = zmq.Context.instance().socket(zmq.DEALER)
        stop.connect(ep)
        stop.send_multipart([b"stop"])
        proc.join(10)
        stop.close(0)


def ort_optimised_nodes(path: Path, tmp: Path) -> int:
    """Node count after onnxruntime's graph optimisations (what actually runs)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / f"{path.stem}.ortopt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath).graph.node)


def compare_exporters(ckpt: Path, tmp: Path, iters: int) -> None:
    """Export with every exporter (the step graph: fused only), then time the sessions interleaved (A B A B
    ...) on the same inputs."""
    from export.onnx_export import export_checkpoint
    from export.onnx_runtime import EXPORTERS, OnnxPredictor

    preds, results = {}, {}
    for exporter in EXPORTERS:
        res = export_checkpoint(
            ckpt,
            tmp / f"{exporter}.onnx",
            streaming=tmp / f"{exporter}_step.onnx" if exporter == "fused" else None,
            exporter=exporter,
            **system_overrides(ckpt),
        )
        results[exporter] = res
        preds[exporter] = OnnxPredictor(res.full_path, res.step_path)
    me = preds[EXPORTERS[0]].meta
    rng = np.random.default_rng(0)
    names = list(preds)
    print("\nexporter     export s (full+step)  nodes full/step  full nodes after ORT opt")
    for name in names:
        r = results[name]
        print(
            f"{name:<12s} {r.export_s['full']:6.2f} + {r.export_s.get('step', 0.0):6.2f}      "
            f"{r.nodes['full']:5d} / {r.nodes.get('step', 0):<5d}   {ort_optimised_nodes(r.full_path, tmp)}"
        )
    k = np.zeros((me.n_layers, 1, me.n_heads, me.context - 1, me.d_head), np.float32)
    xw = rng.normal(size=(1, me.patch, me.n)).astype(np.float32)
    uw = rng.normal(size=(1, me.patch, me.m)).astype(np.float32)
    print("\ncase (interleaved)       " + "".join(f"{n + ' p50':>18s}" for n in names))
    for label, b, t, n_it in (
        (f"full B1 T{me.context}", 1, me.context, iters),
        ("full B1 T16", 1, 16, iters),
        ("full B256 T16", 256, 16, max(5, iters // 40)),
        (f"step B1 S{me.context - 1}", 0, 0, iters),
    ):
        if b:
            x = rng.normal(size=(b, t, me.n)).astype(np.float32)
            u = rng.normal(size=(b, t, me.m)).astype(np.float32)
            fns = [lambda p=preds[n], x=x, u=u: p.predict(x, u) for n in names]
        else:  # the step graph: fused only
            names_b = [n for n in names if preds[n].step_sess is not None]
            fns = [fixed_step(preds[n], k, xw[0], uw[0]) for n in names_b]
            ts = timeit_interleaved(fns, n_it, warmup=3)
            cells = "".join(f"{np.percentile(v, 50):15.3f} ms" for v in ts)
            print(f"{label:<24s} {cells}  ({', '.join(names_b)})")
            continue
        ts = timeit_interleaved(fns, n_it, warmup=3)
        print(f"{label:<24s} " + "".join(f"{np.percentile(v, 50):15.3f} ms" for v in ts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: fm_core/weights/default.pt if present")
    ap.add_argument("--windows", type=int, nargs="+", default=[64], help="window lengths T (default 64)")
    ap.add_argument("--iters", type=int, default=500, help="calls per batch-1 measurement")
    ap.add_argument("--big-iters", type=int, default=40, help="calls per batch-256 measurement")
    ap.add_argument("--spin-us", type=float, default=0.0, help="server --spin-us (busy-poll after requests)")
    ap.add_argument(
        "--client-spin-us", type=float, default=0.0,
        help="client spin_us: busy-poll for the reply before blocking (needs the server on another core)",
    )
    ap.add_argument("--compare-exporters", action="store_true", help="only compare the exporters")
    ap.add_argument("--rate-hz", type=float, default=500.0, help="paced stream_step rate (0: skip)")
    ap.add_argument("--floor", action="store_true", help="only the transport floor (raw pyzmq, framing)")
    ap.add_argument(
        "--server-cpu",
        type=int,
        default=None,
        help="pin the predictor process to this CPU (its own core; pin the bench with taskset)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="rigfm-bench-") as d:
        tmp = Path(d)
        ckpt, label = get_checkpoint(args.checkpoint, tmp)
        print(f"model: {label}; torch {torch.__version__}; {sys.platform}; "
              f"server --spin-us {args.spin_us:g}; "
              f"client spin_us {args.client_spin_us:g}")
        if args.floor:
            transport_floor(tmp, args.iters)
        elif args.compare_exporters:
            compare_exporters(ckpt, tmp, args.iters)
        else:
            bench_latency(
                ckpt,
                tmp,
                args.windows,
                args.iters,
                args.big_iters,
                ["--spin-us", str(args.spin_us)],
                args.server_cpu,
                args.rate_hz,
                args.client_spin_us,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
