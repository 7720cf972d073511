"""Synthetic controlled dynamics sampled from an RKHS (numpy only, vectorised, seeded).

A system with ``n`` states and ``m`` inputs is ``x' = f(x, u) - lam * x`` with, per output ``j < n``,

    f_j(z) = sum_i alpha_ij k(z, z_i),   z = [x, u] in R^(n+m),
    k(z, z') = exp(-0.5 * sum_k ((z_k - z'_k) / l_k)^2)          (RBF, per-dimension lengthscales l_k)

and ``alpha_j`` rescaled so that ``||f_j||_H^2 = alpha_j^T K alpha_j = rho^2`` (``K`` = Gram matrix of the
centres, ``rho`` drawn per system). Since ``k(z, z) = 1``, ``|f_j(z)| <= rho`` everywhere; the stabilising
term ``-lam x`` (``lam > 0``) then keeps ``|x_j|`` inside ``max(|x_j(0)|, rho / lam)`` in continuous time.
Integration: fixed step ``dt``, explicit Euler or RK4, inputs held constant over a step (zero-order hold).
Trajectories that diverge (non-finite or ``|x| > x_bound``) or fail the total-variation rule are discarded
and replaced by fresh draws; see ``docs/synthetic_data.md`` for every knob and the exact selection rule.

Many systems are simulated at once: systems of different ``(n, m)`` share one batch padded to the batch's
largest ``n`` / ``m`` (padded coordinates of centres, states and inputs are exactly 0 and padded outputs have
``alpha = 0``, so padded states stay exactly 0 and do not change the kernel).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fm_core.train_configs import known_keys

INPUT_KINDS = ("smooth", "multisine", "steps", "zero")
INTEGRATORS = ("euler", "rk4")
CORPUS_FORMAT_VERSION = 1
CORPUS_MANIFEST = "manifest.json"


class RKHSConfigError(ValueError):
    """Invalid RKHSConfig value; the message names the field."""


class RKHSGenerationError(RuntimeError):
    """The generator could not produce enough accepted trajectories (config yields flat/diverging systems)."""


class CorpusError(ValueError):
    """A corpus shard is missing, unreadable or inconsistent; the message names the file and the field."""


def _default_mix() -> dict[str, float]:
    return {"smooth": 0.35, "multisine": 0.25, "steps": 0.25, "zero": 0.15}


@dataclass
class RKHSConfig:
    """All knobs of the synthetic generator (docs/synthetic_data.md). Ranges are inclusive ``(lo, hi)``."""

    n_max: int = 6                                   # padded state width of every batch
    m_max: int = 2                                   # padded input width of every batch
    n_range: tuple[int, int] | None = None           # state dims drawn uniformly; None -> (1, n_max)
    m_range: tuple[int, int] | None = None           # input dims drawn uniformly; None -> (0, m_max)
    num_centres: int = 32                            # kernel centres per system
    centre_std: float = 1.0                          # centres z_i ~ N(0, centre_std^2) in (x, u) space
    lengthscale_range: tuple[float, float] = (0.5, 2.0)   # log-uniform, per system (and per dim if ard)
    ard: bool = True                                 # independent lengthscale per input dimension
    rkhs_norm_range: tuple[float, float] = (2.0, 20.0)     # target ||f_j||_H, log-uniform per system
    stab_range: tuple[float, float] = (0.2, 1.0)     # lam of the stabilising term -lam*x, uniform per system
    dt: float = 0.05                                 # integration / sampling step
    T: int = 256                                     # default trajectory length (samples)
    integrator: str = "euler"                        # "euler" | "rk4"
    x0_range: float = 1.0                            # x(0) ~ U(-x0_range, x0_range) per state
    input_mix: dict[str, float] = field(default_factory=_default_mix)   # probabilities of the input kinds
    input_amp_range: tuple[float, float] = (0.3, 1.5)     # input amplitude, uniform per trajectory
    input_offset: float = 0.3                        # constant offset ~ U(-input_offset, input_offset)
    smooth_cutoff_range: tuple[float, float] = (0.05, 1.0)  # band-limited noise cutoff (1/time), log-unif.
    multisine_freq_range: tuple[float, float] = (0.02, 1.0)  # sine frequencies (1/time), log-uniform
    multisine_max_components: int = 5                # 1..this many sines per channel
    step_hold_range: tuple[float, float] = (0.5, 5.0)  # mean hold time of step inputs (time), log-uniform
    x_bound: float = 10.0                            # |x| beyond this anywhere -> diverged, rejected
    tv_min: float = 0.05                             # every state channel's TV rate must be >= tv_min
    tv_max: float = 20.0                             # ... and <= tv_max   (TV rate: see total_variation)
    mechanical_fraction: float = 0.0                 # share of second-order systems (q' = v, v' = f(q,v,u))
    time_scale_range: tuple[float, float] | None = None  # c ~ log-U per system: x' = c (f - stab x +
                                                     # coupling x) (= sampling at dt' = c dt)
    angle_fraction: float = 0.0                      # share of mechanical systems with one position seen as
                                                     # (sin kq, cos kq): n -> n + 1 (the rigs' sin/cos layout)
    max_rounds: int = 50                             # resampling rounds before RKHSGenerationError
    chunk_size: int = 1024                           # systems simulated per vectorised chunk
    dtype: str = "float32"                           # simulation dtype ("float32" | "float64")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        if self.n_range is None:
            self.n_range = (1, self.n_max)
        if self.m_range is None:
            self.m_range = (0, self.m_max)
        self.input_mix = dict(self.input_mix)
        self.validate()

    def validate(self) -> None:
        """Raise RKHSConfigError naming the first invalid field."""
        def bad(name: str, why: str) -> RKHSConfigError:
            return RKHSConfigError(f"RKHSConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("n_max", "m_max", "num_centres", "T", "multisine_max_components", "max_rounds",
                     "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise bad(name, "must be an integer")
        if self.n_max < 1:
            raise bad("n_max", "must be >= 1")
        if self.m_max < 0:
            raise bad("m_max", "must be >= 0")
        for name in ("num_centres", "T", "multisine_max_components", "max_rounds", "chunk_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name, lo_ok, hi_max in (("n_range", 1, self.n_max), ("m_range", 0, self.m_max)):
            r = getattr(self, name)
            if (not isinstance(r, tuple) or len(r) != 2 or not all(isinstance(a, int | np.integer) for a in r)
                    or not lo_ok <= r[0] <= r[1] <= hi_max):
                raise bad(name, f"must be integers (lo, hi) with {lo_ok} <= lo <= hi <= {hi_max}")
        for name, positive in (("lengthscale_range", True), ("rkhs_norm_range", True), ("stab_range", False),
                               ("input_amp_range", False), ("smooth_cutoff_range", True),
                               ("multisine_freq_range", True), ("step_hold_range", True)):
            r = getattr(self, name)
            if not isinstance(r, tuple) or len(r) != 2:
                raise bad(name, "must be a pair (lo, hi)")
            try:
                lo, hi = float(r[0]), float(r[1])
            except (TypeError, ValueError):
                raise bad(name, "must be numbers") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise bad(name, "must be finite with lo <= hi")
            if positive and lo <= 0:
                raise bad(name, "must be > 0 (log-uniform range)")
            if name == "input_amp_range" and lo < 0:
                raise bad(name, "must be >= 0")
        for name in ("centre_std", "dt", "x0_range", "input_offset", "x_bound", "tv_min", "tv_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float | np.floating) or math.isnan(v):
                raise bad(name, "must be a number")
        if not (self.dt > 0 and math.isfinite(self.dt)):
            raise bad("dt", "must be finite and > 0")
        for name in ("centre_std", "x0_range", "input_offset", "tv_min"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not self.x_bound > 0:
            raise bad("x_bound", "must be > 0")
        if self.tv_max < self.tv_min:
            raise bad("tv_max", f"must be >= tv_min={self.tv_min}")
        ts = self.time_scale_range
        if ts is not None:
            if (not isinstance(ts, tuple) or len(ts) != 2
                    or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in ts)
                    or not (0 < ts[0] <= ts[1] and math.isfinite(ts[1]))):
                raise bad("time_scale_range", "must be None or finite numbers (lo, hi) with 0 < lo <= hi")
        mf = self.mechanical_fraction
        if isinstance(mf, bool) or not isinstance(mf, int | float | np.floating) or not 0.0 <= mf <= 1.0:
            raise bad("mechanical_fraction", "must be a number in [0, 1]")
        if mf > 0 and not any(k % 2 == 0 for k in range(self.n_range[0], self.n_range[1] + 1)):
            raise bad("mechanical_fraction", f"needs an even state dimension inside n_range={self.n_range}")
        af = self.angle_fraction
        if isinstance(af, bool) or not isinstance(af, int | float | np.floating) or not 0.0 <= af <= 1.0:
            raise bad("angle_fraction", "must be a number in [0, 1]")
        if af > 0 and mf == 0:
            raise bad("angle_fraction", "needs mechanical_fraction > 0 (angles are positions of those)")
        if af > 0 and not any(k % 2 == 0 and k + 1 <= self.n_range[1]
                              for k in range(self.n_range[0], self.n_range[1] + 1)):
            raise bad("angle_fraction", f"needs an even n with n + 1 <= {self.n_range[1]} (n_range)")
        if self.integrator not in INTEGRATORS:
            raise bad("integrator", f"must be one of {INTEGRATORS}")
        if self.dtype not in ("float32", "float64"):
            raise bad("dtype", "must be 'float32' or 'float64'")
        if not isinstance(self.input_mix, dict) or not self.input_mix:
            raise bad("input_mix", f"must be a non-empty table of probabilities over {INPUT_KINDS}")
        unknown = sorted(set(self.input_mix) - set(INPUT_KINDS))
        if unknown:
            raise bad("input_mix", f"unknown input kind(s) {unknown}; known: {list(INPUT_KINDS)}")
        probs = list(self.input_mix.values())
        if any(isinstance(p, bool) or not isinstance(p, int | float) or not p >= 0 for p in probs) \
                or sum(probs) <= 0:
            raise bad("input_mix", "probabilities must be numbers >= 0 with a positive sum")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RKHSConfig:
        """Build from a plain dict (TOML [rkhs] table); unknown keys raise RKHSConfigError naming them."""
        return cls(**known_keys(cls, d, RKHSConfigError))

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-friendly dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def as_config(cfg: RKHSConfig | dict[str, Any] | None) -> RKHSConfig:
    """Accept an RKHSConfig, a plain dict (e.g. a TOML [rkhs] table) or None (defaults)."""
    if cfg is None:
        return RKHSConfig()
    if isinstance(cfg, dict):
        return RKHSConfig.from_dict(cfg)
    if not isinstance(cfg, RKHSConfig):
        raise RKHSConfigError(f"expected an RKHSConfig or a dict, got {type(cfg).__name__}")
    return cfg


def _loguniform(rng: np.random.Generator, lo: float, hi: float, size: Any) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size=size))


# ----------------------------------------------------------------------------------------------- systems
@dataclass
class RKHSSystem:
    """A batch of ``S`` RKHS systems in a padded space (``n_pad`` states, ``m_pad`` inputs).

    ``centres`` (S,C,n_pad+m_pad), ``lengthscales`` (S,n_pad+m_pad), ``alpha`` (S,C,n_pad) and ``stab`` (S,)
    are float64 (exact parameters); ``rkhs_norm`` (S,) is the target ``||f_j||_H`` of every output ``j < n``.
    Calling the system evaluates ``x' = f(x, u) - stab * x + coupling @ x`` in ``dtype`` for x (S,n_pad),
    u (S,m_pad). ``coupling`` (S,n_pad,n_pad) float64 is None for first-order systems; a mechanical system
    (``n = 2k`` states ``[q, v]``) has ``coupling[j, k + j] = 1`` and ``alpha[:, j] = 0`` for ``j < k``, so
    ``q_j' = v_j - stab q_j`` and only the accelerations ``v'`` come from the RKHS.
    """

    n: np.ndarray
    m: np.ndarray
    centres: np.ndarray
    lengthscales: np.ndarray
    alpha: np.ndarray
    stab: np.ndarray
    rkhs_norm: np.ndarray
    dtype: str = "float32"
    coupling: np.ndarray | None = None

    def __post_init__(self) -> None:
        dt = np.dtype(self.dtype)
        n_pad = self.alpha.shape[2]
        self._coupling = None if self.coupling is None else np.ascontiguousarray(self.coupling, dtype=dt)
        zs = self.centres / self.lengthscales[:, None, :]                        # (S,C,d) scaled centres
        inv_l = (1.0 / self.lengthscales).astype(dt)
        self._inv_lx = np.ascontiguousarray(inv_l[:, :n_pad])
        self._inv_lu = np.ascontiguousarray(inv_l[:, n_pad:])
        self._wx = np.ascontiguousarray(zs[:, :, :n_pad].transpose(0, 2, 1), dtype=dt)   # (S,n_pad,C)
        self._wu = np.ascontiguousarray(zs[:, :, n_pad:].transpose(0, 2, 1), dtype=dt)   # (S,m_pad,C)
        self._bias = (-0.5 * (zs * zs).sum(-1)).astype(dt)                        # (S,C)
        self._alpha_t = np.ascontiguousarray(self.alpha.transpose(0, 2, 1), dtype=dt)    # (S,n_pad,C)
        self._stab = self.stab.astype(dt)[:, None]

    @property
    def size(self) -> int:
        """Number of systems S."""
        return int(self.alpha.shape[0])

    @property
    def n_pad(self) -> int:
        return int(self.alpha.shape[2])

    @property
    def m_pad(self) -> int:
        return int(self.centres.shape[2] - self.alpha.shape[2])

    def input_features(self, u: np.ndarray | None) -> np.ndarray:
        """Input part of the log-kernel, ``(S,C)``: ``u_s . c_u - |c_s|^2/2 - |u_s|^2/2`` (scaled coords)."""
        if self.m_pad == 0 or u is None:
            return self._bias
        us = np.asarray(u, dtype=self._bias.dtype) * self._inv_lu
        s = np.einsum("sd,sdc->sc", us, self._wu)
        s += self._bias
        s -= 0.5 * (us * us).sum(-1, keepdims=True)
        return s

    def deriv_from_features(self, x: np.ndarray, su: np.ndarray) -> np.ndarray:
        """``x'`` given the precomputed input features ``su`` (S,C) of the current (held) input."""
        xs = x * self._inv_lx
        s = np.einsum("sd,sdc->sc", xs, self._wx)
        s += su
        s -= 0.5 * (xs * xs).sum(-1, keepdims=True)
        np.minimum(s, 0.0, out=s)           # exact value is <= 0; guards rounding of the expanded square
        np.exp(s, out=s)
        out = np.einsum("sc,snc->sn", s, self._alpha_t)
        out -= self._stab * x
        if self._coupling is not None:
            out += np.einsum("snk,sk->sn", self._coupling, x)
        return out

    def __call__(self, x: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
        """Evaluate ``x' = f(x, u) - stab * x``; x (S,n_pad), u (S,m_pad) (a single system also takes 1-D)."""
        x = np.asarray(x, dtype=self._bias.dtype)
        single = x.ndim == 1
        if single:
            x = x[None]
            u = None if u is None else np.asarray(u)[None]
        if x.shape != (self.size, self.n_pad):
            raise ValueError(f"RKHSSystem: x has shape {x.shape}, expected ({self.size}, {self.n_pad})")
        if self.m_pad and (u is None or np.shape(u) != (self.size, self.m_pad)):
            raise ValueError(f"RKHSSystem: u has shape {np.shape(u)}, expected ({self.size}, {self.m_pad})")
        out = self.deriv_from_features(x, self.input_features(u))
        return out[0] if single else out

    def gram(self) -> np.ndarray:
        """Gram matrices ``K`` (S,C,C) of the centres, float64."""
        return _gram(self.centres, self.lengthscales)

    def rkhs_norms_squared(self) -> np.ndarray:
        """``alpha_j^T K alpha_j`` per system and output, (S,n_pad) float64 (0 for padded outputs)."""
        return _quad(self.alpha, self.gram())

    def subset(self, idx: np.ndarray) -> RKHSSystem:
        """The systems selected by ``idx`` (index array or boolean mask)."""
        return RKHSSystem(self.n[idx], self.m[idx], self.centres[idx], self.lengthscales[idx],
                          self.alpha[idx], self.stab[idx], self.rkhs_norm[idx], self.dtype,
                          None if self.coupling is None else self.coupling[idx])


def _gram(centres: np.ndarray, lengthscales: np.ndarray) -> np.ndarray:
    """RBF Gram matrices (S,C,C) in float64 (expanded square via batched matmul, clipped at 0)."""
    zs = centres / lengthscales[:, None, :]
    sq = (zs * zs).sum(-1)
    g = np.matmul(zs, zs.transpose(0, 2, 1))          # in place from here: one (S,C,C) buffer
    g *= -2.0
    g += sq[:, :, None]
    g += sq[:, None, :]
    np.maximum(g, 0.0, out=g)
    g *= -0.5
    return np.exp(g, out=g)


def _quad(alpha: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``alpha_j^T K alpha_j`` for alpha (S,C,n), K (S,C,C) -> (S,n)."""
    return (alpha * np.matmul(gram, alpha)).sum(1)


def sample_system(
    rng: np.random.Generator, n: int | np.ndarray, m: int | np.ndarray, cfg: RKHSConfig | dict | None = None,
    mechanical: bool | np.ndarray | None = None,
) -> RKHSSystem:
    """Draw RKHS systems: scalar ``n, m`` -> one system; arrays (S,) -> S systems padded to max(n), max(m).

    ``mechanical`` (bool or (S,) bools, default none): those systems are second order, ``x = [q, v]`` with
    ``q' = v - lam q`` and ``v' = f(q, v, u) - lam v`` (``n`` must be even); the RKHS draw, the norm scaling
    and the random stream are the same as for a first-order system, only the position outputs' ``alpha`` is
    replaced by the kinematic coupling.
    """
    cfg = as_config(cfg)
    n_arr = np.atleast_1d(np.asarray(n, dtype=np.int64))
    m_arr = np.atleast_1d(np.asarray(m, dtype=np.int64))
    if n_arr.shape != m_arr.shape or n_arr.ndim != 1 or n_arr.size == 0:
        raise ValueError(f"sample_system: n and m must be ints or equal-length 1-D arrays, got {n!r}, {m!r}")
    if (n_arr < 1).any() or (m_arr < 0).any():
        raise ValueError(f"sample_system: need n >= 1 and m >= 0, got n={n_arr.tolist()} m={m_arr.tolist()}")
    s, c = n_arr.size, cfg.num_centres
    n_pad, m_pad = int(n_arr.max()), int(m_arr.max())
    d = n_pad + m_pad
    # which padded coordinates exist for each system: states [0, n), inputs [n_pad, n_pad + m)
    k = np.arange(d)[None, :]
    exists = (k < n_arr[:, None]) | ((k >= n_pad) & (k < n_pad + m_arr[:, None]))           # (S,d)
    out_exists = np.arange(n_pad)[None, :] < n_arr[:, None]                                # (S,n_pad)

    lo, hi = cfg.lengthscale_range
    ls = _loguniform(rng, lo, hi, (s, d) if cfg.ard else (s, 1)) * np.ones((s, d))
    ls = np.where(exists, ls, 1.0)
    centres = rng.normal(0.0, cfg.centre_std, size=(s, c, d)) * exists[:, None, :]
    alpha = rng.standard_normal((s, c, n_pad)) * out_exists[:, None, :]
    norm = _loguniform(rng, *cfg.rkhs_norm_range, s)
    stab = rng.uniform(*cfg.stab_range, size=s)
    coupling = None
    if mechanical is not None and np.any(mechanical):
        mech = np.broadcast_to(np.asarray(mechanical, dtype=bool), n_arr.shape)
        if (n_arr[mech] % 2).any():
            raise ValueError(f"sample_system: mechanical systems need an even n, got {n_arr[mech].tolist()}")
        half = np.where(mech, n_arr // 2, 0)
        j = np.arange(n_pad)
        position = j[None, :] < half[:, None]                                                  # (S,n_pad)
        alpha = alpha * ~position[:, None, :]
        coupling = np.zeros((s, n_pad, n_pad))
        si, ji = np.nonzero(position)
        coupling[si, ji, ji + half[si]] = 1.0
    q = _quad(alpha, _gram(centres, ls))                                                     # (S,n_pad)
    scale = np.sqrt(np.divide(norm[:, None] ** 2, q, out=np.zeros_like(q), where=q > 0))
    alpha = alpha * scale[:, None, :]
    if cfg.time_scale_range is not None:  # drawn last, only when set: the default stream stays bit-identical
        c = _loguniform(rng, *cfg.time_scale_range, s)
        alpha, stab, norm = alpha * c[:, None, None], stab * c, norm * c
        coupling = None if coupling is None else coupling * c[:, None, None]
    return RKHSSystem(n_arr, m_arr, centres, ls, alpha, stab, norm, cfg.dtype, coupling)


# ----------------------------------------------------------------------------------------------- simulation
def simulate(
    system: RKHSSystem, x0: np.ndarray, u: np.ndarray | None, dt: float, integrator: str = "euler",
    T: int | None = None,
) -> np.ndarray:
    """Integrate ``x' = f(x, u) - stab x`` from ``x0`` (S,n_pad) under ``u`` (S,T,m_pad), zero-order hold.

    Returns ``x`` (S,T,n_pad) with ``x[:, 0] = x0``; ``u[:, t]`` drives the step ``t -> t+1`` (``u[:, -1]`` is
    unused). ``T`` is required when the system has no inputs (``u`` None or width 0).
    """
    if integrator not in INTEGRATORS:
        raise ValueError(f"simulate: integrator={integrator!r}, expected one of {INTEGRATORS}")
    dtype = system._bias.dtype
    x = np.array(x0, dtype=dtype).reshape(system.size, system.n_pad)
    if u is not None:
        u = np.asarray(u, dtype=dtype)
        if u.ndim != 3 or u.shape[0] != system.size or u.shape[2] != system.m_pad:
            raise ValueError(f"simulate: u has shape {u.shape}, expected ({system.size}, T, {system.m_pad})")
        T = u.shape[1] if T is None else T
    if T is None or T < 1:
        raise ValueError("simulate: T must be given (>= 1) when there is no input array")
    n_pad, m_pad, d = system.n_pad, system.m_pad, system.n_pad + system.m_pad
    # augmented features z = [x/l_x, u/l_u, 1, -|z_s|^2/2] against [c_x; c_u; -|c_s|^2/2; 1]: one einsum
    # per evaluation gives the log-kernel -|z_s - c_s|^2 / 2 for all centres.
    bias = system._bias[:, None, :]
    w_aug = np.concatenate([system._wx, system._wu, bias, np.ones_like(bias)], axis=1)   # (S,d+2,C)
    zb = np.zeros((system.size, d + 2), dtype=dtype)
    zb[:, d] = 1.0
    if m_pad:
        us = u.transpose(1, 0, 2) * system._inv_lu[None]                      # (T,S,m_pad) scaled inputs
        qu = -0.5 * (us * us).sum(-1)                                         # (T,S)
    else:
        us, qu = None, np.zeros((T, system.size), dtype=dtype)
    traj = np.empty((T, system.size, n_pad), dtype=dtype)
    traj[0] = x
    h = dtype.type(dt)
    inv_lx = system._inv_lx

    def kernel(xc: np.ndarray, q: np.ndarray) -> np.ndarray:
        xs = np.multiply(xc, inv_lx, out=zb[:, :n_pad])
        zb[:, d + 1] = q - 0.5 * np.einsum("sd,sd->s", xs, xs)
        e = np.einsum("sd,sdc->sc", zb, w_aug)
        return np.exp(e, out=e)

    with np.errstate(over="ignore", invalid="ignore"):
        if integrator == "euler":
            decay = 1.0 - h * system._stab                        # x + h(f - lam x) = decay x + h f
            alpha_h = system._alpha_t * h
            coupling_h = None if system._coupling is None else system._coupling * h
            for t in range(T - 1):
                if us is not None:
                    zb[:, n_pad:d] = us[t]
                e = kernel(x, qu[t])
                nxt = traj[t + 1]
                np.multiply(decay, x, out=nxt)
                nxt += np.einsum("sc,snc->sn", e, alpha_h)
                if coupling_h is not None:
                    nxt += np.einsum("snk,sk->sn", coupling_h, x)
                x = nxt
        else:
            # the input part of the log-kernel is shared by the 4 stages: computed once per step
            alpha_t, stab, coupling = system._alpha_t, system._stab, system._coupling
            wx1 = np.concatenate([system._wx, np.ones_like(bias)], axis=1)     # (S,n_pad+1,C)
            zx = np.empty((system.size, n_pad + 1), dtype=dtype)

            def f(xc: np.ndarray, su: np.ndarray) -> np.ndarray:
                xs = np.multiply(xc, inv_lx, out=zx[:, :n_pad])
                zx[:, n_pad] = -0.5 * np.einsum("sd,sd->s", xs, xs)
                e = np.einsum("sd,sdc->sc", zx, wx1)
                e += su
                np.exp(e, out=e)
                out = np.einsum("sc,snc->sn", e, alpha_t)
                out -= stab * xc
                if coupling is not None:
                    out += np.einsum("snk,sk->sn", coupling, xc)
                return out

            for t in range(T - 1):
                if us is not None:
                    su = np.einsum("sd,sdc->sc", us[t], system._wu)
                    su += system._bias
                    su += qu[t][:, None]
                else:
                    su = system._bias
                k1 = f(x, su)
                k2 = f(x + (h / 2) * k1, su)
                k3 = f(x + (h / 2) * k2, su)
                k4 = f(x + h * k3, su)
                k2 += k3
                k2 *= 2
                k1 += k2
                k1 += k4
                k1 *= h / 6
                np.add(x, k1, out=traj[t + 1])
                x = traj[t + 1]
    return np.ascontiguousarray(traj.transpose(1, 0, 2))


# ----------------------------------------------------------------------------------------------- inputs
def sample_inputs(
    rng: np.random.Generator, m: np.ndarray, T: int, cfg: RKHSConfig, m_pad: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Input signals (S,T,m_pad) (zero past each m) and the kind index per trajectory (into INPUT_KINDS).

    kinds: band-limited Gaussian noise ("smooth"), sums of sines ("multisine"), piecewise-constant random
    levels ("steps") and "zero"; each non-zero kind is scaled to unit RMS, times an amplitude
    ~ U(input_amp_range), plus an offset ~ U(-input_offset, input_offset), per trajectory and channel.
    """
    m = np.asarray(m, dtype=np.int64)
    s = m.size
    m_pad = int(m.max(initial=0)) if m_pad is None else m_pad
    f32 = np.float32
    probs = np.array([float(cfg.input_mix.get(k, 0.0)) for k in INPUT_KINDS])
    kind = rng.choice(len(INPUT_KINDS), size=s, p=probs / probs.sum())
    u = np.zeros((s, T, m_pad), dtype=f32)
    if m_pad == 0:
        return u.astype(cfg.dtype), kind
    t = (np.arange(T) * cfg.dt).astype(f32)
    # smooth: Gaussian-filtered white noise, drawn directly as random Fourier coefficients of a length-2T
    # signal (only the bins below 4 * the largest cutoff are non-zero); the first T samples are used.
    idx = np.flatnonzero(kind == 0)
    if idx.size:
        n_fft = 2 * T
        df = 1.0 / (n_fft * cfg.dt)
        nb = int(min(T + 1, math.ceil(4.0 * cfg.smooth_cutoff_range[1] / df) + 2))
        fc = _loguniform(rng, *cfg.smooth_cutoff_range, (idx.size, m_pad, 1)).astype(f32)
        gain = np.exp(-0.5 * (np.arange(nb, dtype=f32) * f32(df) / fc) ** 2)              # (I,m,nb)
        gain[:, :, 0] = 0.0
        coef = np.empty((idx.size, m_pad, nb), dtype=np.complex64)
        coef.real = rng.standard_normal((idx.size, m_pad, nb), dtype=f32) * gain
        coef.imag = rng.standard_normal((idx.size, m_pad, nb), dtype=f32) * gain
        sig = np.fft.irfft(coef, n=n_fft, axis=-1)[:, :, :T].astype(f32)
        sig -= sig.mean(-1, keepdims=True)
        rms = np.sqrt((sig * sig).mean(-1, keepdims=True))
        sig /= np.maximum(rms, f32(1e-12))
        u[idx] = sig.transpose(0, 2, 1)
    # multisine: 1..K sines per channel, log-uniform frequencies, random phases, unit RMS over the window
    idx = np.flatnonzero(kind == 1)
    if idx.size:
        kmax = cfg.multisine_max_components
        ncomp = rng.integers(1, kmax + 1, size=(idx.size, 1, m_pad))
        w = (2 * np.pi * _loguniform(rng, *cfg.multisine_freq_range, (idx.size, kmax, m_pad))).astype(f32)
        ph = rng.uniform(0, 2 * np.pi, size=(idx.size, kmax, m_pad)).astype(f32)
        acc = np.zeros((idx.size, T, m_pad), dtype=f32)
        for k in range(kmax):
            acc += np.sin(w[:, k, None, :] * t[None, :, None] + ph[:, k, None, :]) * (k < ncomp)
        rms = np.sqrt((acc * acc).mean(1, keepdims=True))                  # exact unit RMS over the window
        u[idx] = acc / np.maximum(rms, f32(1e-12))
    # steps: levels ~ U(-sqrt3, sqrt3) (unit RMS), switching with probability dt / hold per step
    idx = np.flatnonzero(kind == 2)
    if idx.size:
        hold = _loguniform(rng, *cfg.step_hold_range, (idx.size, 1, m_pad))
        switch = rng.random((idx.size, T, m_pad), dtype=f32) < np.minimum(cfg.dt / hold, 1.0)
        switch[:, 0] = False
        seg = np.cumsum(switch, axis=1)
        levels = rng.uniform(-math.sqrt(3), math.sqrt(3), size=(idx.size, T, m_pad)).astype(f32)
        u[idx] = np.take_along_axis(levels, seg, axis=1)
    amp = rng.uniform(*cfg.input_amp_range, size=(s, 1, m_pad))
    off = rng.uniform(-cfg.input_offset, cfg.input_offset, size=(s, 1, m_pad))
    real = (np.arange(m_pad)[None, None, :] < m[:, None, None]) & (kind != 3)[:, None, None]
    u *= (amp * real).astype(f32)
    u += (off * real).astype(f32)
    return u.astype(cfg.dtype, copy=False), kind


# ----------------------------------------------------------------------------------------------- selection
def total_variation(x: np.ndarray, dt: float) -> np.ndarray:
    """Per-channel TV rate ``sum_t |x[t+1] - x[t]| / ((T-1) dt)`` (mean |speed|): (B,T,n) -> (B,n)."""
    x = np.asarray(x)
    if x.shape[1] < 2:
        return np.zeros((x.shape[0], x.shape[2]))
    d = np.diff(x, axis=1)
    np.abs(d, out=d)
    return d.sum(1, dtype=np.float64) / ((x.shape[1] - 1) * dt)


def accept_mask(x: np.ndarray, n: np.ndarray, cfg: RKHSConfig) -> tuple[np.ndarray, dict[str, int]]:
    """Selection rule: finite, ``max|x| <= x_bound``, every real channel's TV rate in [tv_min, tv_max].

    Returns the boolean mask (B,) and the rejection counts per reason (checked in that order).
    """
    n = np.asarray(n)
    real = np.arange(x.shape[2])[None, :] < n[:, None]                                     # (B,n_pad)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(x).all(axis=(1, 2))
        bounded = finite & (np.abs(x).max(axis=(1, 2)) <= cfg.x_bound)
        tv = total_variation(x, cfg.dt)             # meaningless for unbounded rows, which are masked below
    tv_lo = np.where(real, tv, np.inf).min(1)
    tv_hi = np.where(real, tv, -np.inf).max(1)
    flat = bounded & (tv_lo < cfg.tv_min)
    wild = bounded & ~flat & (tv_hi > cfg.tv_max)
    ok = bounded & ~flat & ~wild
    stats = {"nonfinite": int((~finite).sum()), "out_of_bound": int((finite & ~bounded).sum()),
             "flat": int(flat.sum()), "too_wild": int(wild.sum()), "accepted": int(ok.sum())}
    return ok, stats


# ----------------------------------------------------------------------------------------------- batches
@dataclass
class SyntheticBatch:
    """Accepted trajectories: x (B,T,n_max) / u (B,T,m_max) float32, zero-padded past n (B,) / m (B,)."""

    x: np.ndarray
    u: np.ndarray
    n: np.ndarray
    m: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def state_mask(self) -> np.ndarray:
        """(B,n_max) float32, 1 for real state channels."""
        return (np.arange(self.x.shape[2])[None, :] < self.n[:, None]).astype(np.float32)

    def input_mask(self) -> np.ndarray:
        """(B,m_max) float32, 1 for real input channels."""
        return (np.arange(self.u.shape[2])[None, :] < self.m[:, None]).astype(np.float32)


def draw_candidates(
    rng: np.random.Generator, count: int, T: int, cfg: RKHSConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Simulate ``count`` fresh systems (no selection): x (S,T,n_pad), u (S,T,m_pad), n (S,), m (S,)."""
    n = rng.integers(cfg.n_range[0], cfg.n_range[1] + 1, size=count)
    m = rng.integers(cfg.m_range[0], cfg.m_range[1] + 1, size=count)
    mech = None
    if cfg.mechanical_fraction > 0:          # no extra draws at 0: the default stream stays bit-identical
        mech = rng.random(count) < cfg.mechanical_fraction
        evens = np.array([k for k in range(cfg.n_range[0], cfg.n_range[1] + 1) if k % 2 == 0])
        n = np.where(mech, rng.choice(evens, size=count), n)
    sys = sample_system(rng, n, m, cfg, mechanical=mech)
    x0 = rng.uniform(-cfg.x0_range, cfg.x0_range, size=(count, sys.n_pad))
    x0 *= np.arange(sys.n_pad)[None, :] < n[:, None]
    u, _ = sample_inputs(rng, m, T, cfg, m_pad=sys.m_pad)
    x = simulate(sys, x0, u, cfg.dt, cfg.integrator, T=T)
    if cfg.angle_fraction > 0 and mech is not None:  # no extra draws at 0 (default stream unchanged)
        ang = mech & (n + 1 <= cfg.n_range[1]) & (rng.random(count) < cfg.angle_fraction)
        which = rng.integers(0, np.maximum(n // 2, 1))              # which position is the angle
        scale = rng.uniform(1.0, math.pi, size=count)                # k: how much of the circle it sweeps
        x, n = observe_angles(x, n, ang, which, scale)
    return x, u, n, m


def observe_angles(
    x: np.ndarray, n: np.ndarray, angle: np.ndarray, which: np.ndarray, scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Systems with ``angle[s]`` show their position ``q = x[s, :, which[s]]`` as ``(sin kq, cos kq)``
    (``k = scale[s]``) in place of ``q``, the later channels shifted right by one: ``n[s] -> n[s] + 1``.

    The dynamics are unchanged; only what the model observes is (the rigs' layout with ``--angle-features
    sincos``: ``[p, sin th, cos th, p_dot, th_dot]``). Returns (x (S,T,n_pad'), n) with n_pad' = max(n).
    """
    n_new = n + angle.astype(n.dtype)
    out = np.zeros(x.shape[:2] + (max(int(n_new.max()), x.shape[2]),), dtype=x.dtype)
    out[:, :, : x.shape[2]] = x
    for s in np.flatnonzero(angle):
        j, k = int(which[s]), x.dtype.type(scale[s])
        q = x[s, :, j] * k
        out[s, :, j + 2 : n_new[s]] = x[s, :, j + 1 : n[s]]
        out[s, :, j], out[s, :, j + 1] = np.sin(q), np.cos(q)
    return out, n_new


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros(a.shape[:2] + (width,), dtype=np.float32)
    out[:, :, : a.shape[2]] = a
    return out


def generate_batch(
    rng: np.random.Generator, batch: int, T: int | None = None, cfg: RKHSConfig | dict | None = None,
) -> SyntheticBatch:
    """``batch`` accepted trajectories of length ``T`` (default cfg.T), reproducible for a given ``rng``.

    Candidates are drawn in chunks (at most cfg.chunk_size systems, mixed n and m), simulated, filtered with
    ``accept_mask`` and replaced by fresh draws until ``batch`` are accepted (RKHSGenerationError after
    cfg.max_rounds chunks). Accepted trajectories keep their draw order.
    """
    cfg = as_config(cfg)
    T = cfg.T if T is None else int(T)
    if batch < 0 or T < 2:
        raise ValueError(f"generate_batch: need batch >= 0 and T >= 2, got batch={batch}, T={T}")
    xs: list[np.ndarray] = []
    us: list[np.ndarray] = []
    ns: list[np.ndarray] = []
    ms: list[np.ndarray] = []
    got = drawn = 0
    totals: dict[str, int] = {}
    rounds = 0
    while got < batch:
        if rounds >= cfg.max_rounds:
            raise RKHSGenerationError(
                f"generate_batch: only {got}/{batch} trajectories accepted after {rounds} rounds "
                f"({drawn} drawn; rejections {totals}). Rule: finite, |x| <= x_bound={cfg.x_bound}, every "
                f"state channel's TV rate in [tv_min={cfg.tv_min}, tv_max={cfg.tv_max}]; adjust RKHSConfig "
                f"(rkhs_norm_range, stab_range, dt, tv_min/tv_max) so that systems move but stay bounded."
            )
        rounds += 1
        rate = max((got + 1) / (drawn + 1), 0.1) if drawn else 0.8
        count = int(min(cfg.chunk_size, max(16, math.ceil((batch - got) / rate * 1.15))))
        x, u, n, m = draw_candidates(rng, count, T, cfg)
        ok, stats = accept_mask(x, n, cfg)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        drawn += count
        take = np.flatnonzero(ok)[: batch - got]
        if take.size:
            xs.append(_pad(x[take], cfg.n_max))
            us.append(_pad(u[take], cfg.m_max))
            ns.append(n[take])
            ms.append(m[take])
            got += take.size
    if batch == 0:
        return SyntheticBatch(np.zeros((0, T, cfg.n_max), np.float32),
                              np.zeros((0, T, cfg.m_max), np.float32),
                              np.zeros(0, np.int64), np.zeros(0, np.int64))
    return SyntheticBatch(np.concatenate(xs), np.concatenate(us), np.concatenate(ns).astype(np.int64),
                          np.concatenate(ms).astype(np.int64))


# ----------------------------------------------------------------------------------------------- corpus files
def _shard_rng(seed: int, shard: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(shard)]))


def write_corpus(
    out_dir: str | Path, num_trajectories: int, shard_size: int = 10_000, seed: int = 0,
    cfg: RKHSConfig | dict | None = None, *, progress: bool = True, overwrite: bool = False,
    compress: bool = False,
) -> list[Path]:
    """Write ``num_trajectories`` accepted trajectories (length cfg.T) as shards ``rkhs-00000.npz``, ...

    Shard ``i`` is generated from ``SeedSequence([seed, i])``, so shards are independent and reproducible.
    Each shard holds x (K,T,n_max), u (K,T,m_max) float32, n, m (K,) int64, dt, seed, shard, format_version
    and the config as JSON; ``manifest.json`` lists the shards. Existing shards raise FileExistsError unless
    ``overwrite``. Returns the shard paths.
    """
    from tqdm import tqdm

    cfg = as_config(cfg)
    if num_trajectories < 1 or shard_size < 1:
        raise ValueError(f"write_corpus: need num_trajectories >= 1 and shard_size >= 1, got "
                         f"{num_trajectories}, {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(num_trajectories / shard_size)
    paths = [out / f"rkhs-{i:05d}.npz" for i in range(num_shards)]
    if not overwrite:
        existing = [p for p in [*paths, out / CORPUS_MANIFEST] if p.exists()]
        if existing:
            raise FileExistsError(f"write_corpus: {existing[0]} already exists (pass overwrite=True)")
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    save = np.savez_compressed if compress else np.savez
    counts = []
    with tqdm(total=num_trajectories, unit="traj", desc="rkhs corpus", disable=not progress) as bar:
        for i, path in enumerate(paths):
            k = min(shard_size, num_trajectories - i * shard_size)
            b = generate_batch(_shard_rng(seed, i), k, cfg.T, cfg)
            tmp = path.with_name(path.name + ".tmp.npz")
            save(tmp, x=b.x, u=b.u, n=b.n, m=b.m, dt=np.float64(cfg.dt), seed=np.int64(seed),
                 shard=np.int64(i), format_version=np.int64(CORPUS_FORMAT_VERSION), config=np.array(cfg_json))
            os.replace(tmp, path)
            counts.append(k)
            bar.update(k)
    manifest = {"format_version": CORPUS_FORMAT_VERSION, "seed": seed, "num_trajectories": num_trajectories,
                "shard_size": shard_size, "T": cfg.T, "dt": cfg.dt, "n_max": cfg.n_max, "m_max": cfg.m_max,
                "shards": [{"file": p.name, "count": c} for p, c in zip(paths, counts, strict=True)],
                "config": cfg.to_dict()}
    (out / CORPUS_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return paths


def corpus_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths of a corpus: a directory (its manifest, else ``rkhs-*.npz`` sorted), a file, or a list."""
    if isinstance(path, str | Path):
        p = Path(path)
        if p.is_dir():
            man = p / CORPUS_MANIFEST
            if man.is_file():
                try:
                    shards = json.loads(man.read_text())["shards"]
                    files = [p / s["file"] for s in shards]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CorpusError(f"{man}: invalid manifest ({exc!r}), field 'shards'") from None
            else:
                files = sorted(p.glob("rkhs-*.npz"))
            if not files:
                raise CorpusError(f"{p}: no corpus shards (rkhs-*.npz) found")
            return files
        return [p]
    return [Path(q) for q in path]


def read_shard(path: str | Path) -> tuple[SyntheticBatch, float]:
    """Load and validate one shard -> (batch, dt); problems raise CorpusError naming the file and field."""
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"{p}: corpus shard not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable archive becomes a CorpusError
        raise CorpusError(f"{p}: cannot read corpus shard: {exc}") from None
    for k in ("x", "u", "n", "m", "dt"):
        if k not in data:
            raise CorpusError(f"{p}: missing field '{k}'")
    x, u, n, m = data["x"], data["u"], data["n"], data["m"]
    if x.ndim != 3 or u.ndim != 3 or u.shape[:2] != x.shape[:2]:
        raise CorpusError(f"{p}: field 'x' {x.shape} / 'u' {u.shape} must be (K,T,n_max) / (K,T,m_max)")
    if n.shape != (x.shape[0],) or m.shape != (x.shape[0],):
        raise CorpusError(f"{p}: field 'n' {n.shape} / 'm' {m.shape} must be ({x.shape[0]},)")
    if (n < 1).any() or (n > x.shape[2]).any() or (m < 0).any() or (m > u.shape[2]).any():
        raise CorpusError(f"{p}: field 'n'/'m' out of range for widths {x.shape[2]}/{u.shape[2]}")
    if not (np.isfinite(x).all() and np.isfinite(u).all()):
        raise CorpusError(f"{p}: field 'x' or 'u' contains NaN/Inf")
    return SyntheticBatch(x.astype(np.float32, copy=False), u.astype(np.float32, copy=False),
                          n.astype(np.int64), m.astype(np.int64)), float(data["dt"])


def iter_corpus(path: str | Path | Sequence[str | Path]) -> Iterator[SyntheticBatch]:
    """Yield the shards of a corpus one at a time (validated)."""
    for f in corpus_files(path):
        yield read_shard(f)[0]


def read_corpus(path: str | Path | Sequence[str | Path]) -> SyntheticBatch:
    """Load a whole corpus (directory, shard file or list of shards) into one SyntheticBatch."""
    parts: list[SyntheticBatch] = []
    dts: list[float] = []
    for f in corpus_files(path):
        b, dt = read_shard(f)
        if parts and (b.x.shape[1:] != parts[0].x.shape[1:] or b.u.shape[1:] != parts[0].u.shape[1:]):
            raise CorpusError(f"{f}: field 'x'/'u' shape {b.x.shape[1:]}/{b.u.shape[1:]} differs from the "
                              f"first shard's {parts[0].x.shape[1:]}/{parts[0].u.shape[1:]}")
        if dts and not math.isclose(dt, dts[0]):
            raise CorpusError(f"{f}: field 'dt' {dt} differs from the first shard's {dts[0]}")
        parts.append(b)
        dts.append(dt)
    return SyntheticBatch(np.concatenate([b.x for b in parts]), np.concatenate([b.u for b in parts]),
                          np.concatenate([b.n for b in parts]), np.concatenate([b.m for b in parts]))
