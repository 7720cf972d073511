"""rigs: physics, parameters, limits and config files of the lab rigs (numpy only).

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

from rigs.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "rigs.config": ("load_config", "RigConfig", "RigConfigError"),
    "rigs.physics": ("make_model", "RigModel"),
    "rigs.sim": ("RigSimulator",),
})
