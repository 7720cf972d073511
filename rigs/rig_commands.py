"""A rig's parameters, limits, encoders and linearisation eigenvalues (the physics part of `rigfm rig-info`).

`python -m rigs.rig_commands rig-info RIG` prints this part alone. The umbrella command `rigfm rig-info` is
registered by `controllers/rig_info.py`, which adds the LQR design (gains, closed-loop poles): controllers sit
above rigs, so the design cannot be computed here."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `rig-info` (shared with controllers/rig_info.py)."""
    p.add_argument("rig", help='"cartpole", "furuta" or a path to a rig .toml file')
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="parameter override for make_model, e.g. pole_mass_scale=1.5 (repeatable)")


def register(subparsers: Any) -> None:
    """Add the physics-only `rig-info` subcommand (standalone entry; `rigfm` uses controllers/rig_info.py)."""
    p = subparsers.add_parser(
        "rig-info",
        help="show a rig's parameters, limits and linearisation eigenvalues",
        description="Print the physical parameters, limits, encoder resolution and the eigenvalues of the "
                    "linearisation at the upright and hanging equilibria of a rig config.",
    )
    add_arguments(p)
    p.set_defaults(func=handle_rig_info)


def parse_overrides(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = float(value)
            if not math.isfinite(out[key.strip()]):
                raise ValueError
        except ValueError:
            raise ValueError(f"--override {key.strip()}: value must be a number, got {value!r}") from None
    return out


def rig_info(rig: str, overrides: dict[str, float] | None = None) -> dict[str, Any]:
    """Collect the rig summary as a JSON-serialisable dict."""
    import numpy as np

    from rigs.config import load_config
    from rigs.physics import make_model

    cfg = load_config(rig)
    model = make_model(cfg, overrides)
    info: dict[str, Any] = {
        "name": cfg.name,
        "kind": cfg.kind,
        "source": cfg.source,
        "description": cfg.description,
        "state_names": list(model.state_names),
        "input_names": list(model.input_names),
        "rates": {"sample_rate_hz": cfg.sample_rate_hz, "control_rate_hz": cfg.control_rate_hz,
                  "model_dt": cfg.model_dt, "watchdog_ms": cfg.watchdog_ms},
        "physics": model.params,
        "overrides": dict(overrides or {}),
        "limits": {**cfg.to_dict()["limits"], "position_safe": cfg.limits.position_safe},
        "encoders": {**cfg.to_dict()["encoders"], "counts_per_unit": list(cfg.encoders.counts_per_unit),
                     "resolution": list(cfg.encoders.resolution)},
        "serial": cfg.to_dict()["serial"],
        "sim": cfg.to_dict()["sim"],
        "safe_state": cfg.to_dict()["safe_state"],
    }
    for label, x_eq in (("upright", model.upright()), ("hanging", model.hanging())):
        A, B = model.linearize(x_eq, np.zeros(1))
        eig = np.linalg.eigvals(A)
        eig = eig[np.lexsort((eig.imag, -eig.real))]
        ctrb = np.hstack([np.linalg.matrix_power(A, k) @ B for k in range(4)])
        info[f"eigenvalues_{label}"] = [[float(e.real), float(e.imag)] for e in eig]
        info[f"controllability_rank_{label}"] = int(np.linalg.matrix_rank(ctrb))
    info["small_oscillation_period_s"] = float(2 * np.pi / abs(np.imag(np.linalg.eigvals(
        make_model(cfg, {**(overrides or {}), "friction_scale": 0.0, "back_emf_scale": 0.0})
        .linearize(model.hanging())[0])).max()))
    return info


def _fmt_eig(pairs: list[list[float]]) -> str:
    return ", ".join(f"{re:+.4g}" if im == 0 else f"{re:+.4g}{im:+.4g}j" for re, im in pairs)


def format_rig_info(info: dict[str, Any]) -> str:
    """Human-readable text of rig_info()."""
    lines = [f"{info['name']} ({info['kind']}) from {info['source']}", f"  {info['description']}",
             f"  state {info['state_names']}  input {info['input_names']}"]
    r = info["rates"]
    lines.append(f"  firmware {r['sample_rate_hz']} Hz, control {r['control_rate_hz']} Hz, model dt "
                 f"{r['model_dt']} s, watchdog {r['watchdog_ms']} ms")
    if info["overrides"]:
        lines.append(f"  overrides {info['overrides']}")
    lines.append("physics:")
    lines += [f"  {k:<28} {v:.6g}" for k, v in info["physics"].items()]
    lines.append("limits:")
    lines += [f"  {k:<28} {v:.6g}" for k, v in info["limits"].items()]
    e = info["encoders"]
    lines.append("encoders:")
    for i, ch in enumerate(e["channels"]):
        unit = "m" if e["pinion_radius"][i] > 0 else "rad"
        lines.append(f"  {ch:<10} {e['counts_per_rev'][i]} counts/rev, "
                     f"{e['counts_per_unit'][i]:.6g} counts/{unit}, {e['resolution'][i]:.4g} {unit}/count, "
                     f"zero at {e['zero_position'][i]:.6g} {unit}")
    s = info["serial"]
    lines.append(f"serial: {s['baud']} baud, timeout {s['timeout_s']} s; safe state {info['safe_state']}")
    lines.append(f"plant: {info['sim']}")
    for label in ("upright", "hanging"):
        lines.append(f"linearisation at {label}: eigenvalues {_fmt_eig(info[f'eigenvalues_{label}'])}; "
                     f"controllability rank {info[f'controllability_rank_{label}']}")
    lines.append(f"small-oscillation period about hanging (frictionless, motor open): "
                 f"{info['small_oscillation_period_s']:.4f} s")
    return "\n".join(lines)


def handle_rig_info(args: argparse.Namespace) -> int:
    """Handler of the physics-only `rig-info`; returns 0, or 2 with a message on a bad config/override."""
    from rigs.config import RigConfigError

    try:
        info = rig_info(args.rig, parse_overrides(args.override))
    except (RigConfigError, ValueError) as exc:
        print(f"rig-info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_rig_info(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m rigs.rig_commands rig-info cartpole`."""
    parser = argparse.ArgumentParser(prog="rigs.rig_commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
