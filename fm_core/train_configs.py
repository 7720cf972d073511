"""Training recipes as plain dataclasses, torch-free: what ``rigfm finetune`` and ``rigfm evaluate`` accept
is validated (and their CLI is built) without importing torch; :mod:`fm_core.finetune` and
:mod:`fm_core.baselines` run them.

* :class:`FinetuneConfig`: the hyper-parameters of one :func:`fm_core.finetune.finetune` call.
* :class:`Budget`: the training-budget rule shared by every model of the evaluation, and
  :func:`finetune_config`, the FinetuneConfig it gives one fit.
* :func:`known_keys`: the one "unknown key" check of every ``Config.from_dict``.

The ``option(...)`` fields of FinetuneConfig are also ``rigfm finetune`` flags (:mod:`fm_core.cli_types`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fm_core.cli_types import SEED, finite_float, int_range, option


@dataclass
class PretrainOptions:
    """The options of ``rigfm pretrain`` and ``python -m fm_core.train`` (each field is also the flag; the
    ``--set`` overrides are added next to them)."""

    config: str | None = option(None, help="TOML config, e.g. fm_core/configs/pretrain_default.toml "
                                            "(default: built-in defaults)")
    out: str = option("runs/pretrain", help="output directory (checkpoints, metrics, plot)")
    resume: bool = option(False, help="continue from OUT/last.pt after a kill")
    progress: bool = option(True, flag="--no-progress", action="store_false", help="no tqdm progress bar")


MODELS = ("fm", "specialist", "linreg", "ffn", "small_tf", "sindy")  # the evaluation's trained models
ROLLOUT_MODE_NAMES = ("masked", "ar")  # multi-step prediction: one masked pass | autoregressive


def known_keys(cls: type, d: dict[str, Any], error: type[Exception] = ValueError) -> dict[str, Any]:
    """``d`` if every key names a field of dataclass ``cls``; else ``error`` naming the unknown keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
    return dict(d)


FINETUNE_MODES = ("full", "head", "lora")
NORMALISATIONS = ("auto", "data", "keep")


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune`. ``model`` is only used when training from scratch."""

    mode: str = option("full", choices=FINETUNE_MODES,
                       help="train everything (full), head+embed only (head), or low-rank block updates + "
                            "head/embed (lora, fm_core/lora.py)")
    steps: int = option(2000, type=int_range(1, 10**9), help="maximum optimiser steps (default 2000)")
    lr: float = option(3e-4, type=finite_float(0, 10, lo_open=True), help="Adam learning rate (default 3e-4)")
    warmup_steps: int = 50
    batch_size: int = 32
    seq_len: int = 64              # tokens per training window (clipped to the trajectory length)
    noise_std: float = 0.01
    mask_prob: float = 0.5
    hidden_weight: float = 1.0
    huber_delta: float = 1.0
    grad_clip: float = 1.0
    fraction: float = option(1.0, type=finite_float(0, 1, lo_open=True),
                             help="share of training trajectories (seeded subsample, at least 1; default 1)")
    seed: int = option(0, type=SEED)
    val_every: int = 50
    patience: int = 10             # validations without improvement before early stopping
    val_windows: int = 64          # fixed validation windows
    threads: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    # token-position range [lo, hi] of the context of masked windows (None: 1..seq_len, the pretraining rule)
    mask_context: tuple[int, int] | None = None
    # early stopping on the val open-loop rollout MSE (context, horizon) instead of the masked val loss
    val_rollout: tuple[int, int] | None = None
    min_lr_ratio: float = 0.0      # cosine decay floor (share of lr)
    # how multi-step predictions are made (val rollout, evaluation, export metadata): "masked" = one forward
    # pass with hidden future states, "ar" = autoregressive, each prediction fed back as observed
    rollout_mode: str = "masked"
    # head output in units of the data's one-step increment std (per channel) instead of the state std
    increment_scale: bool = False
    # extra training passes on the model's own (detached) one-step predictions (0 = teacher forcing only)
    pushforward: int = 0
    # units of the training loss: "state" (the normalised state) | "increment" (units of dx_scale)
    loss_scale: str = "state"
    max_minutes: float = 0.0       # wall-time cap (checked at validations; 0 = none)
    lora_rank: int = 8             # mode "lora": rank of the blocks' weight updates
    # share of every training batch drawn from synthetic RKHS systems (per-sample normalised, as in
    # pretraining): a regulariser against forgetting the prior when the rig data is tiny (0 = off)
    synthetic_mix: float = 0.0
    # L2-SP: loss += l2sp * the squared distance of the trained weights from their initial values (0 = off)
    l2sp: float = 0.0
    # exponential moving average of the weights (decay per step, 0 = off): validated and returned instead of
    # the raw weights
    ema: float = 0.0
    # residual dropout in every decoder block while training (0 = off) and AdamW's decoupled weight decay
    # (0 = plain Adam): regularisers for fits on a few trajectories
    dropout: float = 0.0
    weight_decay: float = 0.0
    # the model's state/input normalisation and increment scale: "data" = from the training trajectories,
    # "keep" = the init checkpoint's, "auto" = keep a rig-fine-tuned init's (the flywheel: a short run that
    # only balances must not rescale a model fitted on the whole rig's range), else from the data
    normalisation: str = "auto"
    # share of every training batch drawn from the replay trajectories given to finetune() (the data the init
    # model was fitted on): keeps what a short closed-loop run cannot show, e.g. the input response (0 = off)
    replay_mix: float = option(0.0, type=finite_float(0, 1, hi_open=True),
                               help="share of each batch from the --replay trajectories (default 0.5 with "
                                    "--replay, else 0)")

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"FinetuneConfig.mode must be one of {FINETUNE_MODES}, got {self.mode!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"FinetuneConfig.normalisation must be one of {NORMALISATIONS}, "
                             f"got {self.normalisation!r}")
        if self.lora_rank < 1:
            raise ValueError(f"FinetuneConfig.lora_rank must be >= 1, got {self.lora_rank}")
        if not (math.isfinite(self.l2sp) and self.l2sp >= 0):
            raise ValueError(f"FinetuneConfig.l2sp must be a finite number >= 0, got {self.l2sp}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"FinetuneConfig.ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FinetuneConfig.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"FinetuneConfig.weight_decay must be a finite number >= 0, "
                             f"got {self.weight_decay}")
        if not 0.0 <= self.synthetic_mix < 1.0:
            raise ValueError(f"FinetuneConfig.synthetic_mix must be in [0, 1), got {self.synthetic_mix}")
        if not 0.0 <= self.replay_mix < 1.0:
            raise ValueError(f"FinetuneConfig.replay_mix must be in [0, 1), got {self.replay_mix}")
        if not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"FinetuneConfig.fraction must be in (0, 1], got {self.fraction}")
        for name in ("steps", "batch_size", "seq_len", "val_every", "patience", "val_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"FinetuneConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"FinetuneConfig.mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.mask_context is not None:
            lo, hi = (int(v) for v in self.mask_context)
            if not 1 <= lo <= hi:
                raise ValueError(f"FinetuneConfig.mask_context must be [lo, hi] with 1 <= lo <= hi, "
                                 f"got {self.mask_context}")
            self.mask_context = (lo, hi)
        if self.val_rollout is not None:
            c, h = (int(v) for v in self.val_rollout)
            if c < 1 or h < 1:
                raise ValueError(f"FinetuneConfig.val_rollout must be (context, horizon) >= 1, "
                                 f"got {self.val_rollout}")
            self.val_rollout = (c, h)
        if self.rollout_mode not in ROLLOUT_MODE_NAMES:
            raise ValueError(f"FinetuneConfig.rollout_mode must be one of {sorted(ROLLOUT_MODE_NAMES)}, "
                             f"got {self.rollout_mode!r}")
        if self.pushforward < 0:
            raise ValueError(f"FinetuneConfig.pushforward must be >= 0, got {self.pushforward}")
        if self.loss_scale not in ("state", "increment"):
            raise ValueError(f"FinetuneConfig.loss_scale must be 'state' or 'increment', "
                             f"got {self.loss_scale!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"FinetuneConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Build from a dict; unknown keys raise ValueError naming them."""
        return cls(**known_keys(cls, d))


@dataclass
class Budget:
    """The training-budget rule shared by every trained model (see docs/experiment.md)."""

    steps: int = 1500  # maximum optimiser steps = the cosine schedule's length (the shared cap; docs)
    batch_size: int = 8  # windows per step
    seq_len: int = 80  # steps per training window (= context + horizon of the metric)
    val_every: int = 20  # validation period (steps)
    patience: int = 25  # validations without improvement before stopping early (500 steps; docs)
    lr_scratch: float = 1e-3  # Adam lr for models trained from scratch (FFN, small transformer, specialist)
    lr_finetune: float = 2e-3  # Adam lr when fine-tuning the pretrained model (picked on val, docs)
    window: int = 4  # history steps w of the window models (linreg, FFN)
    # transformers: share of training windows with a hidden horizon (the rest: all steps observed)
    mask_prob: float = 0.0
    # token-position range [lo, hi] of the observed context of masked training windows; None: 1..seq_len
    mask_context: tuple[int, int] | None = None
    # model selection for EVERY model on the val split: open-loop rollout MSE with (context, horizon) -- early
    # stopping (transformers, FFN) and the ridge strength (linreg); None: the one-step / masked val loss
    val_rollout: tuple[int, int] | None = None
    # transformers: multi-step prediction mode ("masked" one pass | "ar" autoregressive), head output in
    # units of the one-step increment std, Gaussian noise on the (normalised) input states in training
    rollout_mode: str = "ar"
    increment_scale: bool = True
    noise_std: float = 0.03
    pushforward: int = 0  # transformers: extra training passes on their own predictions
    loss_scale: str = "state"  # transformers: "state" | "increment" units of the training loss
    max_minutes: float = 60.0  # wall-time cap of one fit (every trained model; 0 = none)
    # the FM's fine-tuning mode: "full" | "head" | "lora" | "auto" (full and head both fitted, the one with
    # the lower val rollout MSE kept: model selection on the val split, like the ridge strength)
    ft_mode: str = "auto"
    lora_rank: int = 8
    synthetic_mix: float = 0.0  # the FM: share of synthetic windows in every fine-tuning batch
    l2sp: float = 0.0  # the FM: pull of the weights towards the pretrained ones (FinetuneConfig.l2sp)
    ema: float = 0.0  # transformers: weight averaging (FinetuneConfig.ema)
    dropout: float = 0.0  # transformers: residual dropout while training (FinetuneConfig.dropout)
    weight_decay: float = 0.0  # transformers: AdamW weight decay (FinetuneConfig.weight_decay)

    def validate(self) -> Budget:
        """Raise ``ValueError`` naming the first field out of range (the fine-tuning config's own checks)."""
        if self.window < 1:
            raise ValueError(f"Budget.window must be >= 1, got {self.window}")
        if self.ft_mode not in (*FINETUNE_MODES, "auto"):
            raise ValueError(f"Budget.ft_mode must be one of {', '.join((*FINETUNE_MODES, 'auto'))}, "
                             f"got {self.ft_mode!r}")
        if self.max_minutes < 0:
            raise ValueError(f"Budget.max_minutes must be >= 0, got {self.max_minutes}")
        for lr in (self.lr_scratch, self.lr_finetune):
            finetune_config(self, 1.0, 0, lr, None, True)
        return self


def finetune_config(
    budget: Budget, fraction: float, seed: int, lr: float, model: dict[str, Any] | None, pretrained: bool,
) -> FinetuneConfig:
    """The FinetuneConfig of one fit under ``budget`` (``pretrained``: the FM; else a model from scratch)."""
    return FinetuneConfig(
        mode=budget.ft_mode if pretrained and budget.ft_mode != "auto" else "full",
        lora_rank=budget.lora_rank,
        synthetic_mix=budget.synthetic_mix if pretrained else 0.0,
        l2sp=budget.l2sp if pretrained else 0.0,
        ema=budget.ema,
        dropout=budget.dropout,
        weight_decay=budget.weight_decay,
        steps=budget.steps,
        lr=lr,
        warmup_steps=min(50, budget.steps // 5 + 1),
        batch_size=budget.batch_size,
        seq_len=budget.seq_len,
        fraction=fraction,
        seed=seed,
        val_every=budget.val_every,
        patience=budget.patience,
        val_windows=32,
        model=dict(model or {}),
        mask_prob=budget.mask_prob,
        mask_context=budget.mask_context,
        val_rollout=budget.val_rollout,
        rollout_mode=budget.rollout_mode,
        increment_scale=budget.increment_scale,
        noise_std=budget.noise_std,
        pushforward=budget.pushforward,
        loss_scale=budget.loss_scale,
        max_minutes=budget.max_minutes,
    )
