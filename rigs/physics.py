"""Rig models: `make_model(cfg, overrides) -> RigModel` (numpy only).

The equations of motion live in rigs/physics_cartpole.py and rigs/physics_furuta.py on top of the shared 2-DOF
machinery in rigs/physics_base.py; this module is the public entry point and handles parameter overrides for
model-mismatch experiments.

Overrides (a dict): any physics parameter name with an absolute value (e.g. {"cart_mass": 0.94}), and/or scale
factors applied after those:
  pole_mass_scale / pendulum_mass_scale  pendulum mass and its inertias (same shape, heavier material)
  friction_scale                         every viscous and Coulomb coefficient of both joints (0: none)
  cart_mass_scale (cart-pole), arm_inertia_scale (Furuta)
  motor_gain_scale                       motor torque constant k_t (force/torque per volt)
  back_emf_scale                         motor back-EMF constant k_m (0 with 0 V = motor disconnected)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from rigs.config import RigConfig, RigConfigError, load_config, replace_validated
from rigs.physics_base import RigModel, wrap_angle
from rigs.physics_cartpole import CartPoleModel
from rigs.physics_furuta import FurutaModel

__all__ = [
    "RigModel",
    "CartPoleModel",
    "FurutaModel",
    "make_model",
    "apply_overrides",
    "OVERRIDE_SCALES",
    "pendulum_angle_name",
    "wrap_angle",
]

_MODELS: dict[str, type[RigModel]] = {"cartpole": CartPoleModel, "furuta": FurutaModel}


def pendulum_angle_name(kind: str) -> str:
    """Name of the rig's free pendulum angle q1 (the periodic coordinate that can make full turns)."""
    if kind not in _MODELS:
        raise RigConfigError(f"unknown rig kind {kind!r}; known: {sorted(_MODELS)}")
    return _MODELS[kind].state_names[1]

_FRICTION = {
    "cartpole": ("cart_viscous", "cart_coulomb", "pendulum_viscous", "pendulum_coulomb"),
    "furuta": ("arm_viscous", "arm_coulomb", "pendulum_viscous", "pendulum_coulomb"),
}
_PENDULUM_MASS = ("pendulum_mass", "pendulum_inertia", "pendulum_axial_inertia")

# scale name -> {kind: parameters it multiplies}
OVERRIDE_SCALES: dict[str, dict[str, tuple[str, ...]]] = {
    "pole_mass_scale": {"cartpole": _PENDULUM_MASS, "furuta": _PENDULUM_MASS},
    "pendulum_mass_scale": {"cartpole": _PENDULUM_MASS, "furuta": _PENDULUM_MASS},
    "friction_scale": _FRICTION,
    "cart_mass_scale": {"cartpole": ("cart_mass",)},
    "arm_inertia_scale": {"furuta": ("arm_inertia",)},
    "motor_gain_scale": {"cartpole": ("motor_torque_constant",), "furuta": ("motor_torque_constant",)},
    "back_emf_scale": {"cartpole": ("motor_back_emf_constant",), "furuta": ("motor_back_emf_constant",)},
}


def apply_overrides(cfg: RigConfig, overrides: dict[str, Any] | None) -> Any:
    """Return the physics parameter dataclass of `cfg` with `overrides` applied and re-validated."""
    params = cfg.physics
    if not overrides:
        return params
    src = f"{cfg.source or cfg.name} (overrides)"
    names = {f.name for f in dataclasses.fields(params)}
    absolute: dict[str, Any] = {}
    scales: dict[str, float] = {}
    for key, value in overrides.items():
        if key in names:
            absolute[key] = value
        elif key in OVERRIDE_SCALES and cfg.kind in OVERRIDE_SCALES[key]:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0:
                raise RigConfigError(f"{src}: override {key} must be a finite number >= 0, got {value!r}")
            scales[key] = float(value)
        else:
            valid = sorted(names | {k for k, v in OVERRIDE_SCALES.items() if cfg.kind in v})
            raise RigConfigError(f"{src}: unknown override {key!r} for a {cfg.kind} "
                                 f"(valid: {', '.join(valid)})")
    values = {**dataclasses.asdict(params), **absolute}
    for key, factor in scales.items():
        for name in OVERRIDE_SCALES[key][cfg.kind]:
            if name in values:
                values[name] = float(values[name]) * factor
    changed = {k: v for k, v in values.items() if k in absolute or v != getattr(params, k)}
    return replace_validated(params, "physics", src, **changed)


def make_model(cfg: RigConfig | str | Path, overrides: dict[str, Any] | None = None) -> RigModel:
    """Build the model of a rig (RigConfig, shipped rig name or TOML path) with optional overrides."""
    cfg = load_config(cfg)
    return _MODELS[cfg.kind](apply_overrides(cfg, overrides))
