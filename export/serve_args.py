"""The options of ``rigfm serve`` and ``python -m export.server``, declared once (cheap: argparse only)."""

from __future__ import annotations

import argparse

from fm_core.cli_types import finite_float, int_range


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
