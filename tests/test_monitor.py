"""Prediction-error monitor: EWMA, windowed mean, sustained drift flag with hysteresis, late predictions."""

from __future__ import annotations

import numpy as np
import pytest

from controllers.monitor import PredictionMonitor


def test_errors_ewma_window_and_horizons():
    mon = PredictionMonitor([1.0, 1.0], horizons=(1, 5), alpha=0.5, window=3, angle_channels=(1,))
    for k in range(4):
        mon.add_prediction(k + 1, np.array([float(k + 1), 0.0]), horizon=1)
    mon.add_prediction(3, np.array([0.0, 2 * np.pi + 0.2]), horizon=5)  # wrapped angle error 0.2
    errs = [mon.observe(k + 1, np.array([float(k + 1) + 0.1 * k, 0.0]), t=k * 0.01) for k in range(4)]
    assert errs[0][1] == pytest.approx(0.0)
    assert errs[2][5] == pytest.approx(np.sqrt((3.2**2 + 0.2**2) / 2), rel=1e-9)  # x_meas[0] = 3.2
    e1 = [e[1] for e in errs]
    snap = mon.snapshot()
    assert snap["err1_count"] == 4 and snap["err5_count"] == 1
    assert snap["err1_win"] == pytest.approx(np.mean(e1[-3:]))
    ewma = e1[0]
    for e in e1[1:]:
        ewma = 0.5 * ewma + 0.5 * e
    assert snap["err1_ewma"] == pytest.approx(ewma)


def test_drift_flag_needs_sustained_error_and_clears_with_hysteresis():
    mon = PredictionMonitor([1.0], alpha=1.0, threshold=0.5, sustain_s=1.0, clear_ratio=0.8)
    t = 0.0
    for k in range(50):  # 0.5 s above threshold: not yet
        mon.add_prediction(k, np.array([1.0]))
        mon.observe(k, np.array([0.0]), t)
        t += 0.01
    assert not mon.drift
    for k in range(50, 200):
        mon.add_prediction(k, np.array([1.0]))
        mon.observe(k, np.array([0.0]), t)
        t += 0.01
    assert mon.drift and mon.drift_events == 1
    mon.add_prediction(200, np.array([0.45]))  # below threshold but above clear level: stays
    mon.observe(200, np.array([0.0]), t)
    assert mon.drift
    mon.add_prediction(201, np.array([0.1]))
    mon.observe(201, np.array([0.0]), t + 0.01)
    assert not mon.drift


def test_late_predictions_are_counted_not_scored():
    mon = PredictionMonitor([1.0])
    mon.observe(10, np.array([0.0]), 0.0)
    mon.add_prediction(10, np.array([5.0]))  # its measurement is already in
    assert mon.snapshot()["late_predictions"] == 1
    assert mon.snapshot()["err1_count"] == 0


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="scale"):
        PredictionMonitor([1.0, 0.0])
    with pytest.raises(ValueError, match="alpha"):
        PredictionMonitor([1.0], alpha=0.0)
    mon = PredictionMonitor([1.0, 1.0])
    with pytest.raises(ValueError, match="2 states"):
        mon.add_prediction(1, np.zeros(3))
