"""Simulated collection -> MCAP (real RunLogger, real ControlLoop) -> `dataset build` -> fm_core.trajfile."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from controllers.collect import (
    CollectError,
    CollectOptions,
    ExcitationController,
    FlaggedSimRig,
    collect,
    plan_segments,
)
from fm_core.trajfile import load_trajectories
from hardware.dataset_build import build_dataset
from hardware.log_reader import decode_json, scan_file

rigs = pytest.importorskip("rigs")


@pytest.mark.parametrize("rig", ["cartpole", "furuta"])
def test_collect_build_load_shapes_splits_and_finite(tmp_path, rig):
    res = collect(
        CollectOptions(rig=rig, runs=3, duration_s=2.5, out=tmp_path / "runs", seed=3, progress=False)
    )
    files = sorted((tmp_path / "runs").glob("*.mcap"))
    assert len(files) == 3 and [len(r["files"]) for r in res] == [1, 1, 1]  # one MCAP file per run
    assert all(r["fault"] is None and r["seconds"] == pytest.approx(2.5) for r in res)
    rep = build_dataset([tmp_path / "runs"], tmp_path / "d.npz", window=50, stride=50, model_dt=0.01)
    ts = load_trajectories(tmp_path / "d.npz")
    assert ts.x.shape[1:] == (50, 4) and ts.u.shape[1:] == (50, 1) and ts.x.dtype == np.float32
    assert np.isfinite(ts.x).all() and np.isfinite(ts.u).all()
    assert sorted(set(ts.split.tolist())) == ["test", "train", "val"]  # 3 runs: one per split, by run
    for split in ("train", "val", "test"):  # no run contributes to two splits
        srcs = {s for s, sp in zip(ts.source.tolist(), ts.split.tolist(), strict=True) if sp == split}
        others = {s for s, sp in zip(ts.source.tolist(), ts.split.tolist(), strict=True) if sp != split}
        assert not srcs & others
    assert list(ts.state_names) == list(rigs.load_config(rig).state_names)
    assert len(ts) == 3 * 5 and rep["windows"]["train"] == 5
    # the excitation really moves the plant and the input (not a flat log)
    assert ts.u.std() > 0.3 and ts.x[..., 1].std() > 0.01
    # logged velocities are the loop's estimates of the logged positions' rates (filtered differentiation)
    dpos = np.diff(ts.x[..., :2], axis=1) / 0.01
    vel = 0.5 * (ts.x[:, 1:, 2:] + ts.x[:, :-1, 2:])
    corr = np.corrcoef(dpos.reshape(-1, 2)[:, 1], vel.reshape(-1, 2)[:, 1])[0, 1]
    assert corr > 0.9


def test_collect_with_the_kf_estimator_logs_its_smoother_velocities(tmp_path):
    """--estimator kf: the logged velocities are the EKF's (recorded in the metadata), on the same plant and
    excitation as diff's; the pendulum rate is far less noisy step to step (diff differentiates quantised
    encoder counts; the cart rate follows the commanded steps in both)."""
    vel = {}
    for est in ("diff", "kf"):
        collect(CollectOptions(rig="cartpole", runs=1, duration_s=2.0, out=tmp_path / est, seed=4,
                               progress=False, estimator=est))
        (path,) = (tmp_path / est).glob("*.mcap")
        rows: list[list[float]] = []

        def on_message(ch, _schema, msg, rows=rows):
            if ch.topic == "/state":
                rows.append(decode_json(ch, msg)["velocities"])

        scan = scan_file(path, on_message)
        assert scan.run_metadata()["controller_params"]["estimator"] == est
        vel[est] = np.asarray(rows)
    assert vel["kf"].shape == vel["diff"].shape == (1000, 2)
    rough = {k: np.std(np.diff(v, axis=0), axis=0) for k, v in vel.items()}
    assert rough["kf"][1] < 0.5 * rough["diff"][1], rough
    assert np.corrcoef(vel["kf"][:, 1], vel["diff"][:, 1])[0, 1] > 0.9  # the same motion


def test_logs_carry_the_loop_schema_metadata_and_excitation_modes(tmp_path):
    collect(CollectOptions(rig="cartpole", runs=1, duration_s=6.0, out=tmp_path, seed=11, progress=False))
    (path,) = tmp_path.glob("*.mcap")
    topics: dict[str, list[dict]] = {}
    def on_message(ch, _schema, msg):
        if ch.message_encoding == "json":  # /log is foxglove.Log (protobuf)
            topics.setdefault(ch.topic, []).append(decode_json(ch, msg))

    scan = scan_file(path, on_message)
    assert scan.complete
    meta = scan.run_metadata()
    assert meta["rig"] == "cartpole" and meta["controller"] == "collect"
    segs = meta["controller_params"]["segments"]
    assert segs and segs[0]["t_start"] == 0 and sum(s["duration"] for s in segs) >= 6.0
    st, cmd = topics["/state"], topics["/command"]
    assert len(st) == len(cmd) == 3000  # 500 Hz loop, one state + one command per tick
    assert set(st[0]) >= {
        "seq",
        "device_time_us",
        "host_time_ns",
        "positions",
        "velocities",
        "counts",
        "flags",
    }
    assert all(abs(c["voltage"]) <= 10.0 for c in cmd)
    modes = {m["mode"] for m in topics["/mode"]}
    assert modes and all(m.startswith("collect-") for m in modes)


def test_flagged_rig_reports_limit_contact_and_the_dataset_excludes_it(tmp_path):
    cfg = rigs.load_config("cartpole")
    sim = rigs.RigSimulator(cfg, seed=0)
    lim = cfg.limits
    sim.reset(np.array([0.5 * (lim.position_soft + lim.position_hard), np.pi, 0.0, 0.0]))
    rig = FlaggedSimRig(sim, cfg)
    rig.advance(0.002)
    from hardware.protocol import StatusFlags

    assert rig.latest_state().flags & StatusFlags.LIMIT_HIT
    sim.reset(np.array([0.0, np.pi, 0.0, 0.0]))
    rig.advance(0.002)
    assert not rig.latest_state().flags & StatusFlags.LIMIT_HIT  # flags are per sample, not latched forever


def test_guard_keeps_the_base_inside_the_soft_limit_under_strong_excitation():
    """Full-amplitude PRBS on the Furuta arm would hit the travel limit; the recovery guard prevents it."""
    from controllers.collect import Segment
    from controllers.loop import ControlLoop
    from controllers.simrig import run_lockstep
    from controllers.tuning import load_tuning

    cfg = rigs.load_config("furuta")
    model = rigs.make_model(cfg)
    sim = rigs.RigSimulator(cfg, seed=1)
    sim.reset(None)
    rig = FlaggedSimRig(sim, cfg)
    segs = [Segment("prbs", 0.0, 8.0, 10.0, 0.0, 5)]
    ctl = ExcitationController(model, cfg, 0.002, segs, load_tuning("furuta"))
    loop = ControlLoop(rig, ctl, model, cfg, rate_hz=500)
    states = run_lockstep(loop, rig, 8.0)
    assert loop.fault is None and len(states) == 4000
    assert ctl.guard_count >= 1  # it had to step in
    assert np.max(np.abs(np.array(states)[:, 0])) < cfg.limits.position_soft


def test_plan_segments_cover_the_run_and_start_with_lqr_when_upright():
    rng = np.random.default_rng(0)
    segs = plan_segments(rng, 30.0, 10.0, start_upright=True)
    assert segs[0].kind == "lqr" and segs[-1].t_start + segs[-1].duration >= 30.0
    kinds = {s.kind for s in plan_segments(np.random.default_rng(1), 400.0, 10.0, False)}
    assert kinds == {"swingup", "steps", "prbs", "chirp", "multisine", "free"}


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(CollectError, match="--runs"):
        collect(CollectOptions(rig="cartpole", runs=0, duration_s=1.0, out=tmp_path, progress=False))
    with pytest.raises(Exception, match="no_such_param"):
        collect(CollectOptions(rig="cartpole", runs=1, duration_s=1.0, out=tmp_path,
                               params={"no_such_param": 2.0}, progress=False))


def test_cli_collect_with_param_override(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "controllers.cli",
            "collect",
            "furuta",
            "--runs",
            "1",
            "--duration",
            "1",
            "-o",
            str(tmp_path),
            "--set",
            "pendulum_mass_scale=1.3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["runs"] == 1 and summary["runs_ended_by_fault"] == 0
    (path,) = tmp_path.glob("*.mcap")
    meta = scan_file(path, lambda *a: None).run_metadata()
    assert meta["controller_params"]["param_overrides"] == {"pendulum_mass_scale": 1.3}
