"""Requests and replies: golden frames, error replies, follow-ups, control."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.dlt645.codec import Control, Frame, Function, decode_frame
from firmware_bridge.dlt645.errors import DataError, Dlt645Error, EncodeError, ProtocolError
from firmware_bridge.dlt645.messages import (
    ControlCommand,
    ErrorFlags,
    ErrorReply,
    Refused,
    control_ok_reply,
    control_plaintext,
    control_request,
    error_reply_frame,
    parse_control_reply,
    parse_control_request,
    parse_read_address_reply,
    parse_read_reply,
    parse_time_sync,
    read_address_reply,
    read_follow_up_reply,
    read_follow_up_request,
    read_reply,
    sealed_control_request,
    time_sync_request,
)

from .strategies import controls, meter_addresses, small_frames

ADDR = "000102030425"
DEADLINE = dt.datetime(2026, 11, 24, 0, 0, 0)


def test_guide_vector_through_parse_read_reply() -> None:
    frame = decode_frame(bytes.fromhex("68 250403020100 68 91 08 3333343375394533 8B 16"))
    r = parse_read_reply(frame, 0x00010000)
    assert (r.di, r.payload, r.more, r.seq) == (0x00010000, bytes.fromhex("42061200"), False, None)


def test_broadcast_time_golden() -> None:
    # 2026-11-23 23:15:30 -> ss mm hh DD MM YY = 30 15 23 23 11 26, +33h = 63 48 56 56 44 59.
    # CS: 68h(104) + 6*99h(918) + 68h(104) + 08 + 06 = 1140; data 99+72+86+86+68+89 = 500;
    # 1640 mod 256 = 104 = 68h.
    raw = time_sync_request(dt.datetime(2026, 11, 23, 23, 15, 30)).encode()
    assert raw == bytes.fromhex("FEFEFEFE 68 999999999999 68 08 06 634856564459 68 16")
    assert parse_time_sync(decode_frame(raw)) == dt.datetime(2026, 11, 23, 23, 15, 30)


def test_trip_golden() -> None:
    # DATA = PA P0 P1 P2 | C0..C3 | N1 N2 | ss mm hh DD MM YY
    #      = 02 11 22 33 | 00 00 00 00 | 1A 00 | 00 00 00 24 11 26
    # +33h = 35 44 55 66 | 33 33 33 33 | 4D 33 | 33 33 33 57 44 59
    # CS: header 104+37+10+104+1Ch(28)+10h(16) = 299; data 53+68+85+102 + 4*51
    # + 77+51 + 51+51+51+87+68+89 = 1037; 1336 mod 256 = 56 = 38h.
    frame = control_request(ADDR, ControlCommand.TRIP, DEADLINE, password=bytes.fromhex("02112233"))
    assert frame.encode(0) == bytes.fromhex(
        "68 250403020100 68 1C 10 35445566 33333333 4D33 333333574459 38 16"
    )
    req = parse_control_request(frame)
    assert (req.command, req.deadline, req.password) == (
        ControlCommand.TRIP,
        DEADLINE,
        bytes.fromhex("02112233"),
    )


def test_control_ok_and_error_replies_golden() -> None:
    # 9CH, L=0: 104+37+10+104+156 = 411 - 256 = 155 = 9Bh
    ok = bytes.fromhex("68 250403020100 68 9C 00 9B 16")
    assert control_ok_reply(ADDR).encode(0) == ok
    parse_control_reply(decode_frame(ok))
    # DCH + 04 (unauthorised, +33h = 37h): 104+37+10+104+220+1+55 = 531 - 512 = 19 = 13h
    refused = bytes.fromhex("68 250403020100 68 DC 01 37 13 16")
    assert error_reply_frame(ADDR, Function.CONTROL, ErrorFlags.UNAUTHORISED).encode(0) == refused
    with pytest.raises(Refused, match="password error / unauthorised") as info:
        parse_control_reply(decode_frame(refused))
    assert info.value.reply == ErrorReply(Function.CONTROL, ErrorFlags.UNAUTHORISED)


def test_read_error_reply_names_the_bits() -> None:
    # D1H + 02 (no data): 104+37+10+104+209+1+35h(53) = 518 - 512 = 6
    raw = bytes.fromhex("68 250403020100 68 D1 01 35 06 16")
    with pytest.raises(Refused, match="no data requested") as info:
        parse_read_reply(decode_frame(raw), 0x0001FF00)
    assert info.value.reply.flags is ErrorFlags.NO_DATA
    assert "error byte 02" in str(info.value)


def test_every_error_bit_is_named() -> None:
    text = ErrorReply(Function.READ, ErrorFlags(0x7F)).describe()
    for name in [
        "other error",
        "no data requested",
        "password error / unauthorised",
        "baud rate cannot change",
        "year zones exceeded",
        "day periods exceeded",
        "rates exceeded",
    ]:
        assert name in text
    # For 1CH only bits 0 and 2 have a standard meaning; others stay numbered.
    assert ErrorReply(Function.CONTROL, ErrorFlags(0x12)).describe() == "error bit 1, error bit 4"


def test_reply_must_answer_the_request() -> None:
    with pytest.raises(ProtocolError, match="DI 00010100, requested 00010000"):
        parse_read_reply(read_reply(ADDR, 0x00010100, bytes(4)), 0x00010000)
    with pytest.raises(ProtocolError, match="request"):
        parse_read_reply(Frame(ADDR, Control(Function.READ), bytes(4)))
    with pytest.raises(ProtocolError, match="does not answer 1CH"):
        parse_control_reply(read_reply(ADDR, 0x00010000, bytes(4)))
    with pytest.raises(DataError):
        parse_read_reply(Frame(ADDR, Control(Function.READ, reply=True), bytes(3)))


def test_follow_up_carries_its_sequence_number() -> None:
    assert read_follow_up_request(ADDR, 0x0001FF00, 2).data == bytes.fromhex("00FF0100 02")
    r = parse_read_reply(read_follow_up_reply(ADDR, 0x0001FF00, b"\x01\x02", 2, more=True))
    assert (r.payload, r.seq, r.more) == (b"\x01\x02", 2, True)


def test_read_address_reply() -> None:
    assert parse_read_address_reply(read_address_reply(ADDR)) == ADDR
    forged = Frame(ADDR, Control(Function.READ_ADDRESS, reply=True), bytes(6))
    with pytest.raises(ProtocolError):
        parse_read_address_reply(forged)


def test_plaintext_control_refuses_encrypted_levels() -> None:
    with pytest.raises(EncodeError, match="SecurityModule"):
        control_request(ADDR, ControlCommand.TRIP, DEADLINE, password=bytes.fromhex("98000000"))
    with pytest.raises(EncodeError, match="4 bytes"):
        control_request(ADDR, ControlCommand.TRIP, DEADLINE, password=b"\x02\x00")


def test_sealed_control_carries_the_ciphertext_verbatim() -> None:
    sealed = bytes(range(16))
    f = sealed_control_request(
        ADDR, password=bytes.fromhex("98000000"), operator=b"OPER", sealed=sealed
    )
    assert f.data == bytes.fromhex("98000000") + b"OPER" + sealed


@given(
    meter_addresses,
    st.sampled_from(ControlCommand),
    st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31)).map(
        lambda d: d.replace(microsecond=0)
    ),
    st.sampled_from([b"\x02", b"\x04"]).flatmap(
        lambda lvl: st.binary(min_size=3, max_size=3).map(lambda p: lvl + p)
    ),
    st.binary(min_size=4, max_size=4),
)
def test_control_round_trip(
    address: str, command: ControlCommand, deadline: dt.datetime, password: bytes, operator: bytes
) -> None:
    frame = control_request(address, command, deadline, password=password, operator=operator)
    req = parse_control_request(decode_frame(frame.encode()))
    assert (req.command, req.deadline, req.password, req.operator) == (
        command,
        deadline,
        password,
        operator,
    )
    assert frame.data[8:] == control_plaintext(command, deadline)


@given(meter_addresses, st.integers(0, 0xFFFFFFFF), st.binary(max_size=100), st.booleans())
def test_read_reply_round_trip(address: str, di: int, payload: bytes, more: bool) -> None:
    r = parse_read_reply(decode_frame(read_reply(address, di, payload, more=more).encode()), di)
    assert (r.di, r.payload, r.more) == (di, payload, more)


@given(small_frames, controls)
def test_parsers_raise_only_codec_errors(frame: Frame, control: Control) -> None:
    f = Frame(frame.address, control, frame.data)
    for parse in (
        parse_read_reply,
        parse_control_reply,
        parse_control_request,
        parse_read_address_reply,
        parse_time_sync,
    ):
        try:
            parse(f)
        except Dlt645Error:
            pass
