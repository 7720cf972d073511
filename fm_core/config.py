"""Training configuration: TOML files with sections [model], [data], [rkhs], [train] plus ``--set`` overrides.

Importing this module is cheap; validating the [model] section imports fm_core.model (torch).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from fm_core.cli_types import split_kv


class ConfigError(ValueError):
    """Invalid configuration: names the file / section / key."""


@dataclass
class DataConfig:
    """Online synthetic batches (see fm_core/data.py)."""

    batch_size: int = 32
    seq_len: int = 64            # tokens per training window
    noise_std: float = 0.01      # Gaussian noise on observed input states (normalised units)
    mask_prob: float = 0.5       # probability that a sample gets masked long-horizon prediction
    min_context: int = 1         # smallest context length L for masked samples
    context_mask: bool = True    # TimesFM-style random zeroing of the first r in [0, p-1] history steps
    num_workers: int = 1         # DataLoader worker processes generating batches
    val_batches: int = 4         # fixed validation batches (seeded) evaluated on rank 0
    # per-sample normalisation like fine-tuning: every system's x and u to zero mean / unit std, and the
    # head's increment scale set to that system's one-step increment std (DynamicsFM.dx_scale)
    normalize: bool = False


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    seed: int = 0
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05   # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    huber_delta: float = 1.0
    hidden_weight: float = 1.0   # loss weight of hidden (masked) positions relative to context positions
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 100
    threads: int = 0             # torch intra-op threads per process (0 = leave torch default)
    max_minutes: float = 0.0     # stop cleanly (and checkpoint) after this wall time; 0 = no limit
    # PDEDER penalty (fm_core/lyapunov.py, docs/model.md): loss += lyapunov_weight * the top Lyapunov
    # exponent of the latent one-step map on `lyapunov_samples` windows of each batch, estimated over
    # `lyapunov_steps` autoregressive steps (after `lyapunov_burn_in`) from `lyapunov_context` observed steps
    lyapunov_weight: float = 0.0  # 0 = off
    lyapunov_steps: int = 8
    lyapunov_context: int = 16
    lyapunov_samples: int = 4
    lyapunov_burn_in: int = 1
    # warm start: initial weights from this checkpoint (its [model] must equal this config's); the optimiser,
    # schedule and step count start fresh. "" = random initialisation
    init: str = ""


@dataclass
class FullConfig:
    """Everything a pretraining run needs; ``rkhs`` is passed to ``fm_core.rkhs.RKHSConfig(**rkhs)``."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rkhs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "data": asdict(self.data), "rkhs": dict(self.rkhs),
                "train": asdict(self.train)}


_SECTIONS = ("model", "data", "rkhs", "train")


def _coerce(section: str, cls: type, values: dict[str, Any], source: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in known:
            raise ConfigError(f"{source}: unknown key [{section}] {k!r}; known: {sorted(known)}")
        default = getattr(cls(), k)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"{source}: [{section}] {k} must be true/false, got {v!r}")
        elif isinstance(default, int):
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
                raise ConfigError(f"{source}: [{section}] {k} must be an integer, got {v!r}")
            v = int(v)
        elif isinstance(default, float):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"{source}: [{section}] {k} must be a number, got {v!r}")
            v = float(v)
        kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> FullConfig:
    """Validate a nested dict (TOML layout) into a FullConfig; unknown sections/keys raise ConfigError."""
    unknown = sorted(set(d) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {list(_SECTIONS)}")
    for s in _SECTIONS:
        if s in d and not isinstance(d[s], dict):
            raise ConfigError(f"{source}: [{s}] must be a table")
    cfg = FullConfig(
        model=dict(d.get("model", {})),
        data=_coerce("data", DataConfig, d.get("data", {}), source),
        rkhs=dict(d.get("rkhs", {})),
        train=_coerce("train", TrainConfig, d.get("train", {}), source),
    )
    _validate(cfg, source)
    return cfg


def _validate(cfg: FullConfig, source: str) -> None:
    from fm_core.model import ModelConfig  # lazy: torch

    try:
        mc = ModelConfig.from_dict(cfg.model).to_dict()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [model] {exc}") from None
    from fm_core.rkhs import RKHSConfig  # numpy only

    rk = {"n_max": mc["n_max"], "m_max": mc["m_max"], **cfg.rkhs}
    try:
        RKHSConfig.from_dict(rk)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [rkhs] {exc}") from None
    if rk["n_max"] != mc["n_max"] or rk["m_max"] != mc["m_max"]:
        raise ConfigError(f"{source}: [rkhs] n_max/m_max must equal the model's "
                          f"({mc['n_max']}/{mc['m_max']})")
    d, t = cfg.data, cfg.train
    checks = [
        (d.batch_size >= 1, "[data] batch_size must be >= 1"),
        (1 <= d.seq_len <= mc["max_len"], f"[data] seq_len must be in [1, model max_len={mc['max_len']}]"),
        (d.noise_std >= 0, "[data] noise_std must be >= 0"),
        (0 <= d.mask_prob <= 1, "[data] mask_prob must be in [0, 1]"),
        (1 <= d.min_context <= d.seq_len, "[data] min_context must be in [1, seq_len]"),
        (d.num_workers >= 0, "[data] num_workers must be >= 0"),
        (d.val_batches >= 0, "[data] val_batches must be >= 0"),
        (t.steps >= 1, "[train] steps must be >= 1"),
        (t.lr > 0, "[train] lr must be > 0"),
        (t.warmup_steps >= 0, "[train] warmup_steps must be >= 0"),
        (0 <= t.min_lr_ratio <= 1, "[train] min_lr_ratio must be in [0, 1]"),
        (t.grad_clip > 0, "[train] grad_clip must be > 0"),
        (t.huber_delta > 0, "[train] huber_delta must be > 0"),
        (t.hidden_weight >= 0, "[train] hidden_weight must be >= 0"),
        (t.log_every >= 1 and t.val_every >= 1 and t.ckpt_every >= 1, "[train] *_every must be >= 1"),
        (t.threads >= 0, "[train] threads must be >= 0"),
        (t.lyapunov_weight >= 0, "[train] lyapunov_weight must be >= 0"),
        (t.lyapunov_steps >= 1 and t.lyapunov_samples >= 1 and t.lyapunov_burn_in >= 0,
         "[train] lyapunov_steps and lyapunov_samples must be >= 1, lyapunov_burn_in >= 0"),
        (t.lyapunov_weight == 0 or mc["patch"] <= t.lyapunov_context
         and t.lyapunov_context + t.lyapunov_burn_in + t.lyapunov_steps + 1 <= d.seq_len,
         f"[train] lyapunov_context (>= patch {mc['patch']}) + lyapunov_burn_in + lyapunov_steps + 1 must "
         f"be <= [data] seq_len={d.seq_len}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: {msg}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (:func:`fm_core.cli_types.split_kv`: TOML values, bare words strings)."""
    try:
        key, value = split_kv(item)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    path = [p for p in key.split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"--set {item!r}: key must be section.key (e.g. train.lr=3e-4)")
    return path, value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with ``--set`` overrides applied."""
    out = copy.deepcopy(d)
    for item in overrides or []:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a table")
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FullConfig:
    """Load a TOML config (or defaults when ``path`` is None) and apply ``--set`` overrides."""
    d: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            d = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return config_from_dict(apply_overrides(d, overrides or []), source)
