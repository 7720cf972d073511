"""Does an exported model fit a rig or a dataset?  One check for ``rigfm score`` and ``rigfm run`` (no torch).

A model's metadata (``ModelMeta.to_dict()`` or the predictor's ``info`` reply) names the rig it was trained
on, its state layout and its time step.  ``check_model_fits`` refuses a model whose rig, state names or dt
differ from the target's, naming both sides.  A pretrained model (rig ``synthetic``, ``unknown`` or empty)
fits any rig, and placeholder state names (``x0, x1, ...``: the exporter's default when a checkpoint has
none) match any layout of the same width; its dt is still checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GENERIC_RIGS = frozenset({"", "synthetic", "unknown"})


class ModelMismatch(ValueError):
    """The model was made for another rig, state layout or time step (the message names both sides)."""


def _named(names: Sequence[str] | None) -> list[str] | None:
    """Real state names, or None for no / placeholder names (``x0``, ``x1``, ...)."""
    names = [str(v) for v in (names or [])]
    if not names or names == [f"x{i}" for i in range(len(names))]:
        return None
    return names


def check_model_fits(meta: Mapping[str, Any], *, model: str, target: str,
                     rig: str | Iterable[str] | None = None, state_names: Sequence[str] | None = None,
                     dt: float | None = None) -> None:
    """Raise ModelMismatch when ``meta`` (rig, state_names, dt) does not fit the target's.

    ``rig``: the target's rig name, or several accepted names (e.g. a rig config's name and kind); the
    first is the one shown.  ``model`` / ``target`` name both sides in the message (``model.onnx``,
    ``rig config 'cartpole'``, ``data.npz``).  Targets without a value for a field are not checked on it."""
    mrig = str(meta.get("rig") or "")
    rigs = [rig] if isinstance(rig, str) else [str(r) for r in (rig or [])]
    rigs = [r for r in rigs if r not in GENERIC_RIGS]
    if mrig not in GENERIC_RIGS and rigs and mrig not in rigs:
        raise ModelMismatch(f"{model} was trained for rig {mrig!r}, but {target} is rig {rigs[0]!r}")
    have, want = _named(meta.get("state_names")), _named(state_names)
    if have is not None and want is not None and have != want:
        raise ModelMismatch(f"{model} has states {have}, but {target} has states {want}")
    mdt = meta.get("dt")
    if dt is not None and mdt is not None:
        mdt, dt = float(mdt), float(dt)
        if not math.isclose(mdt, dt, rel_tol=1e-6):
            raise ModelMismatch(f"{model} has dt {mdt:g} s, but {target} has dt {dt:g} s")
