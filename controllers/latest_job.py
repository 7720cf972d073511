"""A background thread that always works on the newest job: what the control loop hands to the predictor.

The loop must never wait for a model call, so it drops a job into a one-slot mailbox and goes on; a job not
yet picked up when the next one arrives is replaced (stale work is never done). Used by the MPC planner
(``controllers.mpc``) and the predictor tap (``controllers.predictor_tap``).
"""

from __future__ import annotations

import threading
from typing import Any


class LatestJobWorker:
    """One daemon thread running :meth:`_run_job` on the newest :meth:`submit`-ted job.

    ``self._lock`` guards the mailbox and may guard the subclass's own shared state too."""

    def __init__(self, name: str, poll_s: float) -> None:
        self._worker_name = name
        self._poll_s = float(poll_s)
        self._lock = threading.Lock()
        self._job: tuple | None = None
        self._busy = False  # a job is running
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run_job(self, *job: Any) -> None:
        raise NotImplementedError

    def start_worker(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._worker, name=self._worker_name, daemon=True)
            self._thread.start()

    @property
    def worker_tid(self) -> int | None:
        """The worker thread's native (kernel) id while it runs, else None."""
        t = self._thread
        return t.native_id if t is not None and t.is_alive() else None

    def stop_worker(self) -> None:
        """Stop the thread; waits (at most 2 s) for the job in flight."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def submit(self, *job: Any) -> bool:
        """Hand a job to the thread without waiting; returns True when it replaced one not yet started."""
        with self._lock:
            replaced = self._job is not None
            self._job = job
        self._wake.set()
        return replaced

    def _worker(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            with self._lock:
                job, self._job = self._job, None
                self._busy = job is not None
            if job is None:
                continue
            try:
                self._run_job(*job)
            finally:
                with self._lock:
                    self._busy = False
