"""Sampling-based MPC (MPPI or CEM) on a batched rollout model, with LQR fallback.

The dynamics source is any ``rollout(x_hist (L,n), u_hist (L,m), u_plan (K,H,m)) -> (K,H,n)``: the learned
model through ``export.PredictorClient.rollout`` in deployment (``PredictorRollout``), or the rig physics
(``PhysicsRollout``) as a stand-in for tests.  ``x_hist[-1]`` is the current state, ``u_plan[:, 0]`` the
command about to be applied and ``out[:, h]`` the state ``h + 1`` model steps ahead.

``SamplingMPC.plan`` optimises a plan of H inputs: warm start = previous plan shifted by the steps
elapsed; samples = plan + Gaussian noise, clipped to the input limits; cost = quadratic distance to the
upright (wrapped angle) + input effort + terminal cost + quadratic penalty outside the state bounds.

``MPCController`` is what the loop calls every tick.  Planning runs in a worker thread at the model step
(so a slow predictor never blocks the tick); the tick applies the current plan's input for the present
time.  If the predictor raises (timeout / unavailable) or the plan is older than ``max_plan_age_s``, the
tick uses the fallback controller (LQR) instead: the fall-back happens on the first tick after the fault.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controllers.base import ControlOutput, pendulum_index, wrap_angle
from controllers.latest_job import LatestJobWorker

RolloutFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class PhysicsRollout:
    """Batched open-loop rollout of the rig model (RK4 substeps), same interface as the predictor's."""

    def __init__(self, model: Any, dt: float, substeps: int = 2) -> None:
        self.model = model
        self.dt = float(dt)
        self.substeps = int(substeps)

    def __call__(self, x_hist: np.ndarray, u_hist: np.ndarray, u_plan: np.ndarray) -> np.ndarray:
        u_plan = np.asarray(u_plan, dtype=float)
        k, h, _ = u_plan.shape
        x = np.repeat(np.asarray(x_hist, dtype=float)[-1][None, :], k, axis=0)
        out = np.empty((k, h, x.shape[1]))
        hs = self.dt / self.substeps
        for j in range(h):
            for _ in range(self.substeps):
                x = np.asarray(self.model.step(x, u_plan[:, j], hs), dtype=float)
            out[:, j] = x
        return out


class PredictorRollout:
    """Adapter: the predictor client's ``rollout`` as a ``RolloutFn`` (errors propagate to the caller)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, x_hist: np.ndarray, u_hist: np.ndarray, u_plan: np.ndarray) -> np.ndarray:
        return np.asarray(self.client.rollout(x_hist, u_hist, u_plan), dtype=float)


@dataclass
class MPCParams:
    """MPC tuning.  Weights are diagonals over the state (n) / input (m)."""

    horizon: int = 10
    samples: int = 64
    iterations: int = 2
    method: str = "mppi"          # "mppi" or "cem"
    temperature: float = 1.0      # MPPI lambda, relative to the cost spread (scale-free)
    noise_std: float = 0.3        # fraction of u_max
    elite_frac: float = 0.15      # CEM
    q: tuple[float, ...] | None = None  # None: the LQR tuning's weights
    r: tuple[float, ...] | None = None
    terminal_scale: float = 10.0        # terminal weight = terminal_scale * q (without lqr_terminal)
    lqr_terminal: bool = True           # terminal weight = the LQR's Riccati solution P
    state_penalty: float = 1e4
    seed: int = 0
    trust_frac: float | None = None     # input within trust_frac * u_max of the fallback's (None: unbounded)
    # planning latency: the first steps of a plan are applied before it lands, so they are held at the inputs
    # already planned for them (the previous plan's) and only the rest is optimised. "auto": the whole model
    # steps a plan's measured landing age (new plan's first use - its state's time) has passed; an int: fixed
    delay_steps: int | str = "auto"
    # a stale plan tracks its predicted path: u = plan input - w K (x - predicted x), K the fallback LQR's
    # gain, w ramping from 0 to 1 as the plan's age goes from 1 to 2 model steps, so a plan that lands late
    # or is used for several steps still feeds back on the state (a fresh one acts at the model step only)
    tracking: bool = True
    # LQR takes over while the pendulum angle is more than this far from upright (rad; None = never), and
    # hands back below half of it: a plan from a wrong or late model must not keep the pendulum swaying
    takeover_angle: float | None = None


class SamplingMPC:
    """MPPI / CEM planner over a batched rollout function."""

    def __init__(self, rollout: RolloutFn, n: int, m: int, u_max: float, x_ref: np.ndarray,
                 params: MPCParams | None = None, angle_channels: Sequence[int] = (),
                 state_bounds: np.ndarray | None = None,
                 prior: Callable[[np.ndarray], np.ndarray] | None = None,
                 terminal: np.ndarray | None = None) -> None:
        self.p = params or MPCParams()
        self.prior = prior
        self.terminal = None if terminal is None else np.asarray(terminal, dtype=float)
        if self.p.method not in ("mppi", "cem"):
            raise ValueError(f"MPC method must be 'mppi' or 'cem', got {self.p.method!r}")
        if self.p.horizon < 1 or self.p.samples < 2:
            raise ValueError("MPC horizon must be >= 1 and samples >= 2")
        if not (self.p.delay_steps == "auto" or (isinstance(self.p.delay_steps, int)
                                                 and 0 <= self.p.delay_steps < self.p.horizon)):
            raise ValueError(f"MPC delay_steps must be 'auto' or an integer in [0, horizon), "
                             f"got {self.p.delay_steps!r}")
        if self.p.takeover_angle is not None and not (self.p.takeover_angle > 0
                                                       and np.isfinite(self.p.takeover_angle)):
            raise ValueError(f"MPC takeover_angle must be > 0 rad (or None), got {self.p.takeover_angle!r}")
        if self.p.trust_frac is not None and not (self.p.trust_frac >= 0 and np.isfinite(self.p.trust_frac)):
            raise ValueError(f"MPC trust_frac must be >= 0 (fraction of u_max), got {self.p.trust_frac!r}")
        self.rollout = rollout
        self.n, self.m = n, m
        self.u_max = float(u_max)
        self.x_ref = np.asarray(x_ref, dtype=float)
        self.q = np.asarray(self.p.q if self.p.q is not None else np.ones(n), dtype=float)
        self.r = np.asarray(self.p.r if self.p.r is not None else np.full(m, 0.01), dtype=float)
        if self.q.shape != (n,) or self.r.shape != (m,):
            raise ValueError(f"MPC weights need q of length {n} and r of length {m}, "
                             f"got {self.q.shape} and {self.r.shape}")
        self.angle = np.zeros(n, dtype=bool)
        self.angle[list(angle_channels)] = True
        self.bounds = None if state_bounds is None else np.asarray(state_bounds, dtype=float)
        self.rng = np.random.default_rng(self.p.seed)
        self.plan_u = np.zeros((self.p.horizon, m))
        self.plan_x = np.full((self.p.horizon, n), np.nan)  # predicted states after each plan input
        self.last_cost = float("nan")

    def reset(self) -> None:
        """Zero plan."""
        self.plan_u = np.zeros((self.p.horizon, self.m))

    def shift(self, steps: int) -> None:
        """Warm start: drop ``steps`` executed inputs, repeat the last one at the end."""
        steps = int(np.clip(steps, 0, self.p.horizon))
        if steps:
            self.plan_u = np.concatenate([self.plan_u[steps:], np.repeat(self.plan_u[-1:], steps, axis=0)])

    def cost(self, xs: np.ndarray, us: np.ndarray) -> np.ndarray:
        """Per-sample cost of rollouts ``xs`` (K,H,n) under inputs ``us`` (K,H,m)."""
        e = xs - self.x_ref
        e[..., self.angle] = wrap_angle(e[..., self.angle])
        stage = np.einsum("khn,n,khn->k", e[:, :-1], self.q, e[:, :-1])
        if self.terminal is not None:  # x'Px of the LQR at the model step: cost-to-go beyond the horizon
            term = np.einsum("kn,nm,km->k", e[:, -1], self.terminal, e[:, -1])
        else:
            term = self.p.terminal_scale * np.einsum("kn,n,kn->k", e[:, -1], self.q, e[:, -1])
        effort = np.einsum("khm,m,khm->k", us, self.r, us)
        c = stage + term + effort
        if self.bounds is not None:
            excess = np.maximum(np.abs(xs) - self.bounds, 0.0)
            c = c + self.p.state_penalty * np.sum(excess**2, axis=(1, 2))
        c[~np.isfinite(c)] = np.inf
        return c

    def plan(self, x_hist: np.ndarray, u_hist: np.ndarray, fixed: int = 0) -> np.ndarray:
        """Improve the warm-started plan from the current history; returns the plan (H,m). The first
        ``fixed`` steps keep the warm start's inputs (they are applied before the plan lands)."""
        p = self.p
        fixed = int(np.clip(fixed, 0, p.horizon - 1))
        mean = self.plan_u.copy()
        held = mean[:fixed].copy()
        std = np.full_like(mean, p.noise_std * self.u_max)
        prior = None
        if self.prior is not None:
            prior = np.asarray(self.prior(np.asarray(x_hist)[-1]), dtype=float).reshape(p.horizon, self.m)
            prior = np.clip(prior, -self.u_max, self.u_max)
        for _ in range(p.iterations):
            noise = self.rng.standard_normal((p.samples, p.horizon, self.m)) * std
            noise[0] = 0.0  # keep the warm start itself among the candidates
            us = np.clip(mean[None] + noise, -self.u_max, self.u_max)
            if prior is not None:  # ... and the prior plan, plain and perturbed
                us[1] = prior
                half = p.samples // 4
                us[2:2 + half] = np.clip(prior[None] + noise[2:2 + half], -self.u_max, self.u_max)
            us[:, :fixed] = held
            xs = self.rollout(x_hist, u_hist, us)
            if xs.shape != (p.samples, p.horizon, self.n):
                want = (p.samples, p.horizon, self.n)
                raise ValueError(f"rollout returned shape {xs.shape}, expected {want}")
            c = self.cost(np.asarray(xs, dtype=float), us)
            if not np.any(np.isfinite(c)):
                raise FloatingPointError("MPC: every sampled rollout has a non-finite cost")
            if p.method == "mppi":
                finite = np.isfinite(c)
                spread = max(float(np.percentile(c[finite], 50) - c[finite].min()), 1e-9)
                w = np.where(finite, np.exp(-(c - c[finite].min()) / (p.temperature * spread)), 0.0)
                w /= w.sum()
                mean = np.einsum("k,khm->hm", w, us)
                self.plan_x = np.einsum("k,khn->hn", w, np.where(finite[:, None, None], xs, 0.0))
            else:
                n_elite = max(2, int(p.elite_frac * p.samples))
                best = np.argsort(c)[:n_elite]
                elite = us[best]
                mean = elite.mean(axis=0)
                std = np.maximum(elite.std(axis=0), 0.02 * self.u_max)
                self.plan_x = np.asarray(xs, dtype=float)[best].mean(axis=0)  # ~ the path of the mean plan
            self.last_cost = float(np.min(c))
        mean[:fixed] = held
        self.plan_u = np.clip(mean, -self.u_max, self.u_max)
        return self.plan_u.copy()


class MPCController(LatestJobWorker):
    """Controller for the loop: threaded MPC at the model step, LQR fallback on predictor faults/staleness."""

    name = "mpc"

    def __init__(self, planner: SamplingMPC, fallback: Any, model_dt: float, history: int = 16,
                 max_plan_age_s: float | None = None, threaded: bool = True,
                 predictor_errors: tuple[type[BaseException], ...] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.planner = planner
        self.fallback = fallback
        self.model_dt = float(model_dt)
        self.max_plan_age_s = float(max_plan_age_s if max_plan_age_s is not None else 3 * model_dt)
        self.threaded = threaded
        self.errors = predictor_errors or _predictor_errors()
        self.clock = clock
        self._xh: deque[np.ndarray] = deque(maxlen=history)
        self._uh: deque[np.ndarray] = deque(maxlen=history)
        self._last_u = np.zeros(planner.m)
        self._next_sample_t: float | None = None
        super().__init__("mpc-planner", poll_s=0.1)
        # (time of the state it starts from, plan inputs (H,m), predicted path (H+1,n) from that state)
        self._plan: tuple[float, np.ndarray, np.ndarray] | None = None
        self.fault: str | None = None
        self.fault_since: float | None = None       # clock() when the current predictor fault was seen
        self.fallback_delays: list[float] = []      # fault seen -> first fallback tick (s), per fault
        self.fallback_delay_ticks: list[int] = []   # ... in ticks (1 = the very next tick)
        self._ticks = 0
        self._fault_tick = 0
        self._fault_handled = True
        self.fallbacks = 0
        self.takeovers = 0          # ticks on LQR because the pendulum left MPCParams.takeover_angle
        self._taken_over = False
        self.plans = 0
        self.plan_time_s = float("nan")
        self._used_plan: tuple[float, np.ndarray, np.ndarray] | None = None
        self.land_age_s = float("nan")  # how late plans land: EWMA of (first use - state time), s
        self.mode = "mpc"

    # -- worker ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the planning thread (idempotent)."""
        if self.threaded:
            self.start_worker()

    def close(self) -> None:
        """Stop the planning thread."""
        self.stop_worker()

    def _run_job(self, t0: float, xh: np.ndarray, uh: np.ndarray, fixed: int = 0) -> None:
        t_start = time.perf_counter()
        try:
            with self._lock:
                if self._plan is not None:
                    self.planner.shift(int(round((t0 - self._plan[0]) / self.model_dt)))
                else:
                    fixed = 0  # no plan in force: nothing planned to hold
            plan = self.planner.plan(xh, uh, fixed)
        except (*self.errors, FloatingPointError, ValueError) as exc:
            with self._lock:
                self._plan = None
                if self.fault is None:
                    self.fault_since = self.clock()
                    self._fault_tick = self._ticks
                    self._fault_handled = False
                self.fault = f"{type(exc).__name__}: {exc}"
            return
        self.plan_time_s = time.perf_counter() - t_start
        with self._lock:
            self._plan = (t0, plan, np.vstack([np.asarray(xh[-1], dtype=float), self.planner.plan_x]))
            self.fault = None
            self.fault_since = None
        self.plans += 1

    def delay_steps(self) -> int:
        """Plan steps applied before a new plan lands: ``MPCParams.delay_steps``, or for "auto" the whole
        model steps its measured landing age has passed (0 until a plan has been used, and when planning is
        inline)."""
        d = self.planner.p.delay_steps
        if d != "auto":
            return int(d)
        if not self.threaded or not np.isfinite(self.land_age_s):
            return 0
        return int(self.land_age_s / self.model_dt)  # the steps a plan's landing has fully passed

    def _takeover(self, x: np.ndarray) -> bool:
        """Whether LQR has the pendulum: its angle error above ``takeover_angle``, until below half of it."""
        lim = self.planner.p.takeover_angle
        if lim is None:
            return False
        ang = self.planner.angle
        err = float(np.max(np.abs(wrap_angle(x[ang] - self.planner.x_ref[ang])))) if ang.any() else 0.0
        self._taken_over = err > (0.5 * lim if self._taken_over else lim)
        return self._taken_over

    def _tracking(self, x: np.ndarray, path: np.ndarray, s: float) -> np.ndarray:
        """``-w K (x - path(s))`` with the fallback LQR's gain, ``w = clip(s - 1, 0, 1)`` at a plan age of
        ``s`` model steps (zero without tracking, or for a path with NaNs)."""
        fb = self.fallback
        w = float(np.clip(s - 1.0, 0.0, 1.0))
        if w == 0.0 or not self.planner.p.tracking or not (hasattr(fb, "k") and hasattr(fb, "error")):
            return np.zeros(self.planner.m)
        ref = _path_point(path, s, self.planner.angle)
        if not np.all(np.isfinite(ref)):
            return np.zeros(self.planner.m)
        return -w * np.asarray(fb.k, dtype=float) @ (fb.error(x) - fb.error(ref))

    # -- controller interface -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget history and plan."""
        self._xh.clear()
        self._uh.clear()
        self._plan = None
        self._used_plan = None
        self._taken_over = False
        self.land_age_s = float("nan")
        self._next_sample_t = None
        self.planner.reset()
        self.fallback.reset()

    def compute(self, x: np.ndarray, t: float | None = None) -> ControlOutput:
        """Command for state ``x`` at time ``t`` (s, monotonic clock): the current plan's input, else LQR."""
        now = self.clock() if t is None else float(t)
        self._ticks += 1
        x = np.asarray(x, dtype=float)
        if self._next_sample_t is None or now >= self._next_sample_t:
            self._xh.append(x.copy())
            self._uh.append(self._last_u.copy())
            base = now if self._next_sample_t is None else self._next_sample_t
            self._next_sample_t = base + self.model_dt
            if self._next_sample_t < now:  # we fell behind by more than one model step: resync
                self._next_sample_t = now + self.model_dt
            job = (now, np.stack(self._xh), np.stack(self._uh), self.delay_steps())
            if self.threaded:
                self.start()
                self.submit(*job)
            else:
                self._run_job(*job)
        with self._lock:
            plan = self._plan
        u = None
        taken_over = self._takeover(x)
        if plan is not None and self.fault is None and not taken_over:
            age = now - plan[0]
            if plan is not self._used_plan:  # a plan's first use: how late plans land
                self._used_plan = plan
                a = self.land_age_s
                self.land_age_s = age if not np.isfinite(a) else 0.9 * a + 0.1 * age
            idx = int(age / self.model_dt)
            if age <= self.max_plan_age_s and idx < len(plan[1]):
                u = plan[1][idx] + self._tracking(x, plan[2], age / self.model_dt)
        if u is None:
            if not self._fault_handled and self.fault_since is not None:
                self.fallback_delays.append(max(0.0, now - self.fault_since))
                self.fallback_delay_ticks.append(self._ticks - self._fault_tick)
                self._fault_handled = True
            out = self.fallback.compute(x, now)
            self.fallbacks += 1
            self.mode = "fallback"
            out.mode = "fallback"
            out.info["mpc_fault"] = 1.0 if self.fault else 0.0
            if taken_over:
                self.takeovers += 1
                out.info["mpc_takeover"] = 1.0
        else:
            self.mode = "mpc"
            u = np.asarray(u, dtype=float).copy()
            trust = self.planner.p.trust_frac
            if trust is not None:  # a bounded correction around the fallback's (LQR's) command
                u_fb = np.asarray(self.fallback.compute(x, now).u, dtype=float)
                band = float(trust) * self.planner.u_max
                u = u_fb + np.clip(u - u_fb, -band, band)
            out = ControlOutput(u, "mpc", {"mpc_cost": self.planner.last_cost})
        self._last_u = out.u.copy()
        return out


def _path_point(path: np.ndarray, s: float, angle: np.ndarray) -> np.ndarray:
    """The predicted path (H+1,n) at fractional model step ``s`` (linear, angle steps wrapped)."""
    i = min(int(s), len(path) - 2)
    step = path[i + 1] - path[i]
    step[angle] = wrap_angle(step[angle])
    return path[i] + (s - i) * step


def _predictor_errors() -> tuple[type[BaseException], ...]:
    try:
        from export.client import PredictorError
    except ImportError:
        return (TimeoutError, ConnectionError)
    return (PredictorError, TimeoutError, ConnectionError)


def make_mpc(model: Any, cfg: Any, rollout: RolloutFn, fallback: Any, model_dt: float,
             params: MPCParams | None = None, **kw: Any) -> MPCController:
    """MPC controller for a rig: reference = upright, input limits from config, angle wrapping."""
    from controllers.base import voltage_limit
    from controllers.lqr import LQRController

    pi = pendulum_index(model)
    params = params or MPCParams()
    lqr = LQRController(model, model_dt, cfg=cfg)
    if params.q is None:  # stage cost = the LQR's, terminal cost = its cost-to-go
        params.q = tuple(np.diag(lqr.q))
        params.r = tuple(np.diag(lqr.r))
    planner = SamplingMPC(rollout, model.n, model.m, voltage_limit(cfg), model.upright(), params,
                          angle_channels=(pi,), state_bounds=_state_bounds(model, cfg),
                          prior=lqr_prior(model, cfg, model_dt, params.horizon),
                          terminal=lqr.p if params.lqr_terminal else None)
    return MPCController(planner, fallback, model_dt, **kw)


def lqr_prior(model: Any, cfg: Any, model_dt: float, horizon: int) -> Callable[[np.ndarray], np.ndarray]:
    """Candidate plan from an LQR at the model step, rolled out on the physics' linearisation.

    The sampled plans are open-loop, which handles an unstable pendulum poorly; seeding each iteration
    with this closed-loop-shaped sequence ``u_j = -K (Ad - Bd K)^j e`` (and perturbations of it) makes the
    sampler start from a stabilising plan.  It is only a proposal: the learned model scores it."""
    from controllers.lqr import LQRController

    lqr = LQRController(model, model_dt, cfg=cfg)
    a_cl = lqr.ad - lqr.bd @ lqr.k
    powers = [np.eye(model.n)]
    for _ in range(horizon - 1):
        powers.append(a_cl @ powers[-1])
    gains = np.stack([-lqr.k @ pw for pw in powers])  # (H, m, n)

    def prior(x: np.ndarray) -> np.ndarray:
        return gains @ lqr.error(x)

    return prior


def _state_bounds(model: Any, cfg: Any) -> np.ndarray | None:
    """Soft position bound on the base coordinate from the config's limits (others unbounded)."""
    from controllers.safety import SoftLimits

    try:
        lim = SoftLimits.from_config(cfg, model)
    except ValueError:
        return None
    b = np.full(model.n, np.inf)
    b[lim.base_index] = lim.base_soft
    return b


__all__ = ["MPCController", "MPCParams", "PhysicsRollout", "PredictorRollout", "SamplingMPC", "make_mpc"]
