"""Run logger: every state, command, prediction, mode change and fault into chunked, compressed MCAP files.

``write()`` never blocks: it appends to a bounded in-memory queue (a deque; on overflow it counts a drop and
returns False). A writer thread drains the queue, JSON-encodes the records, and closes an MCAP chunk at least
every ``chunk_ms / 2`` (``mcap.writer.Writer.flush()`` finalises the chunk and flushes the file), so after a
SIGKILL the file is readable up to the last closed chunk and at most ``chunk_ms`` of data is lost (half the
budget is headroom for scheduling delays on a loaded machine). ``rigfm logs check --recover`` rebuilds a valid
file from a truncated one. Files rotate by size and by age; every part carries the run metadata.

A thread (not a process) is used: encoding + MCAP framing cost ~8 us per message (> 100 k msg/s in one
thread, see bench/bench_logger.py), and a process would need the record pickled in the control loop's own
process anyway. Records are handed over: do not mutate a record after passing it to ``write()``."""

from __future__ import annotations

import atexit
import collections
import json
import math
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from mcap.writer import CompressionType, Writer

from hardware.log_schema import (
    END_METADATA_NAME,
    LOG_FORMAT,
    MESSAGE_ENCODING,
    METADATA_NAME,
    REQUIRED,
    SCHEMA_ENCODING,
    SCHEMA_NAMES,
    TOPICS,
    encode_metadata,
    schema_bytes,
)

STANDARD_METADATA_KEYS = (
    "rig",
    "rig_config",
    "firmware_version",
    "protocol_version",
    "model_sha256",
    "controller",
    "controller_params",
)
_SEQ_TOPICS = frozenset({"/state", "/command"})
_COMPRESSION = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
_POLL_S = 0.005
_BATCH = 32  # records encoded per GIL hold (~0.25 ms)


def git_revision(cwd: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` of the source tree (best effort; "unknown" when git or the repo is missing)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else "unknown"


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, without importing numpy
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _sanitise(obj: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN/Inf) so the message stays valid JSON."""
    if hasattr(obj, "tolist"):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _sanitise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitise(v) for v in obj]
    return obj


def encode_record(record: dict[str, Any]) -> bytes:
    """Compact JSON of one record (numpy values converted, NaN/Inf written as null)."""
    try:
        text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=_default)
    except ValueError:
        text = json.dumps(_sanitise(record), separators=(",", ":"), allow_nan=False, default=_default)
    return text.encode()


class RunLogger:
    """Non-blocking MCAP run logger (see module docstring). Use as a context manager or call ``close()``.

    Files are ``directory/<run_name>_<part:04d>.mcap``."""

    def __init__(
        self,
        directory: str | os.PathLike,
        metadata: dict[str, Any],
        run_name: str | None = None,
        chunk_ms: float = 100.0,
        rotate_bytes: int = 256 * 1024 * 1024,
        rotate_s: float = 1800.0,
        queue_size: int = 65536,
        compression: str = "zstd",
        fsync_s: float | None = 1.0,
    ) -> None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        if compression not in _COMPRESSION:
            raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}")
        if chunk_ms <= 0 or rotate_bytes <= 0 or rotate_s <= 0 or queue_size <= 0:
            raise ValueError("chunk_ms, rotate_bytes, rotate_s and queue_size must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        rig = str(metadata.get("rig", "run")).replace("/", "_")
        self.run_name = run_name or f"{rig}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}_{os.getpid()}"
        self._compression = _COMPRESSION[compression]
        self._flush_period_ns = int(chunk_ms * 1e6 / 2)
        self._rotate_bytes = int(rotate_bytes)
        self._rotate_ns = int(rotate_s * 1e9)
        self._fsync_ns = None if fsync_s is None else int(fsync_s * 1e9)
        self._qmax = int(queue_size)
        self._required = {t: frozenset(REQUIRED[t]) for t in TOPICS}

        meta = dict(metadata)
        for key in STANDARD_METADATA_KEYS:
            meta.setdefault(key, "unknown")
        if not meta.get("git_revision") or meta.get("git_revision") == "unknown":
            meta["git_revision"] = git_revision()
        meta.update(
            log_format=LOG_FORMAT,
            run_id=self.run_name,
            host=socket.gethostname(),
            started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            chunk_ms=float(chunk_ms),
        )
        encode_metadata(meta)  # validate now, in the caller, with a clear error
        self._meta = meta

        self._dq: collections.deque = collections.deque()
        self._drop_lock = threading.Lock()
        self._dropped = 0
        self._dropped_by_topic: dict[str, int] = dict.fromkeys(TOPICS, 0)
        self._written = 0
        self._written_by_topic: dict[str, int] = dict.fromkeys(TOPICS, 0)
        self._pending: list[str] = []  # topics of messages in the open chunk
        self._write_errors = 0
        self._encode_errors = 0
        self._last_error: str | None = None
        self._bytes_done = 0
        self._files: list[Path] = []
        self._part = -1
        self._seq_counters: dict[str, int] = dict.fromkeys(TOPICS, 0)
        self._writer: Writer | None = None
        self._file = None
        self._channels: dict[str, int] = {}
        self._part_start_ns = 0
        self._chunk_first_ns: int | None = None
        self._last_fsync_ns = 0
        self._reopen_after_ns = 0
        self._closed = False
        self._stop = threading.Event()

        self._open_part()  # in the caller: a bad directory fails here, loudly
        self._thread = threading.Thread(target=self._run, name=f"rigfm-logger-{self.run_name}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ caller side
    def write(self, topic: str, record: dict[str, Any], log_time_ns: int | None = None) -> bool:
        """Queue one record; never blocks. False (and a counted drop) when the queue is full or closed.

        Raises ValueError for an unknown topic or a record missing required fields (programming errors)."""
        required = self._required.get(topic)
        if required is None:
            raise ValueError(f"unknown log topic {topic!r}; topics are {', '.join(TOPICS)}")
        if not isinstance(record, dict):
            raise TypeError(f"{topic} record must be a dict, got {type(record).__name__}")
        if not record.keys() >= required:
            missing = sorted(required - record.keys())
            raise ValueError(f"{topic} record is missing required field(s) {', '.join(missing)}")
        if self._closed or len(self._dq) >= self._qmax:
            with self._drop_lock:
                self._dropped += 1
                self._dropped_by_topic[topic] += 1
            return False
        self._dq.append((topic, record, time.time_ns() if log_time_ns is None else int(log_time_ns)))
        return True

    def stats(self) -> dict[str, Any]:
        """Counters: written (in closed chunks), dropped, queued, bytes, files, write/encode errors."""
        cur = 0
        f = self._file
        if f is not None:
            try:
                cur = f.tell()
            except (OSError, ValueError):
                cur = 0
        return {
            "run_name": self.run_name,
            "written": self._written,
            "written_by_topic": dict(self._written_by_topic),
            "dropped": self._dropped,
            "dropped_by_topic": dict(self._dropped_by_topic),
            "queued": len(self._dq),
            "bytes": self._bytes_done + cur,
            "files": [str(p) for p in self._files],
            "write_errors": self._write_errors,
            "encode_errors": self._encode_errors,
            "last_error": self._last_error,
        }

    @property
    def files(self) -> list[Path]:
        """Paths of all parts written so far (the last one may still be open)."""
        return list(self._files)

    def close(self, timeout: float = 30.0) -> dict[str, Any]:
        """Drain the queue, close the last chunk, write summaries and footer. Idempotent; returns stats()."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._last_error = f"writer thread did not finish within {timeout} s; {len(self._dq)} queued"
            else:
                # records appended by a write() racing with close() after the thread's last drain
                with self._drop_lock:
                    while self._dq:
                        topic = self._dq.popleft()[0]
                        self._dropped += 1
                        self._dropped_by_topic[topic] += 1
            try:
                atexit.unregister(self.close)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
        return self.stats()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        dq = self._dq
        while True:
            stopping = self._stop.is_set()
            n = 0
            while dq and n < 512:  # then check the chunk timer
                self._add(*dq.popleft())
                n += 1
                if n % _BATCH == 0:
                    time.sleep(0)  # hand the GIL to a waiting control loop between short batches
            now = time.monotonic_ns()
            if self._chunk_first_ns is not None and (now - self._chunk_first_ns >= self._flush_period_ns):
                self._flush_chunk(now)
            if self._writer is not None and (now - self._part_start_ns >= self._rotate_ns):
                self._rotate()
            if stopping and not dq:
                break
            if n == 0:
                self._stop.wait(_POLL_S)
        self._finish_part()

    def _add(self, topic: str, record: dict[str, Any], log_time_ns: int) -> None:
        try:
            data = encode_record(record)
        except Exception as exc:  # noqa: BLE001 - never kill the writer thread
            self._encode_errors += 1
            self._last_error = f"{topic}: cannot encode record: {exc}"
            return
        if self._writer is None and not self._try_reopen():
            self._write_errors += 1
            return
        if topic in _SEQ_TOPICS:
            seq = int(record["seq"]) & 0xFFFFFFFF
        else:
            seq = self._seq_counters[topic] = (self._seq_counters[topic] + 1) & 0xFFFFFFFF
        try:
            self._writer.add_message(self._channels[topic], log_time_ns, data, log_time_ns, seq)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"writing {topic}", exc, lost=1)
            return
        self._pending.append(topic)
        if self._chunk_first_ns is None:
            self._chunk_first_ns = time.monotonic_ns()

    def _flush_chunk(self, now: int) -> None:
        if self._writer is None:
            return
        try:
            self._writer.flush()
            if self._fsync_ns is not None and now - self._last_fsync_ns >= self._fsync_ns:
                os.fsync(self._file.fileno())
                self._last_fsync_ns = now
        except Exception as exc:  # noqa: BLE001
            self._fail("flushing a chunk", exc, lost=0)
            return
        self._commit_pending()
        if self._file.tell() >= self._rotate_bytes:
            self._rotate()

    def _commit_pending(self) -> None:
        for topic in self._pending:
            self._written_by_topic[topic] += 1
        self._written += len(self._pending)
        self._pending = []
        self._chunk_first_ns = None

    def _fail(self, what: str, exc: BaseException, lost: int) -> None:
        """A file error: count the lost messages, abandon the part, open a fresh one later."""
        self._write_errors += lost + len(self._pending)
        self._pending = []
        self._chunk_first_ns = None
        self._last_error = f"{what} in {self._files[-1] if self._files else '?'}: {exc}"
        try:
            if self._file is not None:
                self._file.close()
        except Exception:  # noqa: BLE001
            pass
        self._writer = None
        self._file = None
        self._reopen_after_ns = time.monotonic_ns() + 1_000_000_000

    def _try_reopen(self) -> bool:
        if time.monotonic_ns() < self._reopen_after_ns:
            return False
        try:
            self._open_part()
            return True
        except Exception as exc:  # noqa: BLE001
            self._last_error = f"cannot open a new log part: {exc}"
            self._reopen_after_ns = time.monotonic_ns() + 1_000_000_000
            return False

    def _rotate(self) -> None:
        self._finish_part()
        try:
            self._open_part()
        except Exception as exc:  # noqa: BLE001
            self._last_error = f"cannot open a new log part: {exc}"
            self._reopen_after_ns = time.monotonic_ns() + 1_000_000_000

    def _open_part(self) -> None:
        self._part += 1
        path = self.directory / f"{self.run_name}_{self._part:04d}.mcap"
        f = open(path, "xb", buffering=1 << 20)  # noqa: SIM115 - closed in _finish_part
        self._files.append(path)
        writer = Writer(
            f,
            chunk_size=8 * 1024 * 1024,
            compression=self._compression,
            enable_data_crcs=True,
        )
        writer.start(profile="", library="rigfm-logger")
        writer.add_metadata(METADATA_NAME, encode_metadata({**self._meta, "part": self._part}))
        self._channels = {}
        for topic in TOPICS:
            sid = writer.register_schema(SCHEMA_NAMES[topic], SCHEMA_ENCODING, schema_bytes(topic))
            self._channels[topic] = writer.register_channel(topic, MESSAGE_ENCODING, sid)
        writer.flush()  # header + metadata on disk right away (schemas ride in the first chunk)
        self._writer, self._file = writer, f
        self._part_start_ns = time.monotonic_ns()
        self._last_fsync_ns = self._part_start_ns

    def _finish_part(self) -> None:
        writer, f = self._writer, self._file
        if writer is None:
            return
        try:
            writer.flush()
            self._commit_pending()
            end = {
                "written_total": self._written,
                "dropped_total": self._dropped,
                "write_errors_total": self._write_errors,
                "encode_errors_total": self._encode_errors,
                "ended_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            writer.add_metadata(END_METADATA_NAME, encode_metadata(end))
            writer.finish()
            f.flush()
            os.fsync(f.fileno())
            self._bytes_done += f.tell()
            f.close()
        except Exception as exc:  # noqa: BLE001
            self._fail("finishing the file", exc, lost=0)
            return
        self._writer = None
        self._file = None
