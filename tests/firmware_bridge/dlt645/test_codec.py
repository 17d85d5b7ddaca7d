"""Framing: golden frames built by hand, round trips, malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.dlt645.codec import (
    Control,
    Frame,
    Function,
    address_from_wire,
    address_matches,
    address_to_wire,
    decode_frame,
)
from firmware_bridge.dlt645.errors import ChecksumError, Dlt645Error, EncodeError, FrameError

from .strategies import addresses, frames

# The GUIDE's test vector as a complete reply from meter 000102030425 (sent
# 25 04 03 02 01 00) to a read of 00010000. Checksum by hand, 68 through DATA:
#   68 + 25 + 04 + 03 + 02 + 01 + 00 + 68          = 104+37+10+104   = 255
#   + 91 + 08                                       = 255+145+8       = 408
#   + 33 + 33 + 34 + 33 + 75 + 39 + 45 + 33         = 408+499         = 907
#   907 mod 256 = 139 = 8B
VECTOR_REPLY = bytes.fromhex("68 250403020100 68 91 08 3333343375394533 8B 16")

# The matching request with the usual four FE: 104+37+10+104 + 11h(17) + 04
# + 33+33+34+33 (205) = 481; 481 - 256 = 225 = E1.
VECTOR_REQUEST = bytes.fromhex("FEFEFEFE 68 250403020100 68 11 04 33333433 E1 16")

# 13H to the wildcard: 104 + 6*AAh(170) + 104 + 13h(19) + 00 = 1247; 1247 - 4*256 = DF.
READ_ADDRESS_WILDCARD = bytes.fromhex("FEFEFEFE 68 AAAAAAAAAAAA 68 13 00 DF 16")


def test_guide_vector_reply_decodes() -> None:
    f = decode_frame(VECTOR_REPLY)
    assert f.address == "000102030425"
    assert f.control == Control(Function.READ, reply=True)
    assert f.data == bytes.fromhex("00 00 01 00 42 06 12 00")  # DI 00010000, 00120642


def test_guide_vector_request_encodes() -> None:
    assert Frame("000102030425", Control(Function.READ), bytes.fromhex("00000100")).encode() == (
        VECTOR_REQUEST
    )


def test_read_address_wildcard_golden() -> None:
    assert Frame("AAAAAAAAAAAA", Control(Function.READ_ADDRESS)).encode() == READ_ADDRESS_WILDCARD


def test_address_is_sent_least_significant_byte_first() -> None:
    assert address_to_wire("000102030425") == bytes.fromhex("25 04 03 02 01 00")
    assert address_from_wire(bytes.fromhex("25 04 03 02 01 00")) == "000102030425"
    assert address_to_wire("AAAAAA000123") == bytes.fromhex("23 01 00 AA AA AA")


@pytest.mark.parametrize("bad", ["00010203042", "0001020304255", "00010203042A", "0A0102030425"])
def test_bad_addresses_are_refused(bad: str) -> None:
    with pytest.raises(EncodeError):
        address_to_wire(bad)


def test_partial_wildcard_matching() -> None:
    assert address_matches("AAAAAA000123", "123456000123")
    assert not address_matches("AAAAAA000123", "123456000124")
    assert address_matches("AAAAAAAAAAAA", "000000000001")


@pytest.mark.parametrize(
    ("byte", "control"),
    [
        (0x11, Control(Function.READ)),
        (0x91, Control(Function.READ, reply=True)),
        (0xB1, Control(Function.READ, reply=True, more=True)),
        (0xD1, Control(Function.READ, reply=True, error=True)),
        (0x9C, Control(Function.CONTROL, reply=True)),
        (0xDC, Control(Function.CONTROL, reply=True, error=True)),
        (0x08, Control(Function.BROADCAST_TIME)),
    ],
)
def test_control_byte(byte: int, control: Control) -> None:
    assert Control.from_byte(byte) == control
    assert control.to_byte() == byte


def test_bad_checksum_is_reported_with_both_values() -> None:
    raw = bytearray(VECTOR_REPLY)
    raw[-2] = 0x8C
    with pytest.raises(ChecksumError) as info:
        decode_frame(bytes(raw))
    assert (info.value.expected, info.value.got) == (0x8B, 0x8C)


def test_bad_end_byte() -> None:
    with pytest.raises(FrameError, match="end byte"):
        decode_frame(VECTOR_REPLY[:-1] + b"\x17")


def test_non_bcd_address_is_a_frame_error() -> None:
    body = bytes.fromhex("68 2B0403020100 68 91 00")
    with pytest.raises(FrameError, match="neither BCD"):
        decode_frame(body + bytes([sum(body) & 0xFF, 0x16]))


def test_length_must_match() -> None:
    with pytest.raises(FrameError):
        decode_frame(VECTOR_REPLY + b"\x00")
    with pytest.raises(FrameError):
        decode_frame(VECTOR_REPLY[:-3])


def test_data_too_long_cannot_be_encoded() -> None:
    with pytest.raises(EncodeError):
        Frame("000000000001", Control(Function.READ), bytes(256)).encode()


@given(frames, st.integers(0, 4))
def test_round_trip(frame: Frame, preamble: int) -> None:
    raw = frame.encode(preamble)
    assert len(raw) == preamble + 12 + len(frame.data)
    assert decode_frame(raw) == frame


@given(addresses)
def test_address_round_trip(address: str) -> None:
    assert address_from_wire(address_to_wire(address)) == address


@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_raises_only_codec_errors(raw: bytes) -> None:
    try:
        decode_frame(raw)
    except Dlt645Error:
        pass


@given(frames, st.integers(0, 300), st.integers(0, 255))
def test_any_single_byte_corruption_is_detected_or_harmless(
    frame: Frame, pos: int, value: int
) -> None:
    raw = bytearray(frame.encode(0))
    pos %= len(raw)
    raw[pos] = value
    try:
        decoded = decode_frame(bytes(raw))
    except Dlt645Error:
        return
    # A one-byte change either breaks a check or is invisible (same byte).
    assert decoded == frame
