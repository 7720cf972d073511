"""fm_core: synthetic RKHS dynamics, the foundation model, pretraining and fine-tuning.

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RKHSConfig": "fm_core.rkhs",
    "generate_batch": "fm_core.rkhs",
    "load_trajectories": "fm_core.trajfile",
    "save_trajectories": "fm_core.trajfile",
    "TrajectoryFileError": "fm_core.trajfile",
    "write_corpus": "fm_core.rkhs",
    "read_corpus": "fm_core.rkhs",
    "SyntheticBatch": "fm_core.rkhs",
    "TrajectorySet": "fm_core.trajfile",
    "split_by_source": "fm_core.trajfile",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
