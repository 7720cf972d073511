"""What one ``rigfm evaluate`` run is (torch-free): :class:`EvalConfig`, whose ``option(...)`` fields are also
the command's flags, and :func:`config_from_args` (the flags, ``--quick``, ``--steps`` and ``--set`` budget
overrides). The run itself is :mod:`controllers.evaluate`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fm_core.cli_types import (
    add_set_option,
    comma_list,
    finite_float,
    int_range,
    option,
    option_values,
    parse_kv,
)
from fm_core.metrics import ONE_STEP_SKIP
from fm_core.train_configs import MODELS, Budget


class EvaluateError(ValueError):
    """Bad evaluation option or input (the message names it)."""


ANGLE_FEATURES = ("raw", "sincos")


def _rig_path(text: str) -> tuple[str, str]:
    """``--data`` item: ``RIG=PATH`` -> (rig, path); a bare ``PATH`` -> ("", path), resolved once the rigs are
    known."""
    rig, sep, path = text.partition("=")
    return (rig.strip(), path) if sep else ("", text)


@dataclass
class EvalConfig:
    """Everything that defines one evaluation run (recorded in results.json); each ``option(...)`` field is
    also its ``rigfm evaluate`` flag."""

    rigs: list[str] = option(factory=lambda: ["cartpole", "furuta"], type=comma_list(),
                             help="comma-separated rig names (default cartpole,furuta)")
    fractions: list[float] = option(factory=lambda: [0.02, 0.1, 1.0], type=comma_list(float, "numbers"),
                                    help="training-data fractions (default 0.02,0.1,1.0)")
    seeds: int = option(5, type=int_range(1, 1000), help="seeds per (model, fraction) (default 5)")
    models: list[str] = option(factory=lambda: list(MODELS), type=comma_list(),
                               help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    checkpoint: str = option("fm_core/weights/default.pt", help="pretrained foundation model")
    # rig -> dataset; the flag is repeated per rig (a bare PATH when one rig is evaluated)
    data: dict[str, str] = option(factory=dict, action="append", type=_rig_path, metavar="[RIG=]DATASET.npz",
                                  help="use this dataset instead of collecting (repeat per rig: "
                                       "cartpole=a.npz)")
    runs: int = option(48, type=int_range(1, 1_000_000), help="collected runs per rig (default 48)")
    duration_s: float = option(20.0, flag="--duration", type=finite_float(0, 1e6, lo_open=True, unit="s"),
                               help="seconds per collected run (default 20)")
    window: int = 200  # dataset window (steps); stride = window (no overlap)
    context: int = option(30, type=int_range(1, 65_536),
                          help="context steps of the multi-step metric (default 30)")
    horizon: int = option(50, type=int_range(1, 65_536),
                          help="open-loop horizon of the multi-step metric (default 50)")
    one_step_skip: int = ONE_STEP_SKIP  # first targets of a window left out of the one-step metric
    budget: Budget = field(default_factory=Budget)
    out: str = option("results", help="output directory (default results/)")
    work: str | None = option(None, help="scratch directory for collected data (default OUT/_work)")
    threads: int = option(1, type=int_range(1, 1024), help="torch threads per process")
    jobs: int = option(1, type=int_range(1, 256), help="rigs evaluated in parallel processes")
    quick: bool = option(False, help="tiny CI budget (1 seed, few steps)")
    collect_rate_hz: float | None = None
    resume: bool = option(False, help="reuse finished fits from OUT/<rig>/partial.json (same config)")
    # "raw": states as logged (angles unwrapped); "sincos": every model sees the pendulum angle as (sin, cos)
    # and its predictions are mapped back (fm_core.angle_features), so the metric is unchanged
    angle_features: str = option("sincos", choices=ANGLE_FEATURES,
                                 help="pendulum angle as (sin, cos) for every model (default) or as logged "
                                      "(raw, unwrapped); the metric is the same")
    # the zero-shot question: FM with this much context (s) against persistence, horizon as the metric's
    zero_shot_context_s: float = 2.0
    zero_shot_max_len: int = 256  # context + horizon never exceeds the model's max_len

    def __post_init__(self) -> None:
        """Resolve ``--data`` items; fill the budget's metric-matched settings: masked training windows
        observe ``context`` tokens and model selection on val uses the metric's rollout (context, horizon);
        explicit values are kept."""
        if self.angle_features not in ANGLE_FEATURES:
            raise EvaluateError(f"angle_features {self.angle_features!r}: use one of {ANGLE_FEATURES}")
        if not isinstance(self.data, dict):
            self.data = self._data_by_rig(self.data)
        b = self.budget if isinstance(self.budget, Budget) else Budget(**self.budget)
        self.budget = replace(
            b,
            mask_context=tuple(b.mask_context) if b.mask_context else (self.context, self.context),
            val_rollout=tuple(b.val_rollout) if b.val_rollout else (self.context, self.horizon),
        )

    def _data_by_rig(self, items: list[tuple[str, str]]) -> dict[str, str]:
        data = {}
        for rig, path in items:
            if not rig:
                if len(self.rigs) != 1:
                    raise EvaluateError(
                        f"--data {path!r}: name the rig (RIG=PATH) when evaluating {self.rigs}")
                rig = self.rigs[0]
            data[rig] = path
        return data

    @classmethod
    def quick_config(cls, **kw: Any) -> EvalConfig:
        """CI variant: 1 seed, tiny data and budgets (seconds, not minutes)."""
        base: dict[str, Any] = dict(
            seeds=1,
            runs=6,
            duration_s=3.0,
            window=60,
            context=20,
            horizon=20,
            one_step_skip=4,
            budget=Budget(steps=4, batch_size=4, seq_len=40, val_every=2, patience=2),
            quick=True,
            collect_rate_hz=250.0,
        )
        return cls(**{**base, **kw})


def add_budget_options(p: argparse.ArgumentParser) -> None:
    """The budget flags of ``rigfm evaluate`` next to :class:`EvalConfig`'s: ``--steps`` and ``--set``."""
    p.add_argument("--steps", type=int_range(1, 10**9), default=None,
                   help="max optimiser steps per trained model (Budget.steps)")
    add_set_option(p, "training-budget field for every model (fm_core/train_configs.py Budget), e.g. --set "
                      "patience=20 --set ft_mode=head", parse=False)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from the `rigfm evaluate` flags; ``--quick`` starts from the CI budgets and keeps only the
    flags given with a value other than their default."""
    if args.quick:
        cfg = EvalConfig.quick_config(**option_values(EvalConfig, args, changed_only=True))
    else:
        cfg = EvalConfig(**option_values(EvalConfig, args))
    if args.steps is not None:
        cfg.budget = replace(cfg.budget, steps=args.steps)
    if args.overrides:
        cfg.budget = replace(cfg.budget, **_budget_overrides(args.overrides))
    return cfg


def _budget_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as Budget fields (TOML values; bare words are strings); named errors."""
    try:
        given = parse_kv(items)
    except ValueError as exc:
        raise EvaluateError(str(exc)) from None
    known = [f.name for f in fields(Budget)]
    defaults = Budget()
    out: dict[str, Any] = {}
    for key, value in given.items():
        item = f"{key}={value}"
        if key not in known:
            raise EvaluateError(f"--set {item!r}: unknown budget field {key!r}; one of {', '.join(known)}")
        default = getattr(defaults, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise EvaluateError(f"--set {item!r}: {key} takes true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise EvaluateError(f"--set {item!r}: {key} takes a number")
            if isinstance(default, float):
                value = float(value)
            elif float(value).is_integer():
                value = int(value)
        out[key] = value
    try:
        Budget(**out).validate()
    except ValueError as exc:
        raise EvaluateError(f"--set: {str(exc).replace('FinetuneConfig.', '')}") from None
    return out
