"""rigs: physics, parameters, limits and config files of the lab rigs (numpy only).

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_config": "rigs.config",
    "RigConfig": "rigs.config",
    "RigConfigError": "rigs.config",
    "make_model": "rigs.physics",
    "RigModel": "rigs.physics",
    "RigSimulator": "rigs.sim",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
