"""The training schedule of pretraining and fine-tuning: the learning rate (linear warm-up, then cosine decay)
and early stopping on the validation score."""

from __future__ import annotations

import copy
import math
import time

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


class EarlyStopping:
    """The best validation score and the weights that gave it; after each validation, :meth:`update` says
    whether to stop: ``patience`` validations in a row without an improvement of more than ``min_delta``, or
    more than ``max_minutes`` since it was made (0: no time cap). ``stop_reason`` is "step_cap" until then."""

    def __init__(self, module: torch.nn.Module, patience: int, max_minutes: float, min_delta: float,
                 initial: float = math.inf) -> None:
        self.module, self.patience, self.min_delta = module, int(patience), float(min_delta)
        self.max_s = 60.0 * float(max_minutes)
        self.best, self.best_step, self.bad = float(initial), 0, 0
        self.best_state = copy.deepcopy(module.state_dict())
        self.stop_reason = "step_cap"
        self.t0 = time.time()

    def update(self, step: int, value: float) -> bool:
        """Record the validation ``value`` at ``step``; True when training should stop."""
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.bad = value, step, 0
            self.best_state = copy.deepcopy(self.module.state_dict())
        else:
            self.bad += 1
        if self.bad >= self.patience:
            self.stop_reason = "patience"
            return True
        return self.timed_out()

    def timed_out(self) -> bool:
        """True (stop reason "time_cap") once more than ``max_minutes`` have passed."""
        if self.max_s > 0 and time.time() - self.t0 > self.max_s:
            self.stop_reason = "time_cap"
        return self.stop_reason != "step_cap"

    def restore_best(self) -> None:
        """Load the best weights back into the module."""
        self.module.load_state_dict(self.best_state)
