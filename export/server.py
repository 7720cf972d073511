"""The rigfm predictor process: one onnxruntime session behind a ZeroMQ ROUTER socket. Torch-free.

Run ``rigfm serve model.onnx --bind ipc:///tmp/rigfm.sock`` (or ``python -m export.server model.onnx ...``).
Prints ``READY <endpoint>`` on stdout once it answers requests. SIGTERM/SIGINT: graceful stop; SIGHUP: reload
the model files from disk (atomic swap after a full load + self-test). Wire format: :mod:`export.schema`,
methods and semantics: docs/predictor.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from export import schema
from export.batch_worker import BatchWorker, Job
from export.endpoint import EndpointError, check_port, parse_bind
from export.onnx_runtime import MAX_ABS_INPUT, InputError, ModelFileError, OnnxPredictor, StreamState
from export.serve_args import add_serve_arguments
from fm_core.cli_types import call_with_args

MAX_STREAMS = 256
LATENCY_WINDOW = 10_000
# Work per request (docs/security.md): a predict / rollout may run at most --max-elements window steps
# (B x T; K x (L-1+H)); beyond INLINE_STEPS it runs in the batch thread in chunks of CHUNK_STEPS steps
# (bounded onnxruntime memory whatever the request), so stream_step never waits behind it.
DEFAULT_MAX_ELEMENTS = 65_536  # B256 x T256
CHUNK_STEPS = 1024
INLINE_STEPS = 64
RCVHWM = 4  # queued requests per connected peer (a client has one in flight; more wait in its own queue)
SNDHWM = 256  # queued replies per peer (a client may pipeline); beyond it ROUTER drops them


STREAM_REPRIME = ("shadow", "full")  # how a full stream cache is renewed (export.onnx_runtime.StreamState)


class ServerConfigError(ValueError):
    """Refusal to start: bad bind address, missing CURVE keys on a non-loopback address, bad model file."""


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, localhost), the host
    read as ZeroMQ reads it (export.endpoint); False for anything else, malformed endpoints included."""
    try:
        return parse_bind(endpoint).local
    except EndpointError:
        return False


def load_curve_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a zmq.auth certificate file (``*.key_secret``)."""
    import zmq.auth

    if not Path(path).is_file():
        raise ServerConfigError(f"--curve-secret-key: file not found: {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except Exception as exc:  # noqa: BLE001 - zmq.auth raises plain ValueError/OSError
        raise ServerConfigError(f"--curve-secret-key {path}: not a zmq certificate ({exc})") from exc
    if not secret:
        raise ServerConfigError(f"--curve-secret-key {path}: holds no secret key (pass the .key_secret file)")
    return public, secret


def write_curve_keys(directory: str | Path, name: str = "server") -> tuple[Path, Path]:
    """Create ``name.key`` (public, give it to clients) and ``name.key_secret`` (server) in ``directory``."""
    import zmq.auth

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret key is never readable by others, not even for a moment
    try:
        pub, sec = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    os.chmod(sec, 0o600)  # also when the file existed before (open() keeps an existing file's mode)
    os.chmod(pub, 0o644)
    return Path(pub), Path(sec)


class Stats:
    """Request counters and rolling windows of server-side handling latencies (µs), overall and per method."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.latency_us: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.by_method: dict[str, collections.deque[float]] = {}
        self.reloads = 0

    def record(self, method: str, latency_us: float) -> None:
        self.requests[method] += 1
        self.latency_us.append(latency_us)
        dq = self.by_method.get(method)
        if dq is None:
            dq = self.by_method[method] = collections.deque(maxlen=LATENCY_WINDOW)
        dq.append(latency_us)

    @staticmethod
    def _pct(values: collections.deque[float]) -> dict[str, float | int]:
        lat = np.asarray(values, dtype=np.float64)
        out: dict[str, float | int] = {"window": int(lat.size)}
        if lat.size:
            for q, v in zip((50, 90, 99), np.percentile(lat, (50, 90, 99)), strict=True):
                out[f"p{q}_us"] = round(float(v), 1)
            out["max_us"] = round(float(lat.max()), 1)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": dict(self.requests),
            "requests_total": int(sum(self.requests.values())),
            "errors": dict(self.errors),
            "errors_total": int(sum(self.errors.values())),
            "latency": self._pct(self.latency_us),
            "latency_by_method": {m: self._pct(v) for m, v in self.by_method.items()},
            "reloads": self.reloads,
        }


class PredictorServer:
    """Serve one model on one ROUTER socket; single-threaded request handling (reloads load in a thread)."""

    def __init__(
        self,
        model_path: str,
        bind: str,
        *,
        step_path: str | None = None,
        threads: int = 1,
        sequential: bool = True,
        curve_secret_key: str | None = None,
        insecure: bool = False,
        reload_dir: str | None = None,
        spin_us: float = 0.0,
        stream_reprime: str = "shadow",
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        mem_arena: bool = True,
    ) -> None:
        try:
            ep = parse_bind(bind)
        except EndpointError as exc:
            raise ServerConfigError(str(exc)) from None
        self.curve: tuple[bytes, bytes] | None = (
            load_curve_secret(curve_secret_key) if curve_secret_key else None
        )
        if not ep.local and self.curve is None:
            what = "all interfaces" if ep.wildcard else "a non-loopback address"
            if not insecure:
                raise ServerConfigError(
                    f"refusing to bind {bind}: ZeroMQ would listen on host {ep.host!r} ({what}) without "
                    "CURVE encryption or authentication; pass --curve-secret-key FILE (see rigfm serve "
                    "--gen-curve-keys), bind tcp://127.0.0.1:PORT, or --insecure"
                )
            print(
                f"rigfm serve: WARNING: --insecure: serving on host {ep.host!r} ({what}) without CURVE: "
                "anyone who can reach it can run requests, reload models from the reload folder and read "
                "replies",
                file=sys.stderr,
                flush=True,
            )
        elif insecure:
            print(f"rigfm serve: note: --insecure has no effect on {bind} (local or CURVE)", file=sys.stderr)
        try:
            check_port(ep)
        except EndpointError as exc:
            raise ServerConfigError(str(exc)) from None
        if not 1 <= int(max_elements) <= schema.MAX_ARRAY_BYTES // 4:
            raise ServerConfigError(
                f"--max-elements {max_elements}: must be in [1, {schema.MAX_ARRAY_BYTES // 4}]"
            )
        self.max_elements = int(max_elements)
        self.mem_arena = bool(mem_arena)
        self.ipv6 = ep.ipv6
        self.bind = bind
        self.threads, self.sequential = threads, sequential
        self.spin_s = max(0.0, float(spin_us)) / 1e6
        if stream_reprime not in STREAM_REPRIME:
            raise ServerConfigError(f"--stream-reprime {stream_reprime!r}: use one of {STREAM_REPRIME}")
        self.stream_reprime = stream_reprime
        self.model_path = str(model_path)
        self.step_path = step_path
        self.reload_dir = Path(reload_dir or Path(model_path).parent).resolve()
        self.predictor = self._load(self.model_path, step_path)
        self.streams: collections.OrderedDict[str, StreamState] = collections.OrderedDict()
        self.stats = Stats()
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.endpoint = ""
        self._stop = threading.Event()
        self._signalled = False  # set by the SIGTERM/SIGINT handler
        self._reload_thread: threading.Thread | None = None
        self._reload_result: tuple[Any, ...] | None = None
        self._reload_waiters: list[tuple[bytes, bool, str]] = []
        self._sighup = False
        self._compute_s: float | None = None  # time inside the model call of the request being answered
        self._t_recv = 0.0  # when the request being handled arrived
        self._deferred = False  # the request being handled became a batch job
        self.worker: BatchWorker | None = None  # the batch lane, started by open()

    # ------------------------------------------------------------------------------------------ model
    def _load(self, model_path: str, step_path: str | None) -> OnnxPredictor:
        return OnnxPredictor(
            model_path, step_path, threads=self.threads, sequential=self.sequential, find_step=True,
            mem_arena=self.mem_arena,
        )

    def limits(self) -> dict[str, Any]:
        """The request limits in force (``info``; docs/security.md)."""
        me = self.predictor.meta
        return {
            "max_elements": self.max_elements,
            "inline_steps": INLINE_STEPS,
            "chunk_steps": CHUNK_STEPS,
            "max_frame_bytes": schema.max_frame_bytes(me.n, me.m, self.max_elements),
            "max_header_bytes": schema.MAX_HEADER_BYTES,
            "max_streams": MAX_STREAMS,
            "max_abs_input": MAX_ABS_INPUT,
            "rcvhwm": RCVHWM,
            "sndhwm": SNDHWM,
        }

    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {
            **p.meta.to_dict(),
            "model_path": p.full_path,
            "step_path": p.step_path,
            "streaming_graph": p.has_step,
            "step_cache": p.step_meta.step_cache if p.step_meta is not None else "",
            "protocol_version": schema.PROTOCOL_VERSION,
            "model_sha256": p.meta.checkpoint_sha256,
            "pid": os.getpid(),
            "endpoint": self.endpoint,
            "stream_reprime": self.stream_reprime,
            "limits": self.limits(),
        }

    # ------------------------------------------------------------------------------------------ socket
    def _ipc_in_use(self, timeout_ms: int = 300) -> bool:
        """True if the ipc socket file exists and a server answers there (bind would silently steal it)."""
        path = self.bind[len("ipc://") :]
        if not self.bind.startswith("ipc://") or not Path(path).exists():
            return False
        probe = self.ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        probe.setsockopt(zmq.IMMEDIATE, 1)
        try:
            probe.connect(self.bind)
            if not probe.poll(timeout_ms, zmq.POLLOUT):
                return False  # stale file: nobody accepts connections
            probe.send_multipart(schema.encode_request("health", "probe"))
            return bool(probe.poll(timeout_ms, zmq.POLLIN))
        finally:
            probe.close(0)

    def open(self) -> str:
        """Bind the ROUTER socket; returns the bound endpoint (resolves tcp port ``*``)."""
        if self._ipc_in_use():
            raise ServerConfigError(f"cannot bind {self.bind}: another process is serving there")
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits()["max_frame_bytes"])  # bigger frames: peer disconnected
        if self.ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if self.curve is not None:
            sock.curve_publickey, sock.curve_secretkey = self.curve
            sock.curve_server = True
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ServerConfigError(f"cannot bind {self.bind}: {exc}") from exc
        self.sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker = BatchWorker(self.ctx, 2 * self.max_elements)
        return self.endpoint

    def _send(self, identity: bytes, frames: list[Any]) -> None:
        assert self.sock is not None
        try:
            self.sock.send(identity, zmq.SNDMORE)
            last = len(frames) - 1
            for i, f in enumerate(frames):
                big = isinstance(f, np.ndarray) and f.nbytes >= schema.COPY_THRESHOLD
                self.sock.send(f, zmq.SNDMORE if i < last else 0, copy=not big)
        except zmq.ZMQError as exc:  # peer gone / HWM: the reply is dropped, the server goes on
            print(f"rigfm-serve: reply dropped: {exc}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------ loop
    def serve_forever(self, ready: bool = True) -> None:
        """Handle requests until stop() / SIGTERM / SIGINT. Prints ``READY <endpoint>`` when ready."""
        if self.sock is None:
            self.open()
        assert self.sock is not None
        if ready:
            print(f"READY {self.endpoint}", flush=True)
        sock = self.sock
        sock.setsockopt(zmq.RCVTIMEO, 50)  # a blocking receive wakes at least every 50 ms to check the flags
        poller = zmq.Poller()  # only for --spin-us: busy-poll between requests
        poller.register(sock, zmq.POLLIN)
        assert self.worker is not None
        both = zmq.Poller()  # while batch jobs run: requests and finished jobs
        both.register(sock, zmq.POLLIN)
        both.register(self.worker.wake, zmq.POLLIN)
        spin_until = 0.0
        try:
            while not (self._signalled or self._stop.is_set()):
                if self._sighup:
                    self._sighup = False
                    self._start_reload(self.model_path, self.step_path, None)
                self._finish_reload()
                if self.worker.outstanding:
                    self._reply_jobs()
                    try:
                        ready = dict(both.poll(50))
                    except zmq.ZMQError as exc:
                        if exc.errno == zmq.EINTR:
                            continue
                        raise
                    if sock not in ready:
                        continue
                    flags = zmq.NOBLOCK
                elif self.spin_s > 0 and time.perf_counter() < spin_until and not poller.poll(0):
                    continue  # stay hot: no scheduler wake-up for the next request of a fast loop
                else:
                    # one blocking call per request: a poll, a non-blocking receive and an EVENTS check
                    # cost ~2.5 µs more
                    flags = 0
                try:
                    frames = self._recv(sock, flags)
                except zmq.Again:  # 50 ms without a request
                    continue
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EINTR:  # signal arrived
                        continue
                    raise
                self.handle(frames)
                if self.spin_s > 0:
                    spin_until = time.perf_counter() + self.spin_s
        finally:
            self.close()

    @staticmethod
    def _recv(sock: zmq.Socket, flags: int) -> list[Any]:
        """One multipart message, as ``recv_multipart(copy=False)``, but never more frames than a legal
        request has: the rest of a longer one is read and dropped (a peer cannot make the server hold an
        unbounded multipart message; ZeroMQ bounds each frame with MAXMSGSIZE)."""
        frames = [sock.recv(flags, copy=False)]
        limit = schema.MAX_ARRAYS + 3  # identity, delimiter, header, arrays
        while sock.getsockopt(zmq.RCVMORE):
            frame = sock.recv(0, copy=False)
            if len(frames) < limit:
                frames.append(frame)
            elif len(frames) == limit:
                frames.append(b"")  # marks the message as too long for the decoder (one frame too many)
        return frames

    def _reply_jobs(self) -> None:
        """Send the replies of finished batch jobs (the server's thread)."""
        assert self.worker is not None
        for job in self.worker.collect():
            delim, rid = job.delimiter, job.req_id
            if job.error is not None:
                reply = self._error_reply(job.error, rid, delim)
            else:
                reply = schema.encode_reply(
                    rid, job.method, job.result, None, delim,
                    server_us=round((time.perf_counter() - job.received) * 1e6, 1),
                    compute_us=round(job.compute_s * 1e6, 1),
                )
            self._send(job.identity, reply)
            self.stats.record(job.method, (time.perf_counter() - job.received) * 1e6)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._reload_thread is not None:
            self._reload_thread.join(timeout=30)
        worker_done = True
        if self.worker is not None:
            worker_done = self.worker.close()
            self.worker = None
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if worker_done:  # else term() would wait for the batch thread's socket: the process exits anyway
            self.ctx.term()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop after the current request; SIGHUP: reload the model files."""

        def _stop(signum: int, _frame: Any) -> None:
            # a plain flag, never a lock: a second signal arriving while Event.set() holds its lock would
            # run this handler again inside it and deadlock (seen with SIGTERM twice on parent death)
            self._signalled = True

        def _hup(signum: int, _frame: Any) -> None:
            self._sighup = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, _hup)

    # ------------------------------------------------------------------------------------------ requests
    def handle(self, frames: list[Any]) -> None:
        """Answer one ROUTER message; never raises (errors become error replies)."""
        t0 = self._t_recv = time.perf_counter()
        self._compute_s = None
        identity = frames[0].bytes if frames else b""
        delim, _ = schema.split_envelope(frames[1:])
        req_id: str | None = None
        method = "?"
        try:
            msg = schema.decode_request(frames[1:])
            req_id, method = msg.id, msg.method or "?"
            out = self._dispatch(identity, msg)
            if out is None:
                reply = None
            else:
                server_us = round((time.perf_counter() - t0) * 1e6, 1)
                compute_us, self._compute_s = self._compute_s, None
                reply = schema.encode_reply(
                    req_id, method, out[1], out[0], delim, server_us=server_us,
                    compute_us=None if compute_us is None else round(compute_us * 1e6, 1),
                )
        except Exception as exc:  # noqa: BLE001 - the server must survive anything a request triggers
            reply = self._error_reply(exc, req_id, delim)
        if reply is not None:
            self._send(identity, reply)
        elif self._deferred:
            self._deferred = False
            return  # recorded when the batch job is answered
        self.stats.record(method if method in schema.METHODS else "invalid", (time.perf_counter() - t0) * 1e6)

    def _error_reply(self, exc: BaseException, req_id: str | None, delim: bool) -> list[Any]:
        """The error reply naming what went wrong (an unexpected exception is printed and is ``internal``)."""
        if isinstance(exc, schema.SchemaError):
            return self._error(req_id or exc.req_id, exc.code, str(exc), delim)
        if isinstance(exc, InputError):
            code = schema.E_VALUE if exc.kind == "value" else schema.E_ARRAYS
            return self._error(req_id, code, str(exc), delim)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        return self._error(req_id, schema.E_INTERNAL, f"{type(exc).__name__}: {exc}", delim)

    def _error(self, req_id: str | None, code: str, message: str, delim: bool) -> list[Any]:
        self.stats.errors[code] += 1
        return schema.encode_error(req_id, code, message, delim)

    def _stream_key(self, identity: bytes, msg: schema.Message) -> str:
        key = msg.params.get("stream")
        if key is None:
            return "id:" + identity.hex()
        if not isinstance(key, str) or not 0 < len(key) <= 128:
            raise schema.SchemaError(
                schema.E_PARAMS, "params.stream must be a string of 1..128 chars", msg.id
            )
        return "key:" + key

    def _dispatch(
        self, identity: bytes, msg: schema.Message
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None] | None:
        """(result, arrays) of a successful request, None when answered later (reload)."""
        m, rid, d = msg.method, msg.id, msg.delimiter
        p = self.predictor
        if m == "info":
            schema.require(msg, ())
            return self.info(), None
        if m in ("health", "stats"):
            schema.require(msg, ())
            res = {
                "status": "ok",
                "model_sha256": p.meta.checkpoint_sha256,
                "streams": len(self.streams),
                "reload_in_progress": self._reload_thread is not None,
                "batch_jobs": 0 if self.worker is None else self.worker.outstanding,
                **self.stats.to_dict(),
            }
            return res, None
        self._check_sizes(msg)
        if m == "predict":
            a = schema.require(msg, ("x", "u"), optional=("obs",))
            x = a["x"]
            if x.ndim == 3:
                self._check_budget(msg, x.shape[0] * x.shape[1], f"B x T = {x.shape[0]} x {x.shape[1]}")
            x, u, obs = p.check_window(x, a["u"], a.get("obs"))
            b, t = x.shape[:2]
            return self._window_work(identity, msg, b * t, max(1, CHUNK_STEPS // t), b,
                                     lambda i, j: p.predict_checked(x[i:j], u[i:j], obs[i:j]))
        if m == "rollout":
            a = schema.require(msg, ("x_hist", "u_hist", "u_plan"))
            xh, up = a["x_hist"], a["u_plan"]
            if xh.ndim == 2 and up.ndim == 3 and 1 <= up.shape[1] <= p.meta.max_len:
                k, h = up.shape[:2]
                lx = max(1, min(xh.shape[0], p.meta.context, p.meta.max_len - h + 1))
                self._check_budget(msg, k * (lx - 1 + h), f"K x (L-1+H) = {k} x {lx - 1 + h}")
            xh, uh, up = p.check_rollout(xh, a["u_hist"], up)
            k, span = up.shape[0], xh.shape[0] - 1 + up.shape[1]
            return self._window_work(identity, msg, k * span, max(1, CHUNK_STEPS // span), k,
                                     lambda i, j: p.rollout_checked(xh, uh, up[i:j]))
        if m == "stream_reset":
            a = schema.require(msg, (), optional=("x_hist", "u_hist"))
            key = self._stream_key(identity, msg)
            st = self.streams.get(key)
            if st is not None and st.pred_ is p:
                st.reset()  # reuse its cache buffers: allocating and binding them costs milliseconds
            else:
                st = p.stream(shadow=self.stream_reprime == "shadow")
            if a:
                if set(a) != {"x_hist", "u_hist"}:
                    raise schema.SchemaError(
                        schema.E_ARRAYS, "stream_reset takes both x_hist and u_hist or none", rid
                    )
                st.prime_history(a["x_hist"], a["u_hist"])
            self.streams[key] = st
            self.streams.move_to_end(key)
            while len(self.streams) > MAX_STREAMS:
                self.streams.popitem(last=False)
            return {"t": st.t, "context": p.meta.context}, None
        if m == "stream_step":
            a = schema.require(msg, ("x_t", "u_t"))
            key = self._stream_key(identity, msg)
            st = self.streams.get(key)
            if st is None:
                raise schema.SchemaError(
                    schema.E_STREAM,
                    "no stream state for this client (server restarted, "
                    "model reloaded or evicted): call stream_reset",
                    rid,
                )
            self.streams.move_to_end(key)
            t0 = time.perf_counter()
            pred = st.step(a["x_t"], a["u_t"])
            self._compute_s = time.perf_counter() - t0
            return {"t": st.t, "start": st.start}, {"pred": pred}
        if m == "reload":
            schema.require(msg, ())
            model = msg.params.get("model", self.model_path)
            step = msg.params.get("streaming")
            if not isinstance(model, str) or (step is not None and not isinstance(step, str)):
                raise schema.SchemaError(
                    schema.E_PARAMS, "params.model / params.streaming must be strings", rid
                )
            for path in (model, step):
                try:
                    inside = path is None or Path(path).resolve().is_relative_to(self.reload_dir)
                except (OSError, ValueError):  # e.g. an embedded NUL byte
                    inside = False
                if not inside:
                    raise schema.SchemaError(
                        schema.E_PARAMS,
                        f"reload path {path!r} is outside the reload directory {self.reload_dir}",
                        rid,
                    )
            if self._reload_thread is not None:
                raise schema.SchemaError(schema.E_BUSY, "a reload is already in progress", rid)
            self._start_reload(model, step, (identity, d, rid))
            return None  # answered when the new model is in place (or failed)
        raise schema.SchemaError(schema.E_METHOD, f"method {m!r} not implemented", rid)

    def _check_sizes(self, msg: schema.Message) -> None:
        """too_large for any array beyond the budget's largest legal one (max_elements rows of the widest
        of n, m): only frames up to twice that get past ZeroMQ's MAXMSGSIZE at all."""
        me = self.predictor.meta
        cap = self.max_elements * max(me.n, me.m, 1)
        for name, arr in msg.arrays.items():
            if arr.size > cap:
                raise schema.SchemaError(
                    schema.E_TOO_LARGE,
                    f"array {name!r} has {arr.size} elements, beyond this server's limit of {cap} "
                    f"(--max-elements {self.max_elements} rows x {max(me.n, me.m, 1)})",
                    msg.id,
                )

    def _check_budget(self, msg: schema.Message, steps: int, what: str) -> None:
        if steps > self.max_elements:
            raise schema.SchemaError(
                schema.E_TOO_LARGE,
                f"{msg.method}: {what} = {steps} window steps exceeds this server's budget of "
                f"{self.max_elements} (--max-elements); split the request",
                msg.id,
            )

    def _window_work(
        self, identity: bytes, msg: schema.Message, steps: int, rows: int, total: int, run: Any
    ) -> tuple[None, dict[str, Any]] | None:
        """Run ``run(i, j)`` (rows i..j of a validated window request) inline when small, else as a batch job
        in chunks of ``rows`` rows; returns the reply arrays, or None when the job answers later."""
        if steps <= INLINE_STEPS or self.worker is None:
            t0 = time.perf_counter()
            pred = run(0, total)
            self._compute_s = time.perf_counter() - t0
            return None, {"pred": pred}

        def chunks() -> Any:
            out: np.ndarray | None = None
            for i in range(0, total, rows):
                part = run(i, min(total, i + rows))
                if out is None:
                    out = np.empty((total, *part.shape[1:]), np.float32)
                out[i : i + len(part)] = part
                yield
            return {"pred": out}

        job = Job(identity, msg.delimiter, msg.id, str(msg.method), steps, self._t_recv, chunks())
        if not self.worker.submit(job):
            raise schema.SchemaError(
                schema.E_BUSY,
                f"batch queue full ({self.worker.pending_steps} window steps pending, limit "
                f"{self.worker.max_pending_steps}): retry later",
                msg.id,
            )
        self._deferred = True
        return None

    # ------------------------------------------------------------------------------------------ reload
    def _start_reload(self, model: str, step: str | None, waiter: tuple[bytes, bool, str] | None) -> None:
        if waiter is not None:
            self._reload_waiters.append(waiter)
        if self._reload_thread is not None:
            return

        def work() -> None:
            try:
                self._reload_result = ("ok", self._load(model, step), model, step)
            except (ModelFileError, OSError, ValueError) as exc:
                self._reload_result = ("error", str(exc))
            except Exception as exc:  # noqa: BLE001
                self._reload_result = ("error", f"{type(exc).__name__}: {exc}")

        self._reload_thread = threading.Thread(target=work, name="rigfm-reload", daemon=True)
        self._reload_thread.start()

    def _finish_reload(self) -> None:
        """Swap in a finished reload (between requests: no request sees a half-loaded model)."""
        th = self._reload_thread
        if th is None or th.is_alive():
            return
        th.join()
        self._reload_thread = None
        res, self._reload_result = self._reload_result, None
        waiters, self._reload_waiters = self._reload_waiters, []
        if res is not None and res[0] == "ok":
            old_sha = self.predictor.meta.checkpoint_sha256
            self.predictor, self.model_path = res[1], res[2]
            self.step_path = res[3]
            self.streams.clear()  # caches belong to the old model
            self.stats.reloads += 1
            result = {
                "reloaded": True,
                "model_path": self.model_path,
                "model_sha256": self.predictor.meta.checkpoint_sha256,
                "previous_sha256": old_sha,
                "streaming_graph": self.predictor.has_step,
            }
            print(f"rigfm-serve: reloaded {self.model_path}", file=sys.stderr, flush=True)
            for identity, d, rid in waiters:
                self._send(identity, schema.encode_reply(rid, "reload", result=result, delimiter=d))
        else:
            why = res[1] if res else "reload thread ended without a result"
            print(f"rigfm-serve: reload failed, keeping the old model: {why}", file=sys.stderr, flush=True)
            for identity, d, rid in waiters:
                self._send(
                    identity, self._error(rid, schema.E_RELOAD, f"reload failed, old model kept: {why}", d)
                )


# ---------------------------------------------------------------------------------------------- CLI
def _exit_with_parent(parent_pid: int) -> bool:
    """Linux: SIGTERM (graceful stop) when the process that started us dies, so a killed parent leaves no
    orphaned predictor; returns False when that parent is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    return os.getppid() == parent_pid


def run(args: argparse.Namespace) -> int:
    """Handler of ``rigfm serve``: returns the exit code (2 on configuration errors)."""
    if args.gen_curve_keys:
        try:
            pub, sec = write_curve_keys(args.gen_curve_keys)
        except OSError as exc:
            print(f"rigfm serve --gen-curve-keys: cannot write keys: {exc}", file=sys.stderr)
            return 2
        print(f"public key (clients): {pub}\nsecret key (server): {sec}")
        return 0
    if not args.model:
        print("rigfm serve: the MODEL argument is required", file=sys.stderr)
        return 2
    if args.parent_pid is not None and not _exit_with_parent(args.parent_pid):
        return 1
    if args.threads < 1:
        print("rigfm serve: --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        server = call_with_args(PredictorServer, args, model_path=args.model, step_path=args.streaming,
                                sequential=not args.parallel, mem_arena=not args.no_ort_arena)
        server.install_signal_handlers()
        server.open()
    except (ServerConfigError, ModelFileError) as exc:
        print(f"rigfm serve: {exc}", file=sys.stderr)
        return 2
    print(
        f"rigfm-serve: model {server.predictor.full_path} (streaming graph: {server.predictor.has_step})",
        file=sys.stderr,
        flush=True,
    )
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.server", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
