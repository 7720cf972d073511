"""hardware: serial protocol, rig driver, virtual rig, gymnasium env and the run logger (torch-free).

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

from rigs.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "hardware.driver": ("RigConnection", "StateSample", "CommandRejected"),
    "hardware.logger": ("RunLogger",),
    "hardware.virtual_rig": ("VirtualRigProcess",),
    "hardware.gym_env": ("RigEnv",),
    "hardware.log_reader": ("LogFileError",),
    "hardware.dataset_build": ("DatasetBuildError",),
})
