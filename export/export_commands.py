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
from fm_core.cli_types import finite_float, int_range


def _export(args: argparse.Namespace) -> int:
    from export.onnx_export import ExportError, export_checkpoint
    from export.quantize import RECIPE, quantize_int8

    try:
        res = export_checkpoint(
            args.checkpoint,
            args.output,
            context=args.context,
            streaming=args.streaming,
            exporter=args.exporter,
            opset=args.opset,
            n=args.n,
            m=args.m,
            dt=args.dt,
        )
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


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``rigfm serve`` (shared with ``python -m export.server``)."""
    p.add_argument("model", nargs="?", help="full-window ONNX file written by `rigfm export`")
    p.add_argument(
        "--bind",
        default="ipc:///tmp/rigfm-pred.sock",
        help="ZeroMQ endpoint: ipc:///path or tcp://127.0.0.1:PORT (PORT may be * for any free port)",
    )
    p.add_argument(
        "--streaming",
        default=None,
        help="step graph for stream_step (default: the file named in the model's metadata, if present)",
    )
    p.add_argument("--threads", type=int_range(1, 1024), default=1,
                   help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--parent-pid", type=int_range(1), default=None,
                   help=argparse.SUPPRESS)  # PredictorProcess
    p.add_argument("--parallel", action="store_true", help="ORT_PARALLEL execution mode (default sequential)")
    p.add_argument("--curve-secret-key", default=None, help="zmq certificate (.key_secret) enabling CURVE")
    p.add_argument(
        "--reload-dir",
        default=None,
        help="reload requests may only load files under this folder (default: the model's folder)",
    )
    p.add_argument(
        "--spin-us",
        type=finite_float(0, 1e6, unit="us"),
        default=0.0,
        help="busy-poll this long after each request before sleeping (lower latency on a dedicated core)",
    )
    p.add_argument(
        "--stream-reprime",
        choices=("shadow", "full"),
        default="shadow",
        help="renew a full stream cache with a shadow cache grown one token per step (default: no latency "
        "spikes, ~2x step compute) or with one full-window call every context/2 steps",
    )
    p.add_argument(
        "--max-elements",
        type=int_range(1, 1 << 26),
        default=65_536,  # export.server.DEFAULT_MAX_ELEMENTS (not imported: this module stays cheap)
        help="element budget: window steps (B x T of a predict, K x (L-1+H) of a rollout) one request may "
        "run; beyond it the reply is too_large (default 65536 = B256 x T256; docs/security.md)",
    )
    p.add_argument("--no-ort-arena", action="store_true",
                   help="disable onnxruntime's CPU memory arena for the window graph (docs/security.md)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without CURVE (prints a warning; docs/security.md)")
    p.add_argument(
        "--gen-curve-keys",
        metavar="DIR",
        default=None,
        help="write server.key / server.key_secret into DIR and exit",
    )


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
        help="fused (default: onnxruntime fused operators built from the weights) or a torch.onnx exporter; "
        "see docs/predictor.md for the measurement",
    )
    p.add_argument("--opset", type=int_range(7, 30), default=None,
                   help="ONNX opset (default 17; 18 for dynamo)")
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
