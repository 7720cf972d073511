"""LoRA-style fine-tuning of DynamicsFM: low-rank updates of the transformer blocks' weights.

``add_lora(model, rank)`` freezes the decoder blocks and gives every ``nn.Linear`` inside them a trainable
update ``W + (alpha / rank) * B @ A`` (``B`` starts at zero, so training starts from the pretrained model);
the embedding and the head stay fully trainable (they carry the system-specific input and output scales).
``merge_lora(model)`` folds the updates into the weights and removes the parametrisations, so a LoRA-tuned
model has exactly the architecture, checkpoint format and ONNX export of a fully fine-tuned one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class LowRankDelta(nn.Module):
    """Parametrisation ``W -> W + scale * B @ A`` with ``A`` (rank, in), ``B`` (out, rank)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = float(alpha) / rank

    def forward(self, w: Tensor) -> Tensor:
        return w + self.scale * (self.b @ self.a)


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze ``model.blocks``, add low-rank updates to their linear layers; returns the trainable params."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    for prm in model.blocks.parameters():
        prm.requires_grad = False
    for mod in model.blocks.modules():
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            parametrize.register_parametrization(mod, "weight", LowRankDelta(out_f, in_f, rank, alpha))
            mod.parametrizations.weight.original.requires_grad = False
    return [p for p in model.parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> None:
    """Fold every low-rank update into its weight and remove the parametrisations (in place)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
