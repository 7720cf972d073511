"""The predictor's batch lane: window requests too big to answer inline run here, in chunks. Torch-free.

The server's thread owns the ROUTER socket and answers ``stream_step`` (and small requests) itself; a
``predict`` / ``rollout`` of more than ``INLINE_STEPS`` window steps becomes a :class:`Job` whose generator
runs one chunk of rows per ``next()``. One worker thread runs the jobs' chunks round robin (a small job never
waits behind more than one chunk of a big one), onnxruntime releases the GIL while a chunk runs, so the
server's thread keeps serving streams meanwhile. Finished jobs are handed back through a deque plus a wake-up
message on an inproc PUSH/PULL pair the server polls; only the server's thread touches the ROUTER socket.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import zmq

_ids = itertools.count()
BATCH_NICE = 19  # the batch thread's nice value (Linux, per thread)


@dataclass
class Job:
    """One deferred request: where its reply goes and the generator computing it (returns the arrays)."""

    identity: bytes
    delimiter: bool
    req_id: str | None
    method: str
    steps: int
    received: float  # time.perf_counter() when the request arrived
    chunks: Generator[None, None, dict[str, Any]]
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    compute_s: float = 0.0
    chunks_run: int = field(default=0)

    def advance(self) -> bool:
        """Run one chunk; True when the job is finished (result or error set)."""
        t0 = time.perf_counter()
        try:
            next(self.chunks)
        except StopIteration as stop:
            self.result = stop.value
            return True
        except Exception as exc:  # noqa: BLE001 - becomes the job's error reply
            self.error = exc
            return True
        finally:
            self.compute_s += time.perf_counter() - t0
            self.chunks_run += 1
        return False


class BatchWorker:
    """A thread running :class:`Job` chunks round robin; at most ``max_pending_steps`` window steps queued."""

    def __init__(self, ctx: zmq.Context, max_pending_steps: int) -> None:
        self.ctx = ctx
        self.max_pending_steps = int(max_pending_steps)
        self.pending_steps = 0  # queued + running, touched by the server's thread only
        self.outstanding = 0
        self.endpoint = f"inproc://rigfm-batch-{next(_ids)}-{id(self):x}"
        self.wake = ctx.socket(zmq.PULL)
        self.wake.setsockopt(zmq.LINGER, 0)
        self.wake.bind(self.endpoint)
        self._jobs: collections.deque[Job] = collections.deque()
        self._done: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rigfm-batch", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def submit(self, job: Job) -> bool:
        """Queue a job; False (nothing queued) when it would exceed the pending budget."""
        if self.outstanding and self.pending_steps + job.steps > self.max_pending_steps:
            return False
        self.pending_steps += job.steps
        self.outstanding += 1
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()
        return True

    def collect(self) -> list[Job]:
        """Finished jobs (server's thread); drains the wake-up messages."""
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        out = []
        while self._done:
            job = self._done.popleft()
            self.pending_steps -= job.steps
            self.outstanding -= 1
            out.append(job)
        return out

    def _run(self) -> None:
        if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            # Linux: a thread's own nice value; the scheduler gives the server's thread (stream_step) the CPU
            # first when both want it (raising one's nice value needs no privilege)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BATCH_NICE)
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self.endpoint)
        self._ready.set()
        try:
            while True:
                with self._cv:
                    while not self._jobs and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                    job = self._jobs.popleft()
                if job.advance():
                    self._done.append(job)
                    try:
                        push.send(b"", zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass  # the server also checks the done queue every poll timeout
                else:
                    with self._cv:
                        self._jobs.append(job)  # round robin: the next job's chunk first
        finally:
            push.close(0)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop after the running chunk; True when the thread has ended (its socket closed)."""
        with self._cv:
            self._stop = True
            self._jobs.clear()
            self._cv.notify_all()
        self._thread.join(timeout_s)
        self.wake.close(0)
        return not self._thread.is_alive()
