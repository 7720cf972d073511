"""Where an MPC plan's time goes: one K x H rollout request in-process vs through the predictor process.

    python bench/bench_mpc_plan.py               # shipped Furuta pair, 8 plans x 4 steps, 16 history
    python bench/bench_mpc_plan.py MODEL.onnx --plans 16 --horizon 8

Prints p50 / p90 (ms) of: the rollout in-process (``OnnxPredictor``), the same request through a predictor
process (``rigfm serve``: transport + server), the server's own handling and model time (``server_us`` /
``compute_us`` of the replies), and a ``health`` round trip (the transport floor), with the ratio process /
in-process measured in this run. One thread everywhere; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.client import PredictorProcess  # noqa: E402
from export.onnx_runtime import OnnxPredictor  # noqa: E402
from export.shipped import shipped_onnx  # noqa: E402


def _times(fn: Callable[[], object], iters: int, gap_s: float) -> np.ndarray:
    """Wall times (ms) of ``iters`` calls after 20 warm-up calls, ``gap_s`` of sleep between calls."""
    for _ in range(20):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        time.sleep(gap_s)
    return np.array(out) * 1e3


def _row(name: str, ms: np.ndarray) -> str:
    return f"| {name} | {np.percentile(ms, 50):.2f} | {np.percentile(ms, 90):.2f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="ONNX file (default: the shipped Furuta pair)")
    p.add_argument("--plans", type=int, default=8, help="K sampled plans (the shipped MPC: 8)")
    p.add_argument("--horizon", type=int, default=4, help="H model steps (the shipped MPC: 4)")
    p.add_argument("--history", type=int, default=16, help="L history states (MPCController's default)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=2.0, help="sleep between requests (a control loop's idle)")
    a = p.parse_args(argv)
    model = a.model or str(shipped_onnx("furuta"))
    local = OnnxPredictor(model, find_step=True)
    n, m = local.meta.n, local.meta.m
    rng = np.random.default_rng(0)
    xh = rng.normal(size=(a.history, n)) * 0.01
    uh = rng.normal(size=(a.history, m)) * 0.1
    up = rng.normal(size=(a.plans, a.horizon, m))
    gap = a.gap_ms / 1e3

    inproc = _times(lambda: local.rollout(xh, uh, up), a.iters, gap)
    server: list[tuple[float, float]] = []
    with PredictorProcess(model) as proc:
        client = proc.client(timeout_ms=2000)

        def request() -> None:
            msg = client.request("rollout", {"x_hist": xh, "u_hist": uh, "u_plan": up})
            server.append((msg.header["server_us"], msg.header["compute_us"]))

        remote = _times(request, a.iters, gap)
        floor = _times(client.health, a.iters, gap)
    srv = np.array(server[20:]) / 1e3
    print(f"{Path(model).name}: rollout of {a.plans} plans x {a.horizon} steps from {a.history} states, "
          f"{a.iters} requests, {a.gap_ms:g} ms apart\n")
    print("| what | p50 ms | p90 ms |\n|---|---:|---:|")
    print(_row("in-process (OnnxPredictor.rollout)", inproc))
    print(_row("through the predictor process", remote))
    print(_row("  server handling (server_us)", srv[:, 0]))
    print(_row("  model call inside the server (compute_us)", srv[:, 1]))
    print(_row("health round trip (transport floor)", floor))
    print(f"\nprocess / in-process, p50: {np.percentile(remote, 50) / np.percentile(inproc, 50):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
