"""Rig config files: shipped configs load, bad files raise RigConfigError naming the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rigs
from rigs.config import RigConfig, RigConfigError, load_config

SHIPPED = Path(rigs.__file__).parent


@pytest.mark.parametrize("rig", ["cartpole", "furuta"])
def test_shipped_configs_load_with_contract_values(rig):
    cfg = rigs.load_config(rig)
    assert isinstance(cfg, RigConfig)
    assert cfg.name == rig and cfg.kind == rig
    assert cfg.sample_rate_hz == 1000 and cfg.control_rate_hz == 500
    assert cfg.model_dt == 0.01 and cfg.watchdog_ms == 50
    assert cfg.serial.baud == 1_000_000
    assert cfg.safe_state.voltage == 0.0
    assert cfg.limits.voltage_max > 0
    assert 0 < cfg.limits.position_safe < cfg.limits.position_soft < cfg.limits.position_hard
    assert cfg.source == f"{rig}.toml"
    # same result from the explicit path, and a RigConfig passes through unchanged
    by_path = load_config(SHIPPED / f"{rig}.toml")
    assert by_path.physics == cfg.physics and by_path.limits == cfg.limits
    assert load_config(cfg) is cfg
    with pytest.raises(AttributeError):
        cfg.name = "other"  # frozen


def test_encoder_resolutions_from_the_manuals():
    cart = load_config("cartpole").encoders
    assert cart.resolution[0] == pytest.approx(22.7485e-6, rel=1e-5)  # IP02: 22.7485 um/count
    assert cart.counts_per_rev == (4096, 4096)
    qube = load_config("furuta").encoders
    assert qube.counts_per_rev == (2048, 2048)
    assert qube.resolution[1] == pytest.approx(2 * np.pi / 2048)


@pytest.mark.parametrize("rig", ["cartpole", "furuta"])
def test_counts_positions_round_trip(rig):
    enc = load_config(rig).encoders
    rng = np.random.default_rng(0)
    counts = rng.integers(-200_000, 200_000, size=(50, 2))
    back = enc.positions_to_counts(enc.counts_to_positions(counts))
    np.testing.assert_array_equal(back, counts)
    assert back.dtype == np.int64
    pos = np.column_stack([rng.uniform(-0.35, 0.35, 50), rng.uniform(-20, 20, 50)])
    err = np.abs(enc.counts_to_positions(enc.positions_to_counts(pos)) - pos)
    assert np.all(err <= 0.5 * np.asarray(enc.resolution) + 1e-12)  # within half a count
    np.testing.assert_allclose(enc.counts_to_positions([0, 0]), enc.zero_position)
    with pytest.raises(ValueError, match="last dimension 2"):
        enc.counts_to_positions([1, 2, 3])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["cartpole", "furuta"]), st.integers(-(2**31), 2**31 - 1),
       st.integers(-(2**31), 2**31 - 1))
def test_counts_round_trip_whole_int32_range(rig, c0, c1):
    enc = load_config(rig).encoders
    assert tuple(enc.positions_to_counts(enc.counts_to_positions([c0, c1]))) == (c0, c1)


def _write_variant(tmp_path: Path, rig: str, pattern: str, replacement: str) -> Path:
    text = (SHIPPED / f"{rig}.toml").read_text()
    new, n = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert n == 1, pattern
    path = tmp_path / f"{rig}.toml"
    path.write_text(new)
    return path


@pytest.mark.parametrize(
    ("rig", "pattern", "replacement", "message"),
    [
        ("furuta", r"^pendulum_mass = .*$", "pendulum_mass = -1",
         "physics.pendulum_mass must be > 0, got -1"),
        ("cartpole", r"^cart_mass = .*$", "cart_mass = 0", "physics.cart_mass must be > 0, got 0"),
        ("furuta", r"^pendulum_mass = .*$", 'pendulum_mass = "heavy"',
         "physics.pendulum_mass must be a number, got str 'heavy'"),
        ("furuta", r"^pendulum_mass = .*$", "pendulum_mass = nan", "physics.pendulum_mass must be finite"),
        ("cartpole", r"^pendulum_mass = .*$", "pendulum_mass = true",
         "physics.pendulum_mass must be a number, got bool"),
        ("cartpole", r"^gear_ratio = .*$", "gear_ratio = 3.71\nspeed = 2", "unknown key physics.speed"),
        ("cartpole", r"^gear_ratio = .*$\n", "", "missing key physics.gear_ratio"),
        ("furuta", r"^baud = .*$", "baud = 1e6", "serial.baud must be an integer"),
        ("furuta", r"^voltage_max = .*$", "voltage_max = -10", "limits.voltage_max must be > 0, got -10"),
        ("furuta", r"^motor_efficiency = .*$", "motor_efficiency = 1.5",
         "physics.motor_efficiency must be <= 1, got 1.5"),
        ("furuta", r"^position_soft = .*$", "position_soft = 3.0", "limits.position_soft must be < "),
        ("cartpole", r"^counts_per_rev = .*$", "counts_per_rev = [4096]",
         "encoders.counts_per_rev must have 2 entries"),
        ("cartpole", r"^counts_per_rev = .*$", "counts_per_rev = [4096, -1]",
         r"encoders.counts_per_rev\[1\] must be > 0, got -1"),
        ("cartpole", r"^sign = .*$", "sign = [1, 2]", r"encoders.sign\[1\] must be one of \[-1, 1\], got 2"),
        ("cartpole", r"^kind = .*$", 'kind = "segway"', "kind must be one of"),
        ("cartpole", r"^kind = .*$", 'kind = "furuta"', "unknown key physics.cart_"),
        ("furuta", r"^control_rate_hz = .*$", "control_rate_hz = 300", "control_rate_hz must divide"),
        ("furuta", r"^watchdog_ms = .*$", "watchdog_ms = 1", "watchdog_ms must exceed one control period"),
        ("furuta", r"^voltage = .*$", "voltage = 12.0", "safe_state.voltage must be within"),
        ("furuta", r"^restitution = .*$", "restitution = -0.5", "sim.restitution must be >= 0"),
        ("furuta", r"^\[safe_state\]\n.*$", "", "missing section \\[safe_state\\]"),
        ("cartpole", r"^pendulum_com = .*$", "pendulum_com = 0.9", "physics.pendulum_com must be <="),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path, rig, pattern, replacement, message):
    path = _write_variant(tmp_path, rig, pattern, replacement)
    with pytest.raises(RigConfigError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")  # the file is named first


def test_invalid_toml_missing_file_and_unknown_name(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(RigConfigError, match=r"broken.toml: invalid TOML"):
        load_config(bad)
    with pytest.raises(RigConfigError, match=r"nowhere.toml: rig config file not found"):
        load_config(tmp_path / "nowhere.toml")
    with pytest.raises(RigConfigError, match="unknown rig 'segway'"):
        load_config("segway")
    assert issubclass(RigConfigError, ValueError)


def test_to_dict_round_trips_through_validation():
    from rigs.config import config_from_dict

    cfg = load_config("furuta")
    d = cfg.to_dict()
    d.pop("source")
    assert config_from_dict(d, "copy").physics == cfg.physics
