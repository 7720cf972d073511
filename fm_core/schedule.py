"""The learning-rate schedule of pretraining and fine-tuning: linear warm-up, then cosine decay."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that multiplies the optimiser's learning rate by :func:`lr_factor` at every step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, min_ratio))
