"""Unit tests of the v2 serial protocol (hardware/protocol.py): golden frames, every error class, the stream
decoder's counters and over-long frame handling."""

from __future__ import annotations

import math
import struct
from binascii import crc_hqx

import pytest
from cobs.cobs import decode as cobs_decode
from cobs.cobs import encode as cobs_encode

from hardware import protocol as p

GOLDEN = [  # (message, seq, frame hex) — the examples of docs/protocol.md; locks the wire format
    (p.Hello(), 0, "03 02 01 01 01 83 a5 c8 00"),
    (p.Command(1.5), 1, "04 02 02 01 01 01 03 c0 3f bd 89 ac 00"),
    (p.Estop(), 2, "04 02 03 02 01 ad 9c a8 00"),
    (p.Heartbeat(0x12345678), 4, "04 02 06 04 05 78 56 34 12 af c4 cc 00"),
    (
        p.State(1000, (100, -200), 150.0, -2.5, p.StatusFlags.CONNECTED | p.StatusFlags.MOTOR_ENABLED),
        1,
        "04 02 82 01 03 e8 03 01 01 01 01 01 02 64 01 01 05 38 ff ff ff "
        "01 03 16 43 01 04 20 c0 30 01 85 e2 a2 00",
    ),
]


def raw_frame(version: int, type_id: int, seq: int, payload: bytes) -> bytes:
    """Build a frame by hand (bypassing encode) with a correct trailer; without the delimiter."""
    return p.frame_body(struct.pack("<BBH", version, type_id, seq) + payload)[:-1]


def v1_frame(type_id: int, seq: int, payload: bytes) -> bytes:
    """A protocol v1 frame (CRC inside the COBS data, no trailer), as an old firmware sends it."""
    body = struct.pack("<BBH", 1, type_id, seq) + payload
    return cobs_encode(body + struct.pack("<H", crc_hqx(body, 0xFFFF)))


def test_crc_is_ccitt_false() -> None:
    assert crc_hqx(b"123456789", p.CRC_INIT) == 0x29B1


def test_trailer_layout() -> None:
    """Trailer = 0x80|t[20:14], 0x80|t[13:7], 0x80|t[6:0]; t = crc16(COBS bytes) << 5 | frame length % 32."""
    frame = p.encode(p.Command(1.5), 1)[:-1]
    cobs_part, tr = frame[:-3], frame[-3:]
    assert all(b & 0x80 for b in tr) and 0 not in frame
    t = ((tr[0] & 0x7F) << 14) | ((tr[1] & 0x7F) << 7) | (tr[2] & 0x7F)
    assert t >> 5 == crc_hqx(cobs_part, 0xFFFF) and t & 31 == len(frame) % 32
    assert p.trailer(cobs_part) == tr
    assert cobs_decode(cobs_part) == struct.pack("<BBHf", 2, p.MsgType.COMMAND, 1, 1.5)


@pytest.mark.parametrize(("msg", "seq", "hexstr"), GOLDEN)
def test_golden_frames(msg: p.Message, seq: int, hexstr: str) -> None:
    frame = p.encode(msg, seq)
    assert frame == bytes.fromhex(hexstr)
    assert frame.endswith(b"\x00") and frame.count(0) == 1
    assert p.decode_frame(frame[:-1]) == (seq, msg)


def test_wire_sizes_match_docs() -> None:
    assert p.wire_size(p.State) == 35  # "keep STATE <= ~32 bytes": 26 payload + 9 framing (v1: 8)
    assert {c.__name__: p.payload_size(c) for c in p.MESSAGE_CLASSES} == {
        "Hello": 0, "HelloReply": 29, "State": 26, "Command": 4, "Estop": 0, "ClearEstop": 0,
        "Heartbeat": 4, "Fault": 6, "Config": 16, "Ack": 3, "Nack": 4, "TruthRequest": 1, "Truth": 28,
    }  # fmt: skip
    for cls in p.MESSAGE_CLASSES:
        assert p.wire_size(cls) == p.payload_size(cls) + 9
        assert p.wire_size(cls) - 1 < p.MIN_FRAME_LEN + p.LENGTH_MODULO  # needed by the split proof


def test_hello_reply_layout_offsets() -> None:
    reply = p.HelloReply(1, p.RigKind.FURUTA, (2, 3, 4), (2048, 512), 1000, 12.0, 50, 0x0102030405060708)
    payload = cobs_decode(p.encode(reply, 9)[:-4])[4:]
    assert payload[0] == 1 and payload[1] == 2 and tuple(payload[2:5]) == (2, 3, 4)
    assert struct.unpack_from("<IIHfHQ", payload, 5) == (2048, 512, 1000, 12.0, 50, 0x0102030405060708)


def test_decode_errors_are_specific() -> None:
    good = p.encode(p.Command(1.5), 1)[:-1]  # 04 02 02 01 01 01 03 c0 3f bd 89 ac: byte 7 is a data byte
    with pytest.raises(p.FramingError, match="empty"):
        p.decode_frame(b"")
    bad_cobs = b"\x09\x01\x02\x03\x04\x05"  # code points past the end, but a valid trailer
    with pytest.raises(p.FramingError, match="COBS"):
        p.decode_frame(bad_cobs + p.trailer(bad_cobs))
    bad_crc = bytearray(good)
    bad_crc[7] ^= 0x40
    with pytest.raises(p.CrcError, match="CRC mismatch"):
        p.decode_frame(bytes(bad_crc))
    bad_trailer = bytearray(good)
    bad_trailer[-2] &= 0x7F
    with pytest.raises(p.FramingError, match="invalid trailer"):
        p.decode_frame(bytes(bad_trailer))
    with pytest.raises(p.LengthError, match="trailer says"):
        p.decode_frame(good[1:])  # the second half of a frame split by a 0x00
    with pytest.raises(p.VersionError, match="version 3"):
        p.decode_frame(raw_frame(3, p.MsgType.COMMAND, 1, struct.pack("<f", 1.0)))
    with pytest.raises(p.VersionError, match="version 1 .v1 frame format"):
        p.decode_frame(v1_frame(p.MsgType.HELLO_REPLY, 0, bytes(29)))  # an old firmware's reply
    with pytest.raises(p.UnknownMessage, match="0x7E"):
        p.decode_frame(raw_frame(2, 0x7E, 1, b""))
    with pytest.raises(p.LengthError, match="Command: payload 3 bytes"):
        p.decode_frame(raw_frame(2, p.MsgType.COMMAND, 1, b"\x01\x02\x03"))
    with pytest.raises(p.LengthError, match="too short"):
        p.decode_frame(b"\x01\x02\x03")
    for exc in (p.FramingError, p.CrcError, p.VersionError, p.UnknownMessage, p.LengthError, p.EncodeError):
        assert issubclass(exc, p.ProtocolError)


def test_encode_errors_name_the_field() -> None:
    with pytest.raises(p.EncodeError, match=r"State\.counts"):
        p.encode(p.State(0, (1, 2**31), 0.0, 0.0, p.StatusFlags.NONE), 0)
    with pytest.raises(p.EncodeError, match=r"Config\.watchdog_ms"):
        p.encode(p.Config(5.0, -1), 0)
    with pytest.raises(p.EncodeError, match=r"Command\.voltage"):
        p.encode(p.Command(1e39), 0)
    with pytest.raises(p.EncodeError, match=r"State\.counts.*expected 2 values"):
        p.encode(p.State(0, (1, 2, 3), 0.0, 0.0, p.StatusFlags.NONE), 0)  # type: ignore[arg-type]
    with pytest.raises(p.EncodeError, match="seq must be"):
        p.encode(p.Hello(), 65536)
    with pytest.raises(p.EncodeError, match="not a protocol message"):
        p.encode("hello", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # EncodeError is also a ValueError
        p.encode(p.Heartbeat(-1), 0)


def test_non_finite_floats_are_carried() -> None:
    # the protocol layer carries NaN/inf (the device NACKs them); the driver refuses to send them
    _, msg = p.decode_frame(p.encode(p.Command(math.nan), 0)[:-1])
    assert math.isnan(msg.voltage)
    _, msg = p.decode_frame(p.encode(p.State(1, (0, 0), math.nan, math.inf, p.StatusFlags.NONE), 0)[:-1])
    assert math.isnan(msg.current_ma) and msg.applied_voltage == math.inf
    assert not p.is_finite_f32(math.nan) and not p.is_finite_f32(1e39) and p.is_finite_f32(3.0)


def test_unknown_enum_values_survive() -> None:
    # a newer firmware may send fault codes / flag bits this host does not know: kept as plain ints
    _, fault = p.decode_frame(raw_frame(2, p.MsgType.FAULT, 1, struct.pack("<Hi", 999, -7)))
    assert fault == p.Fault(999, -7) and not isinstance(fault.code, p.FaultCode)
    state = p.State(5, (1, 2), 0.0, 0.0, p.StatusFlags(0x8000 | p.StatusFlags.FAULT))
    _, back = p.decode_frame(p.encode(state, 2)[:-1])
    assert back.flags & p.StatusFlags.FAULT and int(back.flags) == 0x8008


def test_seq_helpers() -> None:
    assert p.next_seq(65535) == 0 and p.next_seq(7) == 8
    assert p.seq_gap(10, 11) == 0 and p.seq_gap(65535, 0) == 0 and p.seq_gap(65534, 2) == 3
    assert p.seq_gap(5, 5) == 65535  # duplicate shows as a huge gap


def test_decoder_counts_each_error_class() -> None:
    dec = p.FrameDecoder()
    bad_crc = bytearray(p.encode(p.Command(1.0), 1))
    bad_crc[3] ^= 0x02  # a data byte (seq), stays non-zero
    stream = (
        b"\x00\x00"  # idle delimiters: ignored
        + b"\x09\x01\x02\x03\x04\x05" + p.trailer(b"\x09\x01\x02\x03\x04\x05") + b"\x00"  # bad COBS
        + bytes(bad_crc)
        + raw_frame(3, 2, 1, b"1234") + b"\x00"
        + raw_frame(2, 0x7E, 1, b"") + b"\x00"
        + raw_frame(2, 2, 1, b"12") + b"\x00"
        + p.encode(p.Heartbeat(77), 9)
    )  # fmt: skip
    out = dec.feed(stream)
    assert out == [(9, p.Heartbeat(77))]
    stats = dec.stats()
    assert stats["frames_ok"] == 1 and stats["crc_errors"] == 1 and stats["framing_errors"] == 1
    assert stats["version_errors"] == 1 and stats["unknown_messages"] == 1 and stats["length_errors"] == 1
    assert stats["bytes_received"] == len(stream)
    assert stats["bytes_discarded"] == len(stream) - 2 - len(p.encode(p.Heartbeat(77), 9))
    assert isinstance(dec.last_error, p.LengthError)


def test_decoder_counts_v1_frames_as_version_errors() -> None:
    """An old (v1) firmware's frames are version errors, not noise: the driver reports a protocol mismatch."""
    dec = p.FrameDecoder()
    old = v1_frame(p.MsgType.HELLO_REPLY, 0, bytes([1, 1]) + bytes(27)) + b"\x00"
    v1_golden = bytes.fromhex("04 01 02 01 01 01 05 c0 3f 46 82 00")  # COMMAND(1.5) seq 1 in protocol v1
    assert p.reencode_version(p.encode(p.Command(1.5), 1), 1) == v1_golden
    assert dec.feed(old + p.reencode_version(p.encode(p.Heartbeat(1), 1), 1)) == []
    assert dec.version_errors == 2 and isinstance(dec.last_error, p.VersionError)
    assert p.decode_frame(p.reencode_version(p.encode(p.Heartbeat(1), 1), 2)[:-1]) == (1, p.Heartbeat(1))
    with pytest.raises(p.VersionError, match="version 7"):
        p.decode_frame(p.reencode_version(p.encode(p.Heartbeat(1), 1), 7)[:-1])


def test_decoder_drops_overlong_frames_and_recovers() -> None:
    dec = p.FrameDecoder(max_frame_len=40)
    junk = bytes(range(1, 200))  # no zero: one endless "frame"
    assert dec.feed(junk[:100]) == []
    assert dec.pending == 0 and dec.oversize_frames == 1  # buffer capped, now discarding
    assert dec.feed(junk[100:]) == []
    frame = p.encode(p.Command(-3.0), 4)
    # the delimiter that ends the junk also ends the discard; the next frame decodes
    assert dec.feed(b"\x00" + frame) == [(4, p.Command(-3.0))]
    assert dec.bytes_discarded == len(junk) + 1
    # an over-long frame completed within one chunk
    assert dec.feed(junk[:50] + b"\x00" + frame) == [(4, p.Command(-3.0))]
    assert dec.oversize_frames == 2
    with pytest.raises(ValueError, match="too small"):
        p.FrameDecoder(max_frame_len=3)


def test_decoder_byte_by_byte_and_reset() -> None:
    msgs = [p.Command(0.25 * i) for i in range(5)]
    stream = b"".join(p.encode(m, i) for i, m in enumerate(msgs))
    dec = p.FrameDecoder()
    out = []
    for b in stream:
        out += dec.feed(bytes([b]))
    assert out == list(enumerate(msgs))
    dec.feed(stream[:5])
    assert dec.pending == 5
    dec.reset()
    assert dec.pending == 0 and dec.feed(stream) == list(enumerate(msgs))
    assert dec.feed(b"") == []


def test_message_fields_plain_dict() -> None:
    d = p.message_fields(p.Nack(3, p.MsgType.CONFIG, p.NackReason.WATCHDOG_RANGE))
    assert d == {"acked_seq": 3, "acked_type": 5, "reason": 7}
    assert type(d["reason"]) is int
