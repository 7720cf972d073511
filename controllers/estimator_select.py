"""The loop's state estimator by name (``rigfm run --estimator diff|kf|fm-ukf``)."""

from __future__ import annotations

from typing import Any

from controllers.estimation import VelocityEstimator
from controllers.estimators import (
    ESTIMATORS,
    DiffEstimator,
    EstimatorSetupError,
    PhysicsEKF,
)
from controllers.fm_ukf import FMUKF


def make_estimator(name: str, model: Any, cfg: Any, tuning: dict | None = None, *,
                   fm_model: str | None = None, pendulum: int = 1) -> Any:
    """Estimator by name with its ``[<kind>.estimation]`` tuning; EstimatorSetupError on a bad request."""
    est = (tuning or {}).get("estimation", {})
    if name == "diff":
        cut = float(est.get("velocity_cutoff_hz", 25.0))
        return DiffEstimator(VelocityEstimator(2, cut, angle_channels=(pendulum,)))
    if name == "kf":
        return PhysicsEKF(model, cfg, accel_noise=est.get("kf_accel_noise", (1.0, 10.0)),
                          angle_channels=(pendulum,),
                          disturbance_noise=float(est.get("kf_disturbance_noise", 0.0)))
    if name == "fm-ukf":
        if not fm_model:
            raise EstimatorSetupError(
                "--estimator fm-ukf needs the learned model in-process: pass --model model.onnx or --model "
                "shipped (the rig's shipped ONNX); an --endpoint alone is not enough")
        return FMUKF.from_onnx(fm_model, model, cfg, tuning=est, angle_channels=(pendulum,))
    raise EstimatorSetupError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
