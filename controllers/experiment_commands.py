"""`rigfm collect` (simulated excitation runs -> MCAP) and `rigfm evaluate` (the paper experiment).

Cheap to import: numpy/torch and the simulator are imported inside the handlers.
"""

from __future__ import annotations

import argparse

from controllers.eval_config import EvalConfig, add_budget_options
from fm_core.cli_types import add_options, add_set_option


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
    add_set_option(p, "simulator physics override, e.g. --set pole_mass_scale=1.4", number=True,
                   drop_section="plant")
    p.set_defaults(func=_collect)

    e = subparsers.add_parser("evaluate", help="foundation model vs baselines at several data fractions")
    add_options(e, EvalConfig)
    add_budget_options(e)
    e.set_defaults(func=_evaluate)
