"""One pymodbus client per bus, with errors mapped to the driver contract.

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
from typing import Any

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
    """A connected pymodbus client plus pacing and error mapping."""

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
        self.client = client
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
        self._rx_bytes = 0  # bytes received for the request in flight
        self._rx_data = b""  # and the bytes themselves (to name a reply from another unit)
        # see every received byte: an answer that never became a valid frame (bad CRC,
        # garbage, cut short) is a frame error, not a silent meter
        client.ctx.trace_packet = self._trace_packet
        # pymodbus closes a TCP connection after N unanswered requests; a dead unit
        # behind a TCP gateway must not cut off the healthy ones.
        client.set_max_no_responses(1_000_000)
        quiet_pymodbus_logging()

    @classmethod
    def tcp(
        cls, host: str, port: int, *, name: str, timeout_s: float, rtu_over_tcp: bool = False, baud: int = 9600
    ) -> ModbusTransport:
        """Modbus TCP (MBAP framing), or RTU frames tunnelled through a serial server.

        With ``rtu_over_tcp`` (transparent RS-485/Ethernet converters) the RS-485
        side still needs t3.5 between frames at ``baud``.
        """
        framer = FramerType.RTU if rtu_over_tcp else FramerType.SOCKET
        client = AsyncModbusTcpClient(host, port=port, framer=framer, timeout=timeout_s, retries=0, reconnect_delay=0)
        gap = rtu_t35_s(baud) if rtu_over_tcp else 0.0
        return cls(client, name=name, timeout_s=timeout_s, silent_interval_s=gap)

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
    ) -> ModbusTransport:
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
        return cls(
            client,
            name=name,
            timeout_s=timeout_s,
            silent_interval_s=rtu_t35_s(baud, parity, stop_bits),
            device=device,
        )

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
        now = self._clock()
        if self._last_connect_fail is not None and now - self._last_connect_fail < self.reconnect_min_s:
            raise TransportError(meter_id, f"bus {self.name}: not connected (retrying in {self.reconnect_min_s:g}s)")
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
        what = f"unit {unit} FC{function_code:02d} {address:#06x}+{count}"
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
        what = f"unit {unit} FC01 {address:#06x}"
        response = await self._call(
            meter_id, what, lambda: self.client.read_coils(address, count=1, device_id=unit), timeout_s, 1, unit
        )
        bits = list(response.bits)
        if not bits:
            raise MeterFrameError(meter_id, f"{what}: empty answer")
        return bool(bits[0])

    async def write_coil(self, meter_id: str, unit: int, address: int, value: bool, *, timeout_s: float | None = None) -> None:
        what = f"unit {unit} FC05 {address:#06x}={int(value)}"
        await self._call(
            meter_id, what, lambda: self.client.write_coil(address, value, device_id=unit), timeout_s, 5, unit
        )

    async def write_register(
        self, meter_id: str, unit: int, address: int, value: int, *, timeout_s: float | None = None
    ) -> None:
        what = f"unit {unit} FC06 {address:#06x}={value}"
        await self._call(
            meter_id, what, lambda: self.client.write_register(address, value, device_id=unit), timeout_s, 6, unit
        )
