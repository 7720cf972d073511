"""Discrete-time LQR about the upright equilibrium, from the rig physics' linearisation (numpy/scipy only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from controllers.base import ControlOutput, angle_error, cfg_get, pendulum_index, voltage_limit

# Defaults used when the tuning has no [<kind>.lqr] table.
DEFAULT_Q = (10.0, 100.0, 1.0, 1.0)
DEFAULT_R = (1.0,)


class LQRDesignError(ValueError):
    """The LQR problem is ill-posed (wrong shapes, non-PSD weights, unstabilisable linearisation)."""


def discretize_zoh(a: np.ndarray, b: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Zero-order-hold discretisation of ``xdot = A x + B u`` via the augmented matrix exponential."""
    n, m = b.shape
    aug = np.zeros((n + m, n + m))
    aug[:n, :n] = a
    aug[:n, n:] = b
    e = scipy.linalg.expm(aug * dt)
    return e[:n, :n], e[:n, n:]


def dlqr(ad: np.ndarray, bd: np.ndarray, q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Infinite-horizon discrete LQR: returns ``(K, P)`` with ``u = -K x`` minimising sum x'Qx + u'Ru."""
    ad, bd, q, r = (np.atleast_2d(np.asarray(v, dtype=float)) for v in (ad, bd, q, r))
    n, m = bd.shape
    if ad.shape != (n, n) or q.shape != (n, n) or r.shape != (m, m):
        raise LQRDesignError(f"LQR shapes disagree: A {ad.shape}, B {bd.shape}, Q {q.shape}, R {r.shape}")
    if np.min(np.linalg.eigvalsh((q + q.T) / 2)) < -1e-12:
        raise LQRDesignError("LQR weight Q must be positive semi-definite")
    if np.min(np.linalg.eigvalsh((r + r.T) / 2)) <= 0:
        raise LQRDesignError("LQR weight R must be positive definite")
    try:
        p = scipy.linalg.solve_discrete_are(ad, bd, q, r)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise LQRDesignError(f"discrete Riccati equation has no stabilising solution: {exc}") from exc
    k = np.linalg.solve(r + bd.T @ p @ bd, bd.T @ p @ ad)
    return k, p


def _weights(spec: Any, size: int, key: str) -> np.ndarray:
    arr = np.asarray(spec, dtype=float)
    if arr.ndim == 1 and arr.shape == (size,):
        arr = np.diag(arr)
    if arr.shape != (size, size):
        raise LQRDesignError(f"LQR weight {key!r} must have {size} diagonal entries or be {size}x{size}, "
                             f"got shape {np.shape(spec)}")
    if not np.all(np.isfinite(arr)):
        raise LQRDesignError(f"LQR weight {key!r} contains non-finite values")
    return arr


def lqr_weights(cfg: Any, n: int = 4, m: int = 1, tuning: Mapping[str, Any] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Q and R for the rig: ``tuning['lqr']`` (default: controllers/tuning.toml for ``cfg.kind``)."""
    if tuning is None:
        from controllers.tuning import load_tuning

        tuning = load_tuning(str(cfg_get(cfg, "kind", default=cfg_get(cfg, "name", default=""))))
    sec = tuning.get("lqr", {})
    return _weights(sec.get("q", DEFAULT_Q), n, "lqr.q"), _weights(sec.get("r", DEFAULT_R), m, "lqr.r")


def linearize_upright(model: Any, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Discrete ``(Ad, Bd)`` of the rig model at the upright equilibrium with zero input."""
    x_star = np.asarray(model.upright(), dtype=float)
    u_star = np.zeros(model.m)
    a, b = model.jacobians(x_star, u_star)
    return discretize_zoh(np.asarray(a, dtype=float), np.asarray(b, dtype=float), dt)


@dataclass
class LQRController:
    """State feedback ``u = -K (x - x*)`` with the pendulum angle error wrapped to (-pi, pi]."""

    model: Any
    dt: float
    q: np.ndarray | None = None
    r: np.ndarray | None = None
    u_max: float | None = None
    cfg: Any = None
    tuning: Mapping[str, Any] | None = None
    name: str = "lqr"
    k: np.ndarray = field(init=False)
    p: np.ndarray = field(init=False)
    ad: np.ndarray = field(init=False)
    bd: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not (self.dt > 0 and np.isfinite(self.dt)):
            raise LQRDesignError(f"LQR sample time must be positive, got {self.dt!r}")
        n, m = self.model.n, self.model.m
        cq, cr = lqr_weights(self.cfg, n, m, self.tuning) if self.cfg is not None else (None, None)
        self.q = _weights(self.q, n, "q") if self.q is not None else (cq if cq is not None
                                                                        else _weights(DEFAULT_Q, n, "q"))
        self.r = _weights(self.r, m, "r") if self.r is not None else (cr if cr is not None
                                                                        else _weights(DEFAULT_R, m, "r"))
        self.ad, self.bd = linearize_upright(self.model, self.dt)
        self.k, self.p = dlqr(self.ad, self.bd, self.q, self.r)
        self.x_star = np.asarray(self.model.upright(), dtype=float)
        self.angle_idx = pendulum_index(self.model)
        if self.u_max is None:
            self.u_max = voltage_limit(self.cfg) if self.cfg is not None else np.inf

    def closed_loop_eigenvalues(self) -> np.ndarray:
        """Eigenvalues of ``Ad - Bd K`` (all inside the unit circle for a stabilising design)."""
        return np.linalg.eigvals(self.ad - self.bd @ self.k)

    def error(self, x: np.ndarray) -> np.ndarray:
        """Deviation from upright with wrapped angle channels."""
        e = np.asarray(x, dtype=float) - self.x_star
        e[self.angle_idx] = angle_error(x[self.angle_idx], self.x_star[self.angle_idx])
        return e

    def reset(self) -> None:
        """Stateless; present for the controller interface."""

    def compute(self, x: np.ndarray, t: float = 0.0) -> ControlOutput:
        """Saturated LQR command for state ``x``."""
        u = -self.k @ self.error(x)
        return ControlOutput(np.clip(u, -self.u_max, self.u_max), self.name)
