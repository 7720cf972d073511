"""rigfm serial protocol v2: message types, frame encoding/decoding and a resynchronising stream decoder.

Wire format (every byte is documented in ``docs/protocol.md``)::

    COBS( [version u8][type u8][seq u16 LE][payload ...] ) [trailer 3 bytes] 0x00

The trailer carries the CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no xor-out) of the
COBS-encoded bytes and the frame length modulo 32, as 3 bytes of 7 data bits each with the high bit set
(zero-free). Every single-byte corruption of a frame is detected (see the proof in docs/protocol.md). All
multi-byte fields are little-endian, fixed layout (no padding). Pure Python (struct, binascii, cobs); no
torch, no pyserial. The C reference lives in ``hardware/firmware``.
"""

from __future__ import annotations

import enum
import math
import struct
from binascii import crc_hqx
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from cobs.cobs import DecodeError as _CobsDecodeError
from cobs.cobs import decode as _cobs_decode
from cobs.cobs import encode as _cobs_encode

PROTOCOL_VERSION = 2
# v2.1 (the version byte stays 2): adds TRUTH_REQUEST / TRUTH, opt-in (a device sends TRUTH only after the
# host asked for it, so a v2.0 host never sees one); firmware without a truth source NACKs UNKNOWN_TYPE.
PROTOCOL_MINOR = 1
DELIMITER = b"\x00"
HEADER_SIZE = 4
CRC_SIZE = 2  # the CRC-16 itself (bytes of information); on the wire it travels inside the trailer
TRAILER_SIZE = 3  # zero-free encoding of CRC-16 (16 bits) + frame length mod 32 (5 bits), 7 bits per byte
COBS_OVERHEAD = 1  # every frame is < 254 bytes: COBS adds exactly one code byte
LENGTH_MODULO = 32  # the trailer's length field is the frame length (without the 0x00) mod 32
CRC_INIT = 0xFFFF
SEQ_MODULO = 1 << 16
# Largest encoded frame (without the delimiter) the stream decoder accepts; every v2 frame is far below.
MAX_FRAME_LEN = 64
# Shortest valid frame without the delimiter (an empty payload): code byte + header + trailer.
MIN_FRAME_LEN = COBS_OVERHEAD + HEADER_SIZE + TRAILER_SIZE


# --------------------------------------------------------------------------------------------- enums
class MsgType(enum.IntEnum):
    """Message type byte. 0x01-0x7F: host -> device (HEARTBEAT both ways); 0x80-0xFF: device -> host."""

    HELLO = 0x01
    COMMAND = 0x02
    ESTOP = 0x03
    CLEAR_ESTOP = 0x04
    CONFIG = 0x05
    HEARTBEAT = 0x06
    TRUTH_REQUEST = 0x07
    HELLO_REPLY = 0x81
    STATE = 0x82
    FAULT = 0x83
    ACK = 0x84
    NACK = 0x85
    TRUTH = 0x86


class RigKind(enum.IntEnum):
    """Which rig the firmware drives (HELLO_REPLY.rig_kind)."""

    CARTPOLE = 1
    FURUTA = 2


class StatusFlags(enum.IntFlag):
    """STATE.flags (u16 bitfield)."""

    NONE = 0
    ESTOP_LATCHED = 1 << 0  # e-stop latched (host ESTOP or e-stop input); motor 0 V until CLEAR_ESTOP
    WATCHDOG_TRIPPED = 1 << 1  # no COMMAND for watchdog_ms: motor 0 V until the next COMMAND
    LIMIT_HIT = 1 << 2  # channel-0 position outside [pos_min, pos_max]: outward voltage is zeroed
    FAULT = 1 << 3  # a latching fault (encoder, overcurrent, internal): motor 0 V until CLEAR_ESTOP
    MOTOR_ENABLED = 1 << 4  # motor driver enabled (applied voltage may be non-zero)
    CONNECTED = 1 << 5  # HELLO handshake done
    VOLTAGE_CLAMPED = 1 << 6  # the last COMMAND exceeded the voltage limit and was clamped
    LOOP_OVERRUN = 1 << 7  # the control loop missed a deadline since the previous STATE
    RX_ERROR = 1 << 8  # a corrupted / unknown frame was discarded since the previous STATE
    CONFIGURED = 1 << 9  # a CONFIG was accepted since the last HELLO
    ESTOP_INPUT = 1 << 10  # the hardware e-stop input is active right now


class FaultCode(enum.IntEnum):
    """FAULT.code (u16); the meaning of FAULT.detail (i32) is given per code."""

    NONE = 0
    WATCHDOG = 1  # detail: ms since the last COMMAND
    ESTOP = 2  # detail: 0 = host ESTOP, 1 = e-stop input
    LIMIT = 3  # detail: channel-0 counts when the limit was hit
    ENCODER = 4  # detail: channel with an illegal quadrature transition (latching)
    OVERCURRENT = 5  # detail: current in mA (latching)
    LOOP_OVERRUN = 6  # detail: lateness in us
    BAD_COMMAND = 7  # detail: 0 = non-finite voltage
    RX_OVERFLOW = 8  # detail: length of the discarded over-long frame
    INTERNAL = 9  # detail: implementation specific (latching)


class NackReason(enum.IntEnum):
    """NACK.reason (u8)."""

    NOT_CONNECTED = 1  # no HELLO yet
    VERSION_MISMATCH = 2
    UNKNOWN_TYPE = 3  # unknown type or a device->host type sent to the device
    BAD_LENGTH = 4
    NOT_FINITE = 5  # a float field is NaN or infinite
    VOLTAGE_LIMIT_RANGE = 6  # CONFIG.voltage_limit not in (0, max_voltage]
    WATCHDOG_RANGE = 7  # CONFIG.watchdog_ms not in [WATCHDOG_MS_MIN, WATCHDOG_MS_MAX]
    POSITION_LIMITS = 8  # CONFIG.pos_min >= pos_max
    DIVIDER_RANGE = 9  # CONFIG.state_divider not in [1, 1000]
    ESTOP_INPUT_ACTIVE = 10  # CLEAR_ESTOP refused while the e-stop input is active


WATCHDOG_MS_MIN = 5
WATCHDOG_MS_MAX = 1000
STATE_DIVIDER_MAX = 1000
INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


# ---------------------------------------------------------------------------------------- exceptions
class ProtocolError(Exception):
    """Base class of all protocol errors."""


class FramingError(ProtocolError):
    """The frame is not valid COBS, is empty, is over-long, or its trailer is not a valid pattern."""


class CrcError(ProtocolError):
    """The CRC-16 (over the COBS bytes) does not match the trailer."""


class VersionError(ProtocolError):
    """The frame's protocol version is not PROTOCOL_VERSION."""


class UnknownMessage(ProtocolError):
    """The message type byte is not a known MsgType."""


class LengthError(ProtocolError):
    """The frame is too short, its length disagrees with its trailer, or does not match its message type."""


class EncodeError(ProtocolError, ValueError):
    """A message field cannot be represented on the wire (names the message and field)."""


# ------------------------------------------------------------------------------------------ messages
@dataclass(frozen=True, slots=True)
class Hello:
    """Host -> device: start a session; the device answers HELLO_REPLY and starts streaming STATE."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO


@dataclass(frozen=True, slots=True)
class HelloReply:
    """Device -> host: identity and capabilities."""

    protocol_version: int
    rig_kind: RigKind | int
    firmware_version: tuple[int, int, int]  # (major, minor, patch)
    counts_per_rev: tuple[int, int]  # per channel (0: cart/arm, 1: pendulum)
    loop_rate_hz: int
    max_voltage: float  # V, hardware maximum (and the default voltage limit)
    watchdog_ms: int  # current watchdog timeout
    uid: int  # device serial number / unique id (u64)
    TYPE: ClassVar[MsgType] = MsgType.HELLO_REPLY


@dataclass(frozen=True, slots=True)
class State:
    """Device -> host: one sample of the fixed-rate loop."""

    timestamp_us: int  # device monotonic clock at the sample, u64 us
    counts: tuple[int, int]  # encoder counts (i32) per channel
    current_ma: float  # measured motor current in mA (NaN if the rig has no sensor)
    applied_voltage: float  # V actually applied this sample (after watchdog, e-stop, limits, clamp)
    flags: StatusFlags
    TYPE: ClassVar[MsgType] = MsgType.STATE


@dataclass(frozen=True, slots=True)
class Command:
    """Host -> device: motor voltage set-point (V); feeds the watchdog."""

    voltage: float
    TYPE: ClassVar[MsgType] = MsgType.COMMAND


@dataclass(frozen=True, slots=True)
class Estop:
    """Host -> device: latch the e-stop (motor 0 V until CLEAR_ESTOP). Answered by ACK."""

    TYPE: ClassVar[MsgType] = MsgType.ESTOP


@dataclass(frozen=True, slots=True)
class ClearEstop:
    """Host -> device: clear the e-stop latch and latched faults (motor stays 0 V until a COMMAND)."""

    TYPE: ClassVar[MsgType] = MsgType.CLEAR_ESTOP


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Both ways: the device echoes a host HEARTBEAT with the same token (round-trip measurement)."""

    token: int  # u32
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT


@dataclass(frozen=True, slots=True)
class Fault:
    """Device -> host: a fault event (sent once on its rising edge)."""

    code: FaultCode | int
    detail: int  # i32, meaning per FaultCode
    TYPE: ClassVar[MsgType] = MsgType.FAULT


@dataclass(frozen=True, slots=True)
class Config:
    """Host -> device: limits. Answered by ACK, or NACK with a NackReason (nothing applied)."""

    voltage_limit: float  # V, (0, max_voltage]
    watchdog_ms: int  # [WATCHDOG_MS_MIN, WATCHDOG_MS_MAX]
    pos_min: int = INT32_MIN  # channel-0 counts; INT32_MIN/INT32_MAX = no limit
    pos_max: int = INT32_MAX
    state_divider: int = 1  # STATE every N loop ticks, [1, STATE_DIVIDER_MAX]
    TYPE: ClassVar[MsgType] = MsgType.CONFIG


@dataclass(frozen=True, slots=True)
class Ack:
    """Device -> host: the frame with seq ``acked_seq`` and type ``acked_type`` was accepted."""

    acked_seq: int
    acked_type: MsgType | int
    TYPE: ClassVar[MsgType] = MsgType.ACK


@dataclass(frozen=True, slots=True)
class Nack:
    """Device -> host: the frame with seq ``acked_seq`` was rejected for ``reason``."""

    acked_seq: int
    acked_type: MsgType | int
    reason: NackReason | int
    TYPE: ClassVar[MsgType] = MsgType.NACK


@dataclass(frozen=True, slots=True)
class TruthRequest:
    """Host -> device (v2.1): ``enable`` 1 = send a TRUTH after every STATE, 0 = stop. ACKed by a device
    that knows its true state (the virtual rig); real firmware answers NACK(UNKNOWN_TYPE). Reset by HELLO."""

    enable: int  # u8
    TYPE: ClassVar[MsgType] = MsgType.TRUTH_REQUEST


@dataclass(frozen=True, slots=True)
class Truth:
    """Device -> host (v2.1, virtual rig only): the plant's true continuous state at the STATE sample with
    the same ``timestamp_us``, and the voltage acting on the plant then (after the actuation delay)."""

    timestamp_us: int  # u64, equals the STATE frame's timestamp_us it follows
    state: tuple[float, float, float, float]  # SI: [q0, q1, q0_dot, q1_dot] (f32)
    voltage: float  # V acting on the motor at that instant (f32)
    TYPE: ClassVar[MsgType] = MsgType.TRUTH


Message = (Hello | HelloReply | State | Command | Estop | ClearEstop | Heartbeat | Fault | Config | Ack | Nack
           | TruthRequest | Truth)
HOST_TO_DEVICE = frozenset({Hello, Command, Estop, ClearEstop, Config, Heartbeat, TruthRequest})
DEVICE_TO_HOST = frozenset({HelloReply, State, Fault, Ack, Nack, Heartbeat, Truth})


# ----------------------------------------------------------------------------------- wire layouts
def _enum_or_int(enum_cls: type[enum.IntEnum], value: int) -> Any:
    """Known values become the enum member, unknown ones stay plain ints (forward compatibility)."""
    try:
        return enum_cls(value)
    except ValueError:
        return value


_FLAG_CACHE: dict[int, StatusFlags] = {}


def _flags(value: int) -> StatusFlags:
    flag = _FLAG_CACHE.get(value)
    if flag is None:
        flag = StatusFlags(value)
        if len(_FLAG_CACHE) < 4096:
            _FLAG_CACHE[value] = flag
    return flag


class _Layout:
    """Packing of one message type: a struct for header+payload plus field flattening."""

    __slots__ = ("cls", "type_id", "body", "payload_size", "field_codes", "flatten", "build")

    def __init__(self, cls: type, payload_fmt: str, field_codes: list[tuple[str, str]], flatten, build):
        self.cls = cls
        self.type_id = int(cls.TYPE)
        self.body = struct.Struct("<BBH" + payload_fmt)
        self.payload_size = self.body.size - HEADER_SIZE
        self.field_codes = field_codes  # (field name, struct codes) for error messages
        self.flatten = flatten
        self.build = build


_LAYOUTS: list[_Layout] = [
    _Layout(Hello, "", [], lambda m: (), lambda f: Hello()),
    _Layout(
        HelloReply,
        "BBBBBIIHfHQ",
        [
            ("protocol_version", "B"),
            ("rig_kind", "B"),
            ("firmware_version", "BBB"),
            ("counts_per_rev", "II"),
            ("loop_rate_hz", "H"),
            ("max_voltage", "f"),
            ("watchdog_ms", "H"),
            ("uid", "Q"),
        ],
        lambda m: (
            m.protocol_version,
            int(m.rig_kind),
            *m.firmware_version,
            *m.counts_per_rev,
            m.loop_rate_hz,
            m.max_voltage,
            m.watchdog_ms,
            m.uid,
        ),
        lambda f: HelloReply(
            f[0], _enum_or_int(RigKind, f[1]), (f[2], f[3], f[4]), (f[5], f[6]), f[7], f[8], f[9], f[10]
        ),
    ),
    _Layout(
        State,
        "QiiffH",
        [
            ("timestamp_us", "Q"),
            ("counts", "ii"),
            ("current_ma", "f"),
            ("applied_voltage", "f"),
            ("flags", "H"),
        ],
        lambda m: (m.timestamp_us, *m.counts, m.current_ma, m.applied_voltage, int(m.flags)),
        lambda f: State(f[0], (f[1], f[2]), f[3], f[4], _flags(f[5])),
    ),
    _Layout(Command, "f", [("voltage", "f")], lambda m: (m.voltage,), lambda f: Command(f[0])),
    _Layout(Estop, "", [], lambda m: (), lambda f: Estop()),
    _Layout(ClearEstop, "", [], lambda m: (), lambda f: ClearEstop()),
    _Layout(Heartbeat, "I", [("token", "I")], lambda m: (m.token,), lambda f: Heartbeat(f[0])),
    _Layout(
        Fault,
        "Hi",
        [("code", "H"), ("detail", "i")],
        lambda m: (int(m.code), m.detail),
        lambda f: Fault(_enum_or_int(FaultCode, f[0]), f[1]),
    ),
    _Layout(
        Config,
        "fHiiH",
        [
            ("voltage_limit", "f"),
            ("watchdog_ms", "H"),
            ("pos_min", "i"),
            ("pos_max", "i"),
            ("state_divider", "H"),
        ],
        lambda m: (m.voltage_limit, m.watchdog_ms, m.pos_min, m.pos_max, m.state_divider),
        lambda f: Config(f[0], f[1], f[2], f[3], f[4]),
    ),
    _Layout(
        Ack,
        "HB",
        [("acked_seq", "H"), ("acked_type", "B")],
        lambda m: (m.acked_seq, int(m.acked_type)),
        lambda f: Ack(f[0], _enum_or_int(MsgType, f[1])),
    ),
    _Layout(
        Nack,
        "HBB",
        [("acked_seq", "H"), ("acked_type", "B"), ("reason", "B")],
        lambda m: (m.acked_seq, int(m.acked_type), int(m.reason)),
        lambda f: Nack(f[0], _enum_or_int(MsgType, f[1]), _enum_or_int(NackReason, f[2])),
    ),
    _Layout(TruthRequest, "B", [("enable", "B")], lambda m: (m.enable,), lambda f: TruthRequest(f[0])),
    _Layout(
        Truth,
        "Qfffff",
        [("timestamp_us", "Q"), ("state", "ffff"), ("voltage", "f")],
        lambda m: (m.timestamp_us, *m.state, m.voltage),
        lambda f: Truth(f[0], (f[1], f[2], f[3], f[4]), f[5]),
    ),
]
_BY_CLASS: dict[type, _Layout] = {lay.cls: lay for lay in _LAYOUTS}
_BY_ID: dict[int, _Layout] = {lay.type_id: lay for lay in _LAYOUTS}
_HEADER = struct.Struct("<BBH")
_CRC = struct.Struct("<H")
MESSAGE_CLASSES: tuple[type, ...] = tuple(lay.cls for lay in _LAYOUTS)
# Exact frame length (without the 0x00) per message type id: COBS code byte + header + payload + trailer.
_FRAME_LEN: dict[int, int] = {lay.type_id: COBS_OVERHEAD + lay.body.size + TRAILER_SIZE for lay in _LAYOUTS}
# The split proof of docs/protocol.md needs every frame shorter than MIN_FRAME_LEN + LENGTH_MODULO.
if not max(_FRAME_LEN.values()) < min(MIN_FRAME_LEN + LENGTH_MODULO, MAX_FRAME_LEN + 1):
    raise RuntimeError("a message type is too long for the v2 trailer's length field")
# ... and no frame length may be a multiple of 32 (two frames merged by a lost delimiter stay detected)
if any(n % LENGTH_MODULO == 0 for n in _FRAME_LEN.values()):
    raise RuntimeError("a message type's frame length is a multiple of the trailer's length modulus")


def payload_size(msg_cls: type) -> int:
    """Payload bytes of a message class (excluding header and trailer)."""
    return _BY_CLASS[msg_cls].payload_size


def wire_size(msg_cls: type) -> int:
    """Bytes on the wire for one frame of this class: COBS code + header + payload + trailer (3) + 0x00."""
    return _FRAME_LEN[_BY_CLASS[msg_cls].type_id] + 1


def trailer(cobs_bytes: bytes) -> bytes:
    """The 3-byte zero-free trailer of a frame whose COBS part is ``cobs_bytes``.

    21 data bits ``t = crc16(cobs_bytes) << 5 | (len(cobs_bytes) + 3) % 32``, sent as
    ``0x80 | t[20:14], 0x80 | t[13:7], 0x80 | t[6:0]`` (every byte has its high bit set)."""
    t = (crc_hqx(cobs_bytes, CRC_INIT) << 5) | ((len(cobs_bytes) + TRAILER_SIZE) & (LENGTH_MODULO - 1))
    return bytes((0x80 | (t >> 14), 0x80 | ((t >> 7) & 0x7F), 0x80 | (t & 0x7F)))


def frame_body(body: bytes) -> bytes:
    """Frame raw header+payload bytes (no field checks): COBS + trailer + 0x00.

    For tests and tools that need frames ``encode`` refuses to build (another version, wrong length)."""
    c = _cobs_encode(body)
    return c + trailer(c) + DELIMITER


def reencode_version(frame: bytes, version: int) -> bytes:
    """Re-frame a complete frame (incl. 0x00) with another protocol version byte (test mode: a device of
    another version). ``version == 1`` gives a genuine v1-format frame (CRC inside the COBS data)."""
    inner = bytearray(_cobs_decode(frame[: -1 - TRAILER_SIZE]))
    inner[0] = version & 0xFF
    if version == 1:
        return _cobs_encode(bytes(inner) + _CRC.pack(crc_hqx(inner, CRC_INIT))) + DELIMITER
    return frame_body(bytes(inner))


def _explain_encode_failure(msg: Any, layout: _Layout, seq: Any, exc: Exception) -> EncodeError:
    """Slow path: find which field does not fit its wire type."""
    name = type(msg).__name__
    if not isinstance(seq, int) or not 0 <= seq < SEQ_MODULO:
        return EncodeError(f"{name}: seq must be an int in [0, 65535], got {seq!r}")
    for fname, codes in layout.field_codes:
        value = getattr(msg, fname)
        parts = value if len(codes) > 1 else (value,)
        try:
            if len(parts) != len(codes):
                raise ValueError(f"expected {len(codes)} values, got {len(parts)}")
            struct.pack("<" + codes, *(int(p) if isinstance(p, enum.Enum) else p for p in parts))
        except (struct.error, OverflowError, TypeError, ValueError) as field_exc:
            return EncodeError(f"{name}.{fname}={value!r} does not fit wire type '{codes}': {field_exc}")
    return EncodeError(f"cannot encode {name}: {exc}")


def encode(msg: Message, seq: int) -> bytes:
    """Encode ``msg`` with sequence number ``seq`` (0..65535): a complete frame incl. the trailing 0x00."""
    layout = _BY_CLASS.get(type(msg))
    if layout is None:
        raise EncodeError(f"not a protocol message: {type(msg).__name__}")
    try:
        body = layout.body.pack(PROTOCOL_VERSION, layout.type_id, seq, *layout.flatten(msg))
    except (struct.error, OverflowError, TypeError, ValueError, IndexError) as exc:
        raise _explain_encode_failure(msg, layout, seq, exc) from None
    c = _cobs_encode(body)
    t = (crc_hqx(c, CRC_INIT) << 5) | ((len(c) + TRAILER_SIZE) & (LENGTH_MODULO - 1))
    return c + bytes((0x80 | (t >> 14), 0x80 | ((t >> 7) & 0x7F), 0x80 | (t & 0x7F), 0))


def _legacy_or(frame: bytes, exc: ProtocolError) -> ProtocolError:
    """A frame that fails the v2 checks but is a valid v1-format frame (old firmware) becomes a VersionError,
    so the driver can say "protocol mismatch" instead of "no reply"; otherwise ``exc``. Never accepts."""
    try:
        inner = _cobs_decode(frame)
    except _CobsDecodeError:
        return exc
    n = len(inner)
    if n >= HEADER_SIZE + CRC_SIZE and inner[0] != PROTOCOL_VERSION:
        if crc_hqx(inner[: n - CRC_SIZE], CRC_INIT) == _CRC.unpack_from(inner, n - CRC_SIZE)[0]:
            return VersionError(
                f"protocol version {inner[0]} (v1 frame format: CRC inside the COBS data), "
                f"expected {PROTOCOL_VERSION}"
            )
    return exc


def decode_frame(frame: bytes) -> tuple[int, Message]:
    """Decode one frame (bytes without the 0x00 delimiter) into ``(seq, message)``.

    Checks, in order: length >= MIN_FRAME_LEN, trailer pattern, trailer length field, CRC over the COBS
    bytes, COBS, version, type, exact length for the type. Raises FramingError, CrcError, VersionError,
    UnknownMessage or LengthError (all ProtocolError)."""
    n = len(frame)
    if n < MIN_FRAME_LEN:
        if not n:
            raise FramingError("empty frame")
        raise _legacy_or(frame, LengthError(f"frame too short: {n} bytes, need >= {MIN_FRAME_LEN}"))
    b0, b1, b2 = frame[n - 3], frame[n - 2], frame[n - 1]
    if not b0 & b1 & b2 & 0x80:
        bad = FramingError(f"invalid trailer {bytes((b0, b1, b2)).hex(' ')} (a high bit is clear)")
        raise _legacy_or(frame, bad)
    t = ((b0 & 0x7F) << 14) | ((b1 & 0x7F) << 7) | (b2 & 0x7F)
    if (t ^ n) & (LENGTH_MODULO - 1):
        bad = LengthError(f"frame of {n} bytes, trailer says {t & (LENGTH_MODULO - 1)} mod {LENGTH_MODULO}")
        raise _legacy_or(frame, bad)
    cobs_part = frame[: n - TRAILER_SIZE]
    crc = crc_hqx(cobs_part, CRC_INIT)
    if crc != t >> 5:
        raise _legacy_or(frame, CrcError(f"CRC mismatch: computed 0x{crc:04X}, received 0x{t >> 5:04X}"))
    try:
        inner = _cobs_decode(cobs_part)
    except _CobsDecodeError as exc:
        raise FramingError(f"invalid COBS ({len(cobs_part)} bytes): {exc}") from None
    if len(inner) < HEADER_SIZE:
        raise LengthError(f"frame too short: {len(inner)} bytes decoded, need >= {HEADER_SIZE}")
    version, type_id, seq = _HEADER.unpack_from(inner)
    if version != PROTOCOL_VERSION:
        raise VersionError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    layout = _BY_ID.get(type_id)
    if layout is None:
        raise UnknownMessage(f"unknown message type 0x{type_id:02X}")
    if len(inner) != layout.body.size or n != _FRAME_LEN[type_id]:
        got = len(inner) - HEADER_SIZE
        raise LengthError(
            f"{layout.cls.__name__}: payload {got} bytes in a {n}-byte frame, expected "
            f"{layout.payload_size} bytes in {_FRAME_LEN[type_id]}"
        )
    values = layout.body.unpack_from(inner)
    return seq, layout.build(values[3:])


def next_seq(seq: int) -> int:
    """The sequence number after ``seq`` (wraps at 65536)."""
    return (seq + 1) & 0xFFFF


def seq_gap(prev: int, cur: int) -> int:
    """Frames missing between two consecutive received sequence numbers (0 when ``cur == prev + 1``).

    Modular: a duplicate/out-of-order frame shows up as a large gap (65535)."""
    return (cur - prev - 1) & 0xFFFF


def is_finite_f32(value: float) -> bool:
    """Whether ``value`` is finite and representable as an IEEE-754 float32."""
    return math.isfinite(value) and abs(value) <= 3.4028234663852886e38


# -------------------------------------------------------------------------------------- stream decoder
_ERROR_COUNTERS: dict[type, str] = {
    CrcError: "crc_errors",
    FramingError: "framing_errors",
    VersionError: "version_errors",
    UnknownMessage: "unknown_messages",
    LengthError: "length_errors",
}


class FrameDecoder:
    """Incremental decoder for a byte stream: splits on 0x00, decodes frames, resynchronises after garbage.

    Never raises on bad input: bad frames are dropped and counted. Bytes of an over-long frame
    (> ``max_frame_len``) are discarded up to the next delimiter."""

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        if max_frame_len < MIN_FRAME_LEN:
            raise ValueError(f"max_frame_len={max_frame_len} is too small for any frame")
        self.max_frame_len = max_frame_len
        self._buf = bytearray()
        self._discarding = False  # inside an over-long frame: drop until the next delimiter
        self.bytes_received = 0
        self.frames_ok = 0
        self.crc_errors = 0
        self.framing_errors = 0
        self.version_errors = 0
        self.unknown_messages = 0
        self.length_errors = 0
        self.oversize_frames = 0
        self.bytes_discarded = 0
        self.last_error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[tuple[int, Message]]:
        """Consume ``data``; return the ``(seq, message)`` pairs of all frames completed by it."""
        self.bytes_received += len(data)
        out: list[tuple[int, Message]] = []
        if not data:
            return out
        chunks = data.split(DELIMITER)
        last = chunks.pop()  # bytes after the final delimiter: an incomplete frame
        for chunk in chunks:
            if self._buf:
                self._buf += chunk
                frame = bytes(self._buf)
                self._buf.clear()
            else:
                frame = chunk
            if self._discarding:
                self._discarding = False
                self.bytes_discarded += len(frame) + 1
                continue
            if not frame:
                continue  # empty frame between two delimiters: idle/flush, not an error
            if len(frame) > self.max_frame_len:
                self.oversize_frames += 1
                self.framing_errors += 1
                self.bytes_discarded += len(frame) + 1
                self.last_error = FramingError(f"frame of {len(frame)} bytes exceeds {self.max_frame_len}")
                continue
            try:
                out.append(decode_frame(frame))
            except ProtocolError as exc:
                setattr(self, _ERROR_COUNTERS[type(exc)], getattr(self, _ERROR_COUNTERS[type(exc)]) + 1)
                self.bytes_discarded += len(frame) + 1
                self.last_error = exc
            else:
                self.frames_ok += 1
        if last:
            if self._discarding:
                self.bytes_discarded += len(last)
            else:
                self._buf += last
                if len(self._buf) > self.max_frame_len:
                    self.oversize_frames += 1
                    self.framing_errors += 1
                    self.bytes_discarded += len(self._buf)
                    self.last_error = FramingError(f"frame exceeds {self.max_frame_len} bytes")
                    self._buf.clear()
                    self._discarding = True
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered for the frame in progress."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop any partial frame (e.g. after a reconnect); counters are kept."""
        self.bytes_discarded += len(self._buf)
        self._buf.clear()
        self._discarding = False

    def stats(self) -> dict[str, int]:
        """All counters as a dict."""
        return {
            "bytes_received": self.bytes_received,
            "frames_ok": self.frames_ok,
            "crc_errors": self.crc_errors,
            "framing_errors": self.framing_errors,
            "version_errors": self.version_errors,
            "unknown_messages": self.unknown_messages,
            "length_errors": self.length_errors,
            "oversize_frames": self.oversize_frames,
            "bytes_discarded": self.bytes_discarded,
        }


def message_fields(msg: Message) -> dict[str, Any]:
    """The message's fields as a plain dict (enums as ints), e.g. for logging."""
    out: dict[str, Any] = {}
    for f in fields(msg):
        v = getattr(msg, f.name)
        out[f.name] = int(v) if isinstance(v, enum.Enum) else v
    return out
