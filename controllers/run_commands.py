"""``rigfm run`` (closed-loop control of a rig or a virtual rig) and ``rigfm demo``.  Cheap to import."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from controllers.run_limits import MAX_DURATION_S, MAX_LATENCY_COMP_MS, MAX_RATE_HZ, MAX_TIMEOUT_MS
from controllers.run_report import result_jsonable, summary_table
from fm_core.cli_types import SEED, add_set_option, finite_float, int_range, section

# parse-time ranges of `rigfm run` (the rig-dependent limits are checked by controllers.session)


def register(subparsers: Any) -> None:
    """Add ``run`` and ``demo``."""
    p = subparsers.add_parser("run", help="run a controller on a rig (serial port) or a virtual rig",
                              description="Closed-loop control at a fixed rate with safety limits, "
                                          "optional learned-model prediction/MPC and MCAP logging.")
    p.add_argument("rig", help="cartpole, furuta or a rig TOML file")
    p.add_argument("--controller", choices=("lqr", "swingup", "mpc"), default="swingup")
    p.add_argument("--estimator", choices=("diff", "kf", "fm-ukf"), default="diff",
                   help="state estimator: diff (filtered differentiation, default), kf (EKF on the rig "
                        "physics), fm-ukf (UKF on the learned model; needs --model)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="serial port of the rig (e.g. /dev/ttyUSB0 or a pty)")
    where.add_argument("--virtual", action="store_true", help="start a virtual rig on a pty and use it")
    p.add_argument("--duration", type=finite_float(0, MAX_DURATION_S, lo_open=True, unit="s"), default=None,
                   metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--rate", type=finite_float(0, MAX_RATE_HZ, lo_open=True, unit="Hz"), default=500.0,
                   help="control rate in Hz (default 500; at most the rig's STATE rate, and at least two "
                        "commands per device watchdog period)")
    p.add_argument("--model", default=None,
                   help="learned model (.onnx) or 'shipped' (the rig's ONNX pair in fm_core/weights, no "
                        "torch needed): starts a predictor process")
    p.add_argument("--endpoint", default=None, help="use a running predictor (e.g. ipc:///tmp/pred.sock)")
    p.add_argument("--log", default=None, metavar="DIR", help="write an MCAP run log into DIR")
    p.add_argument("--on-log-error", choices=("stop", "continue"), default="stop",
                   help="when the log cannot be written (disk full): stop the run (fault, motor to 0 V; "
                        "default) or continue without a complete log; either way the exit status is 1")
    p.add_argument("--foxglove", nargs="?", const="8765", default=None, metavar="[HOST:]PORT",
                   help="serve the run's channels on a Foxglove WebSocket (default 127.0.0.1:8765; "
                        "loopback unless a host is given)")
    p.add_argument("--dry-run", action="store_true", help="compute and log, never actuate")
    p.add_argument("--init", choices=("hanging", "upright"), default="hanging",
                   help="initial state of the virtual rig")
    add_set_option(p, "physics override of the virtual rig's plant (plant.KEY) or of the controllers' model "
                      "(model.KEY), e.g. --set plant.pole_mass_scale=1.5", number=True,
                   sections=("plant", "model"))
    p.add_argument("--tuning", default=None,
                   help="controller tuning TOML (overrides controllers/tuning.toml)")
    p.add_argument("--lqr-design", choices=("nominal", "learned"), default="nominal",
                   help="balance LQR designed on the physics (nominal, default) or on the served model's "
                        "linearisation (learned; needs --model/--endpoint; redesigned when the predictor "
                        "reloads a new model; falls back to nominal outside the trust band)")
    p.add_argument("--latency-comp-ms", type=finite_float(0, MAX_LATENCY_COMP_MS, unit="ms"), default=0.0,
                   help="forecast the state this far ahead with the physics model (0 = off)")
    p.add_argument("--latency-source", choices=("physics", "predictor"), default="physics",
                   help="latency forecast: physics model, or physics + the predictor's one-step correction "
                        "(falls back to physics when no fresh, plausible prediction)")
    p.add_argument("--predictor-timeout-ms", type=finite_float(0, MAX_TIMEOUT_MS, lo_open=True, unit="ms"),
                   default=None, help="deadline of one-step predictions (default: 0.8 model steps)")
    p.add_argument("--stale-ms", type=finite_float(0, MAX_TIMEOUT_MS, lo_open=True, unit="ms"), default=50.0,
                   help="e-stop when no new state for this long")
    p.add_argument("--watchdog-ms", type=int_range(5, 1000, unit="ms"), default=None,
                   help="device watchdog for this run: no COMMAND for this long -> 0 V (default: the rig "
                        "config's watchdog_ms, 50; the motor's stop time when this process is killed)")
    p.add_argument("--realtime", action="store_true", help="SCHED_FIFO priority for the loop (if permitted)")
    p.add_argument("--seed", type=SEED, default=0, help="virtual rig seed")
    p.add_argument("--quiet", action="store_true", help="no live status line")
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

    opts = RunOptions(rig=args.rig, controller=args.controller, estimator=args.estimator, port=args.port,
                      virtual=args.virtual,
                      duration_s=args.duration, rate_hz=args.rate, model=args.model, endpoint=args.endpoint,
                      log_dir=args.log, dry_run=args.dry_run, init=args.init,
                      virtual_params=section(args.overrides, "plant"),
                      model_params=section(args.overrides, "model"),
                      tuning=args.tuning, lqr_design=args.lqr_design, latency_ms=args.latency_comp_ms,
                      latency_source=args.latency_source,
                      predictor_timeout_ms=args.predictor_timeout_ms, stale_ms=args.stale_ms,
                      watchdog_ms=args.watchdog_ms,
                      status=not args.quiet, seed=args.seed, realtime=args.realtime,
                      on_log_error=args.on_log_error, foxglove=args.foxglove)
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
