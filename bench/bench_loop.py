"""Control-loop timing at 500 Hz on a virtual rig (real pty), with and without the predictor in the loop.

Prints p50/p99/max |period error|, jitter (std of the period), overrun % and tick busy time per setting.

    python bench/bench_loop.py [--duration 20] [--rig cartpole] [--model model.onnx] [--no-realtime]

Without --model a random-weight model of the shipped size is exported to a temporary folder (needs
torch, in a subprocess).  The machine is shared: run it twice and compare.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_model(folder: Path) -> str:
    ckpt = ROOT / "fm_core" / "weights" / "default.pt"
    code = ("import sys\nfrom pathlib import Path\n"
            "from export.onnx_export import export_checkpoint, save_random_checkpoint\n"
            "d = Path(sys.argv[1]); ck = Path(sys.argv[2])\n"
            "if not ck.is_file():\n"
            "    ck = save_random_checkpoint(d / 'random.pt', seed=0, dt=0.01, rig='synthetic')\n"
            "export_checkpoint(ck, d / 'model.onnx', context=32, streaming=d / 'model_step.onnx',\n"
            "                  n=4, m=1, dt=0.01)\n")
    subprocess.run([sys.executable, "-c", code, str(folder), str(ckpt)], check=True, capture_output=True)
    return str(folder / "model.onnx")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rig", default="cartpole")
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-realtime", action="store_true")
    args = ap.parse_args()

    from controllers.session import RunOptions, run_session

    with tempfile.TemporaryDirectory(prefix="rigfm-bench-loop-") as tmp:
        model = args.model or export_model(Path(tmp))
        rows = []
        for label, mdl in (("LQR, no predictor", None), ("LQR + predictor (stream + k-step)", model)):
            res = run_session(RunOptions(rig=args.rig, controller="lqr", virtual=True, init="upright",
                                         duration_s=args.duration, rate_hz=args.rate, model=mdl, status=False,
                                         realtime=not args.no_realtime, stale_ms=500.0))
            s = res.stats
            p = res.predictor
            rows.append((label, s, p, res.fault))
        print(f"\nloop at {args.rate:.0f} Hz for {args.duration:.0f} s on a virtual {args.rig} "
              f"(realtime={'off' if args.no_realtime else 'on'})")
        hdr = (f"{'setting':<36}{'rate Hz':>9}{'p50 us':>9}{'p99 us':>9}{'max us':>10}{'jitter us':>11}"
               f"{'overrun %':>11}{'busy p99 us':>13}{'pred p50 us':>13}{'pred fail':>10}")
        print(hdr)
        print("-" * len(hdr))
        for label, s, p, fault in rows:
            print(f"{label:<36}{s['rate_hz']:>9.1f}{s['period_err_p50_us']:>9.1f}{s['period_err_p99_us']:>9.1f}"
                  f"{s['period_err_max_us']:>10.0f}{s['jitter_us']:>11.1f}{s['overrun_pct']:>11.3f}"
                  f"{s['busy_p99_us']:>13.0f}{p.get('pred_latency_p50_us', float('nan')):>13.0f}"
                  f"{p.get('pred_failures', 0):>10}" + (f"  FAULT {fault}" if fault else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
