"""A rig's parameters, limits, encoders and linearisation eigenvalues: the physics part of `rigfm rig-info`
(the command, with its LQR design, is `controllers/rig_info.py`: controllers sit above rigs)."""

from __future__ import annotations

from typing import Any


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
