"""Throughput of the synthetic RKHS generator per CPU core (accepted trajectories per core-second).

    python bench/bench_rkhs.py                  # n <= 4, T = 256, Euler and RK4, plus the default n <= 6 mix
    python bench/bench_rkhs.py --count 8000 --repeats 5

Runs single-threaded (BLAS/OpenMP thread pools pinned to 1 before numpy is imported, process pinned to one
CPU where possible) and reports both CPU time (per core-second) and wall time, plus the ratio to the target of
5,000 trajectories of length 256 per core-second. On a shared machine the wall number is noisy; CPU time is
the per-core figure.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fm_core.rkhs import RKHSConfig, accept_mask, draw_candidates, generate_batch  # noqa: E402

TARGET = 5000.0  # accepted trajectories (T=256) per core-second


def _measure(cfg: RKHSConfig, count: int, repeats: int, T: int) -> tuple[float, float]:
    """Best and median accepted trajectories per CPU-second over ``repeats`` runs (after one warm-up)."""
    generate_batch(np.random.default_rng(123), 64, T, cfg)
    rates = []
    for r in range(repeats):
        rng = np.random.default_rng(r)
        c0, w0 = time.process_time(), time.perf_counter()
        b = generate_batch(rng, count, T, cfg)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        assert len(b) == count
        rates.append((count / cpu, count / wall))
    cpu_rates = [c for c, _ in rates]
    wall_rates = [w for _, w in rates]
    return max(cpu_rates), statistics.median(cpu_rates), statistics.median(wall_rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=4096, help="accepted trajectories per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--T", type=int, default=256)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        except OSError:
            pass
    print(f"numpy {np.__version__}; {args.count} accepted trajectories x {args.repeats} repeats, T={args.T}, "
          f"single thread; target {TARGET:.0f} traj/core-s")
    cases = [
        ("n<=4 m<=2 euler", RKHSConfig(n_range=(1, 4))),
        ("n<=4 m<=2 rk4", RKHSConfig(n_range=(1, 4), integrator="rk4")),
        ("n<=6 m<=2 euler (default cfg)", RKHSConfig()),
        ("n<=6 m<=2 rk4", RKHSConfig(integrator="rk4")),
    ]
    print(f"{'case':34s} {'acc.rate':>8s} {'best/core-s':>12s} {'median/core-s':>14s} {'median wall/s':>14s} "
          f"{'ratio':>6s}")
    for name, cfg in cases:
        x, _, n, _ = draw_candidates(np.random.default_rng(99), 2048, args.T, cfg)
        acc = accept_mask(x, n, cfg)[0].mean()
        best, med, wall = _measure(cfg, args.count, args.repeats, args.T)
        print(f"{name:34s} {acc:8.2f} {best:12.0f} {med:14.0f} {wall:14.0f} {med / TARGET:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
