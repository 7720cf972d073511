"""The ONNX models shipped with the package (``fm_core/weights/<rig>*.onnx``): lookup and freshness check.

Torch-free and onnx-free (metadata is read with onnxruntime), so a deployment-only install (``pip install -e
.``) can serve the shipped rig models. Each pair (full-window graph + KV step graph) is ``rigfm export`` of
``fm_core/weights/<rig>.pt`` and records that checkpoint's sha256 (``rigfm.checkpoint_sha256``): a pair whose
checkpoint has changed since is *stale*. Regenerate with :data:`REGENERATE` (fm_core/weights/MODEL_CARD.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "fm_core" / "weights"
SHIPPED_RIGS = ("cartpole", "furuta")
REGENERATE = "python bench/ship_onnx.py"
# the full-window graph of a rig, in order of preference (the step graph is named in its metadata)
_NAMES = ("{rig}.int8.onnx", "{rig}.onnx")


def checkpoint_path(rig: str) -> Path:
    """The checkpoint the shipped ONNX of ``rig`` is exported from."""
    return WEIGHTS / f"{rig}.pt"


def shipped_onnx(rig: str) -> Path | None:
    """The shipped full-window ONNX graph of rig ``rig`` (``cartpole`` / ``furuta``), or None."""
    for pattern in _NAMES:
        path = WEIGHTS / pattern.format(rig=rig)
        if path.is_file():
            return path
    return None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read with onnxruntime."""
    from export.onnx_runtime import make_session

    return dict(make_session(path).get_modelmeta().custom_metadata_map)


def staleness(onnx_path: str | Path, checkpoint: str | Path | None = None) -> str | None:
    """Why the shipped pair at ``onnx_path`` does not match its checkpoint, or None when it does.

    Checks the full graph and the step graph it names: both must record the sha256 of ``checkpoint``
    (default: ``fm_core/weights/<rig>.pt`` of the file's ``rigfm.rig``). A missing checkpoint is not stale
    (a deployment may ship the ONNX alone)."""
    onnx_path = Path(onnx_path)
    full = metadata(onnx_path)
    ckpt = Path(checkpoint) if checkpoint is not None else checkpoint_path(full.get("rigfm.rig", ""))
    if not ckpt.is_file():
        return None
    want = file_sha256(ckpt)
    files = [(onnx_path, full)]
    if full.get("rigfm.step_file"):
        step = onnx_path.with_name(full["rigfm.step_file"])
        if not step.is_file():
            return f"{onnx_path.name} names the step graph {step.name}, which is missing"
        files.append((step, metadata(step)))
    for path, meta in files:
        got = meta.get("rigfm.checkpoint_sha256", "")
        if got != want:
            return (f"{path.name} was exported from a checkpoint with sha256 {got[:12] or '?'}..., "
                    f"{ckpt.name} now has {want[:12]}... (regenerate: {REGENERATE})")
    return None
