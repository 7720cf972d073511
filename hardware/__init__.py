"""hardware: serial protocol, rig driver, virtual rig, gymnasium env and the run logger (torch-free).

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RigConnection": "hardware.driver",
    "StateSample": "hardware.driver",
    "CommandRejected": "hardware.driver",
    "RunLogger": "hardware.logger",
    "VirtualRigProcess": "hardware.virtual_rig",
    "RigEnv": "hardware.gym_env",
    "LogFileError": "hardware.log_reader",
    "DatasetBuildError": "hardware.dataset_build",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
