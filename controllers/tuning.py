"""Controller tuning (LQR weights, swing-up gains, estimator cut-off) per rig kind, from a TOML file.

The shipped defaults live in ``controllers/tuning.toml`` (tables ``[<kind>.lqr]``, ``[<kind>.swingup]``,
``[<kind>.mpc]``, ``[<kind>.estimation]``, ``[<kind>.learned_lqr]``); a user file passed to ``load_tuning``
overrides them key by key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SECTIONS = ("lqr", "swingup", "mpc", "estimation", "learned_lqr")


class TuningError(ValueError):
    """A tuning file is unreadable or has an unknown section."""


def _read(path: str | Path | None) -> dict[str, Any]:
    try:
        if path is None:
            text = resources.files("controllers").joinpath("tuning.toml").read_text()
            where = "controllers/tuning.toml"
        else:
            text = Path(path).read_text()
            where = str(path)
        return tomllib.loads(text) | {"__file__": where}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TuningError(f"cannot read tuning file {path or 'controllers/tuning.toml'}: {exc}") from exc


def load_tuning(kind: str, path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Tuning tables for rig ``kind``: shipped defaults updated with ``path`` (if given)."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for src in (None, path) if path is not None else (None,):
        data = _read(src)
        where = data.pop("__file__")
        tables = data.get(kind, {})
        if not isinstance(tables, dict):
            raise TuningError(f"{where}: [{kind}] must be a table")
        for sec, vals in tables.items():
            if sec not in SECTIONS or not isinstance(vals, dict):
                raise TuningError(f"{where}: unknown tuning section [{kind}.{sec}] "
                                  f"(known: {', '.join(SECTIONS)})")
            out[sec].update(vals)
    return out
