"""``rigfm run`` (closed-loop control of a rig or a virtual rig) and ``rigfm demo``.  Cheap to import."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from controllers.run_limits import MAX_DURATION_S
from controllers.run_report import result_jsonable, summary_table
from fm_core.cli_types import add_options, add_set_option, finite_float, options_from_args, section

# parse-time ranges of `rigfm run` (the rig-dependent limits are checked by controllers.session)


def register(subparsers: Any) -> None:
    """Add ``run`` and ``demo``."""
    p = subparsers.add_parser("run", help="run a controller on a rig (serial port) or a virtual rig",
                              description="Closed-loop control at a fixed rate with safety limits, "
                                          "optional learned-model prediction/MPC and MCAP logging.")
    from controllers.session import RunOptions

    add_options(p, RunOptions)
    add_set_option(p, "physics override of the virtual rig's plant (plant.KEY) or of the controllers' model "
                      "(model.KEY), e.g. --set plant.pole_mass_scale=1.5", number=True,
                   sections=("plant", "model"))
    p.add_argument("--summary-json", default=None, metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=run_handler)

    d = subparsers.add_parser("demo",
                              help="virtual rig + predictor + swing-up/balance + logger, then a report")
    d.add_argument("rig", nargs="?", default="cartpole")
    d.add_argument("--duration", type=finite_float(0, MAX_DURATION_S, lo_open=True, unit="s"), default=20.0)
    d.add_argument("--model", default=None,
                   help=".onnx model (default: the rig's shipped ONNX, fm_core/weights/<rig>.int8.onnx)")
    d.add_argument("--out", default=None, help="run folder (default runs/demo-<timestamp>)")
    d.add_argument("--controller", choices=("lqr", "swingup", "mpc"), default="swingup")
    d.add_argument("--no-plots", action="store_true")
    d.set_defaults(func=demo_handler)


def run_handler(args: argparse.Namespace) -> int:
    """``rigfm run``: returns 0 on a clean run, 1 on a fault, 2 on bad arguments."""
    from controllers.session import RunOptions, run_session

    opts = options_from_args(RunOptions, args, virtual_params=section(args.overrides, "plant"),
                             model_params=section(args.overrides, "model"))
    try:
        result = run_session(opts)
    except (ValueError, FileNotFoundError) as exc:  # includes hardware.live_view.LiveViewError
        print(f"rigfm run: {exc}", file=sys.stderr)
        return 2
    print(summary_table(result))
    if result.log_error:
        lg = result.logger
        print(f"rigfm run: LOGGING FAILED: {result.log_error}; {lg.get('write_errors')} messages lost "
              f"({lg.get('dropped')} dropped in all); the log holds everything up to the failure: "
              f"{', '.join(lg.get('files') or []) or 'no file'}", file=sys.stderr)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(result_jsonable(result), fh, indent=1, default=float)
    return 0 if result.ok else 1


def demo_handler(args: argparse.Namespace) -> int:
    """``rigfm demo``."""
    from controllers.demo import run_demo

    return run_demo(args.rig, duration_s=args.duration, model=args.model, out=args.out,
                    controller=args.controller, plots=not args.no_plots)
