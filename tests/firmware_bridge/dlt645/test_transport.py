"""Transport behaviour against a scripted TCP peer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket

import pytest

from firmware_bridge.dlt645.codec import Function
from firmware_bridge.dlt645.messages import (
    read_address_reply,
    read_address_request,
    read_reply,
    read_request,
    time_sync_request,
)
from firmware_bridge.dlt645.transport import Dlt645Transport, char_time_s, open_transport
from firmware_bridge.driver import BusUnavailable, MeterTimeout, TransportError
from firmware_bridge.settings import BusSettings
from tests.harness.loops import BOTH_LOOPS

from .peer import ADDR, DI, REPLY, Peer


def section(port: int, timeout_s: float = 0.3) -> BusSettings:
    return BusSettings("t", "tcp", host="127.0.0.1", port=port, timeout_s=timeout_s)


@BOTH_LOOPS
async def test_plain_transaction(peer: Peer) -> None:
    async with open_transport(section(peer.port)) as t:
        assert await t.transact(read_request(ADDR, DI)) == REPLY
    assert peer.requests[0][1] == read_request(ADDR, DI)


async def test_echo_and_other_meters_are_ignored(peer: Peer) -> None:
    other = read_reply("000000000099", DI, bytes(4))
    peer.script = lambda req: [req.encode(), other.encode(), REPLY.encode()]
    async with open_transport(section(peer.port)) as t:
        assert await t.transact(read_request(ADDR, DI)) == REPLY
        assert t.stats.ignored_frames == 2


async def test_reply_to_another_di_is_ignored(peer: Peer) -> None:
    stale = read_reply(ADDR, 0x02010100, bytes(2))
    peer.script = lambda req: [stale.encode(), REPLY.encode()]
    async with open_transport(section(peer.port)) as t:
        assert await t.transact(read_request(ADDR, DI)) == REPLY


@BOTH_LOOPS
async def test_reply_trickling_in_byte_by_byte(peer: Peer) -> None:
    peer.script = lambda req: [x for b in REPLY.encode() for x in (bytes([b]), 0.003)]
    async with open_transport(section(peer.port)) as t:
        assert await t.transact(read_request(ADDR, DI)) == REPLY


async def test_stale_input_is_discarded_before_sending(peer: Peer) -> None:
    stale = read_reply(ADDR, DI, bytes.fromhex("00000000"))
    peer.on_connect = b"\x00\x01" + stale.encode()
    async with open_transport(section(peer.port)) as t:
        await asyncio.sleep(0.05)  # the stale bytes are in by now
        assert await t.transact(read_request(ADDR, DI)) == REPLY
        assert t.stats.stale_bytes == 2 + len(stale.encode())


@BOTH_LOOPS
async def test_silence_is_a_timeout(peer: Peer) -> None:
    peer.script = lambda req: []
    async with open_transport(section(peer.port, timeout_s=0.1)) as t:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(MeterTimeout, match=r"meter m9: no reply within 0\.1 s"):
            await t.transact(read_request(ADDR, DI), meter_id="m9")
        assert 0.09 <= loop.time() - start < 0.5
        assert t.stats.timeouts == 1 and t.stats.by_kind == {"timeout": 1}


@BOTH_LOOPS
async def test_inter_frame_gap_is_honoured(peer: Peer) -> None:
    async with Dlt645Transport(section(peer.port), gap_s=0.05) as t:
        await t.transact(read_request(ADDR, DI))
        await t.transact(read_request(ADDR, DI))
    (t1, _), (t2, _) = peer.requests
    assert t2 - t1 >= 0.045


async def test_wildcard_accepts_any_matching_meter(peer: Peer) -> None:
    peer.script = lambda req: [read_address_reply(ADDR).encode()]
    async with open_transport(section(peer.port)) as t:
        reply = await t.transact(read_address_request())
        assert reply.address == ADDR


async def test_broadcast_expects_no_reply(peer: Peer) -> None:

    peer.script = lambda req: []
    async with open_transport(section(peer.port)) as t:
        await t.broadcast(time_sync_request(dt.datetime(2026, 11, 23, 12, 0, 0)))
        await asyncio.sleep(0.02)
        with pytest.raises(ValueError):
            await t.transact(time_sync_request(dt.datetime(2026, 11, 23, 12, 0, 0)))
    assert peer.requests[0][1].control.function == Function.BROADCAST_TIME


async def test_connection_refused_is_a_transport_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t = open_transport(section(port))
    with pytest.raises(TransportError, match=r"cannot open 127\.0\.0\.1"):
        await t.open()
    with pytest.raises(TransportError):
        await t.transact(read_request(ADDR, DI))


@BOTH_LOOPS
async def test_lost_connection_then_reconnect(peer: Peer) -> None:
    peer.close_after = 1
    async with open_transport(section(peer.port)) as t:
        with pytest.raises(TransportError, match=r"connection to 127\.0\.0\.1:\d+ lost"):
            await t.transact(read_request(ADDR, DI))
        assert await t.transact(read_request(ADDR, DI)) == REPLY
        assert t.stats.reconnects == 1


async def test_missing_serial_device_names_the_bus_and_what_to_do() -> None:
    bus = BusSettings("s", "serial", device="/dev/does-not-exist-645", baud=2400, parity="E")
    with pytest.raises(BusUnavailable) as info:
        await open_transport(bus).open()
    text = str(info.value)
    assert text.startswith("bus s: serial device /dev/does-not-exist-645 does not exist")
    assert "adapter plugged in" in text and "meter" not in text and "\n" not in text


def test_wire_time() -> None:
    # 8E1: 11 bits per byte; at 2400 bps a 30-byte frame is 137.5 ms
    assert char_time_s(2400, "E", 1) * 30 == pytest.approx(0.1375)
    assert char_time_s(9600, "N", 1) == pytest.approx(10 / 9600)
