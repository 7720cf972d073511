"""Subcommands of `rigfm` owned by the `rigs` package (aggregated from the modules below)."""

from __future__ import annotations

import importlib

# `rig-info` is registered by controllers/rig_info.py (it adds the LQR design, a controllers concern, to
# rigs.rig_commands' physics summary); `python -m rigs.rig_commands rig-info` runs the physics part alone.
_MODULES: tuple[str, ...] = ()


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
