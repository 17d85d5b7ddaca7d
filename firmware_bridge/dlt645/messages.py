"""DL/T 645-2007 requests and replies on top of :mod:`~firmware_bridge.dlt645.codec`.

Builders return :class:`~firmware_bridge.dlt645.codec.Frame` values; the
``parse_*`` functions take the reply frame and return what it says, or raise
:class:`Refused` (an error reply, with its named error bits) or
:class:`~firmware_bridge.dlt645.errors.ProtocolError` (a valid frame that does
not answer the request). Pure functions: times are passed in.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Protocol

from firmware_bridge.dlt645.codec import BROADCAST, WILDCARD, Control, Frame, Function
from firmware_bridge.dlt645.dataids import bcd_digits, di_from_wire, di_to_wire, digits_bcd
from firmware_bridge.dlt645.errors import DataError, Dlt645Error, EncodeError, ProtocolError

# ---------------------------------------------------------------------------
# Error replies


class ErrorFlags(enum.IntFlag):
    """The error byte of an error reply (D1H, D2H, D4H, ...)."""

    OTHER = 0x01
    NO_DATA = 0x02  # no data for the requested identifier
    UNAUTHORISED = 0x04  # password wrong or level not authorised
    BAUD_UNCHANGEABLE = 0x08
    YEAR_ZONES_EXCEEDED = 0x10
    DAY_PERIODS_EXCEEDED = 0x20
    RATES_EXCEEDED = 0x40
    RESERVED = 0x80


_ERROR_TEXT = {
    ErrorFlags.OTHER: "other error",
    ErrorFlags.NO_DATA: "no data requested",
    ErrorFlags.UNAUTHORISED: "password error / unauthorised",
    ErrorFlags.BAUD_UNCHANGEABLE: "baud rate cannot change",
    ErrorFlags.YEAR_ZONES_EXCEEDED: "year zones exceeded",
    ErrorFlags.DAY_PERIODS_EXCEEDED: "day periods exceeded",
    ErrorFlags.RATES_EXCEEDED: "rates exceeded",
    ErrorFlags.RESERVED: "reserved bit 7",
}
# A 1CH (control) failure reply uses the same byte. DL/T 645-2007 only fixes the
# meaning of bits 0 and 2 for it; the other bits are meter- and utility-specific
# and are reported by number rather than given a meaning they may not have.
_CONTROL_ERROR_TEXT = {
    ErrorFlags.OTHER: "other error (e.g. command refused in the meter's state, deadline passed)",
    ErrorFlags.UNAUTHORISED: "password error / unauthorised",
}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    function: int
    flags: ErrorFlags

    def describe(self) -> str:
        texts = _CONTROL_ERROR_TEXT if self.function == Function.CONTROL else _ERROR_TEXT
        parts = []
        for bit in range(8):
            flag = ErrorFlags(1 << bit)
            if self.flags & flag:
                parts.append(texts.get(flag, f"error bit {bit}"))
        return ", ".join(parts) or "error reply without error bits"


_CONTROL_HINTS = {
    ErrorFlags.UNAUTHORISED: (
        "the meter did not accept the password or operator code (meter.password is the level"
        " byte and 3 password bytes in wire order), or it takes only encrypted (level 98) control"
    ),
    ErrorFlags.OTHER: (
        "the meter refuses it in its present state: power-protect (保电) on, the command's"
        " validity deadline already past by the meter's own clock, a close while the meter's"
        " own credit is used up, or a command this meter does not support"
    ),
}


def control_refusal_hint(reply: ErrorReply) -> str:
    """Why a meter may have refused a 1CH command with this error byte."""
    hints = [h for flag, h in _CONTROL_HINTS.items() if reply.flags & flag]
    if not hints:
        return "the meter gives no reason this gateway knows (see its manual for the error bits)"
    return "; or ".join(hints)


class Refused(Dlt645Error):
    """The meter sent an error reply."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(
            f"error reply to {reply.function:02X}H: {reply.describe()} "
            f"(error byte {int(reply.flags):02X})"
        )
        self.reply = reply


def error_reply(frame: Frame) -> ErrorReply | None:
    """The error carried by ``frame`` if it is an error reply, else ``None``."""
    if not (frame.control.reply and frame.control.error):
        return None
    flags = ErrorFlags(frame.data[0]) if frame.data else ErrorFlags(0)
    return ErrorReply(frame.control.function, flags)


def _check_reply(frame: Frame, function: int) -> None:
    if not frame.control.reply:
        raise ProtocolError(f"frame {frame.control} is a request, not a reply")
    if frame.control.function != function:
        raise ProtocolError(
            f"reply function {frame.control.function:02X}H does not answer {function:02X}H"
        )
    err = error_reply(frame)
    if err is not None:
        raise Refused(err)


# ---------------------------------------------------------------------------
# Read (11H) and read follow-up (12H)


def read_request(address: str, di: int) -> Frame:
    return Frame(address, Control(Function.READ), di_to_wire(di))


def read_follow_up_request(address: str, di: int, seq: int) -> Frame:
    if not 0 <= seq <= 0xFF:
        raise EncodeError(f"follow-up sequence number must be 0..255, got {seq}")
    return Frame(address, Control(Function.READ_FOLLOW_UP), di_to_wire(di) + bytes([seq]))


@dataclass(frozen=True, slots=True)
class ReadReply:
    di: int
    payload: bytes
    more: bool  # more-follows bit: ask for the rest with 12H
    seq: int | None = None  # follow-up replies (12H) carry their sequence number


def read_reply(address: str, di: int, payload: bytes, *, more: bool = False) -> Frame:
    return Frame(address, Control(Function.READ, reply=True, more=more), di_to_wire(di) + payload)


def read_follow_up_reply(
    address: str, di: int, payload: bytes, seq: int, *, more: bool = False
) -> Frame:
    return Frame(
        address,
        Control(Function.READ_FOLLOW_UP, reply=True, more=more),
        di_to_wire(di) + payload + bytes([seq]),
    )


def parse_read_reply(frame: Frame, di: int | None = None) -> ReadReply:
    """Decode a 91H/B1H (or 92H/B2H follow-up) reply; check its DI if given."""
    follow_up = frame.control.function == Function.READ_FOLLOW_UP
    _check_reply(frame, Function.READ_FOLLOW_UP if follow_up else Function.READ)
    need = 5 if follow_up else 4
    if len(frame.data) < need:
        raise DataError(f"read reply data is {len(frame.data)} bytes, at least {need} needed")
    got = di_from_wire(frame.data[:4])
    if di is not None and got != di:
        raise ProtocolError(f"reply carries DI {got:08X}, requested {di:08X}")
    if follow_up:
        return ReadReply(got, frame.data[4:-1], frame.control.more, frame.data[-1])
    return ReadReply(got, frame.data[4:], frame.control.more)


# ---------------------------------------------------------------------------
# Read address (13H)


def read_address_request(pattern: str = WILDCARD) -> Frame:
    """13H to ``pattern``: ``AA``x6, or a partial wildcard such as ``AAAAAA000123``."""
    return Frame(pattern, Control(Function.READ_ADDRESS))


def read_address_reply(address: str) -> Frame:
    return Frame(address, Control(Function.READ_ADDRESS, reply=True), digits_bcd(address))


def parse_read_address_reply(frame: Frame) -> str:
    _check_reply(frame, Function.READ_ADDRESS)
    if len(frame.data) != 6:
        raise DataError(f"address reply data is {len(frame.data)} bytes, expected 6")
    address = bcd_digits(frame.data)
    if address != frame.address:
        raise ProtocolError(f"address reply says {address}, frame is from {frame.address}")
    return address


# ---------------------------------------------------------------------------
# Broadcast time (08H)


def _datetime_bcd(when: dt.datetime) -> bytes:
    """ss mm hh DD MM YY (least significant first)."""
    if not 2000 <= when.year <= 2099:
        raise EncodeError(f"year {when.year} cannot be sent (2000..2099)")
    return digits_bcd(f"{when:%y%m%d%H%M%S}")


def _datetime_from_bcd(raw: bytes) -> dt.datetime:
    d = bcd_digits(raw)
    try:
        return dt.datetime(
            2000 + int(d[0:2]), int(d[2:4]), int(d[4:6]), int(d[6:8]), int(d[8:10]), int(d[10:12])
        )
    except ValueError as exc:
        raise DataError(f"date-time {d}: {exc}") from None


def time_sync_request(when: dt.datetime) -> Frame:
    """Broadcast time (meter local time, naive). Meters do not answer broadcasts."""
    return Frame(BROADCAST, Control(Function.BROADCAST_TIME), _datetime_bcd(when))


def parse_time_sync(frame: Frame) -> dt.datetime:
    if frame.control.function != Function.BROADCAST_TIME or len(frame.data) != 6:
        raise ProtocolError("not a broadcast time frame")
    return _datetime_from_bcd(frame.data)


# ---------------------------------------------------------------------------
# Control (1CH): relay, alarm, power-protect


class ControlCommand(enum.IntEnum):
    """N1 of a 1CH control frame."""

    TRIP = 0x1A  # open the relay (cut supply)
    CLOSE_ALLOWED = 0x1B  # allow closing; the customer closes at the meter
    CLOSE = 0x1C  # close directly
    ALARM = 0x2A
    ALARM_OFF = 0x2B
    PROTECT = 0x3A  # power-protect: no trip while set
    PROTECT_OFF = 0x3B


PLAINTEXT_LEVELS = (0x02, 0x04)


def control_plaintext(command: ControlCommand, deadline: dt.datetime) -> bytes:
    """N1..N8: command, reserved 00, validity deadline ss mm hh DD MM YY."""
    return bytes([ControlCommand(command), 0x00]) + _datetime_bcd(deadline)


def _check_credentials(password: bytes, operator: bytes) -> None:
    if len(password) != 4:
        raise EncodeError(f"password must be 4 bytes (level + 3), got {len(password)}")
    if len(operator) != 4:
        raise EncodeError(f"operator code must be 4 bytes, got {len(operator)}")


def control_request(
    address: str,
    command: ControlCommand,
    deadline: dt.datetime,
    *,
    password: bytes,
    operator: bytes = b"\0\0\0\0",
) -> Frame:
    """A plaintext 1CH frame; ``password`` is ``PA P0 P1 P2`` with level PA 02 or 04."""
    _check_credentials(password, operator)
    if password[0] not in PLAINTEXT_LEVELS:
        raise EncodeError(
            f"password level {password[0]:02X} is not a plaintext level (02, 04); "
            "encrypted levels need a SecurityModule"
        )
    return Frame(
        address,
        Control(Function.CONTROL),
        password + operator + control_plaintext(command, deadline),
    )


def sealed_control_request(
    address: str, *, password: bytes, operator: bytes, sealed: bytes
) -> Frame:
    """A 1CH frame whose N1..N8 were replaced by a security module's ciphertext."""
    _check_credentials(password, operator)
    if not sealed:
        raise EncodeError("sealed control data is empty")
    return Frame(address, Control(Function.CONTROL), password + operator + sealed)


@dataclass(frozen=True, slots=True)
class ControlRequest:
    password: bytes
    operator: bytes
    command: ControlCommand
    deadline: dt.datetime


def parse_control_request(frame: Frame) -> ControlRequest:
    """Decode a plaintext 1CH request (used by the simulator)."""
    d = frame.data
    if frame.control.function != Function.CONTROL or frame.control.reply:
        raise ProtocolError("not a control request")
    if len(d) != 16:
        raise DataError(f"plaintext control data is {len(d)} bytes, expected 16")
    try:
        command = ControlCommand(d[8])
    except ValueError:
        raise DataError(f"unknown control command {d[8]:02X}") from None
    return ControlRequest(d[0:4], d[4:8], command, _datetime_from_bcd(d[10:16]))


def control_ok_reply(address: str) -> Frame:
    return Frame(address, Control(Function.CONTROL, reply=True))


def error_reply_frame(address: str, function: int, flags: ErrorFlags) -> Frame:
    return Frame(address, Control(function, reply=True, error=True), bytes([flags]))


def parse_control_reply(frame: Frame) -> None:
    """Return if the 1CH command was accepted (9CH), raise :class:`Refused` if not."""
    _check_reply(frame, Function.CONTROL)
    if frame.data:
        raise DataError(f"control success reply carries {len(frame.data)} data bytes")


class SecurityModule(Protocol):
    """Seals control commands for encrypted password levels (e.g. 98, ESAM).

    State Grid prepaid meters accept 1CH only with N1..N8 encrypted by keys held
    in the meter's security chip (ESAM) and the utility's key management. An
    implementation talks to whatever holds those keys (a local ESAM/HSM, or the
    master station that returns the ciphertext); this package provides no
    implementation and never pretends to encrypt.
    """

    @property
    def level(self) -> int:
        """Password level byte this module serves (e.g. 0x98)."""
        ...

    async def seal_control(self, address: str, plaintext: bytes) -> bytes:
        """Ciphertext that replaces N1..N8 (``plaintext``) for meter ``address``."""
        ...
