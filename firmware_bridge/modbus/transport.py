"""One transport per bus, with errors mapped to the driver contract.

Modbus TCP (MBAP) runs on a client of our own (:class:`MbapTransport`,
frames in firmware_bridge/modbus/mbap.py); RTU, on a serial line or tunnelled
through TCP, on a pymodbus client (:class:`PymodbusTransport`).

The transport is shared by every meter (and relay) on its bus; the bus
scheduler guarantees one operation at a time, and the transport itself
serialises requests and keeps the protocol's silent interval between frames
(t3.5 for RTU). pymodbus' own retries and background reconnect are turned
off: retries, back-off and reconnect pacing are the scheduler's and this
module's decisions, so that a dead meter cannot hold the bus for
``retries × timeout`` behind the scheduler's back.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from firmware_bridge.driver import (
    MeterFrameError,
    MeterRefused,
    MeterTimeout,
    MeterWrongAddress,
    TransportError,
)
from firmware_bridge.modbus import mbap
from firmware_bridge.serial_line import check_device
from firmware_bridge.timing import rtu_t35_s

# pymodbus: "request uses device id=1 but received 9"
_WRONG_UNIT = re.compile(r"device id=(\d+) but received (\d+)")

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class ModbusExceptionReply(MeterRefused):
    """The meter answered with a Modbus exception; ``code`` is the exception code."""

    def __init__(self, meter_id: str, detail: str, code: int) -> None:
        super().__init__(meter_id, detail)
        self.code = code


ILLEGAL_DATA_ADDRESS = 2


def quiet_pymodbus_logging() -> None:
    """Keep pymodbus from logging every unanswered request at ERROR (with a frame dump).

    Every failure already comes back as a typed MeterError and lands in the
    meter's health; an ERROR line per dead meter per cycle only wears the SD
    card. Applied only while nobody configured the ``pymodbus`` logger level
    (set it, e.g. to DEBUG, before opening a bus to see frames again).
    """
    logger = logging.getLogger("pymodbus.logging")
    if logger.level == logging.NOTSET and logging.getLogger("pymodbus").level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)


def crc16(data: bytes) -> int:
    """Modbus RTU CRC (polynomial 0xA001, initial 0xFFFF)."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu_unit(frame: bytes) -> int | None:
    """The unit id of ``frame`` if it is one whole RTU frame with a good CRC, else None."""
    if len(frame) < 5 or crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
        return None
    return frame[0]


class ModbusTransport:
    """One bus's Modbus transport: what the drivers and relay actuators call.

    :meth:`tcp` gives Modbus TCP (:class:`MbapTransport`, the project's own
    MBAP client) or RTU tunnelled over TCP (:class:`PymodbusTransport`);
    :meth:`serial` gives RTU on a serial line (:class:`PymodbusTransport`).
    Every request has one deadline, the request's timeout; the same errors of
    the driver contract come out of both.
    """

    def __init__(
        self,
        *,
        name: str,
        timeout_s: float,
        silent_interval_s: float = 0.0,
        reconnect_min_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        device: str | None = None,
    ) -> None:
        self.name = name
        self.device = device  # serial device path (None over TCP)
        self.timeout_s = timeout_s
        self.silent_interval_s = silent_interval_s
        self.reconnect_min_s = reconnect_min_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last_end: float | None = None
        self._last_connect_fail: float | None = None
        self.requests = 0  # frames sent (for bus metrics)

    @classmethod
    def tcp(
        cls, host: str, port: int, *, name: str, timeout_s: float, rtu_over_tcp: bool = False, baud: int = 9600
    ) -> ModbusTransport:
        """Modbus TCP (MBAP framing), or RTU frames tunnelled through a serial server.

        With ``rtu_over_tcp`` (transparent RS-485/Ethernet converters) the RS-485
        side still needs t3.5 between frames at ``baud``.
        """
        if not rtu_over_tcp:
            return MbapTransport(host, port, name=name, timeout_s=timeout_s)
        client = AsyncModbusTcpClient(
            host, port=port, framer=FramerType.RTU, timeout=timeout_s, retries=0, reconnect_delay=0
        )
        return PymodbusTransport(client, name=name, timeout_s=timeout_s, silent_interval_s=rtu_t35_s(baud))

    @classmethod
    def serial(
        cls,
        device: str,
        *,
        name: str,
        baud: int,
        parity: str,
        stop_bits: int,
        timeout_s: float,
    ) -> PymodbusTransport:
        client = AsyncModbusSerialClient(
            device,
            baudrate=baud,
            parity=parity,
            stopbits=stop_bits,
            bytesize=8,
            timeout=timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        return PymodbusTransport(
            client,
            name=name,
            timeout_s=timeout_s,
            silent_interval_s=rtu_t35_s(baud, parity, stop_bits),
            device=device,
        )

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    async def connect(self, meter_id: str = "-") -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _check_reconnect(self, meter_id: str) -> None:
        """Fail fast for ``reconnect_min_s`` after a failed connect."""
        if self._last_connect_fail is not None and self._clock() - self._last_connect_fail < self.reconnect_min_s:
            raise TransportError(meter_id, f"bus {self.name}: not connected (retrying in {self.reconnect_min_s:g}s)")

    async def read_registers(
        self, meter_id: str, unit: int, function_code: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> list[int]:
        raise NotImplementedError

    async def read_coil(self, meter_id: str, unit: int, address: int, *, timeout_s: float | None = None) -> bool:
        raise NotImplementedError

    async def write_coil(self, meter_id: str, unit: int, address: int, value: bool, *, timeout_s: float | None = None) -> None:
        raise NotImplementedError

    async def write_register(
        self, meter_id: str, unit: int, address: int, value: int, *, timeout_s: float | None = None
    ) -> None:
        raise NotImplementedError


class PymodbusTransport(ModbusTransport):
    """A connected pymodbus client (RTU on a serial line or tunnelled over TCP) plus
    pacing and error mapping."""

    def __init__(
        self,
        client: AsyncModbusTcpClient | AsyncModbusSerialClient,
        *,
        name: str,
        timeout_s: float,
        silent_interval_s: float = 0.0,
        reconnect_min_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        device: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            timeout_s=timeout_s,
            silent_interval_s=silent_interval_s,
            reconnect_min_s=reconnect_min_s,
            clock=clock,
            device=device,
        )
        self.client = client
        self._rx_bytes = 0  # bytes received for the request in flight
        self._rx_data = b""  # and the bytes themselves (to name a reply from another unit)
        # see every received byte: an answer that never became a valid frame (bad CRC,
        # garbage, cut short) is a frame error, not a silent meter
        client.ctx.trace_packet = self._trace_packet
        # pymodbus closes a TCP connection after N unanswered requests; a dead unit
        # behind a TCP gateway must not cut off the healthy ones.
        client.set_max_no_responses(1_000_000)
        quiet_pymodbus_logging()

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx_bytes = max(self._rx_bytes, len(data))
            if len(data) >= len(self._rx_data):
                self._rx_data = bytes(data)
        return data

    def _no_answer(self, meter_id: str, what: str, limit: float, unit: int | None = None) -> Exception:
        other = rtu_unit(self._rx_data)
        if unit is not None and other is not None and other != unit:
            # a whole, valid RTU frame that pymodbus dropped: it came from another unit
            return MeterWrongAddress(meter_id, f"unit {unit}", f"{other}", what="unit")
        if self._rx_bytes:
            return MeterFrameError(
                meter_id, f"{what}: {self._rx_bytes} byte(s) received but no valid frame within {limit:g}s"
            )
        return MeterTimeout(meter_id, f"{what}: no answer within {limit:g}s")

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    async def connect(self, meter_id: str = "-") -> None:
        if self.client.connected:
            return
        self._check_reconnect(meter_id)
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):
                ok = await self.client.connect()
        except (TimeoutError, OSError, ModbusException) as exc:
            ok = False
            detail = f"{type(exc).__name__}: {exc}"
        else:
            detail = "connect failed"
        if not ok:
            self._last_connect_fail = self._clock()
            self.client.close()
            if self.device is not None:
                detail = check_device(self.device) or detail
            raise TransportError(meter_id, f"bus {self.name}: {detail}")
        self._last_connect_fail = None

    def close(self) -> None:
        self.client.close()

    async def _call(
        self,
        meter_id: str,
        what: str,
        op: Callable[[], Awaitable[Any]],
        timeout_s: float | None,
        function_code: int,
        unit: int | None = None,
    ) -> Any:
        """Run one request with pacing, a hard deadline and error mapping."""
        async with self._lock:
            await self.connect(meter_id)
            if self._last_end is not None and self.silent_interval_s > 0:
                wait = self._last_end + self.silent_interval_s - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            limit = timeout_s if timeout_s is not None else self.timeout_s
            # per-request timeout (a meter may be slower than the bus default)
            self.client.ctx.comm_params.timeout_connect = limit
            self.requests += 1
            self._rx_bytes = 0
            self._rx_data = b""
            try:
                # pymodbus applies the client timeout; this deadline is the backstop
                # (a timeout scope, not wait_for: no extra task per request)
                async with asyncio.timeout(limit + 0.5):
                    response = await op()
            except TimeoutError:
                raise self._no_answer(meter_id, what, limit, unit) from None
            except ConnectionException as exc:
                raise TransportError(meter_id, f"{what}: bus {self.name}: {exc}") from None
            except ModbusIOException as exc:
                text = str(exc)
                if "no response" in text.lower():
                    raise self._no_answer(meter_id, what, limit, unit) from None
                wrong = _WRONG_UNIT.search(text)
                if wrong:
                    raise MeterWrongAddress(
                        meter_id, f"unit {wrong.group(1)}", wrong.group(2), what="unit"
                    ) from None
                raise MeterFrameError(meter_id, f"{what}: {text}") from None
            except ModbusException as exc:
                raise MeterFrameError(meter_id, f"{what}: {exc}") from None
            except OSError as exc:
                raise TransportError(meter_id, f"{what}: bus {self.name}: {exc}") from None
            finally:
                self._last_end = self._clock()
            if response is None:
                raise MeterTimeout(meter_id, f"{what}: no answer")
            if response.isError():
                code = getattr(response, "exception_code", 0)
                name = EXCEPTION_NAMES.get(code, "unknown")
                raise ModbusExceptionReply(meter_id, f"{what}: exception {code} ({name})", code)
            if getattr(response, "function_code", function_code) != function_code:
                raise MeterFrameError(meter_id, f"{what}: answer has function code {response.function_code}")
            return response

    async def read_registers(
        self, meter_id: str, unit: int, function_code: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> list[int]:
        what = _what(unit, function_code, address, f"+{count}")
        if function_code == 3:

            def op() -> Awaitable[Any]:
                return self.client.read_holding_registers(address, count=count, device_id=unit)

        elif function_code == 4:

            def op() -> Awaitable[Any]:
                return self.client.read_input_registers(address, count=count, device_id=unit)

        else:
            raise ValueError(f"function code {function_code} is not a register read")
        response = await self._call(meter_id, what, op, timeout_s, function_code, unit)
        regs = list(response.registers)
        if len(regs) != count:
            raise MeterFrameError(meter_id, f"{what}: answered {len(regs)} registers")
        return regs

    async def read_coil(self, meter_id: str, unit: int, address: int, *, timeout_s: float | None = None) -> bool:
        what = _what(unit, 1, address)
        response = await self._call(
            meter_id, what, lambda: self.client.read_coils(address, count=1, device_id=unit), timeout_s, 1, unit
        )
        bits = list(response.bits)
        if not bits:
            raise MeterFrameError(meter_id, f"{what}: empty answer")
        return bool(bits[0])

    async def write_coil(self, meter_id: str, unit: int, address: int, value: bool, *, timeout_s: float | None = None) -> None:
        what = _what(unit, 5, address, f"={int(value)}")
        await self._call(
            meter_id, what, lambda: self.client.write_coil(address, value, device_id=unit), timeout_s, 5, unit
        )

    async def write_register(
        self, meter_id: str, unit: int, address: int, value: int, *, timeout_s: float | None = None
    ) -> None:
        what = _what(unit, 6, address, f"={value}")
        await self._call(
            meter_id, what, lambda: self.client.write_register(address, value, device_id=unit), timeout_s, 6, unit
        )


def _what(unit: int, function_code: int, address: int, tail: str = "") -> str:
    """How a request is named in errors: ``unit 1 FC04 0x0000+2``."""
    return f"unit {unit} FC{function_code:02d} {address:#06x}{tail}"


class _MbapConnection(asyncio.Protocol):
    """One TCP connection: frames cut from the stream, each matched to the waiting
    request by its transaction id; a frame for another id (a late answer to a
    request that timed out) is dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # the loop the connection runs on (asked once, not per request)
        self.parser = mbap.MbapParser()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.tid = -1
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.late = 0  # frames for another transaction id while a request waited
        # One timer serves every request: requests follow each other in well under
        # their timeout, so it is armed once and, when it fires, either expires the
        # request still waiting or is re-armed for that request's deadline (no timer
        # set and cancelled per request).
        self.deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def expect(self, tid: int, waiter: asyncio.Future[tuple[int, bytes]], deadline: float) -> None:
        """``waiter`` gets the frame with ``tid``, or TimeoutError at ``deadline`` (loop time)."""
        self.tid = tid
        self.waiter = waiter
        self.deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer, deadline)

    def _on_timer(self, armed_for: float) -> None:
        self._timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # idle: armed again by the next request
        if self.deadline <= armed_for:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self.loop.call_at(self.deadline, self._on_timer, self.deadline)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (create_connection); not an isinstance check: uvloop's
        # transports have the methods without deriving from asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except mbap.MbapFrameError as exc:
            self._fail(exc)
            self.abort()
            return
        for tid, unit, pdu in frames:
            waiter = self.waiter
            if waiter is not None and tid == self.tid and not waiter.done():
                waiter.set_result((unit, pdu))
            else:
                self.late += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stop_timer()
        pending = self.parser.pending
        lost = "connection closed by the peer" if exc is None else f"connection lost: {exc}"
        if pending:
            lost += f" ({pending} byte(s) of a frame received)"
        self._fail(ConnectionError(lost))

    def _fail(self, exc: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        self.closed = True
        self.stop_timer()
        self.parser.reset()
        if self.transport is not None:
            self.transport.abort()


class MbapTransport(ModbusTransport):
    """Modbus TCP on one connection of our own: MBAP frames on an asyncio protocol.

    One request at a time (the transport's lock; the bus scheduler already
    serialises its operations, so it is never contended there). Each request
    has one deadline, its timeout, after which it fails; replies are matched
    by transaction id, so a late answer to a request that timed out is never
    taken for the next one. A stream that is not MBAP, or a frame left
    incomplete at the deadline, resets the connection; the next request
    re-dials (failing fast for ``reconnect_min_s`` after a failed connect).
    No silent interval: there is no RS-485 line on our side of the socket.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        name: str,
        timeout_s: float,
        reconnect_min_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=name, timeout_s=timeout_s, reconnect_min_s=reconnect_min_s, clock=clock)
        self.host = host
        self.port = port
        self._conn: _MbapConnection | None = None
        self._tid = 0

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed

    async def connect(self, meter_id: str = "-") -> None:
        if self.connected:
            return
        self._check_reconnect(meter_id)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):
                _, conn = await loop.create_connection(lambda: _MbapConnection(loop), self.host, self.port)
        except (TimeoutError, OSError) as exc:
            self._last_connect_fail = self._clock()
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise TransportError(meter_id, f"bus {self.name}: {self.host}:{self.port}: {detail}") from None
        self._conn = conn
        self._last_connect_fail = None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.closed = True
            conn.stop_timer()
            conn.transport.close()

    async def _exchange(
        self, meter_id: str, unit: int, function_code: int, address: int, count: int, pdu: bytes | None, timeout_s: float | None
    ) -> bytes:
        """Send one request (a register read when ``pdu`` is None) and return the reply's PDU."""
        lock = self._lock
        await lock.acquire()
        try:
            conn = self._conn
            if conn is None or conn.closed:
                await self.connect(meter_id)
                conn = self._conn
                assert conn is not None and conn.transport is not None
            limit = self.timeout_s if timeout_s is None else timeout_s
            self._tid = tid = self._tid % 0xFFFF + 1
            data = mbap.read_frame(tid, unit, function_code, address, count) if pdu is None else mbap.frame(tid, unit, pdu)
            loop = conn.loop  # not asyncio.get_running_loop(): a getpid() per call on 3.11
            fut: asyncio.Future[tuple[int, bytes]] = loop.create_future()
            conn.expect(tid, fut, loop.time() + limit)
            late = conn.late
            self.requests += 1
            conn.transport.write(data)  # type: ignore[union-attr]
            try:
                got, reply = await fut
            except TimeoutError:
                raise self._no_answer(conn, meter_id, unit, function_code, address, count, pdu, limit, late) from None
            except mbap.MbapFrameError as exc:
                raise MeterFrameError(
                    meter_id, f"{self._what(unit, function_code, address, count, pdu)}: {exc}; connection reset"
                ) from None
            except OSError as exc:  # ConnectionError from connection_lost, or a failed write
                what = self._what(unit, function_code, address, count, pdu)
                raise TransportError(meter_id, f"{what}: bus {self.name}: {exc}") from None
            finally:
                conn.waiter = None
        finally:
            lock.release()
        if got != unit:
            raise MeterWrongAddress(meter_id, f"unit {unit}", f"{got}", what="unit")
        if reply[0] & 0x80:
            code = mbap.exception_code(function_code, reply)
            if code is not None:
                name = EXCEPTION_NAMES.get(code, "unknown")
                what = self._what(unit, function_code, address, count, pdu)
                raise ModbusExceptionReply(meter_id, f"{what}: exception {code} ({name})", code)
        return reply

    @staticmethod
    def _what(unit: int, function_code: int, address: int, count: int, pdu: bytes | None) -> str:
        if pdu is None or function_code in (mbap.READ_COILS, mbap.READ_DISCRETE_INPUTS):
            return _what(unit, function_code, address, f"+{count}" if count != 1 or pdu is None else "")
        if function_code == mbap.WRITE_SINGLE_COIL:
            return _what(unit, function_code, address, f"={int(pdu[3] == 0xFF)}")
        if function_code == mbap.WRITE_SINGLE_REGISTER:
            return _what(unit, function_code, address, f"={int.from_bytes(pdu[3:5], 'big')}")
        return _what(unit, function_code, address, f"+{count}")

    def _no_answer(
        self,
        conn: _MbapConnection,
        meter_id: str,
        unit: int,
        function_code: int,
        address: int,
        count: int,
        pdu: bytes | None,
        limit: float,
        late_before: int,
    ) -> Exception:
        what = self._what(unit, function_code, address, count, pdu)
        pending = conn.parser.pending
        if pending:
            # the rest of the frame may still come and would be read as the next
            # frame's start: the stream cannot be trusted any more
            conn.abort()
            return MeterFrameError(
                meter_id, f"{what}: {pending} byte(s) of an incomplete frame within {limit:g}s; connection reset"
            )
        late = conn.late - late_before
        note = f" ({late} late answer(s) to earlier requests dropped)" if late else ""
        return MeterTimeout(meter_id, f"{what}: no answer within {limit:g}s{note}")

    def _frame_error(self, meter_id: str, what: str, exc: mbap.MbapReplyError) -> MeterFrameError:
        return MeterFrameError(meter_id, f"{what}: {exc}")

    async def read_registers(
        self, meter_id: str, unit: int, function_code: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> list[int]:
        pdu = await self.read_register_pdu(meter_id, unit, function_code, address, count, timeout_s=timeout_s)
        return mbap.unpack_registers(pdu, count)

    async def read_register_pdu(
        self, meter_id: str, unit: int, function_code: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> bytes:
        """:meth:`read_registers`, the registers left in the reply's PDU (function code,
        byte count, then the ``count`` registers big-endian): the same request, checks
        and errors, without the list of integers (the driver decodes the bytes)."""
        if function_code not in (mbap.READ_HOLDING_REGISTERS, mbap.READ_INPUT_REGISTERS):
            raise ValueError(f"function code {function_code} is not a register read")
        reply = await self._exchange(meter_id, unit, function_code, address, count, None, timeout_s)
        try:
            mbap.check_registers(function_code, reply, count)
        except mbap.MbapReplyError as exc:
            raise self._frame_error(meter_id, _what(unit, function_code, address, f"+{count}"), exc) from None
        return reply

    async def read_bits(
        self, meter_id: str, unit: int, function_code: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> list[bool]:
        """FC01 (coils) or FC02 (discrete inputs)."""
        if function_code not in (mbap.READ_COILS, mbap.READ_DISCRETE_INPUTS):
            raise ValueError(f"function code {function_code} is not a bit read")
        request = mbap.read_pdu(function_code, address, count)
        reply = await self._exchange(meter_id, unit, function_code, address, count, request, timeout_s)
        try:
            return mbap.bits(function_code, reply, count)
        except mbap.MbapReplyError as exc:
            raise self._frame_error(meter_id, self._what(unit, function_code, address, count, request), exc) from None

    async def read_coil(self, meter_id: str, unit: int, address: int, *, timeout_s: float | None = None) -> bool:
        (bit,) = await self.read_bits(meter_id, unit, mbap.READ_COILS, address, 1, timeout_s=timeout_s)
        return bit

    async def _write(self, meter_id: str, unit: int, address: int, count: int, request: bytes, timeout_s: float | None) -> None:
        fc = request[0]
        reply = await self._exchange(meter_id, unit, fc, address, count, request, timeout_s)
        try:
            mbap.check_echo(request, reply)
        except mbap.MbapReplyError as exc:
            raise self._frame_error(meter_id, self._what(unit, fc, address, count, request), exc) from None

    async def write_coil(self, meter_id: str, unit: int, address: int, value: bool, *, timeout_s: float | None = None) -> None:
        await self._write(meter_id, unit, address, 1, mbap.write_single_coil_pdu(address, value), timeout_s)

    async def write_register(
        self, meter_id: str, unit: int, address: int, value: int, *, timeout_s: float | None = None
    ) -> None:
        await self._write(meter_id, unit, address, 1, mbap.write_single_register_pdu(address, value), timeout_s)

    async def write_coils(
        self, meter_id: str, unit: int, address: int, values: list[bool], *, timeout_s: float | None = None
    ) -> None:
        """FC15."""
        request = mbap.write_multiple_coils_pdu(address, values)
        await self._write(meter_id, unit, address, len(values), request, timeout_s)

    async def write_registers(
        self, meter_id: str, unit: int, address: int, values: list[int], *, timeout_s: float | None = None
    ) -> None:
        """FC16."""
        request = mbap.write_multiple_registers_pdu(address, values)
        await self._write(meter_id, unit, address, len(values), request, timeout_s)
