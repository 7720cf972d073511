"""The learned-linearisation LQR (controllers/learned_lqr.py) on a model that equals the physics.

The stand-in (tests/linear_standin.py) is an ONNX graph with the served models' I/O contract whose step is
exactly the ZOH-discretised linearised physics ``x' = Ad x + Bd u``; it is served by the real predictor
process and linearised through a real ZeroMQ client.  The designed gains must equal python-control's
``dlqr`` on ``(Ad, Bd)``.  The `rigfm run --lqr-design` tests run real processes (virtual rig on a pty,
predictor, CLI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import control
import numpy as np
import pytest

import rigs
from controllers.learned_lqr import (
    LearnedDesignParams,
    LearnedLQRController,
    continuous_from_zoh,
    design_from_client,
    design_learned,
    gain_scale,
    jacobian_windows,
)
from controllers.lqr import LQRController, discretize_zoh, linearize_upright
from export.client import PredictorProcess

sys.path.insert(0, str(Path(__file__).parent))
from linear_standin import physics_standin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.mark.parametrize(("rig", "history"), [("cartpole", "present"), ("furuta", "present"),
                                              ("furuta", "trajectory")])
def test_gains_through_the_predictor_match_dlqr_on_the_physics(rig, history, tmp_path):
    """A Markov model reads the newest step only, so both ways of perturbing the window give its Jacobian."""
    path, ad, bd = physics_standin(tmp_path / "lin.onnx", rig)
    cfg = rigs.load_config(rig)
    model = rigs.make_model(cfg)
    ctl = LearnedLQRController(model, 1 / 500, cfg=cfg)
    with PredictorProcess(path) as proc:
        client = proc.client(timeout_ms=5000)
        try:
            d = design_from_client(client, ctl, model, cfg, LearnedDesignParams(history=history))
            requests = client.health()["requests"]
        finally:
            client.close()
    assert requests.get("predict") == 1  # every perturbation in one batched request
    assert d.source == "learned", d.reason
    assert _rel(d.ad_model, ad) < 1e-6 and _rel(d.bd_model, bd) < 1e-6
    # at the model step: python-control's dlqr on the exact (Ad, Bd)
    k_ref, _, _ = control.dlqr(ad, bd, ctl.q, ctl.r)
    k_model_step, _, _ = control.dlqr(d.ad_model, d.bd_model, ctl.q, ctl.r)
    assert _rel(k_model_step, k_ref) < 1e-5
    # at the control step (what the loop uses): dlqr on the physics' ZOH at 2 ms = the nominal LQR
    ad2, bd2 = linearize_upright(model, 1 / 500)
    k2_ref, _, _ = control.dlqr(ad2, bd2, ctl.q, ctl.r)
    assert _rel(d.k, k2_ref) < 1e-5
    assert d.gain_change < 1e-5


def test_trajectory_windows_move_the_whole_window_along_one_consistent_path():
    x_star, u_star = np.array([0.0, np.pi, 0.0, 0.0]), np.zeros(1)
    hx, hu, dt, ctx = np.array([0.01, 0.02, 0.3, 0.4]), np.array([0.5]), 0.01, 6
    x, u = jacobian_windows(x_star, u_star, hx, hu, ctx, "trajectory", dt)
    xp, up = jacobian_windows(x_star, u_star, hx, hu, ctx, "present", dt)
    np.testing.assert_allclose(x[:, -1], xp[:, -1])  # the newest step is perturbed the same way
    np.testing.assert_allclose(u, up)  # inputs: newest step only, in both
    lag = np.arange(ctx - 1, -1, -1)
    np.testing.assert_allclose(x[3, :, 1], np.pi - hx[1])  # state 1 at -h (row 3): every step moves
    np.testing.assert_allclose(x[6, :, 3], hx[3])  # a velocity offset: every step's velocity ...
    np.testing.assert_allclose(x[6, :, 1], np.pi - lag * dt * hx[3])  # ... and positions along its path
    np.testing.assert_allclose(np.diff(x[6, :, 1]) / dt, hx[3])
    np.testing.assert_allclose(xp[6, :-1], np.broadcast_to(x_star, (ctx - 1, 4)))  # present: past untouched
    with pytest.raises(ValueError, match="history must be one of"):
        jacobian_windows(x_star, u_star, hx, hu, ctx, "smooth", dt)
    with pytest.raises(ValueError, match="needs .positions, velocities. states and dt > 0"):
        jacobian_windows(x_star, u_star, hx, hu, ctx, "trajectory", 0.0)


def test_learned_lqr_tuning_section_is_read_and_checked(tmp_path):
    from controllers.tuning import load_tuning

    good = tmp_path / "good.toml"
    good.write_text('[furuta.learned_lqr]\nhistory = "trajectory"\ncontext = 8\n')
    params = LearnedDesignParams.from_tuning(load_tuning("furuta", good))
    assert (params.history, params.context) == ("trajectory", 8)
    assert LearnedDesignParams.from_tuning(load_tuning("furuta")).history == "present"
    for bad, match in (({"history": "smooth"}, "history must be one of"), ({"context": 0}, "context must be"),
                       ({"trust_frac": 2.0}, "trust_frac must be"), ({"bogus": 1}, "unknown .learned_lqr.")):
        with pytest.raises(ValueError, match=match):
            LearnedDesignParams.from_tuning({"learned_lqr": bad})


def test_zoh_inverse_recovers_the_continuous_model():
    cfg = rigs.load_config("cartpole")
    model = rigs.make_model(cfg)
    a, b = (np.asarray(v, float) for v in model.jacobians(model.upright(), np.zeros(1)))
    ad, bd = discretize_zoh(a, b, 0.01)
    a2, b2 = continuous_from_zoh(ad, bd, 0.01)
    assert _rel(a2, a) < 1e-9 and _rel(b2, b) < 1e-9


def test_trust_band_falls_back_to_the_nominal_gain():
    cfg = rigs.load_config("cartpole")
    model = rigs.make_model(cfg)
    nominal = LQRController(model, 1 / 500, cfg=cfg)
    ad, bd = linearize_upright(model, cfg.model_dt)
    s = gain_scale(cfg)
    # a model where the input does nothing: not stabilisable
    d = design_learned(nominal, ad, 0 * bd, cfg.model_dt, s)
    assert d.source == "nominal" and "Riccati" in d.reason
    np.testing.assert_array_equal(d.k, nominal.k)
    # a model whose input is 20x weaker: stabilisable, but the gain differs wildly from nominal
    d = design_learned(nominal, ad, bd / 20, cfg.model_dt, s)
    assert d.source == "nominal" and "max_gain_change" in d.reason and d.gain_change > 1.0
    # a heavier pendulum (x1.4) is a moderate change, accepted
    ad_h, bd_h = linearize_upright(rigs.make_model(cfg, {"pole_mass_scale": 1.4}), cfg.model_dt)
    d = design_learned(nominal, ad_h, bd_h, cfg.model_dt, s)
    assert d.source == "learned" and 0.0 < d.gain_change < 1.0
    # non-finite Jacobians
    d = design_learned(nominal, ad * np.nan, bd, cfg.model_dt, s)
    assert d.source == "nominal" and "finite" in d.reason


def test_runtime_trust_band_bounds_the_command_around_nominal():
    cfg = rigs.load_config("cartpole")
    model = rigs.make_model(cfg)
    ctl = LearnedLQRController(model, 1 / 500, cfg=cfg, trust_frac=0.1)
    d = design_learned(ctl.nominal, *linearize_upright(model, cfg.model_dt), cfg.model_dt, gain_scale(cfg))
    d.k = d.k * 3.0  # a wild gain got through: the band still holds the command near nominal
    ctl.apply(d)
    x = np.array([0.01, 0.05, 0.0, 0.0])
    u = float(ctl.compute(x).u[0])
    u_nom = float(-(ctl.k_nominal @ ctl.error(x))[0])
    assert abs(u - u_nom) <= 0.1 * 10.0 + 1e-9


def _run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controllers.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=ENV)


def test_run_lqr_design_learned_on_the_physics_standin(tmp_path):
    """rigfm run --lqr-design learned: the virtual rig (pty) balances on the gain designed through the
    predictor, which equals the nominal one for a model equal to the physics; the design is in the log."""
    path, _, _ = physics_standin(tmp_path / "lin.onnx", "cartpole")
    out = tmp_path / "s.json"
    r = _run_cli(["run", "cartpole", "--virtual", "--init", "upright", "--controller", "lqr", "--lqr-design",
                  "learned", "--model", str(path), "--duration", "2", "--quiet", "--stale-ms", "200",
                  "--summary-json", str(out), "--log", str(tmp_path / "log")])
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(out.read_text())
    d = s["lqr_design"]
    assert d["source"] == "learned" and d["refreshes"] == 0
    assert _rel(d["k"], d["k_nominal"]) < 1e-5
    assert s["fault"] is None and s["final_mode"] == "lqr"
    assert "LQR design" in r.stdout and "learned" in r.stdout
    from hardware.log_reader import read_topics

    files = sorted((tmp_path / "log").rglob("*.mcap"))
    _, msgs = read_topics(files[0], {"/event"})
    events = [m for _, m in msgs["/event"] if m.get("name") == "lqr_design"]
    assert events and events[0]["data"]["source"] == "learned"


def test_run_lqr_design_learned_rejects_a_wild_model_and_uses_nominal(tmp_path):
    path, _, _ = physics_standin(tmp_path / "wild.onnx", "cartpole", bd_scale=0.05)
    out = tmp_path / "s.json"
    r = _run_cli(["run", "cartpole", "--virtual", "--init", "upright", "--controller", "lqr", "--lqr-design",
                  "learned", "--model", str(path), "--duration", "1.5", "--quiet", "--stale-ms", "200",
                  "--summary-json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(out.read_text())
    assert s["lqr_design"]["source"] == "nominal"
    assert "max_gain_change" in s["lqr_design"]["reason"]
    assert "learned LQR design rejected, using the nominal gain" in r.stderr
    assert s["lqr_design"]["k"] == s["lqr_design"]["k_nominal"]
    assert s["fault"] is None


def test_run_lqr_design_learned_needs_a_model():
    r = _run_cli(["run", "cartpole", "--virtual", "--lqr-design", "learned", "--duration", "1", "--quiet"])
    assert r.returncode == 2
    assert "--lqr-design learned needs the learned model" in r.stderr
    assert "Traceback" not in r.stderr


def test_gain_is_redesigned_when_the_predictor_reloads_a_new_model(tmp_path):
    """The flywheel's redeploy (a hot reload on the running predictor) -> the session's next poll
    linearises the new model and swaps the gain, between ticks, without stopping the run."""
    from controllers.session import RunOptions, run_session

    v1, _, _ = physics_standin(tmp_path / "v1.onnx", "cartpole")
    v2, ad2, bd2 = physics_standin(tmp_path / "v2.onnx", "cartpole", overrides={"pole_mass_scale": 1.4})
    with PredictorProcess(v1) as proc:
        client = proc.client(timeout_ms=30_000)
        result: dict = {}

        def run() -> None:
            result["r"] = run_session(RunOptions(
                rig="cartpole", controller="lqr", virtual=True, init="upright", duration_s=4.0,
                endpoint=proc.endpoint, lqr_design="learned", status=False, stale_ms=200.0))

        th = threading.Thread(target=run)
        th.start()
        time.sleep(1.5)
        client.reload(str(v2))
        th.join(timeout=60)
        client.close()
    res = result["r"]
    assert res.fault is None, res.fault
    d = res.lqr_design
    assert d["refreshes"] == 1 and len(d["designs"]) == 2
    assert d["source"] == "learned" and d["model_path"].endswith("v2.onnx")
    cfg = rigs.load_config("cartpole")
    heavy = LQRController(rigs.make_model(cfg, {"pole_mass_scale": 1.4}), 1 / 500, cfg=cfg)
    assert _rel(d["k"], heavy.k) < 1e-5
    assert _rel(d["designs"][0]["k"], d["k_nominal"]) < 1e-5
