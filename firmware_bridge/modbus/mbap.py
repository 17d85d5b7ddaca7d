"""Modbus TCP frames (MBAP): requests, a stream parser, reply checks. Pure, no I/O.

An MBAP frame is a 7-byte header — transaction id (2), protocol id (2, always
0), length (2: the unit id and PDU bytes that follow), unit id (1) — then the
PDU: function code and data, at most 253 bytes. The connection that sends and
receives these frames is :class:`firmware_bridge.modbus.transport.MbapTransport`.

Two kinds of error:

* :class:`MbapFrameError` — the byte stream is not MBAP frames (protocol id
  not 0, a length field no PDU can have). Nothing after it can be trusted:
  the connection is reset.
* :class:`MbapReplyError` — a well-framed reply that does not answer the
  request (another function code, a wrong byte count, a write echo that
  differs). The stream is still in step.

Exception replies (function code | 0x80) are not errors here:
:func:`exception_code` names them and the transport raises the driver
contract's refusal.
"""

from __future__ import annotations

import struct
from typing import NoReturn

from firmware_bridge.errors import EdgeGwError, ErrorKind

HEADER_BYTES = 7  # transaction id, protocol id, length, unit id
MAX_PDU_BYTES = 253  # function code + data (Modbus application protocol, 4.1)
MAX_FRAME_BYTES = HEADER_BYTES + MAX_PDU_BYTES  # 260
MIN_LENGTH = 2  # the length field counts the unit id and at least a function code
MAX_LENGTH = 1 + MAX_PDU_BYTES

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_COILS = 15
WRITE_MULTIPLE_REGISTERS = 16

MAX_READ_BITS = 2000  # per request (FC01/FC02)
MAX_READ_REGISTERS = 125  # FC03/FC04
MAX_WRITE_BITS = 1968  # FC15
MAX_WRITE_REGISTERS = 123  # FC16

_READ = struct.Struct(">HHHBBHH")  # header + function code, address, count
_HEAD = struct.Struct(">HHHB")


class MbapFrameError(EdgeGwError, ValueError):
    """Bytes that are not a Modbus TCP frame stream; the connection must be reset."""

    kind = ErrorKind.FRAME


class MbapReplyError(EdgeGwError, ValueError):
    """A complete frame that does not answer the request it came for."""

    kind = ErrorKind.FRAME


def frame(tid: int, unit: int, pdu: bytes) -> bytes:
    """One MBAP frame carrying ``pdu`` (function code and data) for ``unit``."""
    if not 0 <= tid <= 0xFFFF:
        raise ValueError(f"transaction id must be 0..65535, got {tid}")
    if not 0 <= unit <= 0xFF:
        raise ValueError(f"unit id must be 0..255, got {unit}")
    if not 1 <= len(pdu) <= MAX_PDU_BYTES:
        raise ValueError(f"a PDU is 1..{MAX_PDU_BYTES} bytes, got {len(pdu)}")
    return _HEAD.pack(tid, 0, len(pdu) + 1, unit) + pdu


def _check_address(address: int, count: int, most: int) -> None:
    if not 1 <= count <= most:
        raise ValueError(f"count must be 1..{most}, got {count}")
    if not 0 <= address <= 0xFFFF or address + count > 0x10000:
        raise ValueError(f"address {address}+{count} outside 0..65535")


def read_pdu(function_code: int, address: int, count: int) -> bytes:
    """FC01/02/03/04 request PDU."""
    if function_code in (READ_COILS, READ_DISCRETE_INPUTS):
        _check_address(address, count, MAX_READ_BITS)
    elif function_code in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        _check_address(address, count, MAX_READ_REGISTERS)
    else:
        raise ValueError(f"function code {function_code} is not a read")
    return bytes((function_code, address >> 8, address & 0xFF, count >> 8, count & 0xFF))


def read_frame(tid: int, unit: int, function_code: int, address: int, count: int) -> bytes:
    """A whole read request (the hot path: one pack, checks as :func:`read_pdu`)."""
    if (
        0 <= tid <= 0xFFFF
        and 0 <= unit <= 0xFF
        and function_code in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS)
        and 1 <= count <= MAX_READ_REGISTERS
        and 0 <= address
        and address + count <= 0x10000
    ):
        return _READ.pack(tid, 0, 6, unit, function_code, address, count)
    return frame(tid, unit, read_pdu(function_code, address, count))


def write_single_coil_pdu(address: int, value: bool) -> bytes:
    _check_address(address, 1, 1)
    return bytes((WRITE_SINGLE_COIL, address >> 8, address & 0xFF, 0xFF if value else 0x00, 0x00))


def write_single_register_pdu(address: int, value: int) -> bytes:
    _check_address(address, 1, 1)
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value must be 0..65535, got {value}")
    return bytes((WRITE_SINGLE_REGISTER, address >> 8, address & 0xFF, value >> 8, value & 0xFF))


def write_multiple_coils_pdu(address: int, values: list[bool]) -> bytes:
    _check_address(address, len(values), MAX_WRITE_BITS)
    packed = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v:
            packed[i // 8] |= 1 << (i % 8)
    return struct.pack(">BHHB", WRITE_MULTIPLE_COILS, address, len(values), len(packed)) + bytes(packed)


def write_multiple_registers_pdu(address: int, values: list[int]) -> bytes:
    _check_address(address, len(values), MAX_WRITE_REGISTERS)
    for v in values:
        if not 0 <= v <= 0xFFFF:
            raise ValueError(f"register value must be 0..65535, got {v}")
    n = len(values)
    return struct.pack(f">BHHB{n}H", WRITE_MULTIPLE_REGISTERS, address, n, 2 * n, *values)


class MbapParser:
    """Cuts a received byte stream into ``(transaction id, unit id, pdu)`` frames.

    Partial frames are kept until the rest arrives. :meth:`feed` raises
    :class:`MbapFrameError` (and nothing else) for a stream that is not MBAP,
    and then holds nothing: the caller resets the connection.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def reset(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf + data if self._buf else bytes(data)
        n = len(buf)
        pos = 0
        out: list[tuple[int, int, bytes]] = []
        while n - pos >= 6:
            if buf[pos + 2] or buf[pos + 3]:
                self._buf = b""
                raise MbapFrameError(
                    f"protocol id {int.from_bytes(buf[pos + 2 : pos + 4], 'big')} (Modbus TCP is 0):"
                    f" not a Modbus TCP stream ({buf[pos : pos + 8].hex()}...)"
                )
            length = (buf[pos + 4] << 8) | buf[pos + 5]
            if not MIN_LENGTH <= length <= MAX_LENGTH:
                self._buf = b""
                raise MbapFrameError(
                    f"length field {length} outside {MIN_LENGTH}..{MAX_LENGTH} (unit id + a PDU of at most"
                    f" {MAX_PDU_BYTES} bytes)"
                )
            end = pos + 6 + length
            if end > n:
                break
            out.append(((buf[pos] << 8) | buf[pos + 1], buf[pos + 6], buf[pos + 7 : end]))
            pos = end
        self._buf = buf[pos:] if pos else buf
        return out


def exception_code(function_code: int, pdu: bytes) -> int | None:
    """The exception code if ``pdu`` is an exception reply to ``function_code``, else None."""
    if len(pdu) == 2 and pdu[0] == function_code | 0x80:
        return pdu[1]
    return None


def _check_function(function_code: int, pdu: bytes) -> None:
    if pdu[0] != function_code:
        raise MbapReplyError(f"answer has function code {pdu[0]}, asked {function_code}")


_REGS: dict[int, struct.Struct] = {}


def registers(function_code: int, pdu: bytes, count: int) -> list[int]:
    """The registers of an FC03/FC04 reply to a request for ``count`` of them."""
    check_registers(function_code, pdu, count)
    return unpack_registers(pdu, count)


def check_registers(function_code: int, pdu: bytes, count: int) -> None:
    """What :func:`registers` checks, without making the list: ``pdu`` is an FC03/FC04
    reply carrying ``count`` registers (big-endian, from byte 2)."""
    if len(pdu) != 2 + 2 * count or pdu[0] != function_code or pdu[1] != 2 * count:
        _wrong_registers(function_code, pdu)


def unpack_registers(pdu: bytes, count: int) -> list[int]:
    """The ``count`` registers of a reply :func:`check_registers` accepted."""
    s = _REGS.get(count)
    if s is None:
        s = _REGS[count] = struct.Struct(f">{count}H")
    return list(s.unpack_from(pdu, 2))


def _wrong_registers(function_code: int, pdu: bytes) -> NoReturn:
    _check_function(function_code, pdu)
    got = pdu[1] if len(pdu) > 1 else None
    if got is None or len(pdu) != 2 + got or got % 2:
        raise MbapReplyError(f"byte count {got} does not match the {len(pdu) - 2} data byte(s) of the answer")
    raise MbapReplyError(f"answered {got // 2} registers")


def bits(function_code: int, pdu: bytes, count: int) -> list[bool]:
    """The coils or inputs of an FC01/FC02 reply to a request for ``count`` of them."""
    _check_function(function_code, pdu)
    want = (count + 7) // 8
    if len(pdu) < 2 or pdu[1] != len(pdu) - 2:
        raise MbapReplyError(f"byte count does not match the {max(0, len(pdu) - 2)} data byte(s) of the answer")
    if pdu[1] != want:
        raise MbapReplyError(f"answered {pdu[1]} byte(s) of bits, {want} expected for {count}")
    return [bool(pdu[2 + i // 8] >> (i % 8) & 1) for i in range(count)]


def check_echo(request_pdu: bytes, pdu: bytes) -> None:
    """A write's reply: the function code and address of the request (FC05/06: and a
    value; FC15/16: and the count).

    The value a single write echoes is not compared: some devices answer with
    the value held after the write (a relay that did not move); what a write
    did is verified by reading it back (firmware_bridge/relay.py).
    """
    fc = request_pdu[0]
    _check_function(fc, pdu)
    expected = request_pdu[:3] if fc in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER) else request_pdu[:5]
    if len(pdu) != 5 or pdu[: len(expected)] != expected:
        raise MbapReplyError(f"write answer {pdu.hex()} does not match the request {request_pdu[:5].hex()}")
