"""Checkpoints: plain dicts of tensors / str / numbers, loadable with ``torch.load(..., weights_only=True)``.

Layout (format ``rigfm-ckpt-v1``)::

    {"format": "rigfm-ckpt-v1", "model_config": {...}, "state_dict": {...},
     "meta": {"n", "m", "state_names", "input_names", "dt", "rig", "x_mean", "x_std", "u_mean", "u_std",
              "train": {...}},
     "train_state": {...}}            # optional: optimizer/scheduler/step for --resume
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fm_core.model import DynamicsFM, ModelConfig

FORMAT = "rigfm-ckpt-v1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or malformed (message names the file and field)."""


def default_meta(model: DynamicsFM, **overrides: Any) -> dict[str, Any]:
    """Meta dict with the model's normalisation buffers; synthetic pretraining defaults for the rest."""
    meta: dict[str, Any] = {
        "n": None, "m": None, "state_names": [], "input_names": [], "dt": None, "rig": "synthetic",
        "x_mean": model.x_mean.tolist(), "x_std": model.x_std.tolist(),
        "u_mean": model.u_mean.tolist(), "u_std": model.u_std.tolist(), "train": {},
    }
    meta.update(overrides)
    return meta


def _plain(obj: Any) -> Any:
    """Convert numpy scalars/arrays and paths to plain python types accepted by weights_only loading."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}  # keys kept (optimizer state uses int keys)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if hasattr(obj, "tolist") and not isinstance(obj, str):  # numpy array / scalar
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_checkpoint(
    path: str | Path, model: DynamicsFM, meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (tmp file + rename). Normalisation in meta is taken from the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = default_meta(model)
    m.update(meta or {})
    for k in ("x_mean", "x_std", "u_mean", "u_std"):
        m[k] = getattr(model, k).tolist()
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "model_config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": _plain(m),
    }
    if train_state is not None:
        ckpt["train_state"] = _plain(train_state)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate the raw checkpoint dict (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save: a zip archive (or a legacy pickle)
        raise CheckpointError(f"{path}: not a torch checkpoint (expected a .pt file written by "
                              f"`rigfm pretrain` or `rigfm finetune`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: checkpoint is not a dict")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {ckpt.get('format')!r}, expected {FORMAT!r}")
    for key, typ in (("model_config", dict), ("state_dict", dict), ("meta", dict)):
        if not isinstance(ckpt.get(key), typ):
            raise CheckpointError(f"{path}: missing or invalid field {key!r}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "<checkpoint>") -> DynamicsFM:
    """Build a DynamicsFM from a checkpoint dict (strict state_dict loading)."""
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: field 'model_config': {exc}") from None
    model = DynamicsFM(cfg)
    sd = dict(ckpt["state_dict"])
    # checkpoints from before the increment scale: their head predicts the normalised increment (scale 1)
    sd.setdefault("dx_scale", torch.ones(cfg.n_max))
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: field 'state_dict.{k}' contains NaN/Inf")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: field 'state_dict' does not match model_config: {exc}") from None
    return model


def load_checkpoint(path: str | Path) -> tuple[DynamicsFM, dict[str, Any]]:
    """Load a checkpoint file -> (model in eval mode, meta)."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, str(path))
    model.eval()
    model.rollout_mode = rollout_mode_of(ckpt["meta"])  # type: ignore[attr-defined]
    model.recipe = pretrain_recipe(ckpt["meta"])  # type: ignore[attr-defined]
    return model, ckpt["meta"]


def pretrain_recipe(meta: dict[str, Any]) -> dict[str, Any]:
    """The pretraining recipe recorded in ``meta.train.recipe`` ({} for older checkpoints)."""
    train = meta.get("train") or {}
    return dict(train.get("recipe") or (train.get("init_train") or {}).get("recipe") or {})


def rollout_mode_of(meta: dict[str, Any]) -> str:
    """How a checkpoint makes multi-step predictions: its fine-tuning config's ``rollout_mode``, else "ar" for
    a pretraining without masked long-horizon windows (``recipe.mask_prob == 0``), else "masked"."""
    train = meta.get("train") or {}
    mode = (train.get("config") or {}).get("rollout_mode") if isinstance(train.get("config"), dict) else None
    if mode:
        return str(mode)
    return "ar" if pretrain_recipe(meta).get("mask_prob", 0.5) == 0 else "masked"
