"""Input dither for identification runs (``rigfm run --dither V``, ``rigfm flywheel --dither V``).

A balancing controller makes its input a function of the state (``u = -K x``), so a log of it cannot tell a
model what the input does on its own: a model fine-tuned on such a run learns a much weaker input response
than the plant's (``bench/probe_balance_rollout.py``). A small random telegraph signal added to the command
while balancing (``+-V``, a new sign every ``hold_s``, seeded) makes the run informative; the logged
``/command`` carries the sum, the loop still clamps it to the limits, and swing-up is left alone.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from controllers.base import ControlOutput

BALANCE_MODES = frozenset({"balance", "lqr", "mpc", "fallback"})  # modes of LQR, swing-up, MPC


class Dither:
    """Wraps a controller: ``+-amplitude_v`` (random sign held ``hold_s``) added to its balance commands."""

    def __init__(self, controller: Any, amplitude_v: float, hold_s: float = 0.02, seed: int = 0) -> None:
        if not (np.isfinite(amplitude_v) and amplitude_v >= 0):
            raise ValueError(f"dither amplitude must be a finite number of volts >= 0, got {amplitude_v!r}")
        if not (np.isfinite(hold_s) and hold_s > 0):
            raise ValueError(f"dither hold must be > 0 s, got {hold_s!r}")
        self.controller = controller
        self.amplitude_v = float(amplitude_v)
        self.hold_s = float(hold_s)
        self.rng = np.random.default_rng([seed, 0xD17])
        self._level = 0.0
        self._next_t: float | None = None

    def __getattr__(self, name: str) -> Any:  # mode, fallbacks, plans, close ... of the wrapped controller
        return getattr(self.controller, name)

    def reset(self) -> None:
        """Reset the wrapped controller and the dither sequence's hold."""
        self.controller.reset()
        self._next_t = None

    def compute(self, x: np.ndarray, t: float | None = None) -> ControlOutput:
        """The wrapped controller's command, plus the dither level while it balances."""
        out = self.controller.compute(x, t) if t is not None else self.controller.compute(x)
        if out.mode not in BALANCE_MODES or self.amplitude_v == 0.0:
            return out
        now = time.monotonic() if t is None else float(t)
        if self._next_t is None or now >= self._next_t:
            self._level = self.amplitude_v * float(self.rng.choice((-1.0, 1.0)))
            self._next_t = now + self.hold_s
        out.u = np.asarray(out.u, dtype=float) + self._level
        out.info["dither_v"] = self._level
        return out
