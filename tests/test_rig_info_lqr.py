"""`rigfm rig-info` prints the LQR design of the control loop: K, discrete closed-loop poles and their
continuous equivalents, the discretisation step; checked against python-control's `dlqr` (scipy if absent)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.signal

import rigs
from controllers.cli import main
from controllers.tuning import load_tuning


def _reference(rig: str, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """(K, closed-loop eigenvalues) designed independently: scipy's ZOH discretisation of the rig model's
    upright Jacobians and the weights of controllers/tuning.toml, solved by python-control's dlqr (or scipy's
    Riccati solver when python-control is not installed)."""
    cfg = rigs.load_config(rig)
    model = rigs.make_model(cfg)
    a, b = model.jacobians(model.upright(), np.zeros(1))
    ad, bd, *_ = scipy.signal.cont2discrete((a, b, np.eye(4), np.zeros((4, 1))), 1.0 / rate_hz, method="zoh")
    lqr = load_tuning(cfg.kind)["lqr"]
    q, r = np.diag(lqr["q"]), np.diag(lqr["r"])
    try:
        import control
    except ImportError:
        p = scipy.linalg.solve_discrete_are(ad, bd, q, r)
        k = np.linalg.solve(r + bd.T @ p @ bd, bd.T @ p @ ad)
        return k, np.linalg.eigvals(ad - bd @ k)
    k, _, e = control.dlqr(ad, bd, q, r)
    return np.asarray(k), np.asarray(e)


@pytest.mark.parametrize("rig, rate", [("cartpole", None), ("furuta", None), ("furuta", 250.0)])
def test_rig_info_json_has_the_lqr_design(rig, rate, capsys):
    args = ["rig-info", rig, "--json"] + ([] if rate is None else ["--rate", str(rate)])
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    d = info["lqr"]
    rate_hz = rate or rigs.load_config(rig).control_rate_hz
    assert d["rate_hz"] == rate_hz and d["dt"] == pytest.approx(1.0 / rate_hz)
    k_ref, e_ref = _reference(rig, rate_hz)
    np.testing.assert_allclose(np.array(d["K"]), k_ref, rtol=1e-8)
    z = np.array([complex(re, im) for re, im in d["poles_discrete"]])
    np.testing.assert_allclose(np.sort_complex(z), np.sort_complex(e_ref.astype(complex)), rtol=1e-8,
                               atol=1e-12)
    assert d["spectral_radius"] == pytest.approx(np.abs(z).max()) and d["spectral_radius"] < 1  # stabilising
    s = np.array([complex(re, im) for re, im in d["poles_continuous_equivalent"]])
    np.testing.assert_allclose(np.exp(s * d["dt"]), z, rtol=1e-10)  # s[i] is the equivalent of z[i]
    assert (s.real < 0).all()
    assert info["eigenvalues_upright"] and info["physics"]  # the physics part is still there


def test_rig_info_text_prints_k_poles_and_step(capsys):
    assert main(["rig-info", "cartpole"]) == 0
    out = capsys.readouterr().out
    assert "linearisation at upright: eigenvalues" in out  # physics part first
    k_ref, _ = _reference("cartpole", 500.0)
    assert "dt = 0.002 s (500 Hz)" in out and "Q = diag(30, 60, 1, 1)  R = diag(0.5)" in out
    assert f"theta: {k_ref[0, 1]:+.6g}" in out
    assert "closed-loop poles, discrete z = eig(Ad - Bd K):" in out
    assert "continuous equivalent s = ln(z) / dt" in out


def test_rig_info_bad_rate_and_tuning_are_named(tmp_path, capsys):
    assert main(["rig-info", "cartpole", "--rate", "0"]) == 2
    assert "argument --rate: must be a finite number in (0, 10000] Hz, got '0'" in capsys.readouterr().err
    bad = tmp_path / "t.toml"
    bad.write_text("[cartpole.lqr]\nq = [1.0, 2.0]\n")
    assert main(["rig-info", "cartpole", "--tuning", str(bad)]) == 2
    assert "LQR weight 'lqr.q' must have 4 diagonal entries" in capsys.readouterr().err


def test_rigs_layer_stays_below_controllers_and_rig_info_is_torch_free():
    code = ("import sys, rigs, rigs.summary\n"
            "assert not [m for m in sys.modules if m.startswith('controllers')], 'rigs imports controllers'\n"
            "from controllers.cli import main; rc = main(['rig-info', 'furuta'])\n"
            "assert 'torch' not in sys.modules, 'rig-info pulled torch'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "K[0] = theta:" in r.stdout
