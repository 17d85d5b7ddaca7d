"""The Modbus TCP client of our own: MBAP frames (pure) and MbapTransport against
the real pymodbus server (the simulator) and a raw asyncio server that sends
what a broken device or gateway would."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.driver import MeterFrameError, MeterTimeout, MeterWrongAddress, TransportError
from firmware_bridge.modbus import mbap
from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.modbus.transport import MbapTransport, ModbusExceptionReply, ModbusTransport
from firmware_bridge.reading import Quantity
from testbed.simulators.modbus import ModbusSimulator
from tests.harness.loops import BOTH_LOOPS

SDM120 = BUILTIN_PROFILES["sdm120"]

# ---------------------------------------------------------------------------
# Frames (pure)

frames_st = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFF),
        st.binary(min_size=1, max_size=mbap.MAX_PDU_BYTES),
    ),
    max_size=8,
)


@given(frames_st, st.data())
@settings(max_examples=200, deadline=None)
def test_frames_survive_any_split_of_the_stream(frames: list[tuple[int, int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(mbap.frame(t, u, p) for t, u, p in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = mbap.MbapParser()
    got: list[tuple[int, int, bytes]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        got += parser.feed(stream[start:cut])
        start = cut
    assert got == frames
    assert parser.pending == 0


@given(st.lists(st.binary(max_size=300), max_size=6))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_give_frames_or_the_parsers_own_error(chunks: list[bytes]) -> None:
    parser = mbap.MbapParser()
    for chunk in chunks:
        try:
            for tid, unit, pdu in parser.feed(chunk):
                assert 0 <= tid <= 0xFFFF and 0 <= unit <= 0xFF
                assert 1 <= len(pdu) <= mbap.MAX_PDU_BYTES
        except mbap.MbapFrameError:
            assert parser.pending == 0  # nothing kept after a broken stream
            parser = mbap.MbapParser()
        assert parser.pending < mbap.MAX_FRAME_BYTES


def test_parser_rejects_what_is_not_mbap() -> None:
    with pytest.raises(mbap.MbapFrameError, match="protocol id 1"):
        mbap.MbapParser().feed(b"\x00\x01\x00\x01\x00\x03\x01\x04\x00")
    with pytest.raises(mbap.MbapFrameError, match="length field 1 "):
        mbap.MbapParser().feed(b"\x00\x01\x00\x00\x00\x01\x01")
    with pytest.raises(mbap.MbapFrameError, match="length field 300 "):
        mbap.MbapParser().feed(b"\x00\x01\x00\x00\x01\x2c\x01\x04")
    p = mbap.MbapParser()
    assert p.feed(b"\x00\x07\x00\x00\x00") == [] and p.pending == 5  # a header cut short waits


def test_requests_are_built_as_the_standard_says() -> None:
    assert mbap.read_frame(0x0102, 7, 4, 0x0048, 2) == bytes.fromhex("0102 0000 0006 07 04 0048 0002")
    assert mbap.read_frame(1, 7, 3, 0, 2) == mbap.frame(1, 7, mbap.read_pdu(3, 0, 2))
    assert mbap.read_pdu(1, 0x13, 19) == bytes.fromhex("01 0013 0013")
    assert mbap.write_single_coil_pdu(0xAC, True) == bytes.fromhex("05 00ac ff00")
    assert mbap.write_single_coil_pdu(0xAC, False) == bytes.fromhex("05 00ac 0000")
    assert mbap.write_single_register_pdu(1, 3) == bytes.fromhex("06 0001 0003")
    # the example of the application protocol specification (FC15: 10 coils from 0x13)
    bits = [True, False, True, True, False, False, True, True, True, False]
    assert mbap.write_multiple_coils_pdu(0x13, bits) == bytes.fromhex("0f 0013 000a 02 cd01")
    assert mbap.write_multiple_registers_pdu(1, [0x000A, 0x0102]) == bytes.fromhex("10 0001 0002 04 000a 0102")


@pytest.mark.parametrize(
    "build, problem",
    [
        (lambda: mbap.read_pdu(4, 0, 126), "count must be 1..125"),
        (lambda: mbap.read_pdu(4, 0, 0), "count must be 1..125"),
        (lambda: mbap.read_pdu(1, 0, 2001), "count must be 1..2000"),
        (lambda: mbap.read_pdu(4, 0xFFFF, 2), "outside 0..65535"),
        (lambda: mbap.read_pdu(7, 0, 1), "not a read"),
        (lambda: mbap.read_frame(1, 1, 4, 0, 200), "count must be 1..125"),
        (lambda: mbap.write_single_register_pdu(0, 70000), "0..65535"),
        (lambda: mbap.write_multiple_registers_pdu(0, [1] * 124), "count must be 1..123"),
        (lambda: mbap.frame(70000, 1, b"\x04"), "transaction id"),
        (lambda: mbap.frame(1, 256, b"\x04"), "unit id"),
        (lambda: mbap.frame(1, 1, b""), "a PDU is 1..253 bytes"),
    ],
)
def test_bad_requests_are_refused_before_sending(build: Callable[[], bytes], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build()


def test_replies_are_checked_against_their_request() -> None:
    assert mbap.registers(4, bytes.fromhex("04 04 0001 ffff"), 2) == [1, 0xFFFF]
    with pytest.raises(mbap.MbapReplyError, match="answered 1 registers"):
        mbap.registers(4, bytes.fromhex("04 02 0001"), 2)
    with pytest.raises(mbap.MbapReplyError, match="function code 3, asked 4"):
        mbap.registers(4, bytes.fromhex("03 04 0001 0002"), 2)
    with pytest.raises(mbap.MbapReplyError, match="byte count 9"):
        mbap.registers(4, bytes.fromhex("04 09 0001 0002"), 2)
    assert mbap.bits(1, bytes.fromhex("01 02 cd 01"), 10) == [True, False, True, True, False, False, True, True, True, False]
    with pytest.raises(mbap.MbapReplyError, match="answered 1 byte"):
        mbap.bits(1, bytes.fromhex("01 01 cd"), 10)
    mbap.check_echo(bytes.fromhex("06 0001 0003"), bytes.fromhex("06 0001 0003"))
    mbap.check_echo(bytes.fromhex("10 0001 0002 04 000a 0102"), bytes.fromhex("10 0001 0002"))
    with pytest.raises(mbap.MbapReplyError, match="does not match"):
        mbap.check_echo(bytes.fromhex("06 0001 0003"), bytes.fromhex("06 0002 0003"))
    assert mbap.exception_code(4, b"\x84\x02") == 2
    assert mbap.exception_code(3, b"\x84\x02") is None


@given(st.sampled_from([3, 4]), st.binary(min_size=1, max_size=12), st.integers(1, 5))
def test_check_registers_checks_what_registers_checks(function_code: int, pdu: bytes, count: int) -> None:
    try:
        want: object = mbap.registers(function_code, pdu, count)
    except mbap.MbapReplyError as exc:
        want = str(exc)
    try:
        mbap.check_registers(function_code, pdu, count)
    except mbap.MbapReplyError as exc:
        assert want == str(exc)
    else:
        assert want == list(struct.unpack_from(f">{count}H", pdu, 2))


# ---------------------------------------------------------------------------
# Against the pymodbus server (the simulator)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator([1, 2], load_kw="1.5") as s:
        yield s


@pytest.fixture
async def transport(sim: ModbusSimulator) -> AsyncIterator[MbapTransport]:
    t = ModbusTransport.tcp("127.0.0.1", sim.port, name="tcp", timeout_s=0.25)
    assert isinstance(t, MbapTransport)
    yield t
    t.close()


@BOTH_LOOPS
async def test_every_function_code_against_a_pymodbus_server(sim: ModbusSimulator, transport: MbapTransport) -> None:
    await transport.write_coil("m1", 1, 3, True)
    assert await transport.read_coil("m1", 1, 3) is True
    await transport.write_coils("m1", 1, 8, [True, False, True])
    assert await transport.read_bits("m1", 1, 1, 8, 3) == [True, False, True]
    assert sim.meter(1).coils[10] is True
    assert await transport.read_bits("m1", 1, 2, 0, 4) == [False] * 4
    sim.meter(1).holding.update({0x9000: 0, 0x9001: 0, 0x9002: 0})
    await transport.write_register("m1", 1, 0x9000, 0xBEEF)
    await transport.write_registers("m1", 1, 0x9001, [1, 2])
    assert await transport.read_registers("m1", 1, 3, 0x9000, 3) == [0xBEEF, 1, 2]
    regs = await transport.read_registers("m1", 1, 4, 0x0000, 2)
    assert struct.unpack(">f", struct.pack(">2H", *regs))[0] == pytest.approx(230.4, abs=1e-3)
    pdu = await transport.read_register_pdu("m1", 1, 4, 0x0000, 2)
    assert pdu[:2] == b"\x04\x04" and list(struct.unpack(">2H", pdu[2:])) == regs
    assert transport.requests == 10


async def test_driver_reads_over_the_lean_client(sim: ModbusSimulator, transport: MbapTransport) -> None:
    r = await ModbusDriver("m1", 1, SDM120, transport).read(0)
    assert r.get(Quantity.VOLTAGE) == Decimal("230.4")
    assert r.get(Quantity.POWER) == Decimal("1.5000")


async def test_exception_reply_from_the_server(sim: ModbusSimulator, transport: MbapTransport) -> None:
    with pytest.raises(ModbusExceptionReply, match=r"FC04 0x7000\+2: exception 2 \(illegal data address\)") as e:
        await transport.read_registers("m1", 1, 4, 0x7000, 2)
    assert e.value.code == 2 and e.value.kind == "refused"
    with pytest.raises(ModbusExceptionReply, match=r"FC04 0x7000\+2: exception 2 \(illegal data address\)") as e:
        await transport.read_register_pdu("m1", 1, 4, 0x7000, 2)
    assert e.value.code == 2
    with pytest.raises(ValueError, match="not a register read"):
        await transport.read_register_pdu("m1", 1, 1, 0, 2)


@BOTH_LOOPS
async def test_late_answer_is_dropped_by_its_transaction_id(sim: ModbusSimulator, transport: MbapTransport) -> None:
    sim.meter(2).delay_s = 0.4  # answers after the 0.25 s timeout
    with pytest.raises(MeterTimeout, match=r"no answer within 0\.25s"):
        await transport.read_registers("m2", 2, 4, 0x0000, 2)
    sim.meter(2).delay_s = 0.0
    await asyncio.sleep(0.25)  # the late answer arrives while nothing waits
    regs = await transport.read_registers("m1", 1, 4, 0x0046, 2)  # frequency, not the late voltage
    assert struct.unpack(">f", struct.pack(">2H", *regs))[0] == pytest.approx(50.0)
    sim.meter(2).delay_s = 0.4
    with pytest.raises(MeterTimeout):
        await transport.read_registers("m2", 2, 4, 0x0000, 2)
    sim.meter(2).delay_s = 0.0
    # the late answer to the timed-out request arrives while this one waits: dropped
    regs = await transport.read_registers("m1", 1, 4, 0x0046, 2, timeout_s=0.5)
    assert struct.unpack(">f", struct.pack(">2H", *regs))[0] == pytest.approx(50.0)


@BOTH_LOOPS
async def test_reconnects_after_the_server_restarts() -> None:
    async with ModbusSimulator([1]) as s:
        port, meters = s.port, s.meters
        t = MbapTransport("127.0.0.1", port, name="r", timeout_s=0.25, reconnect_min_s=0.0)
        await t.read_registers("m1", 1, 4, 0, 2)
    try:
        with pytest.raises(TransportError):
            await t.read_registers("m1", 1, 4, 0, 2)
        assert not t.connected
        async with ModbusSimulator(meters=meters, port=port):
            assert len(await t.read_registers("m1", 1, 4, 0, 2)) == 2
            assert t.connected
    finally:
        t.close()


async def test_failed_connect_fails_fast_then_redials() -> None:
    async with ModbusSimulator([1]) as s:
        port = s.port
    now = [100.0]
    t = MbapTransport("127.0.0.1", port, name="gone", timeout_s=0.25, clock=lambda: now[0])
    with pytest.raises(TransportError, match=f"bus gone: 127.0.0.1:{port}: ConnectionRefusedError"):
        await t.read_registers("m1", 1, 4, 0, 2)
    with pytest.raises(TransportError, match="retrying in 2s"):
        await t.read_registers("m1", 1, 4, 0, 2)
    now[0] += 2.0
    with pytest.raises(TransportError, match="ConnectionRefusedError"):
        await t.read_registers("m1", 1, 4, 0, 2)
    t.close()


# ---------------------------------------------------------------------------
# Against a raw server: what broken devices and gateways send

Reply = Callable[[int, int, bytes], list[bytes | None]]
CLOSE = None  # in a reply list: close the connection there


class RawServer:
    """A TCP server that reads MBAP requests and answers with whatever ``reply``
    returns for (transaction id, unit, pdu): byte strings written in turn, ``CLOSE``
    to hang up."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[tuple[int, int, bytes]] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(100):
                head = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                self.requests.append((tid, unit, pdu))
                for out in self.reply(tid, unit, pdu):
                    if out is CLOSE:
                        writer.close()
                        return
                    writer.write(out)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # one segment each
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(tid: int, unit: int, pdu: bytes) -> bytes:
    return mbap.frame(tid, unit, pdu)


def good(tid: int, unit: int, pdu: bytes) -> bytes:
    """A correct FC04/FC03 answer: register i holds its address."""
    fc, address, count = pdu[0], int.from_bytes(pdu[1:3], "big"), int.from_bytes(pdu[3:5], "big")
    return answer(tid, unit, bytes((fc, 2 * count)) + b"".join((address + i).to_bytes(2, "big") for i in range(count)))


@pytest.fixture
def raw_transport() -> Callable[[RawServer], MbapTransport]:
    made: list[MbapTransport] = []

    def make(server: RawServer) -> MbapTransport:
        t = MbapTransport("127.0.0.1", server.port, name="raw", timeout_s=0.2)
        made.append(t)
        return t

    yield make  # type: ignore[misc]
    for t in made:
        t.close()


@BOTH_LOOPS
async def test_partial_frames_are_reassembled(raw_transport: Callable[[RawServer], MbapTransport]) -> None:
    def reply(tid: int, unit: int, pdu: bytes) -> list[bytes | None]:
        whole = good(tid, unit, pdu)
        return [whole[:3], whole[3:8], whole[8:]]

    async with RawServer(reply) as srv:
        t = raw_transport(srv)
        assert await t.read_registers("m", 5, 4, 0x10, 3) == [0x10, 0x11, 0x12]


async def test_wrong_transaction_id_is_dropped(raw_transport: Callable[[RawServer], MbapTransport]) -> None:
    async with RawServer(lambda tid, u, p: [good((tid + 7) & 0xFFFF, u, p), good(tid, u, p)]) as srv:
        t = raw_transport(srv)
        assert await t.read_registers("m", 5, 4, 0, 2) == [0, 1]
    async with RawServer(lambda tid, u, p: [good((tid + 7) & 0xFFFF, u, p)]) as srv:
        t = raw_transport(srv)
        with pytest.raises(MeterTimeout, match=r"no answer within 0.2s \(1 late answer"):
            await t.read_registers("m", 5, 4, 0, 2)


async def test_reply_from_another_unit(raw_transport: Callable[[RawServer], MbapTransport]) -> None:
    async with RawServer(lambda tid, u, p: [good(tid, u + 1, p)]) as srv:
        t = raw_transport(srv)
        with pytest.raises(MeterWrongAddress, match="reply from unit 6, expected unit 5") as e:
            await t.read_registers("m", 5, 4, 0, 2)
        assert e.value.kind == "address"


async def test_exception_codes_are_named(raw_transport: Callable[[RawServer], MbapTransport]) -> None:
    async with RawServer(lambda tid, u, p: [answer(tid, u, bytes((p[0] | 0x80, 4)))]) as srv:
        t = raw_transport(srv)
        with pytest.raises(ModbusExceptionReply, match=r"exception 4 \(device failure\)") as e:
            await t.read_registers("m", 5, 3, 0, 2)
        assert e.value.code == 4
        with pytest.raises(ModbusExceptionReply, match=r"FC05 0x0002=1: exception 4"):
            await t.write_coil("m", 5, 2, True)


async def test_short_frame_is_a_frame_error_and_resets_the_connection(
    raw_transport: Callable[[RawServer], MbapTransport],
) -> None:
    calls = 0

    def reply(tid: int, unit: int, pdu: bytes) -> list[bytes | None]:
        nonlocal calls
        calls += 1
        return [good(tid, unit, pdu)[:-1]] if calls == 1 else [good(tid, unit, pdu)]

    async with RawServer(reply) as srv:
        t = raw_transport(srv)
        with pytest.raises(MeterFrameError, match=r"byte\(s\) of an incomplete frame within 0\.2s; connection reset"):
            await t.read_registers("m", 5, 4, 0, 2)
        assert await t.read_registers("m", 5, 4, 0, 2) == [0, 1]
        assert srv.connections == 2


@pytest.mark.parametrize(
    "bad, problem",
    [
        (lambda tid, u, p: struct.pack(">HHHB", tid, 3, 5, u) + b"\x04\x02\x00\x01", "protocol id 3"),
        (lambda tid, u, p: struct.pack(">HHHB", tid, 0, 1000, u) + b"\x04", "length field 1000"),
        (lambda tid, u, p: b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a Modbus TCP stream"),
    ],
)
async def test_garbage_is_a_frame_error_and_resets_the_connection(
    raw_transport: Callable[[RawServer], MbapTransport], bad: Callable[[int, int, bytes], bytes], problem: str
) -> None:
    calls = 0

    def reply(tid: int, unit: int, pdu: bytes) -> list[bytes | None]:
        nonlocal calls
        calls += 1
        return [bad(tid, unit, pdu)] if calls == 1 else [good(tid, unit, pdu)]

    async with RawServer(reply) as srv:
        t = raw_transport(srv)
        with pytest.raises(MeterFrameError, match=f"{problem}.*connection reset"):
            await t.read_registers("m", 5, 4, 0, 2)
        assert await t.read_registers("m", 5, 4, 0, 2) == [0, 1]
        assert srv.connections == 2


@pytest.mark.parametrize(
    "bad, problem",
    [
        (lambda tid, u, p: answer(tid, u, b"\x03\x04\x00\x00\x00\x01"), "function code 3, asked 4"),
        (lambda tid, u, p: answer(tid, u, b"\x04\x02\x00\x00"), "answered 1 registers"),
        (lambda tid, u, p: answer(tid, u, b"\x04\x07\x00\x00\x00\x01"), "byte count 7"),
    ],
)
async def test_wrong_answers_are_frame_errors(
    raw_transport: Callable[[RawServer], MbapTransport], bad: Callable[[int, int, bytes], bytes], problem: str
) -> None:
    async with RawServer(lambda tid, u, p: [bad(tid, u, p)]) as srv:
        t = raw_transport(srv)
        with pytest.raises(MeterFrameError, match=problem):
            await t.read_registers("m", 5, 4, 0, 2)
        assert srv.connections == 1 and t.connected  # the stream is still in step


@BOTH_LOOPS
async def test_peer_closing_mid_frame_is_a_transport_error(raw_transport: Callable[[RawServer], MbapTransport]) -> None:
    async with RawServer(lambda tid, u, p: [good(tid, u, p)[:5], CLOSE]) as srv:
        t = raw_transport(srv)
        with pytest.raises(TransportError, match=r"connection closed by the peer \(5 byte\(s\) of a frame received\)"):
            await t.read_registers("m", 5, 4, 0, 2)
        assert not t.connected
        with pytest.raises(TransportError):  # the next request re-dials: the same again
            await t.read_registers("m", 5, 4, 0, 2)
        assert srv.connections == 2


@BOTH_LOOPS
async def test_no_reply_times_out_within_the_requests_timeout(
    raw_transport: Callable[[RawServer], MbapTransport],
) -> None:
    async with RawServer(lambda tid, u, p: []) as srv:
        t = raw_transport(srv)
        for limit in (0.3, 0.1):  # a shorter timeout after a longer one still holds
            start = time.monotonic()
            with pytest.raises(MeterTimeout, match=f"no answer within {limit:g}s"):
                await t.read_registers("m", 5, 4, 0, 2, timeout_s=limit)
            # uvloop's clock and timers count whole milliseconds: up to 1 ms early
            assert limit - 0.001 <= time.monotonic() - start < limit + 0.1
        assert t.connected  # a silent unit does not cost the others the connection
