"""Live view of a run: the log's channels served on a local Foxglove WebSocket (``rigfm run --foxglove``).

``LiveView`` starts a foxglove-sdk WebSocket server (subprotocol ``foxglove.websocket.v1``) and advertises
the same topics with the same JSON schemas as the MCAP log (``hardware.log_schema``) plus ``/log``
(foxglove.Log). ``write()`` has the ``RunLogger.write`` signature and never blocks: records go through a
bounded queue to a thread that encodes them (``hardware.logger.encode_record``, the log's own encoder) and
hands them to the SDK, which drops the oldest messages of a slow client (its backlog) instead of waiting.
The server binds to loopback unless another host is given. ``LogTee`` sends each record to the logger and
the live view."""

from __future__ import annotations

import collections
import ipaddress
import threading
from typing import Any

from hardware import log_clock
from hardware.log_schema import (
    LOG_TOPIC,
    MESSAGE_ENCODING,
    SCHEMA_ENCODING,
    SCHEMA_NAMES,
    TOPICS,
    schema_bytes,
)
from hardware.logger import MIRRORED, encode_record, foxglove_log_schema, log_line

DEFAULT_PORT = 8765


class LiveViewError(ValueError):
    """The live view cannot start (bad address, port in use, foxglove-sdk missing); the message says why."""


def parse_address(text: str) -> tuple[str, int]:
    """``"PORT"`` or ``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) -> (host, port); loopback when no host."""
    text = str(text).strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise LiveViewError(f"--foxglove {text!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    try:
        port = int(port_text)
    except ValueError:
        raise LiveViewError(f"--foxglove {text!r}: port {port_text!r} is not a number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise LiveViewError(f"--foxglove {text!r}: port {port} is out of range 0-65535")
    if not host:
        raise LiveViewError(f"--foxglove {text!r}: empty host")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LiveView:
    """Foxglove WebSocket server with the run log's channels (see module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, name: str = "rigfm",
                 queue_size: int = 8192) -> None:
        try:
            import foxglove
        except ImportError as exc:
            raise LiveViewError("--foxglove needs foxglove-sdk (pip install foxglove-sdk)") from exc
        self.host = host
        self._ctx = foxglove.Context()
        try:
            self._server = foxglove.start_server(name=name, host=host, port=port, context=self._ctx)
        except Exception as exc:  # noqa: BLE001 - the SDK raises its own error types
            raise LiveViewError(f"cannot serve the Foxglove live view on {host}:{port}: {exc}") from exc
        self.port = int(self._server.port)
        self._channels: dict[str, Any] = {}
        for topic in TOPICS:
            schema = foxglove.Schema(name=SCHEMA_NAMES[topic], encoding=SCHEMA_ENCODING,
                                     data=schema_bytes(topic))
            self._channels[topic] = foxglove.Channel(topic, schema=schema, message_encoding=MESSAGE_ENCODING,
                                                     context=self._ctx)
        self._fox = foxglove_log_schema()
        if self._fox is not None:
            self._channels[LOG_TOPIC] = foxglove.Channel(LOG_TOPIC, schema=self._fox[1],
                                                         message_encoding="protobuf", context=self._ctx)
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self.last_error: str | None = None
        self._qmax = int(queue_size)
        self._dq: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rigfm-live-view", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``ws://host:port`` to open in Foxglove (Open connection -> Foxglove WebSocket)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def write(self, topic: str, record: dict[str, Any], log_time_ns: int | None = None) -> bool:
        """Queue one record (never blocks); False when the queue is full or the view is closed."""
        if self._closed or len(self._dq) >= self._qmax:
            self.dropped += 1
            return False
        if log_time_ns is None:
            log_time_ns = record.get("host_time_ns") or log_clock.now_ns()
        self._dq.append((topic, record, int(log_time_ns)))
        return True

    def _run(self) -> None:
        dq = self._dq
        while not (self._stop.is_set() and not dq):
            if not dq:
                self._stop.wait(0.005)
                continue
            topic, record, t_ns = dq.popleft()
            ch = self._channels.get(topic)
            if ch is None:
                continue
            try:
                ch.log(encode_record(record, topic), log_time=t_ns)
                if self._fox is not None and topic in MIRRORED:
                    self._channels[LOG_TOPIC].log(log_line(self._fox[0], topic, record, t_ns), log_time=t_ns)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - never kill the thread; count and go on
                self.errors += 1
                self.last_error = f"{topic}: {exc}"

    def stats(self) -> dict[str, Any]:
        """sent / dropped / errors counters, the URL and the last error."""
        return {"url": self.url, "sent": self.sent, "dropped": self.dropped, "errors": self.errors,
                "last_error": self.last_error}

    def close(self) -> dict[str, Any]:
        """Send what is queued, stop the server. Idempotent; returns stats()."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            self._thread.join(10.0)
            for ch in self._channels.values():
                try:
                    ch.close()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
            self._server.stop()
        return self.stats()

    def __enter__(self) -> LiveView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogTee:
    """``write()`` to several sinks (a RunLogger and a LiveView); returns the first sink's answer."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def write(self, topic: str, record: dict[str, Any], log_time_ns: int | None = None) -> bool:
        ok = True
        for i, sink in enumerate(self.sinks):
            r = sink.write(topic, record, log_time_ns)
            if i == 0:
                ok = r
        return ok
