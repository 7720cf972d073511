"""Property tests (hypothesis) of the v2 serial protocol: round trips over the full value ranges of every
message type, single-byte corruption detection with ZERO misses (exhaustive: every position x every wrong
value, incl. 0x00 frame splits), lost delimiters, stream resynchronisation."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware import protocol as p

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
i32 = st.integers(-(2**31), 2**31 - 1)
f32 = st.floats(width=32, allow_nan=False)  # incl. +-inf, subnormals, -0.0: exact through f32
seqs = u16
flags = st.integers(0, 0xFFFF).map(p.StatusFlags)

MESSAGES = {
    p.Hello: st.just(p.Hello()),
    p.Estop: st.just(p.Estop()),
    p.ClearEstop: st.just(p.ClearEstop()),
    p.Command: st.builds(p.Command, f32),
    p.Heartbeat: st.builds(p.Heartbeat, u32),
    p.Config: st.builds(p.Config, f32, u16, i32, i32, u16),
    p.HelloReply: st.builds(
        p.HelloReply,
        u8,
        st.sampled_from(list(p.RigKind)) | u8,
        st.tuples(u8, u8, u8),
        st.tuples(u32, u32),
        u16,
        f32,
        u16,
        u64,
    ),
    p.State: st.builds(p.State, u64, st.tuples(i32, i32), f32, f32, flags),
    p.Fault: st.builds(p.Fault, st.sampled_from(list(p.FaultCode)) | u16, i32),
    p.Ack: st.builds(p.Ack, u16, st.sampled_from(list(p.MsgType)) | u8),
    p.Nack: st.builds(
        p.Nack, u16, st.sampled_from(list(p.MsgType)) | u8, st.sampled_from(list(p.NackReason)) | u8
    ),
    p.TruthRequest: st.builds(p.TruthRequest, u8),
    p.Truth: st.builds(p.Truth, u64, st.tuples(f32, f32, f32, f32), f32),
}
any_message = st.one_of(*MESSAGES.values())


def test_strategies_cover_every_message_class() -> None:
    assert set(MESSAGES) == set(p.MESSAGE_CLASSES)


@pytest.mark.parametrize("cls", p.MESSAGE_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None)
@given(data=st.data(), seq=seqs)
def test_round_trip(cls: type, data: st.DataObject, seq: int) -> None:
    msg = data.draw(MESSAGES[cls])
    frame = p.encode(msg, seq)
    assert len(frame) == p.wire_size(cls)
    assert frame[-1] == 0 and 0 not in frame[:-1]
    assert p.decode_frame(frame[:-1]) == (seq, msg)
    assert p.FrameDecoder().feed(frame) == [(seq, msg)]


def accepted(frame: bytes) -> bool:
    """Whether a receiver (decode_frame; the stream decoder ignores empty frames) accepts these bytes."""
    if not frame:
        return False
    try:
        p.decode_frame(frame)
    except p.ProtocolError:
        return False
    return True


def assert_all_parts_rejected(corrupted: bytes, original: p.Message) -> None:
    """A corrupted frame (no delimiter) may contain 0x00 and so arrive as several frames: all must fail."""
    for part in corrupted.split(b"\x00"):
        if accepted(part):
            pytest.fail(
                f"corrupted frame {corrupted.hex()} (from {original}) decoded as {p.decode_frame(part)}"
            )


def count_missed_single_byte_corruptions(frame: bytes) -> tuple[int, int]:
    """Every position x every one of the 255 other values of ``frame`` (no delimiter): (checked, accepted).

    A 0x00 splits the frame: missed if either part is accepted."""
    checked = missed = 0
    for pos, orig in enumerate(frame):
        pre, post = frame[:pos], frame[pos + 1 :]
        missed += accepted(pre) or accepted(post)  # value 0x00 (orig is never 0)
        for value in range(1, 256):
            if value != orig:
                missed += accepted(pre + bytes((value,)) + post)
        checked += 255
    return checked, missed


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(msg=any_message, seq=seqs, data=st.data())
def test_single_corrupted_byte_is_detected_random(msg: p.Message, seq: int, data: st.DataObject) -> None:
    frame = p.encode(msg, seq)[:-1]
    pos = data.draw(st.integers(0, len(frame) - 1), label="position")
    value = data.draw(u8.filter(lambda v: v != frame[pos]), label="value")
    corrupted = bytearray(frame)
    corrupted[pos] = value
    assert_all_parts_rejected(bytes(corrupted), msg)


def corpus() -> list[tuple[p.Message, int]]:
    """Fixed messages of every type: boundary values, zero-heavy and 0xFF-heavy payloads."""
    f = p.StatusFlags
    msgs: list[p.Message] = [
        p.Hello(), p.Estop(), p.ClearEstop(),
        p.Command(0.0), p.Command(-0.0), p.Command(12.0), p.Command(-3.4e38), p.Command(1e-45),
        p.Heartbeat(0), p.Heartbeat(0xFFFFFFFF), p.Heartbeat(0x01000001),
        p.Config(6.0, 50), p.Config(0.0, 0, 0, 0, 0), p.Config(12.0, 1000, -4096, 4096, 2),
        p.HelloReply(1, p.RigKind.CARTPOLE, (1, 0, 0), (4096, 4096), 1000, 12.0, 50, 0x0123456789ABCDEF),
        p.HelloReply(0, 0, (0, 0, 0), (0, 0), 0, 0.0, 0, 0),
        p.HelloReply(255, 255, (255, 255, 255), (2**32 - 1, 2**32 - 1), 65535, -1.0, 65535, 2**64 - 1),
        p.State(0, (0, 0), 0.0, 0.0, f.NONE),
        p.State(1_000_000, (100, -200), 150.0, -2.5, f.CONNECTED | f.MOTOR_ENABLED),
        p.State(2**64 - 1, (-(2**31), 2**31 - 1), -1.0, 12.0, f(0xFFFF)),
        p.State(256, (256, 65536), 2.0**-126, 0.5, f.ESTOP_LATCHED),
        p.Fault(p.FaultCode.WATCHDOG, 51), p.Fault(0, 0), p.Fault(0xFFFF, -1),
        p.Ack(0, p.MsgType.CONFIG), p.Ack(0xFFFF, 0xFF),
        p.Nack(0, 0, 0), p.Nack(7, p.MsgType.CONFIG, p.NackReason.WATCHDOG_RANGE),
        p.TruthRequest(0), p.TruthRequest(1),
        p.Truth(0, (0.0, 0.0, 0.0, 0.0), 0.0), p.Truth(2**64 - 1, (-3.4e38, 3.4e38, 1e-45, -0.0), 12.0),
        p.Truth(1_000_000, (0.01, 3.1415927, -0.25, 7.5), -2.5),
    ]  # fmt: skip
    return [(m, s) for m in msgs for s in (0, 1, 0x0100, 0xFFFF)]


def test_corpus_covers_every_message_type() -> None:
    assert {type(m) for m, _ in corpus()} == set(p.MESSAGE_CLASSES) and len(corpus()) == 132


def test_single_corrupted_byte_is_detected_exhaustive() -> None:
    """Every position of every corpus frame (132 frames, all types) x every one of the 255 wrong values
    (incl. 0x00 = frame split, both parts checked): zero accepted. ~0.54 M corruptions, a few seconds."""
    checked = missed = 0
    for msg, seq in corpus():
        c, m = count_missed_single_byte_corruptions(p.encode(msg, seq)[:-1])
        checked, missed = checked + c, missed + m
    assert checked > 500_000
    assert missed == 0


@pytest.mark.slow
def test_single_corrupted_byte_is_detected_exhaustive_random_messages() -> None:
    """The same exhaustive sweep over 1100 random messages (100 per type, random field bytes incl. many
    zeros, random seq): ~4.6 M corruptions, zero accepted."""
    rng = random.Random(20260401)
    checked = missed = 0
    for cls in p.MESSAGE_CLASSES:
        for _ in range(100):
            size = p.payload_size(cls)
            payload = bytes(rng.choice((0, 0, 1, 0xFF, rng.randrange(256))) for _ in range(size))
            body = struct.pack("<BBH", p.PROTOCOL_VERSION, cls.TYPE, rng.randrange(1 << 16)) + payload
            frame = p.frame_body(body)[:-1]
            assert accepted(frame)
            c, m = count_missed_single_byte_corruptions(frame)
            checked, missed = checked + c, missed + m
    assert checked > 4_500_000
    assert missed == 0


def test_why_single_byte_corruption_is_always_detected() -> None:
    """The proof of docs/protocol.md, step by step, on every corpus frame:
    (1) a non-zero change in the COBS part fails the CRC (a single-byte error is a burst <= 8 bits);
    (2) a change in the trailer breaks its pattern, its length field or its CRC field;
    (3) a 0x00 split: the first part keeps the header, so its length is wrong for its type;
    (4) the second part keeps the trailer, whose length field (mod 32) cannot match a shorter frame."""
    for msg, seq in corpus():
        frame = p.encode(msg, seq)[:-1]
        n, type_len = len(frame), p.wire_size(type(msg)) - 1
        assert n == type_len and frame[2] == msg.TYPE  # COBS code, version, type: type is wire byte 2
        for pos in range(n):
            for value in (
                frame[pos] ^ 0x01 or 0x02,
                frame[pos] ^ 0x80 or 0x7F,
                0xFF if frame[pos] != 0xFF else 1,
            ):
                corrupted = frame[:pos] + bytes((value,)) + frame[pos + 1 :]
                expected = p.CrcError if pos < n - 3 else (p.FramingError, p.LengthError, p.CrcError)
                with pytest.raises(expected):
                    p.decode_frame(corrupted)
            first, second = frame[:pos], frame[pos + 1 :]
            assert len(first) < p.MIN_FRAME_LEN or len(first) != type_len  # (3)
            mod = p.LENGTH_MODULO
            assert len(second) < p.MIN_FRAME_LEN or len(second) % mod != n % mod  # (4)
            for part in (first, second):
                if part:
                    with pytest.raises(p.ProtocolError):
                        p.decode_frame(part)


def test_split_first_half_always_has_wrong_length() -> None:
    """Why the first half of a split is always rejected: it keeps the true header but not the length."""
    for msg, seq in corpus():
        frame = p.encode(msg, seq)[:-1]
        for cut in range(1, len(frame)):
            with pytest.raises((p.LengthError, p.FramingError, p.CrcError)):
                p.decode_frame(frame[:cut])


def test_lost_delimiter_and_single_byte_slips_are_detected() -> None:
    """Beyond the single-byte guarantee: two frames merged by a lost 0x00 (no frame length is a multiple of
    32), and any single byte deleted or inserted (the length field changes), are always rejected."""
    frames = [p.encode(m, s)[:-1] for m, s in corpus()[::3]]
    assert all(len(f) % p.LENGTH_MODULO for f in frames)
    for a, b in zip(frames, frames[1:] + frames[:1], strict=True):
        assert not accepted(a + b)
    for frame in frames:
        for pos in range(len(frame)):
            assert not accepted(frame[:pos] + frame[pos + 1 :])
            for value in (0x01, 0x55, 0x80, 0xFF):
                assert not accepted(frame[:pos] + bytes((value,)) + frame[pos:])


@st.composite
def chunked(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def feed_all(dec: p.FrameDecoder, chunks: list[bytes]) -> list[tuple[int, p.Message]]:
    out: list[tuple[int, p.Message]] = []
    for chunk in chunks:
        out += dec.feed(chunk)
    return out


@settings(max_examples=300, deadline=None)
@given(
    garbage=st.binary(max_size=200),
    msgs=st.lists(any_message, min_size=1, max_size=6),
    data=st.data(),
)
def test_stream_resyncs_after_garbage(garbage: bytes, msgs: list[p.Message], data: st.DataObject) -> None:
    expected = [(i, m) for i, m in enumerate(msgs)]
    stream = garbage + b"".join(p.encode(m, s) for s, m in expected)
    dec = p.FrameDecoder()
    out = feed_all(dec, data.draw(chunked(stream)))
    # the garbage can only spoil the first frame it is glued to; everything after it decodes exactly
    n = len(expected)
    assert out[len(out) - (n - 1) :] == expected[1:] if n > 1 else True
    assert out[: len(out) - (n - 1)] in ([], [expected[0]])
    if not garbage or garbage.endswith(b"\x00"):
        assert out == expected
    assert dec.frames_ok == len(out)
    assert dec.pending == 0


@settings(max_examples=300, deadline=None)
@given(msgs=st.lists(any_message, min_size=2, max_size=6), data=st.data(), flush=st.booleans())
def test_stream_resyncs_after_truncated_frame(
    msgs: list[p.Message], data: st.DataObject, flush: bool
) -> None:
    frames = [p.encode(m, s) for s, m in enumerate(msgs)]
    i = data.draw(st.integers(0, len(frames) - 1), label="truncated frame")
    cut = data.draw(st.integers(1, len(frames[i]) - 2), label="bytes kept")  # at least 1 frame byte lost
    frames[i] = frames[i][:cut] + (b"\x00" if flush else b"")  # e.g. device reset mid-frame (+ boot 0x00)
    dec = p.FrameDecoder()
    out = feed_all(dec, data.draw(chunked(b"".join(frames))))
    expected = [(s, m) for s, m in enumerate(msgs) if s != i]
    if flush:
        assert out == expected  # only the truncated frame is lost
    else:
        # without a delimiter the truncated frame also spoils the one it is glued to, never more
        assert out in (expected, [(s, m) for s, m in expected if s != i + 1])
    errors = dec.crc_errors + dec.framing_errors + dec.length_errors + dec.unknown_messages
    if flush or i < len(msgs) - 1:  # the spoiled frame was terminated, so it was seen and counted
        assert errors >= 1 and dec.bytes_discarded > 0
    else:
        assert dec.pending == cut


@settings(max_examples=200, deadline=None)
@given(noise=st.binary(max_size=300), data=st.data())
def test_chunking_does_not_change_the_result(noise: bytes, data: st.DataObject) -> None:
    """Feeding any split of the same bytes gives the same messages and the same counters."""
    stream = noise + p.encode(p.Command(1.0), 1) + noise[::-1] + p.encode(p.Heartbeat(5), 2)
    whole = p.FrameDecoder(max_frame_len=48)
    ref = whole.feed(stream)
    parts = p.FrameDecoder(max_frame_len=48)
    assert feed_all(parts, data.draw(chunked(stream))) == ref
    assert parts.stats() == whole.stats()


def test_random_garbage_never_crashes_decode_frame() -> None:
    """decode_frame raises only ProtocolError subclasses, whatever the input."""

    @settings(max_examples=500, deadline=None)
    @given(st.binary(min_size=0, max_size=80))
    def check(blob: bytes) -> None:
        try:
            p.decode_frame(blob)
        except p.ProtocolError:
            pass

    check()
    # and a valid-CRC frame with the wrong payload length for every type is a LengthError
    for cls in p.MESSAGE_CLASSES:
        type_id = int(cls.TYPE)
        for n in (0, 1, 40):
            if n == p.payload_size(cls):
                continue
            body = struct.pack("<BBH", p.PROTOCOL_VERSION, type_id, 0) + bytes(range(1, n + 1))
            frame = p.frame_body(body)[:-1]
            with pytest.raises(p.LengthError, match=cls.__name__):
                p.decode_frame(frame)
