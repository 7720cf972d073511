"""The data flywheel end to end: run -> log -> dataset -> fine-tune -> export -> hot reload -> run again.

Real parts throughout: virtual rig on a pty, one predictor process (ZeroMQ + onnxruntime), MCAP logs,
``rigfm finetune`` / ``rigfm export`` subprocesses.  Every process is stopped by ``run_flywheel``'s
context managers; the test checks the predictor is gone afterwards.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from controllers.flywheel import FlywheelConfig, FlywheelError, build_fit_dataset, resolve_init, run_flywheel


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); PredictorProcess reaps it, so alive here means really running
    return True


def _check_mechanics(res: dict, out) -> None:
    assert res["predictor_pid"] == res["pid_after_reload"]          # reloaded in place, no restart
    assert res["reloads"] == 1
    assert res["sha_v1"] and res["sha_v2"] and res["sha_v1"] != res["sha_v2"]
    assert res["reload_reply"]["model_sha256"] == res["sha_v2"]
    assert res["reload_reply"]["previous_sha256"] == res["sha_v1"]
    assert not _pid_alive(res["predictor_pid"])                      # stopped after the experiment
    assert res["before"]["fault"] is None and res["after"]["fault"] is None
    for key in ("error_before", "error_after", "error1_before", "error1_after"):
        assert res[key] is not None and math.isfinite(res[key]) and res[key] >= 0, key
    assert res["before"]["err10_count"] > 0 and res["after"]["err10_count"] > 0
    data = np.load(out / "data.npz")
    assert data["x"].shape[0] > 0 and data["x"].shape[2] == 4 and np.isfinite(data["x"]).all()
    assert set(data["split"]) >= {"train", "val"}
    saved = json.loads((out / "flywheel.json").read_text())
    assert saved["factor"] == pytest.approx(res["factor"], nan_ok=True)
    assert "10-step" in (out / "flywheel.md").read_text()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("angles", ["raw", "sincos"])
def test_flywheel_pipeline_reloads_the_running_predictor(tmp_path, angles):
    out = tmp_path / "fw"
    cfg = FlywheelConfig(out=str(out), duration_s=5.0, finetune_steps=10, angle_features=angles, gate=0.0)
    res = run_flywheel(cfg)
    _check_mechanics(res, out)
    assert res["deployed"] == "v2" and res["gate"] is None
    # a (sin, cos) v2 is served in raw states: the same loop and monitor ran on it without a fault
    assert res["angle_channels_v2"] == ([1] if angles == "sincos" else [])


@pytest.mark.timeout(300)
def test_a_failed_gate_keeps_v1_serving(tmp_path):
    """The gate measures both models and, failing (here: a bar no update can reach), keeps v1 in the running
    predictor: no reload, run 2 on v1, and the result and summary say why."""
    out = tmp_path / "fw"
    res = run_flywheel(FlywheelConfig(out=str(out), duration_s=4.0, finetune_steps=5, gate=1e6))
    gate = res["gate"]
    assert gate["passed"] is False and gate["min_ratio"] == 1e6 and gate["windows"] > 0
    assert len(gate["v1_response"]) == 4 and all(math.isfinite(v) for v in gate["v2_response"])
    assert gate["channel"] == "theta" and "(below 1000000.0)" in gate["reason"]
    assert res["deployed"] == "v1" and res["deployed_onnx"].endswith("v1.onnx")
    assert res["reloads"] == 0 and res["sha_v2"] == res["sha_v1"] and "skipped" in res["reload_reply"]
    assert res["after"]["fault"] is None and res["after"]["err10_count"] > 0
    assert not _pid_alive(res["predictor_pid"])
    md = (out / "flywheel.md").read_text()
    assert "failed" in md and "run 2 served v1" in md and "after (v1)" in md


def test_bad_angle_features_is_named(tmp_path):
    with pytest.raises(ValueError, match="angle_features 'polar'"):
        FlywheelConfig(out=str(tmp_path), angle_features="polar")


def test_missing_init_checkpoint_is_named(tmp_path):
    cfg = FlywheelConfig(out=str(tmp_path), init_checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resolve_init(cfg)


def test_failed_stage_names_it(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = FlywheelConfig(out=str(tmp_path / "fw"), init_checkpoint=str(bad), duration_s=1.0)
    with pytest.raises(FlywheelError, match="export"):
        run_flywheel(cfg)


def test_too_short_a_run_is_named_before_fine_tuning(tmp_path):
    """A run that yields no val window (too short, or ended by a fault) stops the flywheel at the dataset
    stage with the reason, not deep inside the fine-tuning."""
    cfg = FlywheelConfig(out=str(tmp_path / "fw"), duration_s=0.4, init_state="upright")
    with pytest.raises(FlywheelError, match="too little data"):
        run_flywheel(cfg)


def test_default_window_is_halved_until_val_has_a_window(tmp_path):
    """A 30 s run whose 10 % val block a state gap cut into pieces shorter than the default window (measured:
    150 steps gave train 30 / val 0 / test 2) is rebuilt with half the window; an explicit window is kept,
    and the halving stops at 16 steps."""
    calls = []

    def build(logs, data, window, seed):
        calls.append(window)
        return {"windows": {"train": 3000 // window, "val": 1 if window <= 75 else 0, "test": 2}}

    assert build_fit_dataset(build, [], tmp_path / "d.npz", 150, False, 0)[0] == 75 and calls == [150, 75]
    calls.clear()
    window, report = build_fit_dataset(build, [], tmp_path / "d.npz", 150, True, 0)
    assert (window, report["windows"]["val"], calls) == (150, 0, [150])
    calls.clear()

    def never(logs, data, window, seed):
        calls.append(window)
        return {"windows": {"train": 1, "val": 0}}

    assert build_fit_dataset(never, [], tmp_path / "d.npz", 150, False, 0)[0] == 18
    assert calls == [150, 75, 37, 18]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flywheel_60s_multistep_error_drops(tmp_path):
    out = tmp_path / "fw"
    res = run_flywheel(FlywheelConfig(out=str(out), duration_s=60.0, finetune_steps=150))
    _check_mechanics(res, out)
    print((out / "flywheel.md").read_text())
    assert res["factor"] > 1.0, res
