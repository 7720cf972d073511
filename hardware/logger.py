"""Run logger: every state, command, prediction, mode change and fault into chunked, compressed MCAP files.

``write()`` never blocks: it appends to a bounded in-memory queue (a deque; on overflow it counts a drop and
returns False). A writer thread drains the queue, turns each record into its file shape
(``hardware.log_schema.to_file``), JSON-encodes it, and closes an MCAP chunk once its oldest record has been
queued for ``chunk_ms / 2`` (``mcap.writer.Writer.flush()`` finalises the chunk and writes it; the age counts
from ``write()``, so a writer that fell behind flushes as soon as it catches up), so after a SIGKILL the file
is readable up to the last closed chunk and at most ``chunk_ms`` of data is lost while the writer keeps up.
``rigfm logs check --recover`` rebuilds a valid file from a truncated one. Files rotate by size and by age;
every part carries the run metadata.
Besides the JSON topics the logger writes ``/log`` (Foxglove's well-known ``foxglove.Log``, protobuf): one
line per mode change, fault and event, for Foxglove's Log panel.

**File errors** (a full disk): the messages of the failed chunk and every later one are counted as dropped
(``write_errors``), ``error`` keeps the first failure for the caller to report; the failed part is cut back
to its last complete chunk and closed with a footer (it stays a valid MCAP file); a part that would hold no
message is deleted; a new part is only opened again when the disk has ``MIN_FREE_BYTES`` free (retried once
a second).

A thread (not a process) is used: encoding + MCAP framing cost a few us per message (see
bench/bench_logger.py), and a process would need the record pickled in the control loop's own process
anyway. Records are handed over: do not mutate a record after passing it to ``write()``."""

from __future__ import annotations

import atexit
import collections
import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcap.data_stream import RecordBuilder
from mcap.records import DataEnd, Footer, Metadata
from mcap.writer import CompressionType, Writer

from hardware import log_clock
from hardware.log_reader import MAGIC
from hardware.log_schema import (
    CLOCK_NOTE,
    END_METADATA_NAME,
    LOG_FORMAT,
    LOG_TOPIC,
    MESSAGE_ENCODING,
    METADATA_NAME,
    REQUIRED,
    SCHEMA_ENCODING,
    SCHEMA_NAMES,
    TOPICS,
    encode_metadata,
    schema_bytes,
    to_file,
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
MIN_FREE_BYTES = 1 << 20  # a new part after a file error only with this much free disk space
_SEQ_TOPICS = frozenset({"/state", "/command"})
MIRRORED = frozenset({"/mode", "/fault", "/event"})  # -> /log lines
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


_SLOW_TOPICS = frozenset({"/prediction", "/event"})  # reshaped fields: always the full to_file


def encode_record(record: dict[str, Any], topic: str | None = None) -> bytes:
    """Compact JSON of one record in its file shape (``log_schema.to_file``: {sec, nsec} times, numpy values
    converted, NaN/Inf left out or written as null). Plain records take a fast path with the same result."""
    topic = topic or ""
    if topic not in _SLOW_TOPICS:
        rec = {k: v for k, v in record.items() if v is not None}
        t = rec.pop("host_time_ns", None)
        if t is not None:
            sec, nsec = divmod(int(t), 1_000_000_000)
            rec["timestamp"] = {"sec": sec, "nsec": nsec}
        if "ref_host_time_ns" not in rec:
            try:  # no numpy, no NaN: this is already the file record
                return json.dumps(rec, separators=(",", ":"), allow_nan=False).encode()
            except (TypeError, ValueError):
                pass
    rec = to_file(topic, record)
    return json.dumps(rec, separators=(",", ":"), allow_nan=False, default=_default).encode()


class PartFile:
    """Unbuffered output of one MCAP part: ``write`` writes everything or raises ``OSError``; ``tell`` is
    the number of bytes handed to the OS. (A buffered file would hide a failed write until a later flush.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.offset = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            if n <= 0:
                raise OSError(errno.EIO, f"write to {self.path} made no progress")
            self.offset += n
            view = view[n:]
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        """Nothing is buffered here."""

    def fileno(self) -> int:
        return self.fd

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        os.lseek(self.fd, size, os.SEEK_SET)
        self.offset = size

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def foxglove_log_schema() -> tuple[Any, Any] | None:
    """(foxglove.messages module, foxglove.Log schema) or None without foxglove-sdk."""
    try:
        from foxglove import messages
    except ImportError:
        return None
    return messages, messages.Log.get_schema()


def log_line(messages: Any, topic: str, record: dict[str, Any], log_time_ns: int) -> bytes:
    """The encoded foxglove.Log line (``messages`` = ``foxglove.messages``) of a /mode, /fault or /event
    record: faults at level ERROR, a change to estop / fault at WARNING, prediction_monitor at DEBUG."""
    m = messages
    level = m.LogLevel.Info
    if topic == "/mode":
        text = f"mode {record.get('previous', '?')} -> {record['mode']}"
        text += f" ({record['reason']})" if record.get("reason") else ""
        if record["mode"] in ("estop", "fault"):
            level = m.LogLevel.Warning
    elif topic == "/fault":
        text = f"fault {record['code']}: {record.get('message', '')}"
        level = m.LogLevel.Error
    else:
        data = record.get("data")
        text = str(record["name"])
        if data:
            text += " " + json.dumps(data, sort_keys=True, default=str)[:500]
        if record["name"] == "prediction_monitor":
            level = m.LogLevel.Debug
    sec, nsec = divmod(int(log_time_ns), 1_000_000_000)
    return m.Log(timestamp=m.Timestamp(sec=sec, nsec=nsec), level=level, message=text, name=topic).encode()


class RunLogger:
    """Non-blocking MCAP run logger (see module docstring). Use as a context manager or call ``close()``.

    Files are ``directory/<run_name>_<part:04d>.mcap``. ``file_factory(path)`` opens a part (default
    ``PartFile``; tests inject failing files through it)."""

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
        foxglove_log: bool = True,
        file_factory: Callable[[Path], Any] = PartFile,
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
        self._file_factory = file_factory
        self._fox = foxglove_log_schema() if foxglove_log else None

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
            clock=CLOCK_NOTE,
            clock_offset_ns=log_clock.OFFSET_NS,
            foxglove_log=LOG_TOPIC if self._fox else "off",
        )
        encode_metadata(meta)  # validate now, in the caller, with a clear error
        self._meta = meta

        self._dq: collections.deque = collections.deque()
        self._drop_lock = threading.Lock()
        self._dropped = 0  # queue full / closed
        self._dropped_by_topic: dict[str, int] = dict.fromkeys(TOPICS, 0)
        self._written = 0
        self._written_by_topic: dict[str, int] = dict.fromkeys((*TOPICS, LOG_TOPIC), 0)
        self._pending: list[str] = []  # topics of messages in the open chunk
        self._write_errors = 0  # messages lost to file errors
        self._encode_errors = 0
        self._error: str | None = None  # the first file error (sticky)
        self._last_error: str | None = None
        self._bytes_done = 0
        self._files: list[Path] = []
        self._part = -1
        self._part_messages = 0  # committed messages in the open part
        self._good_offset = 0  # end of the last complete chunk of the open part
        self._seq_counters: dict[str, int] = dict.fromkeys((*TOPICS, LOG_TOPIC), 0)
        self._writer: Writer | None = None
        self._file: Any = None
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

        MCAP log time = ``log_time_ns``, else the record's ``host_time_ns``, else ``log_clock.now_ns()``.
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
        if log_time_ns is None:
            log_time_ns = record["host_time_ns"] if "host_time_ns" in record else log_clock.now_ns()
        self._dq.append((topic, record, int(log_time_ns), time.monotonic_ns()))
        return True

    @property
    def error(self) -> str | None:
        """The first file error of this logger (None while every message reached the file)."""
        return self._error

    def stats(self) -> dict[str, Any]:
        """Counters: written (in closed chunks), dropped (all messages not in the file: queue full, closed,
        lost to file errors), dropped_queue, write_errors, encode_errors, error, queued, bytes, files."""
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
            "dropped": self._dropped + self._write_errors,
            "dropped_queue": self._dropped,
            "dropped_by_topic": dict(self._dropped_by_topic),
            "queued": len(self._dq),
            "bytes": self._bytes_done + cur,
            "files": [str(p) for p in self._files],
            "write_errors": self._write_errors,
            "encode_errors": self._encode_errors,
            "error": self._error,
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

    def _lose(self, topic: str, n: int = 1) -> None:
        self._write_errors += n
        with self._drop_lock:
            self._dropped_by_topic[topic] = self._dropped_by_topic.get(topic, 0) + n

    def _add(self, topic: str, record: dict[str, Any], log_time_ns: int, queued_ns: int) -> None:
        try:
            data = encode_record(record, topic)
        except Exception as exc:  # noqa: BLE001 - never kill the writer thread
            self._encode_errors += 1
            self._last_error = f"{topic}: cannot encode record: {exc}"
            return
        if self._writer is None and not self._try_reopen():
            self._lose(topic)
            return
        if topic in _SEQ_TOPICS:
            seq = int(record["seq"]) & 0xFFFFFFFF
        else:
            seq = self._seq_counters[topic] = (self._seq_counters[topic] + 1) & 0xFFFFFFFF
        added = False
        try:
            self._writer.add_message(self._channels[topic], log_time_ns, data, log_time_ns, seq)
            self._pending.append(topic)
            added = True
            if self._fox is not None and topic in MIRRORED:
                self._add_log_line(topic, record, log_time_ns)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"writing {topic}", exc, lost_topic=None if added else topic)
            return
        if self._chunk_first_ns is None:  # the chunk's age counts from when its oldest record was queued,
            self._chunk_first_ns = queued_ns  # so a writer running behind flushes as soon as it catches up

    def _add_log_line(self, topic: str, record: dict[str, Any], log_time_ns: int) -> None:
        """The foxglove.Log line of a /mode, /fault or /event record."""
        data = log_line(self._fox[0], topic, record, log_time_ns)
        seq = self._seq_counters[LOG_TOPIC] = (self._seq_counters[LOG_TOPIC] + 1) & 0xFFFFFFFF
        self._writer.add_message(self._channels[LOG_TOPIC], log_time_ns, data, log_time_ns, seq)
        self._pending.append(LOG_TOPIC)

    def _flush_chunk(self, now: int) -> None:
        if self._writer is None:
            return
        try:
            self._writer.flush()
            if self._fsync_ns is not None and now - self._last_fsync_ns >= self._fsync_ns:
                os.fsync(self._file.fileno())
                self._last_fsync_ns = now
        except Exception as exc:  # noqa: BLE001
            self._fail("flushing a chunk", exc)
            return
        self._commit_pending()
        if self._file.tell() >= self._rotate_bytes:
            self._rotate()

    def _commit_pending(self) -> None:
        for topic in self._pending:
            self._written_by_topic[topic] += 1
        n = sum(1 for t in self._pending if t != LOG_TOPIC)
        self._written += n
        self._part_messages += len(self._pending)
        self._pending = []
        self._chunk_first_ns = None
        if self._file is not None:
            self._good_offset = self._file.tell()

    def _fail(self, what: str, exc: BaseException, lost_topic: str | None = None) -> None:
        """A file error: count the lost messages, close the part at its last complete chunk, retry later."""
        for topic in self._pending:
            if topic != LOG_TOPIC:
                self._lose(topic)
        if lost_topic is not None:
            self._lose(lost_topic)
        self._pending = []
        self._chunk_first_ns = None
        where = self._files[-1] if self._files else self.directory
        self._last_error = f"{what} to {where}: {exc}"
        if self._error is None:
            self._error = self._last_error
        self._salvage_part()
        self._reopen_after_ns = time.monotonic_ns() + 1_000_000_000

    def _end_metadata(self) -> dict[str, str]:
        end = {
            "written_total": self._written,
            "dropped_total": self._dropped + self._write_errors,
            "write_errors_total": self._write_errors,
            "encode_errors_total": self._encode_errors,
            "ended_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self._error:
            end["error"] = self._error
        return encode_metadata(end)

    def _salvage_part(self) -> None:
        """Cut the failed part back to its last complete chunk and end it with end metadata, DataEnd and a
        footer (no summary: a valid MCAP file); a part with no complete chunk of messages is deleted."""
        f = self._file
        self._writer = None
        self._file = None
        if f is None:
            return
        try:
            if self._part_messages == 0 and self._part > 0:
                f.close()
                self._drop_part_file(f.path)
                return
            f.truncate(self._good_offset)
            for with_metadata in (True, False):  # the end metadata only if it fits: the footer matters more
                b = RecordBuilder()
                if with_metadata:
                    Metadata(name=END_METADATA_NAME, metadata=self._end_metadata()).write(b)
                DataEnd(0).write(b)
                Footer(0, 0, 0).write(b)
                try:
                    f.write(b.end() + MAGIC)
                    break
                except OSError:
                    f.truncate(self._good_offset)
            else:  # no room even for a footer: readable up to the last chunk (rigfm logs check --recover)
                self._last_error += f"; {f.path} ends without a footer (rigfm logs check --recover)"
            self._bytes_done += f.tell()
        except OSError as exc:
            self._last_error = f"{self._last_error}; closing the part failed too: {exc}"
        finally:
            try:
                f.close()
            except OSError:
                pass

    def _drop_part_file(self, path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass
        if self._files and self._files[-1] == path:
            self._files.pop()
            self._part -= 1

    def _try_reopen(self) -> bool:
        """Open the next part unless a failure said wait (1 s) or, after a file error, the disk is full."""
        if time.monotonic_ns() < self._reopen_after_ns:
            return False
        try:
            if self._error is not None:
                st = os.statvfs(self.directory)
                free = st.f_bavail * st.f_frsize
                if free < MIN_FREE_BYTES:
                    self._last_error = f"not opening a new log part: {free} bytes free in {self.directory}"
                    self._reopen_after_ns = time.monotonic_ns() + 1_000_000_000
                    return False
            self._open_part()
            return True
        except Exception as exc:  # noqa: BLE001
            self._last_error = f"cannot open a new log part in {self.directory}: {exc}"
            if self._error is None:
                self._error = self._last_error
            self._reopen_after_ns = time.monotonic_ns() + 1_000_000_000
            return False

    def _rotate(self) -> None:
        self._finish_part()
        self._try_reopen()  # not before the retry time when finishing failed

    def _open_part(self) -> None:
        self._part += 1
        path = self.directory / f"{self.run_name}_{self._part:04d}.mcap"
        try:
            f = self._file_factory(path)
        except BaseException:
            self._part -= 1
            raise
        self._files.append(path)
        try:
            writer = Writer(f, chunk_size=8 * 1024 * 1024, compression=self._compression,
                            enable_data_crcs=True)
            writer.start(profile="", library="rigfm-logger")
            writer.add_metadata(METADATA_NAME, encode_metadata({**self._meta, "part": self._part}))
            channels = {}
            for topic in TOPICS:
                sid = writer.register_schema(SCHEMA_NAMES[topic], SCHEMA_ENCODING, schema_bytes(topic))
                channels[topic] = writer.register_channel(topic, MESSAGE_ENCODING, sid)
            if self._fox is not None:
                schema = self._fox[1]
                sid = writer.register_schema(schema.name, schema.encoding, schema.data)
                channels[LOG_TOPIC] = writer.register_channel(LOG_TOPIC, "protobuf", sid)
            writer.flush()  # header + metadata on disk right away (schemas ride in the first chunk)
        except BaseException:
            try:
                f.close()
            finally:
                self._drop_part_file(path)
            raise
        self._writer, self._file, self._channels = writer, f, channels
        self._part_messages = 0
        self._good_offset = f.tell()
        self._part_start_ns = time.monotonic_ns()
        self._last_fsync_ns = self._part_start_ns

    def _finish_part(self) -> None:
        writer, f = self._writer, self._file
        if writer is None:
            return
        try:
            writer.flush()
            self._commit_pending()
            if self._part_messages == 0 and self._part > 0:  # nothing in it: no empty part on disk
                self._writer = self._file = None
                f.close()
                self._drop_part_file(f.path)
                return
            writer.add_metadata(END_METADATA_NAME, self._end_metadata())
            writer.finish()
            os.fsync(f.fileno())
            self._bytes_done += f.tell()
            f.close()
        except Exception as exc:  # noqa: BLE001
            self._fail("finishing the file", exc)
            return
        self._writer = None
        self._file = None
