"""LQR designed on the served learned model's own linearisation, with the nominal LQR as fallback.

Linearisation (``model_jacobians``): the Jacobians of the model's one-step map ``x[t+1] = f(x[t], u[t] |
context)`` at the operating point (upright, ``u = 0``), by central finite differences, all ``2 (n + m)``
perturbed windows in ONE batched ``predict`` request (through the predictor or an in-process onnxruntime
session: anything with ``predict(x (B,T,n), u (B,T,m)) -> (B,T,n)``).  A sequence model needs a context:
each window is a *steady context* of ``L`` steps sitting at the operating point (``x*``, ``u*``), all
observed, and only the newest step is perturbed (``x* +- h_i e_i`` or ``u* +- h_u``); its prediction is the
derivative of the next state with respect to the current state and input, the past held at equilibrium.
For a Markov model (the physics) this is the exact Jacobian; for a learned model it is the partial
derivative with respect to the present step.

Design (``design_learned``): the model's ``(Ad, Bd)`` are at the model step (``model_dt``, 10 ms); the
loop runs faster (2 ms), so the continuous model is recovered exactly by the inverse of the ZOH map
(``logm`` of ``[[Ad, Bd], [0, I]]`` / ``model_dt``) and re-discretised at the control step, then ``dlqr``
with the rig's Q and R, exactly as the nominal design does on the physics' linearisation.

Trust band (any failure -> the nominal gain, with the reason; the session logs it as an ``lqr_design``
event): the learned ``(A, B)`` must be finite, the ZOH inverse real, the pair stabilisable (``dlqr``
succeeds and ``Ad - Bd K`` is inside the unit circle), the learned gain must also stabilise the *nominal*
physics' linearisation (spectral radius < 1 at the control step), and it must not differ wildly from the
nominal gain: ``gain_change = ||(K - K_nom) S|| / ||K_nom S|| <= max_gain_change`` (default 1.0), with ``S =
diag(gain_scale(cfg))`` the typical excursion of each state (10 % of the base's soft limit, 0.1 rad, 5 % of
the base speed limit, 1 rad/s), i.e. the change in volts of the command at typical deviations, relative.
At run time ``trust_frac`` (optional) keeps the command within ``trust_frac * voltage_max`` of the
nominal LQR's, as the MPC's trust band does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from controllers.base import ControlOutput, cfg_get, window_path_offsets
from controllers.lqr import LQRController, LQRDesignError, discretize_zoh, dlqr

LQR_DESIGNS = ("nominal", "learned")
DEFAULT_CONTEXT = 16            # steps of steady context (capped to the model's context)
DEFAULT_REL_STEP = 0.1          # finite-difference step: this fraction of gain_scale(cfg) per state
DEFAULT_U_STEP_FRAC = 0.05      # ... and of voltage_max for the input
DEFAULT_MAX_GAIN_CHANGE = 1.0   # trust band on the gain (see module docstring)
JACOBIAN_HISTORIES = ("present", "trajectory")  # how a state perturbation enters the window

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def gain_scale(cfg: Any) -> np.ndarray:
    """Typical excursion of each state at balance: base (10 % of its soft limit), pendulum (0.1 rad),
    base rate (5 % of its speed limit), pendulum rate (1 rad/s).
    Scales the finite-difference steps and the gain-change measure."""
    lim = cfg.limits
    return np.array([0.1 * lim.position_soft, 0.1, 0.05 * lim.actuated_velocity_max, 1.0])


def jacobian_windows(x_star: np.ndarray, u_star: np.ndarray, hx: np.ndarray, hu: np.ndarray,
                     context: int, history: str = "present",
                     dt: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The ``2 (n + m)`` windows of one central-difference request: steady context of ``context`` steps at
    ``(x*, u*)``, perturbed by ``+h`` then ``-h`` along each state, then each input (newest step only).

    ``history="present"``: a state perturbation moves the newest step only. ``"trajectory"``: it moves the
    whole window as one kinematically consistent path through the newest step (the state is ``[positions,
    velocities]``): a position offset shifts every step, a velocity offset ``h`` adds ``h`` to every step's
    velocity and ``-lag * dt * h`` to its position (``lag`` steps before the newest)."""
    if history not in JACOBIAN_HISTORIES:
        raise ValueError(f"history must be one of {JACOBIAN_HISTORIES}, got {history!r}")
    n, m = len(x_star), len(u_star)
    if history == "trajectory" and (n % 2 or not dt > 0):
        raise ValueError(f"history='trajectory' needs [positions, velocities] states and dt > 0 "
                         f"(n = {n}, dt = {dt})")
    b = 2 * (n + m)
    x = np.broadcast_to(np.asarray(x_star, np.float64), (b, context, n)).copy()
    u = np.broadcast_to(np.asarray(u_star, np.float64), (b, context, m)).copy()
    for i in range(n):
        for row, sign in ((2 * i, 1.0), (2 * i + 1, -1.0)):
            dev = np.zeros(n)
            dev[i] = sign * hx[i]
            if history == "present":
                x[row, -1] += dev
            else:
                x[row] += window_path_offsets(dev, context, dt)
    for j in range(m):
        u[2 * (n + j), -1, j] += hu[j]
        u[2 * (n + j) + 1, -1, j] -= hu[j]
    return x, u


def model_jacobians(predict: PredictFn, x_star: Any, u_star: Any, hx: Any, hu: Any,
                    context: int = DEFAULT_CONTEXT, history: str = "present",
                    dt: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(Ad, Bd)`` of the one-step map at ``(x*, u*)`` by central differences (one batched predict call).

    ``hx``/``hu`` are the steps, exactly representable in float32 (the I/O precision of the predictor) so
    that ``x* +- h`` is what the model sees; the difference quotient uses the float32 values sent."""
    x_star = np.asarray(x_star, np.float64)
    u_star = np.asarray(u_star, np.float64)
    n, m = len(x_star), len(u_star)
    x, u = jacobian_windows(x_star, u_star, np.asarray(hx, float), np.asarray(hu, float), int(context),
                            history, dt)
    x32, u32 = x.astype(np.float32), u.astype(np.float32)
    pred = np.asarray(predict(x32, u32), np.float64)
    if pred.shape != (2 * (n + m), context, n):
        raise LQRDesignError(f"predict returned shape {pred.shape}, expected {(2 * (n + m), context, n)}")
    last = pred[:, -1]
    if not np.all(np.isfinite(last)):
        raise LQRDesignError("the model's one-step predictions at the operating point are not finite")
    dx = x32[:, -1].astype(np.float64)
    du = u32[:, -1].astype(np.float64)
    ad = np.stack([(last[2 * i] - last[2 * i + 1]) / (dx[2 * i, i] - dx[2 * i + 1, i]) for i in range(n)], 1)
    bd = np.stack([(last[2 * (n + j)] - last[2 * (n + j) + 1])
                   / (du[2 * (n + j), j] - du[2 * (n + j) + 1, j]) for j in range(m)], 1)
    return ad, bd


def continuous_from_zoh(ad: np.ndarray, bd: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`controllers.lqr.discretize_zoh`: ``(A, B)`` with ``expm([[A, B], [0, 0]] dt) =
    [[Ad, Bd], [0, I]]`` (principal matrix logarithm); LQRDesignError when it is not real (no continuous
    linear system has this ZOH map, e.g. a negative real eigenvalue)."""
    n, m = bd.shape
    aug = np.eye(n + m)
    aug[:n, :n] = ad
    aug[:n, n:] = bd
    with np.errstate(all="ignore"):
        log = scipy.linalg.logm(aug)
    log = np.asarray(log)
    if not np.all(np.isfinite(log)):
        raise LQRDesignError("the learned (Ad, Bd) has no matrix logarithm (singular Ad)")
    if np.iscomplexobj(log):
        if np.max(np.abs(log.imag)) > 1e-9 * max(1.0, float(np.max(np.abs(log.real)))):
            raise LQRDesignError("the learned (Ad, Bd) is not the ZOH map of a real continuous system "
                                 "(its matrix logarithm is complex)")
        log = log.real
    log = log / dt
    return log[:n, :n], log[:n, n:]


@dataclass
class LQRDesign:
    """The gain in use and where it came from (``source``: learned or nominal; ``reason`` when nominal)."""

    source: str
    k: np.ndarray
    ad: np.ndarray                   # at the control step
    bd: np.ndarray
    p: np.ndarray
    k_nominal: np.ndarray
    reason: str = ""
    gain_change: float = float("nan")
    ad_model: np.ndarray | None = None  # the learned Jacobians at the model step
    bd_model: np.ndarray | None = None
    model_sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record (the ``lqr_design`` event and the run summary)."""
        out: dict[str, Any] = {"source": self.source, "reason": self.reason, "k": self.k.tolist(),
                               "k_nominal": self.k_nominal.tolist(),
                               "gain_change": None if not np.isfinite(self.gain_change) else self.gain_change,
                               "model_sha256": self.model_sha256, **self.info}
        if self.ad_model is not None and self.bd_model is not None:
            out["ad_model"] = self.ad_model.tolist()
            out["bd_model"] = self.bd_model.tolist()
        return out


def nominal_design(lqr: LQRController, reason: str = "", **kw: Any) -> LQRDesign:
    """The nominal LQR's own design as an :class:`LQRDesign`."""
    return LQRDesign("nominal", lqr.k.copy(), lqr.ad.copy(), lqr.bd.copy(), lqr.p.copy(), lqr.k.copy(),
                     reason=reason, **kw)


def design_learned(nominal: LQRController, ad_model: np.ndarray, bd_model: np.ndarray, model_dt: float,
                   scale: np.ndarray, max_gain_change: float = DEFAULT_MAX_GAIN_CHANGE,
                   model_sha256: str = "") -> LQRDesign:
    """dlqr on the learned Jacobians at the control step, or the nominal design when the trust band fails."""
    info: dict[str, Any] = {}
    kw = {"ad_model": np.asarray(ad_model, float), "bd_model": np.asarray(bd_model, float),
          "model_sha256": model_sha256, "info": info}
    try:
        if not (np.all(np.isfinite(ad_model)) and np.all(np.isfinite(bd_model))):
            raise LQRDesignError("the learned Jacobians are not finite")
        a_c, b_c = continuous_from_zoh(np.asarray(ad_model, float), np.asarray(bd_model, float), model_dt)
        ad, bd = discretize_zoh(a_c, b_c, nominal.dt)
        k, p = dlqr(ad, bd, nominal.q, nominal.r)
        info["k_learned"] = k.tolist()  # kept for the record even when the trust band rejects it
        rho = float(np.max(np.abs(np.linalg.eigvals(ad - bd @ k))))
        info["rho_learned"] = rho
        if not rho < 1.0:
            raise LQRDesignError(f"the learned closed loop is not stable (spectral radius {rho:.4f})")
        rho_nom = float(np.max(np.abs(np.linalg.eigvals(nominal.ad - nominal.bd @ k))))
        info["rho_nominal_plant"] = rho_nom
        if not rho_nom < 1.0:
            raise LQRDesignError(f"the learned gain does not stabilise the nominal physics (spectral radius "
                                 f"{rho_nom:.4f})")
    except (LQRDesignError, np.linalg.LinAlgError, ValueError) as exc:
        return nominal_design(nominal, reason=str(exc), **kw)
    s = np.diag(np.asarray(scale, float))
    change = float(np.linalg.norm((k - nominal.k) @ s) / max(np.linalg.norm(nominal.k @ s), 1e-12))
    if not change <= max_gain_change:
        return nominal_design(nominal, reason=f"the learned gain differs from the nominal by {change:.2f} "
                                              f"(scaled norm) > max_gain_change {max_gain_change:g}",
                              gain_change=change, **kw)
    return LQRDesign("learned", k, ad, bd, p, nominal.k.copy(), gain_change=change, **kw)


class LearnedLQRController(LQRController):
    """An :class:`LQRController` whose gain can be replaced by a :class:`LQRDesign` at any time (atomic swap
    between ticks); optional run-time trust band around the nominal command."""

    def __init__(self, model: Any, dt: float, cfg: Any = None, tuning: Any = None,
                 trust_frac: float | None = None) -> None:
        super().__init__(model, dt, cfg=cfg, tuning=tuning)
        self.nominal = LQRController(model, dt, cfg=cfg, tuning=tuning)  # the physics design, kept
        self.k_nominal = self.nominal.k
        self.trust_frac = trust_frac
        self.design = nominal_design(self.nominal, reason="not designed yet")
        self.designs: list[LQRDesign] = []

    def apply(self, design: LQRDesign) -> None:
        """Use ``design``'s gain from the next tick on."""
        self.ad, self.bd, self.p = design.ad, design.bd, design.p
        self.k = design.k  # one reference assignment: a tick sees the old or the new gain, never a mix
        self.design = design
        self.designs.append(design)

    def compute(self, x: np.ndarray, t: float = 0.0) -> ControlOutput:
        """Saturated command of the current gain (within the trust band of the nominal one, if set)."""
        e = self.error(x)
        u = -self.k @ e
        if self.trust_frac is not None:
            u_n = -self.k_nominal @ e
            band = float(self.trust_frac) * float(self.u_max)
            u = u_n + np.clip(u - u_n, -band, band)
        return ControlOutput(np.clip(u, -self.u_max, self.u_max), self.name)


@dataclass
class LearnedDesignParams:
    """``[<kind>.learned_lqr]`` tuning."""

    context: int = DEFAULT_CONTEXT
    rel_step: float = DEFAULT_REL_STEP
    u_step_frac: float = DEFAULT_U_STEP_FRAC
    max_gain_change: float = DEFAULT_MAX_GAIN_CHANGE
    trust_frac: float | None = None
    refresh_poll_s: float = 1.0
    history: str = "present"  # jacobian_windows: "present" (newest step) | "trajectory" (the whole window)

    def __post_init__(self) -> None:
        if self.history not in JACOBIAN_HISTORIES:
            raise ValueError(f"[learned_lqr] history must be one of {', '.join(JACOBIAN_HISTORIES)}, "
                             f"got {self.history!r}")
        for name in ("context", "rel_step", "u_step_frac", "max_gain_change", "refresh_poll_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise ValueError(f"[learned_lqr] {name} must be a number > 0, got {v!r}")
        if self.trust_frac is not None and not (isinstance(self.trust_frac, int | float)
                                                and 0 < self.trust_frac <= 1):
            raise ValueError(f"[learned_lqr] trust_frac must be in (0, 1], got {self.trust_frac!r}")

    @classmethod
    def from_tuning(cls, tuning: Any) -> LearnedDesignParams:
        sec = dict((tuning or {}).get("learned_lqr", {}))
        known = set(cls.__dataclass_fields__)
        bad = set(sec) - known
        if bad:
            raise ValueError(f"unknown [learned_lqr] tuning key(s) {sorted(bad)} (known: {sorted(known)})")
        return cls(**sec)


def _f32_exact(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(np.float64)


def design_from_client(client: Any, controller: LearnedLQRController, model: Any, cfg: Any,
                       params: LearnedDesignParams, info: dict[str, Any] | None = None) -> LQRDesign:
    """Linearise the model served at ``client`` (one predict request) and design; never raises for a model
    problem (-> nominal design with the reason); predictor errors propagate."""
    info = info if info is not None else client.info()
    context = int(max(1, min(params.context, int(info.get("context") or params.context),
                             int(info.get("max_len") or params.context))))
    model_dt = float(info.get("dt") or cfg.model_dt)
    x_star = np.asarray(model.upright(), float)
    u_star = np.zeros(model.m)
    hx = _f32_exact(params.rel_step * gain_scale(cfg))
    hu = _f32_exact(np.full(model.m, params.u_step_frac * float(cfg_get(cfg, "limits", "voltage_max"))))
    t0 = time.perf_counter()
    ad_m, bd_m = model_jacobians(client.predict, x_star, u_star, hx, hu, context, params.history, model_dt)
    ms = (time.perf_counter() - t0) * 1e3
    d = design_learned(controller.nominal, ad_m, bd_m, model_dt, gain_scale(cfg),
                       params.max_gain_change, model_sha256=str(info.get("model_sha256") or ""))
    d.info.update(context=context, request_ms=round(ms, 2), model_path=str(info.get("model_path") or ""))
    return d


class GainRefresher:
    """Background thread: poll the predictor's model identity; when it changes (a flywheel redeploy / hot
    reload), linearise the new model and swap the gain.  ``on_design(design)`` is called for every design
    (e.g. to log an ``lqr_design`` event)."""

    def __init__(self, client: Any, controller: LearnedLQRController, model: Any, cfg: Any,
                 params: LearnedDesignParams, identity: tuple[str, str],
                 on_design: Callable[[LQRDesign], None] | None = None) -> None:
        self.client, self.controller, self.model, self.cfg = client, controller, model, cfg
        self.params = params
        self.identity = identity
        self.on_design = on_design
        self.refreshes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lqr-refresh", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def poll_once(self) -> bool:
        """One check; True when a new model was found and a design applied."""
        info = self.client.info()
        ident = (str(info.get("model_sha256") or ""), str(info.get("model_path") or ""))
        if ident == self.identity:
            return False
        d = design_from_client(self.client, self.controller, self.model, self.cfg, self.params, info)
        d.info["refresh"] = True
        self.controller.apply(d)
        self.identity = ident
        self.refreshes += 1
        if self.on_design is not None:
            self.on_design(d)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.params.refresh_poll_s):
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - a predictor hiccup: keep the gain, try again later
                self.errors.append(f"{type(exc).__name__}: {exc}")


__all__ = ["LQR_DESIGNS", "GainRefresher", "LQRDesign", "LearnedDesignParams", "LearnedLQRController",
           "continuous_from_zoh", "design_from_client", "design_learned", "gain_scale", "model_jacobians"]
