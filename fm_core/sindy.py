"""SINDy with control (pysindy): a sparse model of the state increment in a polynomial x trig library.

Discrete time, increment form (robust at dt 0.01 with encoder noise: no numerical derivatives beyond the
one-step difference, no ODE integrator; the model is the one-step map the metric rolls out)::

    x[t+1] - x[t] = dt * Theta(x[t], u[t]) @ xi

Library (``pysindy.GeneralizedLibrary``): a constant, a polynomial of degree ``degree`` in the non-angle
states and the inputs, ``sin(k a), cos(k a)`` (k = 1..``n_frequencies``) of every angle ``a``, and the
products of the two (e.g. ``theta_dot^2 sin(theta)``, ``u cos(theta)``). An angle enters only through sin /
cos (never as a polynomial), so the model is the same whether the angle comes unwrapped (``--angle-features
raw``) or as a ``(sin, cos)`` pair (``sincos``: the pair is turned back into an angle by ``atan2`` inside,
and the predicted angle leaves as its sin / cos). The angles are the rig's pendulum angle in raw data
(``rigs.physics``), every ``sin(a), cos(a)`` pair of adjacent state channels in encoded data, or those given.

Sparse regression: ``pysindy.STLSQ`` (ridge inside, ``alpha = ridge * N``) on library columns scaled to unit
RMS and targets divided by the increment std per channel, so a threshold is the smallest kept contribution
of a term as a share of the target's std (the same meaning on every channel and at every data fraction); it
runs on the QR-compressed problem (``R w ~ Q^T y``: the same least-squares / ridge objective up to a constant,
F rows instead of N). The (threshold, ridge) pair is picked from a grid on the val split like the other
baselines (the open-loop rollout MSE when ``budget.val_rollout`` is set, else the one-step increment MSE);
on ties the sparser, more regularised model wins. Rollouts are recursive; every predicted state is clipped
to the training envelope (each non-angle channel's train range widened by half of it on both sides: a
polynomial model leaves its data fast and blows up) and the windows that hit it are counted
(:meth:`SindyPredictor.rollout_report`); a non-finite state makes that window ``inf`` from then on (reported
as diverged by the metric), never NaN.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

THRESHOLDS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)  # smallest kept contribution / target std
RIDGES = (1e-8, 1e-5, 1e-3, 1e-1)  # ridge strength per sample on unit-RMS columns
ENVELOPE = 0.5  # rollouts are clipped to the train range widened by this share of it on both sides


class SindyLayout:
    """How the caller's state channels map to the SINDy state (angles as one channel each).

    ``pairs``: (sin, cos) channel pairs of the caller's representation; ``angles``: raw angle channels of it.
    The SINDy ("core") state has one channel per raw channel: a pair becomes its angle at the sine's place.
    """

    def __init__(self, n: int, pairs: Sequence[tuple[int, int]] = (), angles: Sequence[int] = ()) -> None:
        self.n = int(n)
        self.pairs = [(int(s), int(c)) for s, c in pairs]
        used = [i for p in self.pairs for i in p]
        if any(c != s + 1 for s, c in self.pairs) or len(set(used)) != len(used):
            raise ValueError(f"SindyLayout: sin/cos pairs must be distinct adjacent channels: {self.pairs}")
        self.raw_angles = sorted({int(a) for a in angles})
        bad = [a for a in self.raw_angles + used if not 0 <= a < n]
        bad += [a for a in self.raw_angles if a in used]
        if bad:
            raise ValueError(f"SindyLayout: bad angle channel(s) {bad} for a state of {n} channels")
        cos_idx = {c for _, c in self.pairs}
        self.keep = [i for i in range(n) if i not in cos_idx]  # caller channel of each core channel
        sin_idx = {s for s, _ in self.pairs}
        self.core_angles = [j for j, i in enumerate(self.keep) if i in sin_idx or i in self.raw_angles]
        self.core_plain = [j for j in range(len(self.keep)) if j not in self.core_angles]
        self.n_core = len(self.keep)

    def to_core(self, z: np.ndarray) -> np.ndarray:
        """(..., n) -> (..., n_core) float64; a (sin, cos) pair becomes ``atan2(sin, cos)``."""
        z = np.asarray(z, dtype=np.float64)
        c = z[..., self.keep].copy()
        for s, co in self.pairs:
            c[..., self.keep.index(s)] = np.arctan2(z[..., s], z[..., co])
        return c

    def from_core(self, c: np.ndarray) -> np.ndarray:
        """(..., n_core) -> (..., n); an encoded angle leaves as (sin, cos)."""
        z = np.empty((*c.shape[:-1], self.n))
        z[..., self.keep] = c
        for s, co in self.pairs:
            a = c[..., self.keep.index(s)]
            z[..., s], z[..., co] = np.sin(a), np.cos(a)
        return z

    def core_names(self, names: Sequence[str]) -> list[str]:
        out = []
        for i in self.keep:
            name = names[i] if i < len(names) else f"x{i}"
            out.append(name[4:-1] if any(i == s for s, _ in self.pairs) and name.startswith("sin(") else name)
        return out


def detect_layout(state_names: Sequence[str], n: int, rig: str = "",
                  angle_channels: Sequence[int] | None = None) -> SindyLayout:
    """Angles of a data set: adjacent ``sin(a), cos(a)`` pairs, plus ``angle_channels`` if given, else the
    rig's pendulum angle when the rig is known and its name is a state."""
    names = [str(s) for s in state_names]
    pairs = [(i, i + 1) for i in range(len(names) - 1)
             if names[i].startswith("sin(") and names[i + 1] == "cos(" + names[i][4:]]
    if angle_channels is not None:
        return SindyLayout(n, pairs, angle_channels)
    raw: list[int] = []
    if rig:
        from rigs.physics import pendulum_angle_name

        try:
            name = pendulum_angle_name(rig)
        except ValueError:  # RigConfigError: not a rig kind -> no known angle
            name = ""
        if name in names:
            raw = [names.index(name)]
    return SindyLayout(n, pairs, raw)


class SindyPredictor:
    """A fitted SINDy model behind the baselines' ``Predictor`` interface (``one_step``, ``rollout``)."""

    name = "sindy"

    def __init__(self, layout: SindyLayout, library: Any, coef: np.ndarray, x_scale: np.ndarray,
                 u_scale: np.ndarray, d_scale: np.ndarray, envelope: tuple[np.ndarray, np.ndarray],
                 info: dict[str, Any]) -> None:
        self.layout, self.library, self.coef = layout, library, np.asarray(coef, dtype=np.float64)
        self.x_scale, self.u_scale, self.d_scale = x_scale, u_scale, d_scale  # core, input, increment stds
        self.lo, self.hi = envelope  # (n_core,) bounds of the predicted states (angles: +-inf)
        self.info = info
        self._rolled = self._clipped = self._diverged_n = 0

    def rollout_report(self) -> dict[str, int]:
        """Rollout windows since the fit: how many, how many hit the envelope, how many went non-finite."""
        return {"rollout_windows": self._rolled, "clipped_windows": self._clipped,
                "diverged_windows": self._diverged_n}

    # ------------------------------------------------------------------ the one-step map (core state)
    def _library_inputs(self, c: np.ndarray, u: np.ndarray) -> np.ndarray:
        lay = self.layout
        plain = c[..., lay.core_plain] / self.x_scale[lay.core_plain]
        return np.concatenate([plain, c[..., lay.core_angles], np.asarray(u, np.float64) / self.u_scale], -1)

    def _delta(self, c: np.ndarray, u: np.ndarray, coefs: np.ndarray | None = None) -> np.ndarray:
        """Predicted increment x[t+1] - x[t] (core units) for states c (..., n_core), inputs u (..., m).

        With ``coefs (K, n_core, F)`` (candidate models), c is (K, ..., n_core) and u (..., m): one library
        evaluation for all K (pysindy's transform has a fixed cost per call)."""
        if coefs is None:
            z = self._library_inputs(c, u)
            theta = np.asarray(self.library.transform(z.reshape(-1, z.shape[-1])))
            return (theta @ self.coef.T * self.d_scale).reshape(c.shape)
        k = coefs.shape[0]
        z = self._library_inputs(c, np.broadcast_to(u, (*c.shape[:-1], u.shape[-1])))
        theta = np.asarray(self.library.transform(z.reshape(-1, z.shape[-1]))).reshape(k, -1, coefs.shape[-1])
        return (np.einsum("kbf,knf->kbn", theta, coefs) * self.d_scale).reshape(c.shape)

    def _next(self, c: np.ndarray, u: np.ndarray, coefs: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step from c: (next state clipped to the envelope, clipped?, non-finite?) per state."""
        with np.errstate(all="ignore"):
            raw = c + self._delta(c, u, coefs)
            nxt = np.clip(raw, self.lo, self.hi)
            clipped = (nxt != raw).any(-1)
        bad = ~np.isfinite(nxt).all(-1)
        return nxt, clipped & ~bad, bad

    def rollout_core(
        self, c0: np.ndarray, u_future: np.ndarray, coefs: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, n_core) start, (B, H, m) inputs -> (B, H, n_core) (with candidate ``coefs (K, n_core, F)``:
        (K, B, H, n_core)); a window that went non-finite is inf from then on."""
        cur = np.asarray(c0, dtype=np.float64).copy()
        h = u_future.shape[1]
        if coefs is not None:
            cur = np.repeat(cur[None], coefs.shape[0], 0)
        out = np.empty((*cur.shape[:-1], h, self.layout.n_core))
        alive = np.ones(cur.shape[:-1], dtype=bool)
        hit = np.zeros(cur.shape[:-1], dtype=bool)
        for j in range(h):
            nxt, clipped, bad = self._next(cur, u_future[:, j], coefs)
            alive &= ~bad
            hit |= clipped
            nxt[~alive] = 0.0  # frozen at a harmless value; reported as inf
            out[..., j, :] = np.where(alive[..., None], nxt, np.inf)
            cur = nxt
        if coefs is None:
            self._rolled += int(alive.size)
            self._clipped += int((hit & alive).sum())
            self._diverged_n += int((~alive).sum())
        return out

    # ------------------------------------------------------------------ Predictor interface
    def one_step(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Teacher-forced predictions of ``x[:, 1:]`` (B, T-1, n) from ``x[:, :-1]`` and ``u[:, :-1]``."""
        c = self.layout.to_core(np.asarray(x)[:, :-1])
        nxt, _, bad = self._next(c, np.asarray(u)[:, :-1])
        z = self.layout.from_core(np.where(bad[..., None], 0.0, nxt))
        return np.where(bad[..., None], np.inf, z).astype(np.float32)

    def rollout(self, x_ctx: np.ndarray, u_ctx: np.ndarray, u_future: np.ndarray) -> np.ndarray:
        """Open-loop prediction of ``x[L..L+H-1]`` (B, H, n): recursive from ``x_ctx[:, -1]`` with
        ``u_future[:, j]`` applied at step L-1+j (SINDy is Markov: the earlier context is not used)."""
        c = self.rollout_core(self.layout.to_core(np.asarray(x_ctx)[:, -1]), np.asarray(u_future))
        bad = ~np.isfinite(c).all(-1)
        z = self.layout.from_core(np.where(bad[..., None], 0.0, c))
        return np.where(bad[..., None], np.inf, z).astype(np.float32)

    # ------------------------------------------------------------------ the identified equations
    def coefficients(self, dt: float | None = None) -> dict[str, dict[str, float]]:
        """Nonzero terms per core state: ``{state: {feature: coefficient}}`` of ``(x[t+1] - x[t]) / dt`` in
        physical units (``dt`` defaults to the training data's; without one: of the increment itself)."""
        dt = dt if dt is not None else self.info.get("dt") or 1.0
        lay = self.layout
        # monomials are homogeneous in the scaled inputs: feature(x / s) = feature(x) / factor, and factor
        # is the feature at x = s over the feature at x = 1 (angles, which are not scaled, at the same value)
        ref = 0.7 * np.ones((1, lay.n_core))
        at_s, at_1 = ref.copy(), ref.copy()
        at_s[0, lay.core_plain] = self.x_scale[lay.core_plain] ** 2
        at_1[0, lay.core_plain] = self.x_scale[lay.core_plain]
        u_s, u_1 = (self.u_scale ** 2)[None], self.u_scale[None]
        factor = (np.asarray(self.library.transform(self._library_inputs(at_s, u_s)))[0]
                  / np.asarray(self.library.transform(self._library_inputs(at_1, u_1)))[0])
        raw = self.coef * self.d_scale[:, None] / dt / factor[None, :]
        feats = self.info["features"]
        return {s: {f: float(raw[i, k]) for k, f in enumerate(feats) if self.coef[i, k] != 0.0}
                for i, s in enumerate(self.info["core_states"])}


def _fit_library(layout: SindyLayout, m: int, degree: int, n_frequencies: int) -> tuple[Any, list[int]]:
    import pysindy as ps

    n_plain, n_ang = len(layout.core_plain), len(layout.core_angles)
    poly_in = list(range(n_plain)) + list(range(n_plain + n_ang, n_plain + n_ang + m))
    if not n_ang:
        return ps.PolynomialLibrary(degree=degree, include_bias=True), poly_in
    ang_in = list(range(n_plain, n_plain + n_ang))
    libs = [ps.PolynomialLibrary(degree=0, include_bias=True),
            ps.PolynomialLibrary(degree=degree, include_bias=False),
            ps.FourierLibrary(n_frequencies=n_frequencies)]
    return ps.GeneralizedLibrary(libs, tensor_array=[[0, 1, 1]],
                                 inputs_per_library=[[0], poly_in, ang_in]), poly_in


def _core_data(layout: SindyLayout, x: np.ndarray) -> np.ndarray:
    """Core states of trajectories (K,T,n) with every angle unwrapped along time."""
    c = layout.to_core(x)
    if layout.core_angles:
        c[..., layout.core_angles] = np.unwrap(c[..., layout.core_angles], axis=1)
    return c


def _selection_scale(layout: SindyLayout, c: np.ndarray) -> np.ndarray:
    """Per core channel: train std; for an angle, the std around each trajectory's own mean (so the unknown
    turn of an encoded angle does not matter and both angle modes select alike)."""
    flat = c.reshape(-1, c.shape[-1])
    s = flat.std(0)
    if layout.core_angles:
        a = c[..., layout.core_angles]
        s[layout.core_angles] = (a - a.mean(axis=1, keepdims=True)).reshape(-1, a.shape[-1]).std(0)
    return np.maximum(s, 1e-9)


def fit_sindy(train: Any, val: Any, seed: int, budget: Any, fraction: float,
              thresholds: Sequence[float] = THRESHOLDS, ridges: Sequence[float] = RIDGES, degree: int = 2,
              n_frequencies: int = 2, angle_channels: Sequence[int] | None = None) -> SindyPredictor:
    """Fit SINDy-with-control on the seeded training subset; (threshold, ridge) picked on val (module doc).

    ``train`` / ``val``: trajectory sets (x (K,T,n), u (K,T,m), state_names, rig, dt); ``budget``: the
    baselines' ``Budget`` (only ``val_rollout`` is used); ``angle_channels`` overrides the detected angles.
    """
    import pysindy as ps

    from fm_core.trajfile import as_trajdata, subsample

    t0 = time.time()
    tr = subsample(as_trajdata(train, "train"), fraction, seed)
    va = as_trajdata(val, "val")
    n, m = tr.x.shape[-1], tr.u.shape[-1]
    layout = detect_layout(tr.state_names, n, tr.rig, angle_channels)
    ctr, cva = _core_data(layout, tr.x), _core_data(layout, va.x)
    u_tr = tr.u.astype(np.float64)
    plain = layout.core_plain
    flat = ctr.reshape(-1, layout.n_core)
    x_scale = np.ones(layout.n_core)
    x_scale[plain] = np.maximum(flat[:, plain].std(0), 1e-9)
    lo, hi = np.full(layout.n_core, -np.inf), np.full(layout.n_core, np.inf)
    span = flat[:, plain].max(0) - flat[:, plain].min(0)
    lo[plain], hi[plain] = flat[:, plain].min(0) - ENVELOPE * span, flat[:, plain].max(0) + ENVELOPE * span
    u_scale = np.maximum(u_tr.reshape(-1, m).std(0), 1e-9)
    d = np.diff(ctr, axis=1)
    d_scale = np.maximum(d.reshape(-1, layout.n_core).std(0), 1e-12)
    library, _ = _fit_library(layout, m, degree, n_frequencies)
    probe = SindyPredictor(layout, library, np.zeros((layout.n_core, 1)), x_scale, u_scale, d_scale,
                           (lo, hi), {})
    z = probe._library_inputs(ctr[:, :-1], u_tr[:, :-1]).reshape(-1, layout.n_core + m)
    theta = np.asarray(library.fit_transform(z), dtype=np.float64)
    col = np.maximum(np.sqrt(np.mean(theta**2, axis=0)), 1e-12)  # unit-RMS columns
    y = (d / d_scale).reshape(-1, layout.n_core)
    q, r = np.linalg.qr(theta / col)  # the same objective on F rows: ||y - A w||^2 = ||Q^T y - R w||^2 + c
    qty = q.T @ y
    names = layout.core_names(tr.state_names)
    in_names = [str(s) for s in tr.input_names] or [f"u{i}" for i in range(m)]
    lib_names = [names[j] for j in layout.core_plain] + [names[j] for j in layout.core_angles] + in_names
    features = library.get_feature_names(lib_names)

    grid = [(thr, lam) for thr in sorted(thresholds, reverse=True) for lam in sorted(ridges, reverse=True)]
    coefs = []
    for thr, lam in grid:  # sparse and regularised first: a denser model must be strictly better on val
        opt = ps.STLSQ(threshold=thr, alpha=lam * len(theta), max_iter=20, unbias=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "all coefficients eliminated" / ConvergenceWarning
            opt.fit(r, qty)
        coefs.append(np.asarray(opt.coef_, dtype=np.float64) / col)
    cstack = np.stack(coefs)
    roll = getattr(budget, "val_rollout", None)
    with np.errstate(all="ignore"):
        if roll is not None:  # every candidate rolled out at once (one library evaluation per step)
            from fm_core.metrics import metric_windows

            c_, h_ = roll
            if va.x.shape[1] < c_ + h_:
                raise ValueError(f"val split has T={va.x.shape[1]} steps; val_rollout context+horizon="
                                 f"{c_ + h_}")
            vx, vu = metric_windows(cva, va.u.astype(np.float64), c_ + h_)
            rr = probe.rollout_core(vx[:, c_ - 1], vu[:, c_ - 1 : -1], cstack)
            losses = (((rr - vx[None, :, c_:]) / _selection_scale(layout, ctr)) ** 2).mean(axis=(1, 2, 3))
        else:
            vz = probe._library_inputs(cva[:, :-1], va.u[:, :-1]).reshape(-1, layout.n_core + m)
            vtheta = np.asarray(library.transform(vz))
            vy = (np.diff(cva, axis=1) / d_scale).reshape(-1, layout.n_core)
            losses = ((np.einsum("bf,knf->kbn", vtheta, cstack) - vy) ** 2).mean(axis=(1, 2))
    best: tuple[float, int] | None = None
    tried = []
    for i, loss in enumerate(losses.tolist()):
        loss = loss if math.isfinite(loss) else math.inf
        tried.append((*grid[i], loss))
        if best is None or loss < best[0] - max(1e-3 * best[0], 1e-12):
            best = (loss, i)
    assert best is not None
    loss, i = best
    coef = coefs[i]
    info = {
        "threshold": grid[i][0], "ridge": grid[i][1], "val_loss": loss, "terms": int(np.count_nonzero(coef)),
        "features": features, "library_size": len(features), "params": int(np.count_nonzero(coef)),
        "core_states": names, "angles": [names[j] for j in layout.core_angles], "dt": tr.dt,
        "grid_tried": tried, "train_s": round(time.time() - t0, 3),
        "n_train_trajectories": int(tr.x.shape[0]),
        "val_diverged": bool(loss == math.inf),
    }
    return SindyPredictor(layout, library, coef, x_scale, u_scale, d_scale, (lo, hi), info)
