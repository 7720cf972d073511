"""Tell the operator, in one console line, when the predictor goes down mid-run (and when it is back).

The loop never waits on the predictor (``PredictorTap`` counts its errors, MPC falls back to LQR), so a
dead predictor would otherwise only show up in the summary's counters.  ``PredictorWatch.poll(now)`` is
called every tick and acts a few times a second: it reports

* the predictor process (``--model``) having exited -- at once, with its exit code / signal, and
* the tap's requests failing without a success for ``persist_s`` (1 s: an ``--endpoint`` predictor that
  died or hangs; late replies on a busy machine are not reported),

as one line on ``stream``: ``rigfm run: predictor DOWN at 3.21 s: <why>; <what the run does now>``, and
``predictor back at ...`` once requests have succeeded for ``persist_s`` again.  ``events`` keeps
``(t, "down"|"up", why)``.
"""

from __future__ import annotations

import signal
import sys
from typing import Any


class PredictorWatch:
    """Poll the tap (and the predictor process) for a lasting failure; one line per change."""

    def __init__(self, tap: Any, proc: Any = None, *, t0: float = 0.0, fallback: str = "",
                 persist_s: float = 1.0, check_hz: float = 10.0, stream: Any = None,
                 clear_line: bool = False) -> None:
        self.tap = tap
        self.proc = proc
        self.t0 = float(t0)
        self.fallback = fallback or "the controller goes on without predictions"
        self.persist_s = float(persist_s)
        self.period = 1.0 / float(check_hz)
        self.stream = stream if stream is not None else sys.stderr
        self.clear_line = clear_line  # a live status line is on the console: write over it
        self.down = False
        self.events: list[tuple[float, str, str]] = []
        self._next = 0.0
        self._fault_since: float | None = None
        self._ok_since: float | None = None
        self._proc_reported = False

    def _exit_reason(self) -> str | None:
        p = getattr(self.proc, "proc", None)
        rc = None if p is None else p.poll()
        if rc is None:
            return None
        if rc < 0:
            try:
                return f"the predictor process was killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"the predictor process was killed by signal {-rc}"
        return f"the predictor process exited with code {rc}"

    def _say(self, now: float, kind: str, why: str) -> None:
        t = now - self.t0
        self.events.append((t, kind, why))
        if kind == "down":
            line = f"rigfm run: predictor DOWN at {t:.2f} s: {why}; {self.fallback}"
        else:
            line = f"rigfm run: predictor back at {t:.2f} s: requests succeed again"
        self.stream.write(("\r\x1b[K" if self.clear_line else "") + line + "\n")
        self.stream.flush()

    def poll(self, now: float) -> None:
        """Check (at most ``check_hz`` times a second); print a line when the state changes."""
        if now < self._next:
            return
        self._next = now + self.period
        fault = getattr(self.tap, "fault", None)
        if fault is None:
            self._fault_since = None
            self._ok_since = now if self._ok_since is None else self._ok_since
        else:
            self._ok_since = None
            self._fault_since = now if self._fault_since is None else self._fault_since
        exited = None if self._proc_reported else self._exit_reason()
        if exited is not None:
            self._proc_reported = True
            if not self.down:
                self.down = True
                self._say(now, "down", exited)
            return
        if not self.down and self._fault_since is not None and now - self._fault_since >= self.persist_s:
            self.down = True
            self._say(now, "down", str(fault))
        elif (self.down and not self._proc_reported and self._ok_since is not None
              and now - self._ok_since >= self.persist_s):
            self.down = False
            self._say(now, "up", "")
