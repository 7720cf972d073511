"""``rigfm rig-info RIG``: the rig's physics summary (rigs.summary) plus the LQR design the loop uses.

The LQR part is the design of ``controllers.lqr.LQRController`` as ``rigfm run`` builds it: the upright
linearisation discretised with a zero-order hold at the control period ``dt = 1 / rate`` (the rig's
``control_rate_hz`` unless ``--rate``), the weights of ``controllers/tuning.toml`` (``[<kind>.lqr]``, or
``--tuning FILE``), ``u = -K (x - x*)``. Printed: dt, Q, R, K, the discrete closed-loop poles
``z = eig(Ad - Bd K)`` and their continuous-time equivalents ``s = ln(z) / dt``. Cheap to import.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fm_core.cli_types import add_set_option, finite_float


def register(subparsers: Any) -> None:
    """Add ``rig-info``."""
    p = subparsers.add_parser(
        "rig-info",
        help="show a rig's parameters, limits, linearisation and LQR design (K, closed-loop poles)",
        description="Print the physical parameters, limits, encoder resolution, the eigenvalues of the "
                    "linearisation at the upright and hanging equilibria, and the LQR design of the control "
                    "loop: discretisation step, K and the closed-loop poles (discrete and continuous "
                    "equivalent).",
    )
    p.add_argument("rig", help='"cartpole", "furuta" or a path to a rig .toml file')
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_set_option(p, "parameter override for make_model, e.g. --set pole_mass_scale=1.5", number=True,
                   drop_section="plant")
    p.add_argument("--rate", type=finite_float(0, 10_000, lo_open=True, unit="Hz"), default=None,
                   metavar="HZ",
                   help="control rate the LQR is designed for (default: the rig's control_rate_hz)")
    p.add_argument("--tuning", default=None, help="tuning TOML overriding controllers/tuning.toml")
    p.set_defaults(func=handle)


def _pairs(values: Any) -> list[list[float]]:
    return [[float(e.real), float(e.imag)] for e in values]


def lqr_design(rig: str, overrides: dict[str, float] | None = None, rate_hz: float | None = None,
               tuning: str | None = None) -> dict[str, Any]:
    """The LQR design of ``rigfm run`` for ``rig`` as a JSON-serialisable dict (see module docstring).

    Raises ValueError (RigConfigError, TuningError, LQRDesignError) naming the problem."""
    import numpy as np

    import rigs
    from controllers.lqr import LQRController
    from controllers.tuning import load_tuning

    cfg = rigs.load_config(rig)
    rate = float(cfg.control_rate_hz if rate_hz is None else rate_hz)
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(f"--rate must be a positive number of Hz, got {rate_hz!r}")
    model = rigs.make_model(cfg, overrides or None)
    ctl = LQRController(model, 1.0 / rate, cfg=cfg, tuning=load_tuning(cfg.kind, tuning))
    z = ctl.closed_loop_eigenvalues().astype(complex)
    z = z[np.lexsort((z.imag, -np.abs(z)))]  # slowest first; s[i] is the equivalent of z[i]
    s = np.log(z) / ctl.dt
    return {
        "rate_hz": rate,
        "dt": ctl.dt,
        "discretisation": "zero-order hold (matrix exponential) of the upright linearisation",
        "tuning": tuning or "controllers/tuning.toml",
        "state_names": list(model.state_names),
        "q": np.diag(ctl.q).tolist() if np.allclose(ctl.q, np.diag(np.diag(ctl.q))) else ctl.q.tolist(),
        "r": np.diag(ctl.r).tolist() if np.allclose(ctl.r, np.diag(np.diag(ctl.r))) else ctl.r.tolist(),
        "K": ctl.k.tolist(),
        "poles_discrete": _pairs(z),
        "poles_continuous_equivalent": _pairs(s),
        "spectral_radius": float(np.abs(z).max()),
    }


def _fmt(pairs: list[list[float]]) -> str:
    return ", ".join(f"{re:+.6g}" if abs(im) < 1e-12 else f"{re:+.6g}{im:+.6g}j" for re, im in pairs)


def format_lqr(d: dict[str, Any]) -> str:
    """Human-readable text of :func:`lqr_design`."""
    k = d["K"]
    diag = all(not isinstance(v, list) for v in d["q"] + d["r"])
    q, r = (", ".join(f"{v:g}" for v in d[key]) for key in ("q", "r")) if diag else (d["q"], d["r"])
    rows = [f"LQR (u = -K (x - x*), {d['tuning']}): dt = {d['dt']:.6g} s ({d['rate_hz']:g} Hz), "
            f"{d['discretisation']}",
            f"  Q = diag({q})  R = diag({r})" if diag else f"  Q = {q}  R = {r}"]
    for i, row in enumerate(k):
        terms = "  ".join(f"{name}: {v:+.6g}" for name, v in zip(d["state_names"], row, strict=True))
        rows.append(f"  K[{i}] = {terms}")
    rows.append(f"  closed-loop poles, discrete z = eig(Ad - Bd K): {_fmt(d['poles_discrete'])} "
                f"(spectral radius {d['spectral_radius']:.6g})")
    rows.append(f"  continuous equivalent s = ln(z) / dt (1/s): {_fmt(d['poles_continuous_equivalent'])}")
    return "\n".join(rows)


def handle(args: argparse.Namespace) -> int:
    """``rigfm rig-info``: returns 0, or 2 with a one-line message on a bad config, override or tuning."""
    from rigs.summary import format_rig_info, rig_info

    try:
        overrides = dict(args.overrides)
        info = rig_info(args.rig, overrides)
        info["lqr"] = lqr_design(args.rig, overrides, args.rate, args.tuning)
    except ValueError as exc:  # RigConfigError, TuningError, LQRDesignError are ValueErrors
        print(f"rig-info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_rig_info(info) + "\n" + format_lqr(info["lqr"]))
    return 0
