"""Where an MPC plan's time goes: one K x H rollout request in-process vs through the predictor process.

    python bench/bench_mpc_plan.py               # shipped Furuta pair, 8 plans x 4 steps, 16 history
    python bench/bench_mpc_plan.py MODEL.onnx --plans 16 --horizon 8

Requests are paced at the MPC's planning rate (``--rate-hz``, one plan per 10 ms model step; idle in between
as the control loop is: ``export.latency.paced``). Prints p50 / p99 (ms) of: the rollout in-process
(``OnnxPredictor``), the same request through a predictor process (``rigfm serve``: transport + server), the
server's own handling and model time (``server_us`` / ``compute_us`` of the replies), and a ``health`` round
trip (the transport floor), with the ratio process / in-process measured in this run. One thread everywhere;
nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.client import PredictorProcess  # noqa: E402
from export.latency import paced, pct, timeit  # noqa: E402
from export.onnx_runtime import OnnxPredictor  # noqa: E402
from export.shipped import shipped_onnx  # noqa: E402

WARMUP = 20


def _times(fn: Callable[[], object], iters: int, rate_hz: float) -> np.ndarray:
    """ms per call of ``iters`` paced calls after ``WARMUP`` untimed ones."""
    timeit(fn, 0, warmup=WARMUP)
    return paced(fn, rate_hz, iters)


def _row(name: str, ms: np.ndarray) -> str:
    p50, p99 = pct(ms)
    return f"| {name} | {p50:.2f} | {p99:.2f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="ONNX file (default: the shipped Furuta pair)")
    p.add_argument("--plans", type=int, default=8, help="K sampled plans (the shipped MPC: 8)")
    p.add_argument("--horizon", type=int, default=4, help="H model steps (the shipped MPC: 4)")
    p.add_argument("--history", type=int, default=16, help="L history states (MPCController's default)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rate-hz", type=float, default=100.0,
                   help="requests per second (the MPC: one per model step)")
    a = p.parse_args(argv)
    model = a.model or str(shipped_onnx("furuta"))
    local = OnnxPredictor(model, find_step=True)
    n, m = local.meta.n, local.meta.m
    rng = np.random.default_rng(0)
    xh = rng.normal(size=(a.history, n)) * 0.01
    uh = rng.normal(size=(a.history, m)) * 0.1
    up = rng.normal(size=(a.plans, a.horizon, m))

    inproc = _times(lambda: local.rollout(xh, uh, up), a.iters, a.rate_hz)
    server: list[tuple[float, float]] = []
    with PredictorProcess(model) as proc:
        client = proc.client(timeout_ms=2000)

        def request() -> None:
            msg = client.request("rollout", {"x_hist": xh, "u_hist": uh, "u_plan": up})
            server.append((msg.header["server_us"], msg.header["compute_us"]))

        remote = _times(request, a.iters, a.rate_hz)
        floor = _times(client.health, a.iters, a.rate_hz)
    srv = np.array(server[WARMUP:]) / 1e3
    print(f"{Path(model).name}: rollout of {a.plans} plans x {a.horizon} steps from {a.history} states, "
          f"{a.iters} requests at {a.rate_hz:g} Hz\n")
    print("| what | p50 ms | p99 ms |\n|---|---:|---:|")
    print(_row("in-process (OnnxPredictor.rollout)", inproc))
    print(_row("through the predictor process", remote))
    print(_row("  server handling (server_us)", srv[:, 0]))
    print(_row("  model call inside the server (compute_us)", srv[:, 1]))
    print(_row("health round trip (transport floor)", floor))
    print(f"\nprocess / in-process, p50: {pct(remote)[0] / pct(inproc)[0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
