"""Property tests (hypothesis) of the v1 serial protocol: round trips over the full value ranges of every
message type, single-byte corruption detection (incl. COBS frame splits), stream resynchronisation."""

from __future__ import annotations

import itertools
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


def assert_all_parts_rejected(corrupted: bytes, original: p.Message) -> None:
    """A corrupted frame (no delimiter) may contain 0x00 and so arrive as several frames: all must fail."""
    for part in corrupted.split(b"\x00"):
        if not part:
            continue  # the stream decoder ignores empty frames
        try:
            decoded = p.decode_frame(part)
        except p.ProtocolError:
            continue
        pytest.fail(f"corrupted frame {corrupted.hex()} (from {original}) decoded as {decoded}")


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
    ]  # fmt: skip
    return [(m, s) for m in msgs for s in (0, 1, 0x0100, 0xFFFF)]


def test_single_corrupted_byte_is_detected_exhaustive() -> None:
    """Every position of every corpus frame, every one of the 255 wrong values (incl. 0x00 = frame split)."""
    checked = 0
    for msg, seq in corpus():
        frame = p.encode(msg, seq)[:-1]
        for pos, value in itertools.product(range(len(frame)), range(256)):
            if value == frame[pos]:
                continue
            corrupted = bytearray(frame)
            corrupted[pos] = value
            assert_all_parts_rejected(bytes(corrupted), msg)
            checked += 1
    assert checked > 100_000


def test_split_first_half_always_has_wrong_length() -> None:
    """Why the first half of a split is always rejected: it keeps the true header but not the length."""
    for msg, seq in corpus():
        frame = p.encode(msg, seq)[:-1]
        for cut in range(1, len(frame)):
            with pytest.raises((p.LengthError, p.FramingError, p.CrcError)):
                p.decode_frame(frame[:cut])


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
            body = struct.pack("<BBH", 1, type_id, 0) + bytes(range(1, n + 1))
            from binascii import crc_hqx

            from cobs.cobs import encode as cobs_encode

            frame = cobs_encode(body + struct.pack("<H", crc_hqx(body, 0xFFFF)))
            with pytest.raises(p.LengthError, match=cls.__name__):
                p.decode_frame(frame)
