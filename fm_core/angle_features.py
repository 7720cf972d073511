"""Angle representation for the experiment: a periodic state channel as (sin, cos), not its unwrapped value.

``SinCosCodec(n, channels)`` maps states ``x (..., n)`` to ``z (..., n + k)``: every listed channel is
replaced in place by its sine and cosine. Models are trained and run on ``z``; :class:`SinCosPredictor` turns
their predictions back into unwrapped angles (``atan2``, then the turn closest to the previous angle), so
metrics stay in the original state units and every model is scored the same way. Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from rigs.physics_base import wrap_angle

__all__ = ["SinCosCodec", "SinCosPredictor", "rig_angle_codec", "wrap_angle"]


class SinCosCodec:
    """Replace the angle channels ``channels`` of an ``n``-dim state by (sin, cos) pairs."""

    def __init__(self, n: int, channels: Sequence[int]) -> None:
        chans = sorted({int(c) for c in channels})
        if not chans:
            raise ValueError("SinCosCodec: no angle channel given")
        bad = [c for c in chans if not 0 <= c < n]
        if bad:
            raise ValueError(f"SinCosCodec: angle channel(s) {bad} outside a state of {n} channels")
        self.n, self.channels = int(n), tuple(chans)
        self.n_encoded = self.n + len(chans)
        # position of each original channel in z (an angle channel: position of its sine; cosine follows)
        self.pos = np.cumsum([0] + [2 if i in chans else 1 for i in range(n)])[:-1]
        self.passthrough = [i for i in range(n) if i not in chans]

    def names(self, state_names: Sequence[str]) -> list[str]:
        """State names of the encoded representation."""
        out: list[str] = []
        for i in range(self.n):
            name = state_names[i] if i < len(state_names) else f"x{i}"
            out += [f"sin({name})", f"cos({name})"] if i in self.channels else [name]
        return out

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(..., n) -> (..., n + k)."""
        x = np.asarray(x)
        if x.shape[-1] != self.n:
            raise ValueError(f"SinCosCodec.encode: expected {self.n} state channels, got {x.shape[-1]}")
        z = np.empty((*x.shape[:-1], self.n_encoded), dtype=x.dtype)
        for i in range(self.n):
            p = self.pos[i]
            if i in self.channels:
                z[..., p], z[..., p + 1] = np.sin(x[..., i]), np.cos(x[..., i])
            else:
                z[..., p] = x[..., i]
        return z

    def decode_step(self, z: np.ndarray, prev_angle: np.ndarray) -> np.ndarray:
        """(..., n + k) -> (..., n); each angle is the turn of ``atan2(sin, cos)`` closest to ``prev_angle``
        (``prev_angle``: (..., k), the previous value of the angle channels in order)."""
        z = np.asarray(z)
        x = np.empty((*z.shape[:-1], self.n), dtype=np.result_type(z.dtype, np.float32))
        for j, i in enumerate(self.channels):
            p = self.pos[i]
            phi = np.arctan2(z[..., p], z[..., p + 1])
            prev = prev_angle[..., j]
            x[..., i] = prev + wrap_angle(phi - prev)
        for i in self.passthrough:
            x[..., i] = z[..., self.pos[i]]
        return x

    def decode_sequence(self, z: np.ndarray, start_angle: np.ndarray) -> np.ndarray:
        """(B, H, n + k) -> (B, H, n), unwrapping along time from ``start_angle`` (B, k).

        Same as :meth:`decode_step` applied step by step against the previous decoded angle; vectorised: the
        angle moves by the wrapped difference of consecutive ``atan2`` values (the first from the start)."""
        z = np.asarray(z)
        out = np.empty((*z.shape[:-1], self.n), dtype=np.result_type(z.dtype, np.float32))
        ps = self.pos[list(self.channels)]
        phi = np.arctan2(z[..., ps], z[..., ps + 1]).astype(np.float64)  # (B, H, k)
        start = np.asarray(start_angle, dtype=np.float64)[:, None, :]
        out[..., list(self.channels)] = start + np.cumsum(
            wrap_angle(np.diff(np.concatenate([start, phi], axis=1), axis=1)), axis=1
        )
        for i in self.passthrough:
            out[..., i] = z[..., self.pos[i]]
        return out

    def encode_data(self, td: Any) -> Any:
        """A trajectory dataclass (``x``, ``state_names`` fields) with encoded states."""
        return replace(td, x=self.encode(td.x).astype(td.x.dtype), state_names=self.names(td.state_names))


class SinCosPredictor:
    """A predictor trained on encoded states, seen from outside in the original (unwrapped) units."""

    def __init__(self, inner: Any, codec: SinCosCodec) -> None:
        self.inner, self.codec = inner, codec
        self.name = getattr(inner, "name", "predictor")
        self.info = {**getattr(inner, "info", {}), "angle_features": "sincos"}

    def one_step(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Teacher-forced predictions of x[:, 1:]; each angle unwrapped against the observed previous one."""
        pz = self.inner.one_step(self.codec.encode(x), u)
        return self.codec.decode_step(pz, np.asarray(x)[:, :-1][..., list(self.codec.channels)])

    def rollout(self, x_ctx: np.ndarray, u_ctx: np.ndarray, u_future: np.ndarray) -> np.ndarray:
        """Open-loop rollout; angles unwrapped along the horizon from the last context angle."""
        pz = self.inner.rollout(self.codec.encode(x_ctx), u_ctx, u_future)
        return self.codec.decode_sequence(pz, np.asarray(x_ctx)[:, -1][..., list(self.codec.channels)])


def rig_angle_codec(rig: str, td: Any) -> SinCosCodec:
    """The (sin, cos) codec of ``rig``'s pendulum angle (``rigs.physics.pendulum_angle_name``) in the state
    layout of ``td`` (anything with ``state_names`` and ``x``); ``ValueError`` naming it if it is missing."""
    from rigs.physics import pendulum_angle_name

    name = pendulum_angle_name(rig)
    names = list(td.state_names)
    if name not in names:
        raise ValueError(f"--angle-features sincos: the {rig} data has no state {name!r} (states: {names})")
    return SinCosCodec(td.x.shape[-1], [names.index(name)])
