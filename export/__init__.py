"""export: ONNX export (needs torch) and the torch-free onnxruntime predictor server and client.

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

from rigs.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "export.client": ("PredictorClient", "PredictorError", "PredictorTimeout", "PredictorUnavailable",
                      "PredictorRequestError", "PredictorProcess"),
})
