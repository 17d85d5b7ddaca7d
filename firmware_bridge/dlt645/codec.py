"""DL/T 645-2007 framing, sans-I/O.

A frame on the wire::

    [FE FE FE FE]  68  A0 A1 A2 A3 A4 A5  68  C  L  DATA(L bytes)  CS  16

* the ``FE`` preamble (0-4 bytes) wakes up the receivers and is not part of the
  frame; masters usually send four;
* ``A0..A5`` is the meter address, 12 BCD digits sent least significant byte
  first (``AA`` bytes are wildcards, ``99``x6 is broadcast);
* ``C`` is the control byte (:class:`Control`), ``L`` the data length;
* every ``DATA`` byte is sent plus 0x33 (mod 256) and un-scrambled here, so a
  :class:`Frame` always holds the plain data;
* ``CS`` is the sum of every byte from the first ``68`` through ``DATA``, mod 256.

This module only turns values into bytes and bytes into values: no I/O, no
clock. :class:`FrameParser` is an incremental parser for a byte stream that may
carry noise, split and concatenated frames.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from firmware_bridge.dlt645.errors import ChecksumError, EncodeError, FrameError

START = 0x68
END = 0x16
PREAMBLE_BYTE = 0xFE
SCRAMBLE = 0x33
MAX_DATA = 255  # L is one byte; DL/T 645 itself limits reads to 200, writes to 50
HEADER_LEN = 10  # 68 A0..A5 68 C L
OVERHEAD = HEADER_LEN + 2  # + CS 16
MAX_FRAME = OVERHEAD + MAX_DATA

WILDCARD = "AAAAAAAAAAAA"
BROADCAST = "999999999999"


class Function(enum.IntEnum):
    """Function code, bits 4-0 of the control byte."""

    BROADCAST_TIME = 0x08
    READ = 0x11
    READ_FOLLOW_UP = 0x12
    READ_ADDRESS = 0x13
    WRITE = 0x14
    WRITE_ADDRESS = 0x15
    FREEZE = 0x16
    CHANGE_BAUD = 0x17
    CHANGE_PASSWORD = 0x18
    CLEAR_MAX_DEMAND = 0x19
    CLEAR_METER = 0x1A
    CLEAR_EVENTS = 0x1B
    CONTROL = 0x1C


# ---------------------------------------------------------------------------
# Addresses


def _address_byte(pair: str) -> int:
    if pair in ("AA", "aa"):
        return 0xAA
    if len(pair) == 2 and pair.isascii() and pair.isdigit():
        return int(pair[0]) << 4 | int(pair[1])
    raise EncodeError(f"address byte {pair!r} is neither two decimal digits nor AA")


def address_to_wire(address: str) -> bytes:
    """``"000102030425"`` -> ``25 04 03 02 01 00`` (least significant byte first).

    Each byte (pair of characters) is two decimal digits or ``AA`` (wildcard).
    """
    if not isinstance(address, str) or len(address) != 12:
        raise EncodeError(f"address must be 12 characters, got {address!r}")
    return bytes(_address_byte(address[i : i + 2]) for i in range(10, -1, -2))


def address_from_wire(raw: bytes) -> str:
    """Inverse of :func:`address_to_wire`; raises :class:`FrameError` on other bytes."""
    if len(raw) != 6:
        raise FrameError(f"address must be 6 bytes, got {len(raw)}")
    out = []
    for b in reversed(raw):
        if b == 0xAA:
            out.append("AA")
        elif (b >> 4) <= 9 and (b & 0x0F) <= 9:
            out.append(f"{b:02X}")
        else:
            raise FrameError(f"address byte {b:02X} is neither BCD nor AA")
    return "".join(out)


def address_matches(pattern: str, address: str) -> bool:
    """True if ``address`` is selected by ``pattern`` (``AA`` bytes match anything)."""
    return len(pattern) == len(address) == 12 and all(
        pattern[i : i + 2].upper() == "AA" or pattern[i : i + 2] == address[i : i + 2]
        for i in range(0, 12, 2)
    )


# ---------------------------------------------------------------------------
# Control byte


@dataclass(frozen=True, slots=True)
class Control:
    """The control byte: direction, error flag, more-follows flag and function.

    ``function`` is an :class:`int` (compare with :class:`Function` members) so
    that frames with function codes this module does not know still parse.
    """

    function: int
    reply: bool = False  # bit7: 1 = sent by the meter
    error: bool = False  # bit6: 1 = error reply
    more: bool = False  # bit5: 1 = more frames follow

    def __post_init__(self) -> None:
        if not 0 <= self.function <= 0x1F:
            raise EncodeError(f"function code must be 00..1F, got {self.function:#x}")

    def to_byte(self) -> int:
        return self.reply << 7 | self.error << 6 | self.more << 5 | self.function

    @classmethod
    def from_byte(cls, c: int) -> Control:
        return cls(
            function=c & 0x1F,
            reply=bool(c & 0x80),
            error=bool(c & 0x40),
            more=bool(c & 0x20),
        )

    def __str__(self) -> str:
        return f"{self.to_byte():02X}H"


# ---------------------------------------------------------------------------
# Frames


def scramble(data: bytes) -> bytes:
    return bytes((b + SCRAMBLE) & 0xFF for b in data)


def unscramble(data: bytes) -> bytes:
    return bytes((b - SCRAMBLE) & 0xFF for b in data)


def checksum(raw: bytes | bytearray) -> int:
    return sum(raw) & 0xFF


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame; ``data`` is the plain (un-scrambled) data field."""

    address: str
    control: Control
    data: bytes = b""

    def encode(self, preamble: int = 4) -> bytes:
        """The frame's wire bytes, with ``preamble`` (0-4) ``FE`` bytes in front."""
        if not 0 <= preamble <= 4:
            raise EncodeError(f"preamble must be 0..4 FE bytes, got {preamble}")
        if len(self.data) > MAX_DATA:
            raise EncodeError(f"data field is {len(self.data)} bytes, at most {MAX_DATA}")
        body = (
            bytes([START])
            + address_to_wire(self.address)
            + bytes([START, self.control.to_byte(), len(self.data)])
            + scramble(self.data)
        )
        return bytes([PREAMBLE_BYTE]) * preamble + body + bytes([checksum(body), END])


def _decode_at(buf: bytes | bytearray, i: int) -> Frame:
    """Decode the complete candidate frame starting at ``buf[i] == 0x68``.

    The caller guarantees the header is there and the buffer holds ``L + 12``
    bytes from ``i``.
    """
    length = buf[i + 9]
    end = i + HEADER_LEN + length
    cs = checksum(buf[i:end])
    if buf[end] != cs:
        raise ChecksumError(cs, buf[end])
    if buf[end + 1] != END:
        raise FrameError(f"end byte is {buf[end + 1]:02X}, expected 16")
    return Frame(
        address=address_from_wire(bytes(buf[i + 1 : i + 7])),
        control=Control.from_byte(buf[i + 8]),
        data=unscramble(bytes(buf[i + HEADER_LEN : end])),
    )


def decode_frame(raw: bytes) -> Frame:
    """Decode exactly one frame (0-4 ``FE`` bytes of preamble allowed, nothing else)."""
    i = 0
    while i < len(raw) and raw[i] == PREAMBLE_BYTE and i < 4:
        i += 1
    if len(raw) - i < OVERHEAD:
        raise FrameError(f"{len(raw) - i} bytes is too short for a frame (at least {OVERHEAD})")
    if raw[i] != START or raw[i + 7] != START:
        raise FrameError("frame does not start with 68 A0..A5 68")
    total = OVERHEAD + raw[i + 9]
    if len(raw) - i != total:
        raise FrameError(f"frame with L={raw[i + 9]} is {total} bytes, got {len(raw) - i}")
    return _decode_at(raw, i)


# ---------------------------------------------------------------------------
# Stream parser


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A complete candidate frame that failed its checks (reported, then skipped)."""

    error: FrameError
    raw: bytes


Event = Frame | BadFrame


class FrameParser:
    """Incremental frame parser for one byte stream (h11 style: bytes in, events out).

    ``feed(data)`` returns the frames completed by ``data`` in order, and a
    :class:`BadFrame` for every candidate (``68 .. 68 C L`` header plus ``L + 2``
    bytes) whose checksum, end byte or address is wrong. After a bad candidate
    the parser resynchronises one byte past its start, so a good frame hidden
    inside the bad one is still found.

    Noise (preamble, line garbage) is skipped and counted in ``noise_bytes``.
    The buffer never holds more than one maximal frame (267 bytes) between calls.

    While a candidate is incomplete, a complete good frame that starts later in
    the buffer wins: otherwise noise that looks like a long header
    (``68 ?? ?? ?? ?? ?? ?? 68 ?? FF``) would hide a reply that follows it until
    255 more bytes arrive, which on a half-duplex bus is never.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.noise_bytes = 0

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a possible frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget buffered bytes (e.g. stale input before a new request)."""
        self.noise_bytes += len(self._buf)
        self._buf.clear()

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        buf = self._buf
        while True:
            i = buf.find(START)
            if i < 0:
                self._skip(len(buf))
                break
            self._skip(i)
            if len(buf) < HEADER_LEN:
                break
            if buf[7] != START:
                self._skip(1)
                continue
            total = OVERHEAD + buf[9]
            if len(buf) < total:
                later = self._complete_frame_after_start()
                if later is None:
                    break
                j, frame = later
                self._skip(j)
                events.append(frame)
                del buf[: OVERHEAD + buf[9]]
                continue
            try:
                events.append(_decode_at(buf, 0))
            except FrameError as exc:
                events.append(BadFrame(exc, bytes(buf[:total])))
                del buf[:1]
                continue
            del buf[:total]
        return events

    def _skip(self, n: int) -> None:
        if n:
            self.noise_bytes += n
            del self._buf[:n]

    def _complete_frame_after_start(self) -> tuple[int, Frame] | None:
        buf = self._buf
        j = buf.find(START, 1)
        while j >= 0 and len(buf) - j >= OVERHEAD:
            if buf[j + 7] == START and len(buf) - j >= OVERHEAD + buf[j + 9]:
                try:
                    return j, _decode_at(buf, j)
                except FrameError:
                    pass
            j = buf.find(START, j + 1)
        return None
