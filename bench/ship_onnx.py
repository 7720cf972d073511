"""Regenerate the shipped ONNX pairs of the rig models with ``rigfm export`` (run after changing a .pt).

    python bench/ship_onnx.py [--rigs cartpole,furuta] [--float32]

For each rig: ``rigfm export fm_core/weights/<rig>.pt -o <tmp>/<rig>.onnx --streaming <tmp>/<rig>_step.onnx
--context 32 --quantize`` (the demo's context), then copies the int8 pair (``<rig>.int8.onnx``,
``<rig>_step.int8.onnx``; why int8: fm_core/weights/MODEL_CARD.md) or, with ``--float32``, the float32 pair
(``<rig>.onnx``, ``<rig>_step.onnx``) into fm_core/weights/, removes the other variant, and prints the model
card's table (file, bytes, sha256, checkpoint sha256). tests/test_shipped_onnx.py fails while a shipped pair
is stale (its checkpoint changed since).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.shipped import WEIGHTS, checkpoint_path, file_sha256  # noqa: E402

CONTEXT = 32


def export_pair(rig: str, tmp: Path) -> list[str]:
    """Run ``rigfm export`` for ``rig`` into ``tmp``; returns the command line it ran."""
    cmd = [sys.executable, "-m", "controllers.cli", "export", str(checkpoint_path(rig)),
           "-o", str(tmp / f"{rig}.onnx"), "--streaming", str(tmp / f"{rig}_step.onnx"),
           "--context", str(CONTEXT), "--quantize"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rigs", default="cartpole,furuta")
    ap.add_argument("--float32", action="store_true", help="ship the float32 pair instead of int8")
    args = ap.parse_args(argv)
    rows = []
    for rig in args.rigs.split(","):
        with tempfile.TemporaryDirectory(prefix="rigfm-ship-") as d:
            tmp = Path(d)
            export_pair(rig, tmp)
            keep = (f"{rig}.onnx", f"{rig}_step.onnx") if args.float32 else (
                f"{rig}.int8.onnx", f"{rig}_step.int8.onnx")
            for name in (f"{rig}.onnx", f"{rig}_step.onnx", f"{rig}.int8.onnx", f"{rig}_step.int8.onnx"):
                (WEIGHTS / name).unlink(missing_ok=True)
            for name in keep:
                shutil.copyfile(tmp / name, WEIGHTS / name)
        ck = file_sha256(checkpoint_path(rig))
        for name in keep:
            path = WEIGHTS / name
            rows.append(f"| `{name}` | {path.stat().st_size:,} | `{file_sha256(path)}` | `{ck[:12]}` |")
    print("| file | bytes | sha256 | checkpoint sha256 prefix |\n|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
