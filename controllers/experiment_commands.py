"""`rigfm collect` (simulated excitation runs -> MCAP) and `rigfm evaluate` (the paper experiment).

Cheap to import: numpy/torch and the simulator are imported inside the handlers.
"""

from __future__ import annotations

import argparse

from fm_core.cli_types import add_options, add_set_option, finite_float, int_range


def _collect(args: argparse.Namespace) -> int:
    from controllers.collect import main_collect

    return main_collect(args)


def _evaluate(args: argparse.Namespace) -> int:
    from controllers.evaluate import main_evaluate

    return main_evaluate(args)


def register(subparsers) -> None:
    """Add `collect` and `evaluate` to the umbrella parser."""
    p = subparsers.add_parser("collect", help="simulated excitation runs logged as MCAP (one file per run)")
    from controllers.collect import CollectOptions

    add_options(p, CollectOptions)
    add_set_option(p, "simulator physics override, e.g. --set pole_mass_scale=1.4", number=True)
    p.set_defaults(func=_collect)

    e = subparsers.add_parser("evaluate", help="foundation model vs baselines at several data fractions")
    e.add_argument("--rigs", default="cartpole,furuta", help="comma-separated rig names")
    e.add_argument("--fractions", default="0.02,0.1,1.0", help="training-data fractions")
    e.add_argument("--seeds", type=int_range(1, 1000), default=5, help="seeds per (model, fraction)")
    e.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of fm,specialist,linreg,ffn,small_tf,sindy (default all)",
    )
    e.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="[RIG=]DATASET.npz",
        help="use this dataset instead of collecting (repeat per rig: cartpole=a.npz)",
    )
    e.add_argument("--checkpoint", default="fm_core/weights/default.pt", help="pretrained foundation model")
    e.add_argument("--runs", type=int_range(1, 1_000_000), default=None,
                   help="collected runs per rig (default by budget)")
    e.add_argument("--duration", type=finite_float(0, 1e6, lo_open=True, unit="s"), default=None,
                   help="seconds per collected run")
    e.add_argument("--steps", type=int_range(1, 10**9), default=None,
                   help="max optimiser steps per trained model")
    add_set_option(e, "training-budget field for every model (fm_core/baselines.py Budget), e.g. --set "
                      "patience=20 --set ft_mode=head", parse=False)
    e.add_argument("--context", type=int_range(1, 65_536), default=None,
                   help="context steps of the multi-step metric")
    e.add_argument("--horizon", type=int_range(1, 65_536), default=None,
                   help="open-loop horizon of the multi-step metric")
    e.add_argument(
        "--angle-features",
        choices=("raw", "sincos"),
        default="sincos",
        help="pendulum angle as (sin, cos) for every model (default) or as logged (raw, unwrapped); the "
             "metric is the same",
    )
    e.add_argument("--jobs", type=int_range(1, 256), default=1, help="rigs evaluated in parallel processes")
    e.add_argument("--threads", type=int_range(1, 1024), default=1, help="torch threads per process")
    e.add_argument("--resume", action="store_true", help="reuse finished fits from OUT/<rig>/partial.json")
    e.add_argument("--quick", action="store_true", help="tiny CI budget (1 seed, few steps)")
    e.add_argument("--out", default="results", help="output directory (default results/)")
    e.add_argument("--work", default=None, help="scratch directory for collected data (default OUT/_work)")
    e.set_defaults(func=_evaluate)
