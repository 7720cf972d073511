"""``rigfm export`` (checkpoint -> ONNX, needs torch), ``rigfm serve`` (onnxruntime predictor, torch-free) and
``rigfm latency`` (the predictor timed on this machine, torch-free).

Cheap to import: torch / onnxruntime / zmq load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export.onnx_runtime import DEFAULT_EXPORTER, EXPORTERS
from export.serve_args import add_serve_arguments
from fm_core.cli_types import call_with_args, finite_float, int_range


def _export(args: argparse.Namespace) -> int:
    from export.onnx_export import ExportError, export_checkpoint
    from export.quantize import RECIPE, quantize_int8

    try:
        res = call_with_args(export_checkpoint, args)
    except (ExportError, ValueError) as exc:
        print(f"rigfm export: {exc}", file=sys.stderr)
        return 2
    for graph, path in (("full", res.full_path), ("step", res.step_path)):
        if path is not None:
            print(
                f"{graph}: {path} ({res.nodes[graph]} nodes, {res.export_s[graph]:.2f} s, {args.exporter}, "
                f"parity vs torch {res.parity[graph]:.1e})"
            )
    angles = json.loads(res.metadata.get("rigfm.angle_channels", "[]"))
    if angles:
        names = json.loads(res.metadata["rigfm.state_names"])
        shown = ", ".join(names[i] for i in angles)
        print(f"angles: {shown} as (sin, cos) inside the graph; the predictor takes and returns raw states")
    if args.quantize:
        q_step = None if res.step_path is None else _int8_name(res.step_path)
        try:
            if res.step_path is not None and q_step is not None:
                quantize_int8(res.step_path, q_step)
            quantize_int8(res.full_path, _int8_name(res.full_path), None if q_step is None else q_step.name)
        except ValueError as exc:
            print(f"rigfm export --quantize: {exc}", file=sys.stderr)
            return 2
        print(f"int8: {_int8_name(res.full_path)}" + (f" and {q_step}" if q_step else "") + f" ({RECIPE})")
    return 0


def _int8_name(path: str | Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".int8.onnx")


def _serve(args: argparse.Namespace) -> int:
    from export.server import run

    return run(args)


def _latency(args: argparse.Namespace) -> int:
    from export.latency import run

    return run(args)


def register(subparsers) -> None:
    """Add ``export`` and ``serve`` to the umbrella parser."""
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (full-window and streaming graphs)",
        description="Export a rigfm checkpoint to ONNX (see docs/predictor.md).",
    )
    p.add_argument("checkpoint", help="rigfm-ckpt-v1 checkpoint (.pt)")
    p.add_argument("-o", "--output", required=True, help="full-window ONNX file to write")
    p.add_argument("--context", type=int_range(1, 65_536), default=64,
                   help="predictor window in steps (default 64)")
    p.add_argument(
        "--streaming", default=None, metavar="STEP.onnx", help="also write the KV-cache step graph"
    )
    p.add_argument("--quantize", action="store_true", help="also write *.int8.onnx (dynamic int8 weights)")
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default=DEFAULT_EXPORTER,
        help="fused (default: onnxruntime's fused operators built from the weights, window and step "
        "graph) or torchscript (standard ONNX operators for other runtimes, window graph only)",
    )
    p.add_argument("--opset", type=int_range(7, 30), default=None,
                   help="ONNX opset (default 17; the fused exporter writes 17)")
    p.add_argument("--n", type=int_range(1, 1024), default=None,
                   help="states (if the checkpoint's meta has none)")
    p.add_argument("--m", type=int_range(1, 1024), default=None,
                   help="inputs (if the checkpoint's meta has none)")
    p.add_argument("--dt", type=finite_float(0, 3600, lo_open=True, unit="s"), default=None,
                   help="model time step in s (if the meta has none)")
    p.set_defaults(func=_export)

    s = subparsers.add_parser(
        "serve",
        help="serve an ONNX model over ZeroMQ (onnxruntime, torch-free)",
        description="Run the rigfm predictor process (prints READY <endpoint>).",
    )
    add_serve_arguments(s)
    s.set_defaults(func=_serve)

    from export.latency import add_arguments

    lat = subparsers.add_parser(
        "latency",
        help="time the predictor on this machine: round trip vs in-process, against the targets (no torch)",
        description="Start the predictor for MODEL and time predict / stream_step at batch 1 over ZeroMQ vs "
        "in-process onnxruntime, back to back and paced at the loop rate; check the latency targets "
        "(docs/predictor.md). Run it on the rig PC.",
    )
    add_arguments(lat)
    lat.set_defaults(func=_latency)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m export.export_commands export|serve ...``."""
    parser = argparse.ArgumentParser(prog="python -m export.export_commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
