"""SINDy with control (fm_core/sindy.py): exact recovery of systems inside its library (a linear system and a
pendulum with sin terms making full turns), the same model in raw and (sin, cos) angle modes, and diverging
rollouts reported as inf (never NaN)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fm_core.angle_features import SinCosCodec, SinCosPredictor
from fm_core.baselines import Budget, fit_model
from fm_core.metrics import prediction_errors
from fm_core.sindy import detect_layout, fit_sindy
from fm_core.trajfile import TrajData

DT = 0.01
A = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [-2.0, 0.5, -0.3, 0.0], [0.4, -3.0, 0.0, -0.2]])
B = np.array([[0.0], [0.0], [1.5], [-0.8]])


def linear_data(k: int, t: int, seed: int) -> TrajData:
    """Noise-free x[t+1] = x[t] + dt (A x[t] + B u[t]) (float64: exact to rounding)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(k, t, 1))
    x = np.zeros((k, t, 4))
    x[:, 0] = rng.normal(size=(k, 4))
    for i in range(t - 1):
        x[:, i + 1] = x[:, i] + DT * (x[:, i] @ A.T + u[:, i] @ B.T)
    return TrajData(x, u, DT)


def test_recovers_a_linear_system_exactly_and_rolls_it_out():
    tr, va, te = linear_data(20, 100, 0), linear_data(5, 100, 1), linear_data(4, 100, 2)
    p = fit_sindy(tr, va, 0, Budget(val_rollout=(20, 50)), 1.0)
    eq = p.coefficients()
    for i in range(4):
        want = {f"x{j}": A[i, j] for j in range(4) if A[i, j]} | ({"u0": B[i, 0]} if B[i, 0] else {})
        assert set(eq[f"x{i}"]) == set(want), (i, eq[f"x{i}"])  # every other term (x0^2, 1, ...) is zero
        for name, v in want.items():
            assert eq[f"x{i}"][name] == pytest.approx(v, rel=1e-6, abs=1e-9)
    assert p.info["library_size"] == 21 and p.info["terms"] == 10 and p.info["angles"] == []
    roll = p.rollout(te.x[:, :30], te.u[:, :29], te.u[:, 29:-1])
    assert roll.shape == (4, 70, 4)
    assert p.rollout_report() == {"rollout_windows": 4, "clipped_windows": 0, "diverged_windows": 0}
    np.testing.assert_allclose(roll, te.x[:, 30:], atol=1e-5 * np.abs(te.x).max())
    one = p.one_step(te.x, te.u)
    np.testing.assert_allclose(one, te.x[:, 1:], atol=1e-5 * np.abs(te.x).max())
    np.testing.assert_allclose(roll[:, 0], one[:, 29], rtol=1e-6, atol=1e-7)  # rollout step 1 = one step


G, DAMP, GAIN = 9.0, 0.4, 6.0  # theta_dot' = -G sin(theta) - DAMP theta_dot + GAIN u


def pendulum(k: int, t: int, seed: int) -> TrajData:
    """Noise-free Euler pendulum, strongly driven so it makes full turns (unwrapped angle)."""
    rng = np.random.default_rng(seed)
    u = np.repeat(rng.normal(0, 2.5, size=(k, t // 10 + 1, 1)), 10, axis=1)[:, :t]
    x = np.zeros((k, t, 2))
    x[:, 0] = np.stack([rng.uniform(-np.pi, np.pi, k), rng.normal(0, 3, k)], -1)
    for i in range(t - 1):
        th, om = x[:, i, 0], x[:, i, 1]
        x[:, i + 1, 0] = th + DT * om
        x[:, i + 1, 1] = om + DT * (-G * np.sin(th) - DAMP * om + GAIN * u[:, i, 0])
    return TrajData(x, u, DT, state_names=["theta", "theta_dot"], input_names=["u"])


def test_recovers_a_pendulum_with_sin_terms_through_full_turns():
    tr, va, te = pendulum(16, 300, 0), pendulum(4, 300, 1), pendulum(4, 300, 2)
    assert np.ptp(tr.x[..., 0]) > 4 * np.pi  # the data leaves [-pi, pi): unwrapped turns
    p = fit_sindy(tr, va, 0, Budget(val_rollout=(30, 100)), 1.0, angle_channels=[0])
    eq = p.coefficients()
    assert eq["theta"] == pytest.approx({"theta_dot": 1.0}, rel=1e-6)
    assert set(eq["theta_dot"]) == {"sin(1 theta)", "theta_dot", "u"}
    assert eq["theta_dot"]["sin(1 theta)"] == pytest.approx(-G, rel=1e-6)
    assert eq["theta_dot"]["theta_dot"] == pytest.approx(-DAMP, rel=1e-6)
    assert eq["theta_dot"]["u"] == pytest.approx(GAIN, rel=1e-6)
    roll = p.rollout(te.x[:, :30], te.u[:, :29], te.u[:, 29:-1])
    np.testing.assert_allclose(roll, te.x[:, 30:], atol=1e-5)


def test_raw_and_sincos_angle_modes_fit_the_same_model():
    """In sin/cos mode the pair is turned back into the angle: same terms, same predictions (logged units)."""
    tr, va, te = pendulum(16, 300, 0), pendulum(4, 300, 1), pendulum(4, 300, 2)
    noise = np.random.default_rng(5)
    for td in (tr, va, te):  # encoder-like noise so the selection has work to do
        td.x = td.x + 1e-3 * noise.normal(size=td.x.shape)
    budget = Budget(val_rollout=(30, 100))
    raw = fit_sindy(tr, va, 0, budget, 1.0, angle_channels=[0])
    codec = SinCosCodec(2, [0])
    enc = fit_sindy(codec.encode_data(tr), codec.encode_data(va), 0, budget, 1.0)
    assert enc.info["angles"] == ["theta"] and enc.info["threshold"] == raw.info["threshold"]
    assert enc.info["features"] == raw.info["features"]
    np.testing.assert_allclose(enc.coef, raw.coef, rtol=1e-6, atol=1e-9)
    wrapped = SinCosPredictor(enc, codec)
    args = (te.x[:, :30], te.u[:, :29], te.u[:, 29:-1])
    np.testing.assert_allclose(wrapped.rollout(*args), raw.rollout(*args), atol=1e-4)
    np.testing.assert_allclose(wrapped.one_step(te.x, te.u), raw.one_step(te.x, te.u), atol=1e-5)
    # the encoded rollout stays on the unit circle and the angle leaves as its sin / cos
    z = enc.rollout(codec.encode(te.x[:, :30]), te.u[:, :29], te.u[:, 29:-1])
    np.testing.assert_allclose(z[..., 0] ** 2 + z[..., 1] ** 2, 1.0, atol=1e-5)


def test_layout_detection_names_the_angles():
    assert detect_layout(["p", "theta", "p_dot", "theta_dot"], 4, "cartpole").raw_angles == [1]
    assert detect_layout(["theta", "alpha", "theta_dot", "alpha_dot"], 4, "furuta").raw_angles == [1]
    lay = detect_layout(["p", "sin(theta)", "cos(theta)", "p_dot", "theta_dot"], 5, "cartpole")
    assert lay.pairs == [(1, 2)] and lay.raw_angles == [] and lay.core_angles == [1] and lay.n_core == 4
    assert detect_layout(["a", "b"], 2, "").core_angles == []
    assert detect_layout(["a", "b"], 2, "not-a-rig").core_angles == []
    with pytest.raises(ValueError, match="bad angle channel"):
        detect_layout(["a", "b"], 2, angle_channels=[2])


def test_a_diverging_rollout_is_clipped_or_inf_and_reported_never_nan():
    tr, va, te = linear_data(20, 100, 0), linear_data(5, 100, 1), linear_data(4, 100, 2)
    p = fit_model("sindy", tr, va, 0, Budget(val_rollout=(20, 50)), 1.0)
    u = te.u.copy()
    u[0, 40:] = 1e12  # driven far out of the data: the states stop at the training envelope
    u[1, 40:] = np.inf  # non-finite: that window is inf from then on
    with np.errstate(all="raise"):  # no floating-point warning escapes the predictor
        roll = p.rollout(te.x[:, :30], u[:, :29], u[:, 29:-1])
    assert p.rollout_report() == {"rollout_windows": 4, "clipped_windows": 1, "diverged_windows": 1}
    assert not np.isnan(roll).any() and np.isinf(roll[1, 11:]).all() and np.isfinite(roll[1, :11]).all()
    span = np.ptp(tr.x.reshape(-1, 4), axis=0)
    lo, hi = tr.x.min((0, 1)) - span / 2, tr.x.max((0, 1)) + span / 2  # the training envelope
    assert np.isfinite(roll[0]).all() and ((roll[0] >= lo - 1e-5) & (roll[0] <= hi + 1e-5)).all()
    assert (np.isclose(roll[0, -1], lo, rtol=1e-5) | np.isclose(roll[0, -1], hi, rtol=1e-5)).any()
    np.testing.assert_allclose(roll[2:], te.x[:, 30:][2:], atol=1e-4)  # the others are untouched
    assert prediction_errors(None, roll, te.x, np.ones(4), context=30)["multi_step_mse"] == math.inf
    one = p.one_step(te.x, u)
    assert not np.isnan(one).any() and np.isinf(one[1, 40:]).all()
