"""Tolerant MCAP reading for rigfm logs: verify, stream messages, survive truncated (crashed) files.

``scan_file`` walks the records itself (instead of ``mcap.reader``) so it knows byte offsets, checks every
CRC (chunk, data section, summary), keeps going past a corrupt chunk and stops cleanly at a truncated tail."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, DataEnd, Footer, Message, Metadata, Schema, Statistics
from mcap.stream_reader import breakup_chunk

from hardware.log_schema import METADATA_NAME, decode_metadata, from_file

MAGIC = bytes([137, 77, 67, 65, 80, 48, 13, 10])
_FOOTER_LEN = 1 + 8 + 8 + 8 + 4

MessageCallback = Callable[[Channel, Schema | None, Message], None]


class LogFileError(ValueError):
    """A log file that cannot be read at all (not MCAP, empty, missing topics); the message names the file."""


@dataclass
class ScanResult:
    """What a sequential pass over one MCAP file found."""

    path: Path
    size: int
    complete: bool = False  # footer + trailing magic present
    errors: list[str] = field(default_factory=list)
    good_until: int = 8  # byte offset of the end of the last fully readable record
    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    metadata: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    messages: int = 0
    chunks: int = 0
    bad_chunks: int = 0
    statistics_count: int | None = None

    @property
    def ok(self) -> bool:
        return self.complete and not self.errors

    @property
    def lost_bytes(self) -> int:
        return self.size - self.good_until if not self.complete else 0

    def run_metadata(self) -> dict[str, Any]:
        """The decoded ``rigfm.run`` metadata record ({} when absent)."""
        for name, data in self.metadata:
            if name == METADATA_NAME:
                return decode_metadata(data)
        return {}


def _parse(cls: Any, body: bytes, length: int | None = None) -> Any:
    stream = ReadDataStream(io.BytesIO(body))
    return cls.read(stream, length) if length is not None else cls.read(stream)


def scan_file(path: str | Path, on_message: MessageCallback | None = None) -> ScanResult:
    """Read every readable record of ``path``, calling ``on_message(channel, schema, message)`` in file order.

    Raises LogFileError when the file is missing, empty or not MCAP. Problems inside an MCAP file (CRC
    mismatch, truncation, undecodable chunk) are collected in ``ScanResult.errors`` instead."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LogFileError(f"{path}: cannot read log file: {exc.strerror or exc}") from exc
    res = ScanResult(path=path, size=len(data))
    if len(data) < 8 or data[:8] != MAGIC:
        raise LogFileError(f"{path}: not an MCAP file (missing MCAP magic bytes)")
    off = 8
    in_data = True
    while True:
        if off >= len(data):
            res.errors.append(f"truncated at byte {off}: no footer (writer did not finish)")
            break
        if off + 9 > len(data):
            res.errors.append(f"truncated at byte {off}: partial record header")
            break
        opcode, length = struct.unpack_from("<BQ", data, off)
        end = off + 9 + length
        if end > len(data):
            res.errors.append(
                f"truncated at byte {off}: record (opcode 0x{opcode:02x}) of {length} bytes runs past the end"
            )
            break
        body = data[off + 9 : end]
        try:
            if opcode == Opcode.DATA_END:
                in_data = False
                crc = _parse(DataEnd, body).data_section_crc
                if crc and crc != zlib.crc32(data[:off]):
                    res.errors.append("data section CRC mismatch")
            elif opcode == Opcode.FOOTER:
                footer: Footer = _parse(Footer, body)
                if data[end : end + 8] != MAGIC:
                    res.errors.append("footer is not followed by the MCAP magic bytes")
                elif footer.summary_crc:
                    start = footer.summary_start or off
                    if zlib.crc32(data[start : end - 4]) != footer.summary_crc:
                        res.errors.append("summary CRC mismatch")
                if (
                    res.statistics_count is not None
                    and res.statistics_count != res.messages
                    and not res.bad_chunks
                ):
                    res.errors.append(
                        f"statistics record says {res.statistics_count} messages, {res.messages} readable"
                    )
                res.good_until = end + 8
                res.complete = True
                break
            elif not in_data:
                if opcode == Opcode.STATISTICS:
                    res.statistics_count = _parse(Statistics, body).message_count
            elif opcode == Opcode.CHUNK:
                res.chunks += 1
                try:
                    records = breakup_chunk(_parse(Chunk, body), validate_crc=True)
                except Exception as exc:  # noqa: BLE001 - corrupt chunk: skip it, keep going
                    res.bad_chunks += 1
                    res.errors.append(f"chunk at byte {off} unreadable ({type(exc).__name__}: {exc})")
                    records = []
                for rec in records:
                    _handle(res, rec, on_message)
            elif opcode == Opcode.SCHEMA:
                _handle(res, _parse(Schema, body), on_message)
            elif opcode == Opcode.CHANNEL:
                _handle(res, _parse(Channel, body), on_message)
            elif opcode == Opcode.MESSAGE:
                _handle(res, _parse(Message, body, length), on_message)
            elif opcode == Opcode.METADATA:
                md: Metadata = _parse(Metadata, body)
                res.metadata.append((md.name, dict(md.metadata)))
        except (struct.error, ValueError, UnicodeDecodeError, EOFError) as exc:
            res.errors.append(f"record at byte {off} (opcode 0x{opcode:02x}) unreadable: {exc}")
            break
        off = end
        if in_data:
            res.good_until = off
    return res


def _handle(res: ScanResult, rec: Any, on_message: MessageCallback | None) -> None:
    if isinstance(rec, Schema):
        res.schemas[rec.id] = rec
    elif isinstance(rec, Channel):
        res.channels[rec.id] = rec
    elif isinstance(rec, Message):
        ch = res.channels.get(rec.channel_id)
        if ch is None:
            res.errors.append(f"message on unknown channel id {rec.channel_id}")
            return
        res.messages += 1
        if on_message is not None:
            on_message(ch, res.schemas.get(ch.schema_id), rec)


def decode_file_json(channel: Channel, message: Message) -> dict[str, Any]:
    """The JSON object of one message as it is in the file (ValueError with the topic on failure)."""
    if channel.message_encoding != "json":
        raise ValueError(f"{channel.topic}: message encoding {channel.message_encoding!r} is not json")
    try:
        rec = json.loads(message.data)
    except ValueError as exc:
        raise ValueError(f"{channel.topic}: invalid JSON message: {exc}") from exc
    if not isinstance(rec, dict):
        raise ValueError(f"{channel.topic}: message is not a JSON object")
    return rec


def decode_json(channel: Channel, message: Message) -> dict[str, Any]:
    """Decode one JSON message into its API record (``log_schema.from_file``: ``host_time_ns`` ints, nested
    ``predicted``, dict ``data``; v1 and v2 files alike). ValueError with the topic on failure."""
    return from_file(channel.topic, decode_file_json(channel, message))


class MessageDecoder:
    """Decodes any message of a rigfm log: JSON channels into API records, protobuf channels (``/log``,
    foxglove.Log) into dicts through the schema's own FileDescriptorSet (mcap-protobuf-support)."""

    def __init__(self) -> None:
        self._proto: dict[int, Callable[[bytes], Any]] = {}

    def decode(self, channel: Channel, schema: Schema | None, message: Message) -> dict[str, Any]:
        if channel.message_encoding == "json":
            return decode_json(channel, message)
        if channel.message_encoding == "protobuf" and schema is not None:
            fn = self._proto.get(schema.id)
            if fn is None:
                from mcap_protobuf.decoder import DecoderFactory

                fn = DecoderFactory().decoder_for("protobuf", schema)
                if fn is None:
                    raise ValueError(f"{channel.topic}: cannot build a protobuf decoder for {schema.name}")
                self._proto[schema.id] = fn
            try:
                from google.protobuf.json_format import MessageToDict

                return MessageToDict(fn(message.data), preserving_proto_field_name=True)
            except Exception as exc:  # noqa: BLE001 - any decoding failure names the topic
                raise ValueError(f"{channel.topic}: invalid protobuf message: {exc}") from exc
        raise ValueError(f"{channel.topic}: message encoding {channel.message_encoding!r} is not supported")


def read_topics(path: str | Path, topics: set[str] | list[str], file_order: bool = False
                ) -> tuple[ScanResult, dict[str, list[tuple]]]:
    """Decoded records of ``topics`` as ``{topic: [(log_time_ns, record), ...]}`` plus the scan result;
    ``file_order=True`` prefixes each tuple with the message's 1-based position in the file (all topics).

    Tolerant of truncated files (everything readable is returned; see ``ScanResult.errors``)."""
    out: dict[str, list[tuple]] = {t: [] for t in topics}
    bad: list[str] = []
    counter = [0]

    def on_message(ch: Channel, _schema: Schema | None, msg: Message) -> None:
        counter[0] += 1
        if ch.topic in out:
            try:
                rec = decode_json(ch, msg)
            except ValueError as exc:
                bad.append(str(exc))
                return
            out[ch.topic].append((counter[0], msg.log_time, rec) if file_order else (msg.log_time, rec))

    res = scan_file(path, on_message)
    if bad:
        res.errors.append(f"{len(bad)} undecodable message(s), first: {bad[0]}")
    return res, out
