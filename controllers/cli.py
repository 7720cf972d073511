"""The umbrella command ``rigfm``: each package contributes its own subcommands.

One registry, :data:`COMMAND_MODULES`: each module named there defines ``register(subparsers)``;
registration must stay light (no torch import at module import time) so ``rigfm --help`` and the
deployment-side commands work on a machine without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# Every module that adds `rigfm` subcommands; the order here is the order in `rigfm --help`.
COMMAND_MODULES = (
    "fm_core.train_commands",        # pretrain, finetune, generate
    "hardware.rig_commands",         # virtual-rig
    "hardware.log_commands",         # logs, dataset
    "export.export_commands",        # export, serve, latency
    "export.score",                  # score
    "controllers.rig_info",          # rig-info
    "controllers.run_commands",      # run, demo
    "controllers.experiment_commands",  # collect, evaluate
    "controllers.flywheel",          # flywheel
)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), not a usage dump.

    Subcommand parsers inherit the class (argparse's ``add_subparsers`` default), so every ``rigfm``
    command reports ``rigfm run: error: argument --rate: must be ... (see rigfm run --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every package's subcommands."""
    parser = OneLineErrorParser(
        prog="rigfm",
        description="Foundation model for dynamical systems, from synthetic pretraining to lab rigs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rigfm``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2, one line already printed) or --help (0)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
