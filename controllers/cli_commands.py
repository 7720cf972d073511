"""Subcommands of `rigfm` owned by the `controllers` package (aggregated from the modules below)."""

from __future__ import annotations

import importlib

_MODULES = ("controllers.rig_info", "controllers.run_commands", "controllers.experiment_commands",
            "controllers.flywheel")


def register(subparsers) -> None:
    """Add this package's subcommands to the umbrella parser."""
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        mod.register(subparsers)
