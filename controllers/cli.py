"""The umbrella command ``rigfm``: each package contributes its own subcommands.

Every package has a ``cli.py`` with ``register(subparsers)``; registration must stay light
(no torch import at module import time) so ``rigfm --help`` and the deployment-side commands
work on a machine without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# Order here is the order in `rigfm --help`.
_PACKAGES = ("fm_core", "rigs", "hardware", "export", "controllers")


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
    for pkg in _PACKAGES:
        try:
            mod = importlib.import_module(f"{pkg}.cli_commands")
        except ModuleNotFoundError as exc:  # a package without commands yet
            if exc.name != f"{pkg}.cli_commands":
                raise
            continue
        mod.register(sub)
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
