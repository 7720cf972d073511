"""Synthetic RKHS dynamics generator: reproducibility, norm scaling, selection, shapes, integrators."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fm_core.rkhs import (
    INPUT_KINDS,
    RKHSConfig,
    RKHSConfigError,
    RKHSGenerationError,
    accept_mask,
    draw_candidates,
    generate_batch,
    observe_angles,
    sample_inputs,
    sample_system,
    simulate,
    total_variation,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _real_tv(x: np.ndarray, n: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over the real channels of each trajectory's TV rate."""
    tv = total_variation(x, dt)
    real = np.arange(x.shape[2])[None, :] < n[:, None]
    return np.where(real, tv, np.inf).min(1), np.where(real, tv, -np.inf).max(1)


def test_same_seed_same_arrays_different_seed_differs():
    cfg = RKHSConfig()
    a = generate_batch(_rng(7), 24, 64, cfg)
    b = generate_batch(_rng(7), 24, 64, cfg)
    c = generate_batch(_rng(8), 24, 64, cfg)
    for f in ("x", "u", "n", "m"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.x, c.x)


def test_rkhs_norm_scaling_hits_target_exactly():
    cfg = RKHSConfig(num_centres=24)
    n = np.array([1, 3, 6, 2, 4])
    m = np.array([0, 2, 1, 1, 0])
    sys_ = sample_system(_rng(1), n, m, cfg)
    # independent Gram matrix: direct pairwise distances in float64
    zs = sys_.centres / sys_.lengthscales[:, None, :]
    K = np.exp(-0.5 * ((zs[:, :, None, :] - zs[:, None, :, :]) ** 2).sum(-1))
    for s in range(len(n)):
        for j in range(sys_.n_pad):
            q = sys_.alpha[s, :, j] @ K[s] @ sys_.alpha[s, :, j]
            if j < n[s]:
                assert abs(q - sys_.rkhs_norm[s] ** 2) / sys_.rkhs_norm[s] ** 2 < 1e-6
            else:
                assert q == 0.0
    lo, hi = cfg.rkhs_norm_range
    assert ((sys_.rkhs_norm >= lo) & (sys_.rkhs_norm <= hi)).all()
    assert len(set(np.round(sys_.rkhs_norm, 6))) == len(n)  # drawn per system


def test_rkhs_part_bounded_by_norm_and_padding_inert():
    """|f_j(z)| <= ||f_j||_H since k(z,z)=1; padded state outputs are exactly zero."""
    cfg = RKHSConfig(dtype="float64")
    n = np.array([2, 4, 1])
    m = np.array([1, 0, 2])
    sys_ = sample_system(_rng(2), n, m, cfg)
    rng = _rng(3)
    for _ in range(20):
        x = rng.normal(0, 1.5, (3, sys_.n_pad)) * (np.arange(sys_.n_pad) < n[:, None])
        u = rng.normal(0, 1.5, (3, sys_.m_pad)) * (np.arange(sys_.m_pad) < m[:, None])
        f = sys_(x, u) + sys_.stab[:, None] * x        # the RKHS part only
        assert (np.abs(f) <= sys_.rkhs_norm[:, None] * (1 + 1e-9)).all()
        assert (f[np.arange(sys_.n_pad)[None, :] >= n[:, None]] == 0).all()
    # a single system accepts 1-D inputs
    one = sample_system(_rng(4), 3, 1, cfg)
    assert one(np.zeros(3), np.zeros(1)).shape == (3,)


def test_shapes_padding_and_dtypes_for_mixed_n_m():
    cfg = RKHSConfig()
    b = generate_batch(_rng(5), 200, 48, cfg)
    assert b.x.shape == (200, 48, 6) and b.u.shape == (200, 48, 2)
    assert b.x.dtype == np.float32 and b.u.dtype == np.float32
    assert b.n.shape == (200,) and b.m.shape == (200,)
    assert set(b.n.tolist()) == set(range(1, 7)) and set(b.m.tolist()) == {0, 1, 2}
    for i in range(200):
        assert (b.x[i, :, b.n[i]:] == 0).all() and (b.u[i, :, b.m[i]:] == 0).all()
        assert np.abs(b.x[i, :, : b.n[i]]).max() > 0
    assert (b.state_mask().sum(1) == b.n).all() and (b.input_mask().sum(1) == b.m).all()
    # configurable widths and ranges
    cfg2 = RKHSConfig(n_max=3, m_max=1, n_range=(2, 3), m_range=(1, 1))
    b2 = generate_batch(_rng(6), 40, 32, cfg2)
    assert b2.x.shape == (40, 32, 3) and b2.u.shape == (40, 32, 1)
    assert set(b2.n.tolist()) <= {2, 3} and (b2.m == 1).all()


def test_outputs_finite_and_bounded():
    cfg = RKHSConfig()
    b = generate_batch(_rng(9), 256, 128, cfg)
    assert np.isfinite(b.x).all() and np.isfinite(b.u).all()
    assert np.abs(b.x).max() <= cfg.x_bound


def test_tv_selection_filters_flat_trajectories():
    # very wide norm range: many systems barely move
    cfg = RKHSConfig(rkhs_norm_range=(1e-3, 20.0), tv_min=0.1, tv_max=5.0)
    x, _, n, _ = draw_candidates(_rng(10), 400, 96, cfg)
    raw_lo, _ = _real_tv(x, n, cfg.dt)
    assert (raw_lo < cfg.tv_min).mean() > 0.2              # unfiltered draws do contain flat ones
    b = generate_batch(_rng(10), 150, 96, cfg)
    lo, hi = _real_tv(b.x, b.n, cfg.dt)
    assert (lo >= cfg.tv_min).all() and (hi <= cfg.tv_max).all()
    assert np.median(lo) > np.median(raw_lo)
    ok, stats = accept_mask(x, n, cfg)
    assert stats["flat"] == int((raw_lo < cfg.tv_min).sum()) and stats["accepted"] == int(ok.sum())


def test_tv_band_upper_limit_rejects():
    cfg = RKHSConfig(tv_min=0.0, tv_max=0.15)
    b = generate_batch(_rng(11), 60, 64, cfg)
    _, hi = _real_tv(b.x, b.n, cfg.dt)
    assert (hi <= 0.15).all()


def test_flat_config_is_rejected_with_clear_error():
    cfg = RKHSConfig(rkhs_norm_range=(1e-5, 1e-5), stab_range=(0.0, 0.0), max_rounds=3)
    with pytest.raises(RKHSGenerationError, match="tv_min"):
        generate_batch(_rng(12), 8, 32, cfg)


def test_diverging_systems_rejected_and_replaced():
    # lam < 0 destabilises: a good share of the draws blow up beyond x_bound or to Inf
    cfg = RKHSConfig(stab_range=(-1.0, 0.5), tv_min=0.0)
    x, _, n, _ = draw_candidates(_rng(13), 300, 256, cfg)
    ok, stats = accept_mask(x, n, cfg)
    assert stats["out_of_bound"] + stats["nonfinite"] > 30
    b = generate_batch(_rng(13), 100, 256, cfg)
    assert np.isfinite(b.x).all() and np.abs(b.x).max() <= cfg.x_bound
    # explicit Euler instability (dt * lam > 2) diverges for every system -> generation fails loudly
    bad = RKHSConfig(stab_range=(50.0, 60.0), max_rounds=2)
    x, _, n, _ = draw_candidates(_rng(14), 50, 256, bad)
    assert not accept_mask(x, n, bad)[0].any()
    with pytest.raises(RKHSGenerationError, match="x_bound"):
        generate_batch(_rng(14), 4, 256, bad)


def test_simulate_matches_manual_integration():
    cfg = RKHSConfig(dtype="float64")
    n, m = np.array([3, 1, 2]), np.array([1, 2, 0])
    sys_ = sample_system(_rng(15), n, m, cfg)
    u, _ = sample_inputs(_rng(16), m, 40, cfg, m_pad=sys_.m_pad)
    x0 = _rng(17).uniform(-1, 1, (3, sys_.n_pad)) * (np.arange(sys_.n_pad) < n[:, None])
    h = cfg.dt
    for method in ("euler", "rk4"):
        xs = simulate(sys_, x0, u, h, method)
        x = x0.copy()
        for t in range(39):
            ut = u[:, t]
            if method == "euler":
                x = x + h * sys_(x, ut)
            else:
                k1 = sys_(x, ut)
                k2 = sys_(x + h / 2 * k1, ut)
                k3 = sys_(x + h / 2 * k2, ut)
                k4 = sys_(x + h * k3, ut)
                x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            np.testing.assert_allclose(xs[:, t + 1], x, rtol=1e-9, atol=1e-11)


def test_euler_and_rk4_converge_as_dt_shrinks():
    cfg = RKHSConfig(dtype="float64")
    n, m = np.array([2, 3, 4, 1]), np.array([1, 0, 2, 1])
    sys_ = sample_system(_rng(18), n, m, cfg)
    x0 = _rng(19).uniform(-1, 1, (4, sys_.n_pad)) * (np.arange(sys_.n_pad) < n[:, None])
    u_const = _rng(20).uniform(-1, 1, (4, 1, sys_.m_pad)) * (np.arange(sys_.m_pad) < m[:, None, None])
    t_end = 2.0

    def final(dt: float, method: str) -> np.ndarray:
        steps = round(t_end / dt)
        return simulate(sys_, x0, np.repeat(u_const, steps + 1, axis=1), dt, method)[:, -1]

    ref = final(0.0025, "rk4")
    errs = [np.abs(final(dt, "euler") - ref).max() for dt in (0.04, 0.02, 0.01)]
    rk_err = np.abs(final(0.04, "rk4") - ref).max()
    assert errs[0] > errs[1] > errs[2] > 0
    assert 1.6 < errs[0] / errs[1] < 2.5 and 1.6 < errs[1] / errs[2] < 2.5     # first order
    assert rk_err < errs[2] / 100                                                # RK4 far more accurate


def test_input_kinds_have_their_character():
    cfg = RKHSConfig(input_offset=0.0, input_amp_range=(1.0, 1.0))
    m = np.full(64, 2)
    for k, kind in enumerate(INPUT_KINDS):
        u, kinds = sample_inputs(_rng(21), m, 256, RKHSConfig(**{**cfg.to_dict(), "input_mix": {kind: 1.0}}))
        assert (kinds == k).all() and u.shape == (64, 256, 2) and np.isfinite(u).all()
        rms = np.sqrt((u**2).mean(1))
        if kind == "zero":
            assert (u == 0).all()
        elif kind == "steps":
            changes = (np.diff(u, axis=1) != 0).sum(1)
            assert changes.max() < 128                          # piecewise constant
        else:
            np.testing.assert_allclose(rms, 1.0, rtol=1e-3)     # unit RMS (times amplitude 1)
    u, _ = sample_inputs(_rng(22), np.array([0, 1, 2]), 32, cfg, m_pad=2)
    assert (u[0] == 0).all() and (u[1, :, 1] == 0).all()


def test_config_validation_names_the_field():
    with pytest.raises(RKHSConfigError, match="integrator"):
        RKHSConfig(integrator="heun")
    with pytest.raises(RKHSConfigError, match="n_range"):
        RKHSConfig(n_max=4, n_range=(1, 6))
    with pytest.raises(RKHSConfigError, match="rkhs_norm_range"):
        RKHSConfig(rkhs_norm_range=(0.0, 1.0))
    with pytest.raises(RKHSConfigError, match="input_mix"):
        RKHSConfig(input_mix={"chirp": 1.0})
    with pytest.raises(RKHSConfigError, match="dt"):
        RKHSConfig(dt=0.0)
    with pytest.raises(RKHSConfigError, match="bogus"):
        RKHSConfig.from_dict({"bogus": 1})
    # TOML-style lists are accepted and round-trip
    cfg = RKHSConfig.from_dict({"lengthscale_range": [0.4, 1.0], "n_max": 4})
    assert cfg.lengthscale_range == (0.4, 1.0) and cfg.n_range == (1, 4)
    assert RKHSConfig.from_dict(cfg.to_dict()) == cfg


def test_float32_simulation_tracks_float64():
    """The fast float32 path (expanded-square kernel) agrees with float64 over a full window."""
    n, m = np.array([4, 2, 6, 1]), np.array([2, 0, 1, 1])
    s64 = sample_system(_rng(23), n, m, RKHSConfig(dtype="float64"))
    s32 = sample_system(_rng(23), n, m, RKHSConfig(dtype="float32"))
    np.testing.assert_array_equal(s64.alpha, s32.alpha)
    u, _ = sample_inputs(_rng(24), m, 128, RKHSConfig(dtype="float64"), m_pad=s64.m_pad)
    x0 = _rng(25).uniform(-1, 1, (4, s64.n_pad)) * (np.arange(s64.n_pad) < n[:, None])
    for method in ("euler", "rk4"):
        a = simulate(s64, x0, u, 0.05, method)
        b = simulate(s32, x0, u, 0.05, method)
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a, atol=2e-3 * max(1.0, np.abs(a).max()))


def test_dict_config_accepted_like_toml_table():
    a = generate_batch(_rng(26), 8, 32, {"n_max": 4, "m_max": 1, "integrator": "rk4"})
    b = generate_batch(_rng(26), 8, 32, RKHSConfig(n_max=4, m_max=1, integrator="rk4"))
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.shape == (8, 32, 4)
    with pytest.raises(RKHSConfigError, match="nmax"):
        generate_batch(_rng(26), 8, 32, {"nmax": 4})


# ----------------------------------------------------------------------------------------- mechanical systems
def test_mechanical_system_has_kinematic_positions_and_rkhs_accelerations():
    cfg = RKHSConfig(num_centres=16)
    n, m = np.array([4, 2, 3]), np.array([1, 0, 2])
    mech = np.array([True, True, False])
    sys_ = sample_system(_rng(31), n, m, cfg, mechanical=mech)
    q = sys_.rkhs_norms_squared()
    # positions (j < n/2) of mechanical systems have no RKHS part; velocities and the first-order system do
    assert (q[0, :2] == 0).all() and (q[1, :1] == 0).all()
    np.testing.assert_allclose(q[0, 2:4], sys_.rkhs_norm[0] ** 2, rtol=1e-6)
    np.testing.assert_allclose(q[2, :3], sys_.rkhs_norm[2] ** 2, rtol=1e-6)
    rng = _rng(32)
    x = rng.normal(size=(3, sys_.n_pad)) * (np.arange(sys_.n_pad) < n[:, None])
    u = rng.normal(size=(3, sys_.m_pad))
    dx = sys_(x, u)
    lam = sys_.stab
    np.testing.assert_allclose(dx[0, :2], x[0, 2:4] - lam[0] * x[0, :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx[1, 0], x[1, 1] - lam[1] * x[1, 0], rtol=1e-5, atol=1e-6)
    assert np.isfinite(dx).all() and (dx[1, 2:] == 0).all()       # padded states stay exactly 0


@pytest.mark.parametrize("integrator", ["euler", "rk4"])
def test_simulated_mechanical_trajectory_matches_its_vector_field(integrator):
    cfg = RKHSConfig(dtype="float64")
    sys_ = sample_system(_rng(33), np.array([4]), np.array([1]), cfg, mechanical=True)
    u = np.full((1, 40, 1), 0.3)
    x = simulate(sys_, np.array([[0.2, -0.1, 0.5, 0.0]]), u, 0.01, integrator)
    # finite-difference velocity of the positions = v - lam q to first order in dt
    dq = (x[0, 1:, :2] - x[0, :-1, :2]) / 0.01
    expect = x[0, :-1, 2:] - sys_.stab[0] * x[0, :-1, :2]
    np.testing.assert_allclose(dq, expect, atol=0.05)
    if integrator == "euler":      # Euler is exact step by step
        np.testing.assert_allclose(dq, expect, atol=1e-9)


def test_mechanical_fraction_draws_even_dims_and_zero_keeps_the_default_stream():
    base = generate_batch(_rng(5), 64, 40, RKHSConfig())
    again = generate_batch(_rng(5), 64, 40, RKHSConfig(mechanical_fraction=0.0))
    np.testing.assert_array_equal(base.x, again.x)
    only = generate_batch(_rng(5), 128, 40, RKHSConfig(mechanical_fraction=1.0))
    assert set(np.unique(only.n)) <= {2, 4, 6} and np.isfinite(only.x).all()
    half = generate_batch(_rng(6), 256, 40, RKHSConfig(mechanical_fraction=0.5))
    assert (half.n % 2 == 1).any() and (half.n % 2 == 0).mean() > 0.6  # odd n: first-order draws only


@pytest.mark.parametrize("kw, field", [
    ({"mechanical_fraction": 1.5}, "mechanical_fraction"),
    ({"mechanical_fraction": "half"}, "mechanical_fraction"),
    ({"mechanical_fraction": 0.5, "n_range": (1, 1)}, "mechanical_fraction"),
])
def test_mechanical_fraction_validation_names_the_field(kw, field):
    with pytest.raises(RKHSConfigError, match=field):
        RKHSConfig(**kw)


def test_odd_mechanical_system_is_refused():
    with pytest.raises(ValueError, match="even n"):
        sample_system(_rng(1), np.array([3]), np.array([1]), RKHSConfig(), mechanical=True)


# ----------------------------------------------------------------------------------------- angle observation
def test_observe_angles_replaces_one_position_by_sin_cos_and_shifts_the_rest():
    rng = _rng(40)
    x = rng.normal(size=(3, 20, 4)).astype(np.float32)
    x[2, :, 2:] = 0.0  # system 2 has n = 2 (padded)
    n = np.array([4, 4, 2])
    angle, which = np.array([True, False, True]), np.array([1, 0, 0])
    out, n2 = observe_angles(x, n, angle, which, np.array([2.0, 1.0, 1.5]))
    assert out.shape == (3, 20, 5) and n2.tolist() == [5, 4, 3]
    np.testing.assert_array_equal(out[0, :, 0], x[0, :, 0])
    np.testing.assert_allclose(out[0, :, 1], np.sin(2.0 * x[0, :, 1]), rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 2], np.cos(2.0 * x[0, :, 1]), rtol=1e-6)
    np.testing.assert_array_equal(out[0, :, 3:], x[0, :, 2:])
    np.testing.assert_array_equal(out[1, :, :4], x[1])  # not an angle system: unchanged, padded
    assert not out[1, :, 4].any()
    np.testing.assert_allclose(out[2, :, 0], np.sin(1.5 * x[2, :, 0]), rtol=1e-6)
    np.testing.assert_array_equal(out[2, :, 2], x[2, :, 1])
    assert not out[2, :, 3:].any()


def test_angle_fraction_batches_have_unit_circle_pairs_and_odd_dims():
    cfg = RKHSConfig(mechanical_fraction=1.0, angle_fraction=1.0)
    b = generate_batch(_rng(41), 96, 40, cfg)
    assert np.isfinite(b.x).all() and set(np.unique(b.n)) <= {3, 5, 6}
    odd = np.flatnonzero(b.n % 2 == 1)
    assert odd.size > 20
    for s in odd:  # exactly one adjacent channel pair on the unit circle at every step
        xs = b.x[s, :, : b.n[s]]
        on_circle = [j for j in range(b.n[s] - 1)
                     if np.allclose(xs[:, j] ** 2 + xs[:, j + 1] ** 2, 1.0, atol=1e-5)]
        assert len(on_circle) == 1 and on_circle[0] < b.n[s] // 2 + 1
    # mechanical-only draws the same systems when the angle share is 0 (no extra random numbers)
    a = generate_batch(_rng(42), 32, 40, RKHSConfig(mechanical_fraction=0.5, angle_fraction=0.0))
    m = generate_batch(_rng(42), 32, 40, RKHSConfig(mechanical_fraction=0.5))
    np.testing.assert_array_equal(a.x, m.x)


@pytest.mark.parametrize("kw, why", [
    ({"angle_fraction": 0.5}, "needs mechanical_fraction > 0"),
    ({"angle_fraction": -0.1, "mechanical_fraction": 0.5}, r"must be a number in \[0, 1\]"),
    ({"angle_fraction": 0.5, "mechanical_fraction": 0.5, "n_range": (2, 2)}, r"n \+ 1 <= 2"),
])
def test_angle_fraction_validation_names_the_field(kw, why):
    with pytest.raises(RKHSConfigError, match=f"angle_fraction.*{why}"):
        RKHSConfig(**kw)


def test_time_scale_is_a_time_rescaling_and_off_keeps_the_default_stream():
    # x' = c F(x, u) sampled at dt is F sampled at c dt: the same draws with c fixed to 0.5 (range (0.5, 0.5))
    # at dt 0.02 equal the unscaled system at dt 0.01, step for step (Euler, float64), mechanical included
    base = RKHSConfig(dtype="float64", mechanical_fraction=0.5)
    n, m, mech = np.array([4, 3]), np.array([1, 2]), np.array([True, False])
    plain = sample_system(_rng(41), n, m, base, mechanical=mech)
    scaled = sample_system(_rng(41), n, m, replace(base, time_scale_range=(0.5, 0.5)), mechanical=mech)
    np.testing.assert_allclose(scaled.rkhs_norms_squared(), 0.25 * plain.rkhs_norms_squared(), rtol=1e-9)
    x0 = _rng(42).normal(size=(2, 4)) * (np.arange(4) < n[:, None])
    u = _rng(43).normal(size=(2, 30, 2)) * (np.arange(2) < m[:, None, None])
    np.testing.assert_allclose(simulate(scaled, x0, u, 0.02), simulate(plain, x0, u, 0.01), rtol=1e-9,
                               atol=1e-12)
    # off (None): no extra draws, the default stream is bit-identical; on: speeds spread over the range
    np.testing.assert_array_equal(generate_batch(_rng(5), 32, 40, RKHSConfig()).x,
                                  generate_batch(_rng(5), 32, 40, RKHSConfig(time_scale_range=None)).x)
    wide = sample_system(_rng(44), np.full(400, 2), np.full(400, 1), RKHSConfig(time_scale_range=(0.1, 1.0)))
    ratio = wide.stab / sample_system(_rng(44), np.full(400, 2), np.full(400, 1), RKHSConfig()).stab
    assert 0.1 <= ratio.min() < 0.15 and 0.9 < ratio.max() <= 1.0


@pytest.mark.parametrize("value", [(0.0, 1.0), (2.0, 1.0), (0.5,), ("a", 1.0), (0.1, float("inf"))])
def test_time_scale_range_validation_names_the_field(value):
    with pytest.raises(RKHSConfigError, match="time_scale_range"):
        RKHSConfig(time_scale_range=value)
