"""export: ONNX export (needs torch) and the torch-free onnxruntime predictor server and client.

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PredictorClient": "export.client",
    "PredictorError": "export.client",
    "PredictorTimeout": "export.client",
    "PredictorUnavailable": "export.client",
    "PredictorRequestError": "export.client",
    "PredictorProcess": "export.client",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
