"""Rig configuration files: loading, validation and the shared encoder conversion (numpy only).

`load_config("cartpole" | "furuta" | "path/to/file.toml") -> RigConfig`. Every section of the TOML maps to a
frozen dataclass below; unknown keys, missing keys, wrong types and out-of-range values raise `RigConfigError`
naming the file and the key, e.g. ``furuta.toml: physics.pendulum_mass must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "RigConfigError",
    "RigConfig",
    "CartPoleParams",
    "FurutaParams",
    "Limits",
    "EncoderConfig",
    "SerialConfig",
    "PlantConfig",
    "SafeState",
    "load_config",
    "shipped_rigs",
    "replace_validated",
    "counts_to_positions",
    "positions_to_counts",
]

RIG_KINDS = ("cartpole", "furuta")


class RigConfigError(ValueError):
    """A rig configuration file (or an override of it) is invalid; the message names the file and the key."""


def _spec(gt: float | None = None, ge: float | None = None, le: float | None = None,
          lt: float | None = None, choices: tuple | None = None, unit: str = "", doc: str = "") -> Any:
    """A dataclass field carrying its validation rule (no default: every key is required in the TOML)."""
    return field(metadata={"gt": gt, "ge": ge, "le": le, "lt": lt, "choices": choices,
                           "unit": unit, "doc": doc})


# --------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class _PendulumMotorParams:
    """What both rigs have: gravity, the pendulum and the DC motor (SI units)."""

    gravity: float = _spec(gt=0, unit="m/s^2")
    pendulum_mass: float = _spec(gt=0, unit="kg")
    pendulum_length: float = _spec(gt=0, unit="m", doc="full length of the rod")
    pendulum_com: float = _spec(gt=0, unit="m", doc="pivot to centre of mass")
    pendulum_inertia: float = _spec(ge=0, unit="kg m^2", doc="about the centre of mass, across the rod")
    pendulum_viscous: float = _spec(ge=0, unit="N m s/rad")
    pendulum_coulomb: float = _spec(ge=0, unit="N m")
    pendulum_coulomb_velocity: float = _spec(gt=0, unit="rad/s")
    motor_resistance: float = _spec(gt=0, unit="ohm")
    motor_torque_constant: float = _spec(ge=0, unit="N m/A")
    motor_back_emf_constant: float = _spec(ge=0, unit="V s/rad")
    motor_inertia: float = _spec(ge=0, unit="kg m^2", doc="rotor (reflected through the gearbox, if any)")
    motor_efficiency: float = _spec(gt=0, le=1)


@dataclass(frozen=True)
class CartPoleParams(_PendulumMotorParams):
    """Physical parameters of the IP02-class cart with a long pendulum (SI units)."""

    cart_mass: float = _spec(gt=0, unit="kg", doc="cart incl. motor and gears, without rotor inertia")
    cart_viscous: float = _spec(ge=0, unit="N s/m", doc="equivalent viscous damping at the motor pinion")
    cart_coulomb: float = _spec(ge=0, unit="N")
    cart_coulomb_velocity: float = _spec(gt=0, unit="m/s", doc="tanh scale of the smooth Coulomb term")
    gear_ratio: float = _spec(gt=0)
    gear_efficiency: float = _spec(gt=0, le=1)
    pinion_radius: float = _spec(gt=0, unit="m", doc="motor pinion on the rack")


@dataclass(frozen=True)
class FurutaParams(_PendulumMotorParams):
    """Physical parameters of the QUBE-Servo 2 rotary pendulum (SI units)."""

    arm_length: float = _spec(gt=0, unit="m", doc="motor axis to pendulum pivot")
    arm_inertia: float = _spec(ge=0, unit="kg m^2", doc="rotary arm about the motor axis")
    hub_inertia: float = _spec(ge=0, unit="kg m^2", doc="module attachment hub")
    pendulum_axial_inertia: float = _spec(ge=0, unit="kg m^2", doc="about the rod's own axis")
    arm_viscous: float = _spec(ge=0, unit="N m s/rad")
    arm_coulomb: float = _spec(ge=0, unit="N m")
    arm_coulomb_velocity: float = _spec(gt=0, unit="rad/s")


@dataclass(frozen=True)
class Limits:
    """Actuation and travel limits. `position_*` is channel 0: cart position (m) or arm angle (rad)."""

    voltage_max: float = _spec(gt=0, unit="V")
    position_soft: float = _spec(gt=0, doc="firmware/safety limit: beyond it the motor is stopped")
    position_margin: float = _spec(ge=0, doc="controllers keep |position| < position_soft - position_margin")
    position_hard: float = _spec(gt=0, doc="mechanical end stop (or cable limit)")
    actuated_velocity_max: float = _spec(gt=0, doc="cart (m/s) or arm (rad/s) speed limit")
    pendulum_velocity_max: float = _spec(gt=0, unit="rad/s")

    @property
    def position_safe(self) -> float:
        """The band controllers should stay within: position_soft - position_margin."""
        return self.position_soft - self.position_margin


@dataclass(frozen=True)
class EncoderConfig:
    """Quadrature encoders, one per position channel (channel 0 = cart/arm, 1 = pendulum).

    A channel with `pinion_radius > 0` is linear (counts per metre = counts_per_rev / (2 pi r)); otherwise it
    is rotary (counts per radian = counts_per_rev / (2 pi)). `zero_position` is the SI position at count 0
    (the power-up pose, e.g. pi for a hanging pendulum); `sign` is +1 or -1 (counting direction).
    """

    channels: tuple[str, ...] = _spec()
    counts_per_rev: tuple[int, ...] = _spec(gt=0)
    pinion_radius: tuple[float, ...] = _spec(ge=0, unit="m")
    sign: tuple[int, ...] = _spec(choices=(-1, 1))
    zero_position: tuple[float, ...] = _spec()

    @property
    def counts_per_unit(self) -> tuple[float, ...]:
        """Counts per SI unit (per metre for linear channels, per radian for rotary ones)."""
        return tuple(
            cpr / (2.0 * math.pi * r) if r > 0 else cpr / (2.0 * math.pi)
            for cpr, r in zip(self.counts_per_rev, self.pinion_radius, strict=True)
        )

    @property
    def resolution(self) -> tuple[float, ...]:
        """SI size of one count per channel (m or rad)."""
        return tuple(1.0 / c for c in self.counts_per_unit)

    def counts_to_positions(self, counts: Any) -> np.ndarray:
        """Integer counts (..., channels) -> SI positions (..., channels). Angles are not wrapped."""
        c = np.asarray(counts, dtype=np.float64)
        if c.shape[-1:] != (len(self.channels),):
            raise ValueError(f"counts must have last dimension {len(self.channels)}, got shape {c.shape}")
        scale = np.asarray(self.sign, float) / np.asarray(self.counts_per_unit)
        return np.asarray(self.zero_position, float) + c * scale

    def positions_to_counts(self, positions: Any) -> np.ndarray:
        """SI positions (..., channels) -> nearest integer counts (int64); inverse of counts_to_positions."""
        p = np.asarray(positions, dtype=np.float64)
        if p.shape[-1:] != (len(self.channels),):
            raise ValueError(f"positions must have last dimension {len(self.channels)}, got shape {p.shape}")
        if not np.all(np.isfinite(p)):
            raise ValueError("positions must be finite")
        scale = np.asarray(self.counts_per_unit) * np.asarray(self.sign, float)
        return np.rint((p - np.asarray(self.zero_position, float)) * scale).astype(np.int64)


@dataclass(frozen=True)
class SerialConfig:
    """Serial link settings shared by the driver and the virtual rig."""

    baud: int = _spec(gt=0)
    timeout_s: float = _spec(gt=0, doc="read timeout")
    write_timeout_s: float = _spec(gt=0)
    handshake_timeout_s: float = _spec(gt=0, doc="time allowed for the HELLO exchange")


@dataclass(frozen=True)
class PlantConfig:
    """Simulated-plant imperfections used by rigs.sim.RigSimulator (not by the equations of motion)."""

    actuation_delay_s: float = _spec(ge=0, le=1, unit="s", doc="command to motor delay")
    count_noise_std: float = _spec(ge=0, unit="counts", doc="Gaussian jitter added before quantisation")
    current_noise_std: float = _spec(ge=0, unit="A")
    restitution: float = _spec(ge=0, le=1, doc="end-stop bounce: 0 stops dead, 1 is elastic")


@dataclass(frozen=True)
class SafeState:
    """What the firmware applies on a fault, a watchdog timeout, an estop or at exit."""

    voltage: float = _spec(unit="V")


_PHYSICS = {"cartpole": CartPoleParams, "furuta": FurutaParams}


@dataclass(frozen=True)
class RigConfig:
    """A validated rig description (see rigs/cartpole.toml and rigs/furuta.toml)."""

    name: str
    kind: str
    description: str
    sample_rate_hz: int
    control_rate_hz: int
    model_dt: float
    watchdog_ms: int
    physics: CartPoleParams | FurutaParams
    limits: Limits
    encoders: EncoderConfig
    serial: SerialConfig
    sim: PlantConfig
    safe_state: SafeState
    source: str = ""

    @property
    def n(self) -> int:
        """State dimension (4 for both rigs)."""
        return 4

    @property
    def m(self) -> int:
        """Input dimension (1: motor voltage)."""
        return 1

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the state channels in contract order."""
        if self.kind == "cartpole":
            return ("p", "theta", "p_dot", "theta_dot")
        return ("theta", "alpha", "theta_dot", "alpha_dot")

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the input channels."""
        return ("voltage",)

    def counts_to_positions(self, counts: Any) -> np.ndarray:
        """Shared encoder conversion: counts (..., 2) -> SI positions (..., 2)."""
        return self.encoders.counts_to_positions(counts)

    def positions_to_counts(self, positions: Any) -> np.ndarray:
        """Shared encoder conversion: SI positions (..., 2) -> counts (..., 2), int64."""
        return self.encoders.positions_to_counts(positions)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-serialisable) of every field."""
        return dataclasses.asdict(self)


def counts_to_positions(cfg: RigConfig, counts: Any) -> np.ndarray:
    """Module-level alias of `cfg.encoders.counts_to_positions` (the one copy of the conversion)."""
    return cfg.encoders.counts_to_positions(counts)


def positions_to_counts(cfg: RigConfig, positions: Any) -> np.ndarray:
    """Module-level alias of `cfg.encoders.positions_to_counts`."""
    return cfg.encoders.positions_to_counts(positions)


# --------------------------------------------------------------------------------------------- validation
_TOP_SCALARS: dict[str, tuple[type, dict[str, Any]]] = {
    "name": (str, {}),
    "kind": (str, {"choices": RIG_KINDS}),
    "description": (str, {}),
    "sample_rate_hz": (int, {"gt": 0}),
    "control_rate_hz": (int, {"gt": 0}),
    "model_dt": (float, {"gt": 0}),
    "watchdog_ms": (int, {"gt": 0}),
}
_SECTIONS = ("physics", "limits", "encoders", "serial", "sim", "safe_state")


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _check_scalar(v: Any, typ: type, rule: dict[str, Any], where: str, src: str) -> Any:
    """Type-check and range-check one scalar; return it converted (int -> float for float fields)."""
    if typ is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise RigConfigError(f"{src}: {where} must be a number, got {type(v).__name__} {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise RigConfigError(f"{src}: {where} must be finite, got {v!r}")
    elif typ is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RigConfigError(f"{src}: {where} must be an integer, got {type(v).__name__} {v!r}")
    elif typ is str:
        if not isinstance(v, str):
            raise RigConfigError(f"{src}: {where} must be a string, got {type(v).__name__} {v!r}")
    elif typ is bool:
        if not isinstance(v, bool):
            raise RigConfigError(f"{src}: {where} must be true or false, got {v!r}")
    for key, op, ok in (("gt", ">", lambda a, b: a > b), ("ge", ">=", lambda a, b: a >= b),
                        ("lt", "<", lambda a, b: a < b), ("le", "<=", lambda a, b: a <= b)):
        bound = rule.get(key)
        if bound is not None and not ok(v, bound):
            raise RigConfigError(f"{src}: {where} must be {op} {_fmt(bound)}, got {_fmt(v)}")
    choices = rule.get("choices")
    if choices is not None and v not in choices:
        raise RigConfigError(f"{src}: {where} must be one of {list(choices)}, got {v!r}")
    return v


def _build_section(cls: type, table: Any, section: str, src: str) -> Any:
    """Build the frozen dataclass `cls` from a TOML table, validating keys, types and ranges."""
    if not isinstance(table, dict):
        raise RigConfigError(f"{src}: [{section}] must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise RigConfigError(f"{src}: unknown key {section}.{unknown[0]} (valid keys: {', '.join(fields)})")
    missing = [k for k in fields if k not in table]
    if missing:
        raise RigConfigError(f"{src}: missing key {section}.{missing[0]}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        typ = hints[name]
        rule = dict(f.metadata)
        where = f"{section}.{name}"
        if typing.get_origin(typ) is tuple:
            elem = typing.get_args(typ)[0]
            seq = table[name]
            if not isinstance(seq, list | tuple):
                raise RigConfigError(f"{src}: {where} must be a list, got {type(seq).__name__} {seq!r}")
            values[name] = tuple(_check_scalar(v, elem, rule, f"{where}[{i}]", src)
                                 for i, v in enumerate(seq))
        else:
            values[name] = _check_scalar(table[name], typ, rule, where, src)
    return cls(**values)


def replace_validated(obj: Any, section: str, src: str, **changes: Any) -> Any:
    """`dataclasses.replace` that re-runs the field validation (used for parameter overrides)."""
    table = dataclasses.asdict(obj)
    table = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
    for k, v in changes.items():
        if k not in table:
            raise RigConfigError(f"{src}: unknown key {section}.{k} (valid keys: {', '.join(table)})")
        table[k] = v.item() if isinstance(v, np.generic) else v
    return _build_section(type(obj), table, section, src)


def _cross_check(cfg: RigConfig, src: str) -> None:
    """Relations between fields that single-field rules cannot express."""

    def err(msg: str) -> RigConfigError:
        return RigConfigError(f"{src}: {msg}")

    if cfg.control_rate_hz > cfg.sample_rate_hz or cfg.sample_rate_hz % cfg.control_rate_hz:
        raise err(f"control_rate_hz must divide sample_rate_hz ({cfg.sample_rate_hz}), "
                  f"got {cfg.control_rate_hz}")
    if cfg.model_dt < 1.0 / cfg.sample_rate_hz:
        raise err(f"model_dt must be >= 1/sample_rate_hz = {1.0 / cfg.sample_rate_hz}, got {cfg.model_dt}")
    if cfg.watchdog_ms * 1e-3 <= 1.0 / cfg.control_rate_hz:
        raise err(f"watchdog_ms must exceed one control period ({1e3 / cfg.control_rate_hz} ms), "
                  f"got {cfg.watchdog_ms}")
    lim = cfg.limits
    if not lim.position_soft < lim.position_hard:
        raise err(f"limits.position_soft must be < limits.position_hard ({lim.position_hard}), "
                  f"got {lim.position_soft}")
    if not lim.position_margin < lim.position_soft:
        raise err(f"limits.position_margin must be < limits.position_soft ({lim.position_soft}), "
                  f"got {lim.position_margin}")
    if abs(cfg.safe_state.voltage) > lim.voltage_max:
        raise err(f"safe_state.voltage must be within +-limits.voltage_max, got {cfg.safe_state.voltage}")
    ph = cfg.physics
    if ph.pendulum_com > ph.pendulum_length:
        raise err(f"physics.pendulum_com must be <= physics.pendulum_length ({ph.pendulum_length}), "
                  f"got {ph.pendulum_com}")
    enc = cfg.encoders
    for key in ("channels", "counts_per_rev", "pinion_radius", "sign", "zero_position"):
        got = len(getattr(enc, key))
        if got != 2:
            raise err(f"encoders.{key} must have 2 entries (actuated channel, pendulum), got {got}")
    if cfg.kind == "cartpole" and enc.pinion_radius[0] <= 0:
        raise err("encoders.pinion_radius[0] must be > 0 for the cart (linear) channel, got 0")
    if cfg.kind == "furuta" and enc.pinion_radius[0] != 0:
        raise err(f"encoders.pinion_radius[0] must be 0 for the rotary arm, got {enc.pinion_radius[0]}")
    if enc.pinion_radius[1] != 0:
        raise err(f"encoders.pinion_radius[1] must be 0 for the rotary pendulum, got {enc.pinion_radius[1]}")


def config_from_dict(data: dict[str, Any], src: str = "<dict>") -> RigConfig:
    """Validate a parsed TOML document (a dict) and build the RigConfig; `src` names it in errors."""
    if not isinstance(data, dict):
        raise RigConfigError(f"{src}: top level must be a table")
    allowed = set(_TOP_SCALARS) | set(_SECTIONS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RigConfigError(f"{src}: unknown key {unknown[0]} (valid keys: {', '.join(sorted(allowed))})")
    for key in list(_TOP_SCALARS) + list(_SECTIONS):
        if key not in data:
            raise RigConfigError(f"{src}: missing key {key}" if key in _TOP_SCALARS else
                                 f"{src}: missing section [{key}]")
    top = {k: _check_scalar(data[k], typ, rule, k, src) for k, (typ, rule) in _TOP_SCALARS.items()}
    cfg = RigConfig(
        **top,
        physics=_build_section(_PHYSICS[top["kind"]], data["physics"], "physics", src),
        limits=_build_section(Limits, data["limits"], "limits", src),
        encoders=_build_section(EncoderConfig, data["encoders"], "encoders", src),
        serial=_build_section(SerialConfig, data["serial"], "serial", src),
        sim=_build_section(PlantConfig, data["sim"], "sim", src),
        safe_state=_build_section(SafeState, data["safe_state"], "safe_state", src),
        source=src,
    )
    _cross_check(cfg, src)
    return cfg


def shipped_rigs() -> tuple[str, ...]:
    """Names of the rig configs shipped inside the package."""
    return RIG_KINDS


def _read_text(name_or_path: str | Path) -> tuple[str, str]:
    """Resolve a shipped rig name or a file path; return (text, label used in error messages)."""
    s = str(name_or_path)
    if s in RIG_KINDS:
        label = f"{s}.toml"
        try:
            return resources.files("rigs").joinpath(label).read_text(encoding="utf-8"), label
        except (FileNotFoundError, ModuleNotFoundError):  # pragma: no cover - broken install
            return (Path(__file__).with_name(label)).read_text(encoding="utf-8"), label
    path = Path(s)
    if not path.suffix and not path.exists():
        raise RigConfigError(f"unknown rig {s!r}: expected one of {list(RIG_KINDS)} "
                             "or a path to a .toml file")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise RigConfigError(f"{path}: rig config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RigConfigError(f"{path}: cannot read rig config: {exc}") from None


def load_config(name_or_path: str | Path | RigConfig) -> RigConfig:
    """Load and validate a rig config: "cartpole", "furuta" (shipped) or a path to a TOML file.

    A RigConfig passed in is returned unchanged. Raises RigConfigError naming the file and the key.
    """
    if isinstance(name_or_path, RigConfig):
        return name_or_path
    text, label = _read_text(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RigConfigError(f"{label}: invalid TOML: {exc}") from None
    return config_from_dict(data, label)
