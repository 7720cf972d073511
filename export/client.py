"""Client of the rigfm predictor process (ZeroMQ DEALER). Torch-free.

Every request carries a fresh id and a deadline. Replies with another id (answers to requests that already
timed out) are discarded. On a timeout the socket is recreated (linger 0) so no stale reply can leak into the
next request. :class:`PredictorTimeout` and :class:`PredictorUnavailable` (both :class:`PredictorError`)
are the fallback signal for controllers: switch to the backup model / safe action when they are raised.
One client per thread (requests on one client are serialised by a lock).
"""

from __future__ import annotations

import collections
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from export import schema


class PredictorError(RuntimeError):
    """Base class of all predictor client errors."""


class PredictorTimeout(PredictorError):
    """The request was sent but no reply arrived before its deadline."""


class PredictorUnavailable(PredictorError):
    """No predictor server is connected (not started, crashed, wrong endpoint) or it could not start."""


class PredictorRequestError(PredictorError):
    """The server answered with an error reply; ``code`` is a stable string (see export.schema E_*)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class PredictorClient:
    """Request/reply client: ``PredictorClient("ipc:///tmp/rigfm-pred.sock", timeout_ms=5)``.

    ``server_public_key``: the server's CURVE public key (Z85 bytes/str or a path to ``server.key``) when the
    server runs with ``--curve-secret-key``.
    ``spin_us``: after sending, poll without sleeping for up to this long before blocking (default 0). On a
    machine where the caller has a core to itself this saves the scheduler wake-up of a blocking wait;
    never use it with the server on the same core (the spin steals its CPU).
    """

    def __init__(
        self,
        endpoint: str,
        timeout_ms: float = 1000.0,
        *,
        server_public_key: bytes | str | None = None,
        context: zmq.Context | None = None,
        spin_us: float = 0.0,
    ) -> None:
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0, got {timeout_ms}")
        if not 0 <= spin_us <= 1e6:
            raise ValueError(f"spin_us must be in [0, 1e6] µs, got {spin_us}")
        self.endpoint = endpoint
        self.timeout_ms = float(timeout_ms)
        self.spin_s = float(spin_us) * 1e-6
        self._ctx = context or zmq.Context.instance()
        self._curve = _server_key(server_public_key) if server_public_key is not None else None
        self._prefix = uuid.uuid4().hex[:12]
        self.stream_key = uuid.uuid4().hex
        self._counter = 0
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._hist: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque(maxlen=256)
        self.reconnects = 0
        self.last_server_us: float | None = None  # server-side handling time of the last reply (µs)
        self.last_compute_us: float | None = None  # of which inside the model call (predict, rollout, step)
        self._stream_dirty = False
        self.stale_discarded = 0
        self._connect()

    # -------------------------------------------------------------------------------------------- socket
    def _connect(self) -> None:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue only to live connections: no server -> cannot send
        s.setsockopt(zmq.RECONNECT_IVL, 20)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 250)
        if self.endpoint.startswith("tcp://["):
            s.setsockopt(zmq.IPV6, 1)  # ZeroMQ connects to an IPv6 literal only with this set
        if self._curve is not None:
            pub, sec = zmq.curve_keypair()
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, self._curve
        s.connect(self.endpoint)
        self._sock = s
        self._poller = zmq.Poller()  # one per socket: Socket.poll() builds a new Poller on every call
        self._poller.register(s, zmq.POLLIN)

    def _reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        self.reconnects += 1
        self._connect()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> PredictorClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- core
    def request(
        self,
        method: str,
        arrays: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout_ms: float | None = None,
    ) -> schema.Message:
        """Send one request and wait for its reply; raises PredictorError subclasses."""
        with self._lock:
            if self._sock is None:
                raise PredictorUnavailable("client is closed")
            self._counter += 1
            rid = f"{self._prefix}-{self._counter}"
            frames = schema.encode_request(method, rid, arrays, params)
            budget = self.timeout_ms if timeout_ms is None else float(timeout_ms)
            deadline = time.monotonic() + budget / 1000.0
            sock, poller = self._sock, self._poller
            try:  # common case first: connected, so no POLLOUT round before the send
                sock.send_multipart(frames, zmq.NOBLOCK, copy=True)
            except zmq.Again:
                if not sock.poll(max(0, int(budget)) or 1, zmq.POLLOUT):
                    raise PredictorUnavailable(
                        f"no predictor connected at {self.endpoint} within {budget:g} ms"
                    ) from None
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    raise PredictorUnavailable(f"no predictor connected at {self.endpoint}") from None
            while True:
                if self.spin_s > 0:
                    spin_end = min(time.monotonic() + self.spin_s, deadline)
                    while not poller.poll(0) and time.monotonic() < spin_end:
                        pass
                left_ms = (deadline - time.monotonic()) * 1000.0
                if not poller.poll(max(0, math.ceil(left_ms))):  # 0: a ready reply still counts
                    self._reconnect()  # drop whatever reply may still come for this id
                    raise PredictorTimeout(f"{method}: no reply from {self.endpoint} within {budget:g} ms")
                reply = sock.recv_multipart(copy=False)
                try:
                    msg = schema.decode(reply)
                except schema.SchemaError as exc:
                    raise PredictorError(f"{method}: malformed reply from server: {exc}") from exc
                if msg.id != rid:
                    self.stale_discarded += 1
                    continue
                self.last_server_us = msg.header.get("server_us")
                self.last_compute_us = msg.header.get("compute_us")
                if msg.header.get("ok") is not True:
                    err = msg.header.get("error")
                    err = err if isinstance(err, dict) else {}
                    raise PredictorRequestError(str(err.get("code", "?")), str(err.get("message", "")))
                return msg

    # -------------------------------------------------------------------------------------------- replies
    def _result(self, msg: schema.Message, method: str) -> dict[str, Any]:
        """The ``result`` object of an ok reply (PredictorError when it is missing or not an object)."""
        res = msg.header.get("result")
        if not isinstance(res, dict):
            raise PredictorError(
                f"{method}: malformed reply from {self.endpoint}: 'result' is {type(res).__name__}, "
                "not an object"
            )
        return res

    def _pred(self, msg: schema.Message, method: str, shape: tuple[int, ...]) -> np.ndarray:
        """The ``pred`` array of an ok reply, checked: present, the expected shape, finite (else
        PredictorError: a controller's fallback catches it like a timeout)."""
        pred = msg.arrays.get("pred")
        where = f"{method}: malformed reply from {self.endpoint}"
        if pred is None:
            raise PredictorError(f"{where}: no 'pred' array (got {sorted(msg.arrays)})")
        if pred.shape != tuple(shape):
            raise PredictorError(f"{where}: 'pred' has shape {pred.shape}, expected {tuple(shape)}")
        if not np.isfinite(pred).all():
            raise PredictorError(f"{where}: 'pred' holds NaN or Inf")
        return pred

    # -------------------------------------------------------------------------------------------- methods
    def info(self) -> dict[str, Any]:
        """Model metadata: n, m, dt, state/input names, context, max_len, model sha256, ..."""
        return self._result(self.request("info"), "info")

    def health(self) -> dict[str, Any]:
        """Server status: request counts, errors, latency percentiles (µs), reloads, uptime."""
        return self._result(self.request("health"), "health")

    stats = health

    def predict(self, x: Any, u: Any, obs: Any | None = None) -> np.ndarray:
        """x (B,T,n), u (B,T,m), obs (B,T) (default all observed) -> (B,T,n) estimates of x[t+1]."""
        arrays = {"x": x, "u": u} if obs is None else {"x": x, "u": u, "obs": obs}
        return self._pred(self.request("predict", arrays), "predict", np.shape(x))

    def rollout(self, x_hist: Any, u_hist: Any, u_plan: Any) -> np.ndarray:
        """Open-loop rollouts of K input plans: x_hist (L,n), u_hist (L or L-1,m), u_plan (K,H,m) -> (K,H,n).

        ``x_hist[-1]`` is the current state, ``u_plan[k, 0]`` is applied at it and ``out[k, j]`` is the state
        right after applying ``u_plan[k, j]``; the last L-1 rows of ``u_hist`` are the inputs applied at
        ``x_hist[:-1]`` (see docs/predictor.md).
        """
        msg = self.request("rollout", {"x_hist": x_hist, "u_hist": u_hist, "u_plan": u_plan})
        ks, hs = np.shape(u_plan)[:2], np.shape(x_hist)[-1:]
        return self._pred(msg, "rollout", (*ks, *hs))

    def stream_reset(self, x_hist: Any | None = None, u_hist: Any | None = None) -> dict[str, Any]:
        """Start (or restart) this client's stream, optionally primed with a history of (x, u) steps."""
        arrays = None
        self._hist.clear()
        if x_hist is not None or u_hist is not None:
            xh, uh = np.asarray(x_hist, np.float32), np.asarray(u_hist, np.float32)
            arrays = {"x_hist": xh, "u_hist": uh}
        res = self._result(self.request("stream_reset", arrays, {"stream": self.stream_key}), "stream_reset")
        context = res.get("context", 256)
        if type(context) is not int or not 1 <= context <= 1 << 20:
            raise PredictorError(f"stream_reset: malformed reply from {self.endpoint}: context {context!r}")
        self._stream_dirty = False
        self._hist = collections.deque(maxlen=context)
        if arrays is not None:
            for xt, ut in zip(arrays["x_hist"], arrays["u_hist"], strict=False):
                self._hist.append((xt, ut))
        return res

    def _reprime(self, params: dict[str, Any]) -> None:
        """Rebuild the server-side stream from the client's local history (the steps that succeeded)."""
        if self._hist:
            xs = np.stack([h[0] for h in self._hist])
            us = np.stack([h[1] for h in self._hist])
            self.request("stream_reset", {"x_hist": xs, "u_hist": us}, params)
        else:
            self.request("stream_reset", None, params)
        self._stream_dirty = False

    def stream_step(self, x_t: Any, u_t: Any) -> np.ndarray:
        """Feed x_t (n,) and the input u_t (m,) applied at it; returns the estimate of x[t+1] (n,).

        If the server lost this stream (restart or reload) it is re-primed from the client's local history
        and the step is retried once. After a failed step (timeout, ...) the server may or may not hold that
        step, so the next call re-primes first: client and server histories never diverge.
        """
        arrays = {"x_t": np.asarray(x_t, np.float32), "u_t": np.asarray(u_t, np.float32)}
        params = {"stream": self.stream_key}
        try:
            if self._stream_dirty:
                self._reprime(params)
            try:
                msg = self.request("stream_step", arrays, params)
            except PredictorRequestError as exc:
                if exc.code != schema.E_STREAM:
                    raise
                self._reprime(params)
                msg = self.request("stream_step", arrays, params)
        except (PredictorTimeout, PredictorUnavailable):
            self._stream_dirty = True  # the server may or may not have applied this step
            raise
        try:
            pred = self._pred(msg, "stream_step", arrays["x_t"].shape)
        except PredictorError:
            self._stream_dirty = True  # the server took the step, the client cannot use it: re-prime next
            raise
        self._hist.append((arrays["x_t"].copy(), arrays["u_t"].copy()))
        return pred

    def reload(
        self, path: str | None = None, streaming: str | None = None, timeout_ms: float = 60_000.0
    ) -> dict[str, Any]:
        """Ask the server to load a model file (default: its current file again) and swap atomically."""
        params: dict[str, Any] = {}
        if path is not None:
            params["model"] = str(path)
        if streaming is not None:
            params["streaming"] = str(streaming)
        return self._result(self.request("reload", None, params, timeout_ms=timeout_ms), "reload")


def _server_key(key: bytes | str) -> bytes:
    if isinstance(key, str) and Path(key).is_file():
        import zmq.auth

        pub, _ = zmq.auth.load_certificate(key)
        return pub
    return key.encode() if isinstance(key, str) else key


# ------------------------------------------------------------------------------------------------ process
class PredictorProcess:
    """Spawn ``python -m export.server MODEL --bind ENDPOINT`` and wait for ``READY``; context manager.

    ``endpoint`` defaults to an ipc socket in a fresh temporary directory. ``endpoint`` may be
    ``tcp://127.0.0.1:*``: the bound port is read from the READY line (``self.endpoint``).
    """

    def __init__(
        self,
        model_path: str | Path,
        endpoint: str | None = None,
        *,
        extra_args: list[str] | None = None,
        start_timeout_s: float = 60.0,
        use_cli: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if endpoint is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rigfm-pred-")
            endpoint = f"ipc://{self._tmp.name}/pred.sock"
        self.requested_endpoint = endpoint
        self.endpoint = endpoint
        self.extra_args = list(extra_args or [])
        self.start_timeout_s = start_timeout_s
        self.use_cli = use_cli
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None
        self.stdout_lines: list[str] = []
        self.stderr_lines: collections.deque[str] = collections.deque(maxlen=200)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        head = (
            [sys.executable, "-m", "controllers.cli", "serve"]
            if self.use_cli
            else [sys.executable, "-m", "export.server"]
        )
        # --parent-pid: the server exits when this process dies, even by SIGKILL (no orphans)
        parent = ["--parent-pid", str(os.getpid())]
        return [*head, self.model_path, "--bind", self.requested_endpoint, *parent, *self.extra_args]

    def start(self) -> PredictorProcess:
        """Start the server and block until it prints READY (PredictorUnavailable on failure / timeout)."""
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err_pump = threading.Thread(target=self._pump_stderr, args=(self.proc.stderr,), daemon=True)
        err_pump.start()  # from the start: a chatty server can never block on a full stderr pipe
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    raise PredictorUnavailable(
                        f"predictor did not print READY within {self.start_timeout_s} s"
                    )
                if not sel.select(timeout=min(left, 0.5)):
                    if self.proc.poll() is not None:
                        break
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    break
                self.stdout_lines.append(line.rstrip("\n"))
                if line.startswith("READY "):
                    self.endpoint = line.split(" ", 1)[1].strip()
                    self._drain = threading.Thread(
                        target=self._pump_stdout, args=(self.proc.stdout,), daemon=True
                    )
                    self._drain.start()
                    return self
        finally:
            sel.close()
        self.proc.wait(timeout=10)
        err_pump.join(timeout=5)
        err = "\n".join(self.stderr_lines)[-4000:]
        raise PredictorUnavailable(f"predictor exited with code {self.proc.returncode} before READY:\n{err}")

    def _pump_stderr(self, stream: Any) -> None:
        for line in stream:
            self.stderr_lines.append(line.rstrip("\n"))
            sys.stderr.write(line)

    def _pump_stdout(self, stream: Any) -> None:
        for line in stream:
            self.stdout_lines.append(line.rstrip("\n"))

    def client(self, timeout_ms: float = 1000.0, **kw: Any) -> PredictorClient:
        """A new client connected to this process."""
        return PredictorClient(self.endpoint, timeout_ms, **kw)

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a crash, for tests) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def restart(self) -> PredictorProcess:
        """Stop (if running) and start again on the same endpoint."""
        self.stop()
        return self.start()

    def __enter__(self) -> PredictorProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
