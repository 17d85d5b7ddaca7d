"""Modbus meter simulator for tests, benchmarks and bench-top demos.

Test-bench code: it uses the register maps and pymodbus, nothing of the
gateway's timing. Several meters (unit ids) answer on one Modbus TCP server,
each following a register map
(:class:`~firmware_bridge.modbus.profiles.Profile`, SDM120 by default). The
import energy register rises with the configured load while the meter's relay
is closed; any value can be set at run time; per-unit behaviour and faults:
``delay_s`` (the meter's response time: inside what its manual documents, or
beyond it for fault tests), ``dead`` (no reply at all), ``refuse``
(exception reply), ``relay_stuck`` (relay writes acknowledged but the relay
does not move), ``energy_step_kwh`` (add a step, negative = energy going
backwards), ``strict_map`` (refuse reads touching registers outside the map),
a slow start after power returns (:meth:`SimMeter.power_on`), and on the RTU
simulator ``wire_fault`` (bad CRC, garbage bytes, a partial frame) and
``reply_unit`` (replies carry another unit id). Units not configured are
silent.

:class:`RtuSimulator` serves the same meters with RTU framing on a
pseudo-terminal pair (the client opens :attr:`RtuSimulator.path` like a
serial port), optionally spending each frame's wire time at the configured
baud rate so that bus timing is realistic.

Usage from asyncio code::

    async with ModbusSimulator(units=[1, 2, 3]) as sim:
        port = sim.port          # bound on 127.0.0.1, port 0 = any free port
        sim.meter(2).dead = True

From a shell::

    python -m testbed.simulators.modbus --tcp 5020 --units 1,2,3 --load-kw 1.5
    python -m testbed.simulators.modbus --rtu --baud 9600 --wire-timing --units 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import os
import random
import time
import tty
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import ModbusException, NoSuchIdException
from pymodbus.framer import FramerRTU, FramerType
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer

from firmware_bridge.modbus.decode import encode_value
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES, Profile
from firmware_bridge.reading import Quantity
from testbed.simulators import wait_for_stop_signal

_HOUR_S = Decimal(3600)


def char_time_s(baud: int, bits_per_char: int = 11) -> float:
    """One character on the line (8E1 and 8N2: 11 bits)."""
    return bits_per_char / baud


def rtu_t35_s(baud: int) -> float:
    """Modbus RTU silent interval: 3.5 characters, fixed 1.75 ms above 19200 baud."""
    return 0.00175 if baud > 19200 else 3.5 * char_time_s(baud)


class WireFault(enum.StrEnum):
    """Byte-level faults of the RTU simulator's replies."""

    BAD_CRC = "bad_crc"  # correct frame, last CRC byte flipped
    GARBAGE = "garbage"  # random bytes instead of the reply
    PARTIAL = "partial"  # the first half of the reply, then silence


@dataclass
class SimMeter:
    """State of one simulated meter; pure apart from reading the clock it is given."""

    unit_id: int
    profile: Profile
    load_kw: Decimal = Decimal("1.0")
    values: dict[Quantity, Decimal] = field(default_factory=dict)
    relay_coil: int | None = 0  # coil address of the supply relay (True = open)
    relay_register: int | None = None  # holding register of the supply relay
    relay_open_value: int = 1
    coils: dict[int, bool] = field(default_factory=dict)
    holding: dict[int, int] = field(default_factory=dict)
    dead: bool = False
    delay_s: float = 0.0
    refuse: ExcCodes | None = None
    relay_stuck: bool = False
    energy_step_kwh: Decimal = Decimal(0)
    wire_fault: WireFault | None = None  # RTU simulator only
    strict_map: bool = False  # refuse reads that touch registers outside the map (like many meters)
    reply_unit: int | None = None  # RTU: replies carry this unit id (a misconfigured meter)
    unanswered: set[int] = field(default_factory=set)  # start addresses never answered (some firmware)
    powered: bool = True
    boot_until_s: float = 0.0  # after power returns: silent until then
    reads: int = 0
    writes: int = 0
    _last_s: float | None = None

    def __post_init__(self) -> None:
        defaults = {
            Quantity.VOLTAGE: Decimal("230.4"),
            Quantity.VOLTAGE_B: Decimal("231.0"),
            Quantity.VOLTAGE_C: Decimal("229.6"),
            Quantity.FREQUENCY: Decimal("50.00"),
            Quantity.POWER_FACTOR: Decimal("0.98"),
            Quantity.ENERGY_IMPORT: Decimal("1206.42"),
            Quantity.ENERGY_EXPORT: Decimal("0"),
        }
        for q, v in defaults.items():
            self.values.setdefault(q, v)

    # -- power ---------------------------------------------------------------
    def power_off(self, now_s: float) -> None:
        """Supply gone: no metering, no answers."""
        self.advance(now_s)
        self.powered = False

    def power_on(self, now_s: float, boot_s: float = 3.0) -> None:
        """Supply back: silent for ``boot_s`` while the meter starts."""
        self._last_s = now_s  # nothing was metered while off
        self.powered = True
        self.boot_until_s = now_s + boot_s

    def answers(self, now_s: float) -> bool:
        return self.powered and not self.dead and now_s >= self.boot_until_s

    # -- relay ---------------------------------------------------------------
    @property
    def relay_open(self) -> bool:
        if self.relay_register is not None:
            return self.holding.get(self.relay_register, 0) == self.relay_open_value
        if self.relay_coil is not None:
            return self.coils.get(self.relay_coil, False)
        return False

    # -- physics -------------------------------------------------------------
    def advance(self, now_s: float) -> None:
        """Integrate energy up to ``now_s`` (monotonic seconds)."""
        if self._last_s is None or not self.powered:
            self._last_s = now_s
            return
        dt = Decimal(repr(max(0.0, now_s - self._last_s)))
        self._last_s = now_s
        if not self.relay_open:
            self.values[Quantity.ENERGY_IMPORT] += self.load_kw * dt / _HOUR_S
        if self.energy_step_kwh:
            self.values[Quantity.ENERGY_IMPORT] += self.energy_step_kwh
            self.energy_step_kwh = Decimal(0)

    def live_values(self) -> dict[Quantity, Decimal]:
        v = dict(self.values)
        power = Decimal(0) if self.relay_open else self.load_kw
        v.setdefault(Quantity.POWER, power)
        if Quantity.POWER not in self.values:
            v[Quantity.POWER] = power
        if Quantity.CURRENT not in self.values:
            volts = v[Quantity.VOLTAGE]
            v[Quantity.CURRENT] = (power * 1000 / volts) if volts else Decimal(0)
        return v

    def register_bank(self) -> dict[int, int]:
        """The profile's registers as the meter would send them now."""
        out: dict[int, int] = {}
        live = self.live_values()
        for f in self.profile.fields:
            value = live.get(f.quantity, Decimal(0))
            for i, word in enumerate(encode_value(value, f, self.profile.word_order)):
                out[f.address + i] = word
        return out

    # -- Modbus data model -----------------------------------------------------
    def get(self, func_code: int, address: int, count: int, now_s: float) -> list[int] | list[bool] | ExcCodes:
        self.advance(now_s)
        if self.refuse is not None:
            return ExcCodes(self.refuse)
        self.reads += 1
        if func_code in (1, 5, 15):
            return [self.coils.get(address + i, False) for i in range(count)]
        if func_code == 2:
            return [False] * count
        if func_code == self.profile.function_code:
            bank = self.register_bank()
            lo = min(f.address for f in self.profile.fields)
            hi = max(f.end for f in self.profile.fields)
            if func_code in (3, 6, 16):
                bank.update(self.holding)
                lo = min([lo, *self.holding])
                hi = max([hi, *(a + 1 for a in self.holding)])
            if address < lo or address + count > hi:
                return ExcCodes.ILLEGAL_ADDRESS
            if self.strict_map and any(address + i not in bank for i in range(count)):
                return ExcCodes.ILLEGAL_ADDRESS
            return [bank.get(address + i, 0) for i in range(count)]
        if func_code in (3, 6, 16):
            if all(address + i in self.holding for i in range(count)):
                return [self.holding[address + i] for i in range(count)]
        return ExcCodes.ILLEGAL_ADDRESS

    def set(self, func_code: int, address: int, values: Sequence[int] | Sequence[bool], now_s: float) -> ExcCodes | None:
        self.advance(now_s)
        if self.refuse is not None:
            return ExcCodes(self.refuse)
        self.writes += 1
        relay_addr = self.relay_coil if func_code in (5, 15) else self.relay_register
        for i, value in enumerate(values):
            addr = address + i
            if self.relay_stuck and addr == relay_addr:
                continue  # acknowledged, but the contactor does not move
            if func_code in (5, 15):
                self.coils[addr] = bool(value)
            elif func_code in (6, 16):
                self.holding[addr] = int(value) & 0xFFFF
            else:
                return ExcCodes.ILLEGAL_FUNCTION
        return None


class _SimContext(ModbusServerContext):
    """Server context that answers from :class:`SimMeter` objects.

    pymodbus uses a :class:`ModbusServerContext` flagged ``old_simulator`` as-is
    (it only calls ``async_getValues``/``async_setValues``/``device_ids``), which lets
    values be computed at request time. Raising :class:`NoSuchIdException` with
    ``ignore_missing_devices=True`` makes pymodbus send no reply (a dead unit).
    """

    def __init__(self, meters: dict[int, SimMeter], clock: Callable[[], float]) -> None:
        # The base initialiser builds static register blocks; not wanted here.
        self._meters = meters
        self._clock = clock
        self.in_flight = 0  # requests being served right now (a one-master bus never exceeds 1)
        self.max_in_flight = 0
        self.simdevices = []
        self.old_simulator = True
        self.single = False

    def device_ids(self) -> list[int]:
        return list(self._meters)

    async def _meter(self, device_id: int) -> SimMeter:
        m = self._meters.get(device_id)
        if m is None or not m.answers(self._clock()):
            raise NoSuchIdException(f"unit {device_id} does not answer")
        if m.delay_s > 0:
            await asyncio.sleep(m.delay_s)
        return m

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        with self._serving():
            m = await self._meter(device_id)
            if address in m.unanswered:
                raise NoSuchIdException(f"unit {device_id} does not answer reads at {address:#06x}")
            return m.get(func_code, address, count, self._clock())

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        with self._serving():
            m = await self._meter(device_id)
            return m.set(func_code, address, values, self._clock())


def make_meters(
    units: Iterable[int],
    profile: Profile | None = None,
    load_kw: Decimal | str | float = "1.0",
) -> dict[int, SimMeter]:
    prof = profile or BUILTIN_PROFILES["sdm120"]
    load = Decimal(str(load_kw))
    return {u: SimMeter(unit_id=u, profile=prof, load_kw=load) for u in units}


class ModbusSimulator:
    """Async context manager running a Modbus TCP server for simulated meters.

    ``rtu_over_tcp`` serves RTU frames over TCP, like a transparent serial server.
    """

    def __init__(
        self,
        units: Iterable[int] = (1,),
        *,
        profile: Profile | None = None,
        load_kw: Decimal | str | float = "1.0",
        host: str = "127.0.0.1",
        port: int = 0,
        meters: dict[int, SimMeter] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rtu_over_tcp: bool = False,
    ) -> None:
        self.meters = meters if meters is not None else make_meters(units, profile, load_kw)
        self.host = host
        self._port = port
        self.rtu_over_tcp = rtu_over_tcp
        self._clock = clock
        self._server: ModbusTcpServer | None = None
        self._ctx: _SimContext | None = None

    def meter(self, unit_id: int) -> SimMeter:
        return self.meters[unit_id]

    @property
    def max_in_flight(self) -> int:
        """Most requests ever served at once (a correct single master keeps this at 1)."""
        return self._ctx.max_in_flight if self._ctx is not None else 0

    @property
    def port(self) -> int:
        if self._server is None or self._server.transport is None:
            raise RuntimeError("simulator not running")
        server: Any = self._server.transport
        return int(server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        ctx = self._ctx = _SimContext(self.meters, self._clock)
        framer = FramerType.RTU if self.rtu_over_tcp else FramerType.SOCKET
        self._server = ModbusTcpServer(
            ctx, framer=framer, address=(self.host, self._port), ignore_missing_devices=True
        )
        await self._server.serve_forever(background=True)
        for m in self.meters.values():
            m.advance(self._clock())

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> ModbusSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def corrupt(frame: bytes, fault: WireFault | None, rng: random.Random) -> bytes:
    """Apply a wire fault to a reply frame (pure apart from the given RNG)."""
    if fault is None:
        return frame
    if fault is WireFault.BAD_CRC:
        return frame[:-1] + bytes([frame[-1] ^ 0xFF])
    if fault is WireFault.GARBAGE:
        return bytes(rng.randrange(256) for _ in range(len(frame)))
    if fault is WireFault.PARTIAL:
        return frame[: max(1, len(frame) // 2)]
    raise ValueError(fault)


class RtuSimulator:
    """Modbus RTU meters on a pseudo-terminal; the client opens :attr:`path`.

    Requests are decoded and answered with pymodbus' RTU framer and PDUs,
    against the same :class:`SimMeter` model as the TCP simulator. With
    ``wire_timing`` each request and reply costs its time on the wire at
    ``baud`` (11 bits per character) plus t3.5, and ``response_delay_s``
    models the meter's own turnaround.
    """

    def __init__(
        self,
        units: Iterable[int] = (1,),
        *,
        profile: Profile | None = None,
        load_kw: Decimal | str | float = "1.0",
        baud: int = 9600,
        wire_timing: bool = False,
        response_delay_s: float = 0.0,
        meters: dict[int, SimMeter] | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
    ) -> None:
        self.meters = meters if meters is not None else make_meters(units, profile, load_kw)
        self.baud = baud
        self.wire_timing = wire_timing
        self.response_delay_s = response_delay_s
        self._clock = clock
        self._rng = random.Random(seed)
        self._ctx = _SimContext(self.meters, clock)
        self._framer = FramerRTU(DecodePDU(True))
        self._master: int | None = None
        self._slave: int | None = None
        self._buf = b""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.path = ""
        self.requests = 0
        self.replies = 0

    def meter(self, unit_id: int) -> SimMeter:
        return self.meters[unit_id]

    def wire_time_s(self, nbytes: int) -> float:
        return nbytes * char_time_s(self.baud)

    async def start(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.path = os.ttyname(slave)
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._on_readable)
        self._task = asyncio.create_task(self._serve(), name="rtu-simulator")
        for m in self.meters.values():
            m.advance(self._clock())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
            os.close(self._master)
            self._master = None
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None

    async def __aenter__(self) -> RtuSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _on_readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO when no process has the slave open
            return
        if data:
            self._buf += data
            self._wake.set()

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buf:
                try:
                    used, pdu = self._framer.handleFrame(self._buf, 0, 0)
                except ModbusException:
                    self._buf = b""
                    break
                self._buf = self._buf[used:]
                if pdu is None:
                    break
                await self._answer(pdu)

    async def _answer(self, request: ModbusPDU) -> None:
        self.requests += 1
        unit = request.dev_id
        if self.wire_timing:
            # the request occupied the wire; the meter answers after t3.5 and its own delay
            req_len = len(self._framer.buildFrame(request))
            await asyncio.sleep(self.wire_time_s(req_len) + rtu_t35_s(self.baud) + self.response_delay_s)
        elif self.response_delay_s:
            await asyncio.sleep(self.response_delay_s)
        meter = self.meters.get(unit)
        if unit == 0 or meter is None:
            return  # broadcast or nobody at that address: silence
        try:
            response = await request.datastore_update(self._ctx, unit)
        except NoSuchIdException:
            return  # dead unit
        except Exception:  # a request the model cannot serve: like a real meter, refuse it
            response = ExceptionResponse(request.function_code, ExcCodes.ILLEGAL_FUNCTION)
        response.dev_id = meter.reply_unit if meter.reply_unit is not None else unit
        frame = corrupt(self._framer.buildFrame(response), meter.wire_fault, self._rng)
        if self.wire_timing:
            await asyncio.sleep(self.wire_time_s(len(frame)))
        view = memoryview(frame)
        while view and self._master is not None:
            try:
                view = view[os.write(self._master, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.001)
        self.replies += 1


def _parse_units(text: str) -> list[int]:
    units = [int(u) for u in text.split(",") if u.strip()]
    if not units or any(not 1 <= u <= 247 for u in units):
        raise argparse.ArgumentTypeError("units must be a comma list of 1..247")
    return units


async def _serve(args: argparse.Namespace) -> int:
    profile = BUILTIN_PROFILES[args.profile]
    if args.rtu:
        async with RtuSimulator(
            args.units, profile=profile, load_kw=args.load_kw, baud=args.baud, wire_timing=args.wire_timing
        ) as rtu:
            print(f"modbus RTU simulator: {profile.name} units {args.units} on {rtu.path} ({args.baud} baud)", flush=True)
            await wait_for_stop_signal()
        return 0
    async with ModbusSimulator(args.units, profile=profile, load_kw=args.load_kw, port=args.tcp) as sim:
        print(f"modbus simulator: {profile.name} units {args.units} on 127.0.0.1:{sim.port}", flush=True)
        await wait_for_stop_signal()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.simulators.modbus", description=__doc__.split("\n")[0])
    p.add_argument("--tcp", type=int, default=5020, metavar="PORT", help="TCP port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--rtu", action="store_true", help="serve RTU on a pseudo-terminal instead of TCP (prints its path)")
    p.add_argument("--baud", type=int, default=9600, help="RTU baud rate for --wire-timing")
    p.add_argument("--wire-timing", action="store_true", help="spend each RTU frame's wire time")
    p.add_argument("--units", type=_parse_units, default=[1], help="comma-separated unit ids, e.g. 1,2,3")
    p.add_argument("--profile", choices=sorted(BUILTIN_PROFILES), default="sdm120")
    p.add_argument("--load-kw", default="1.0", help="load per meter in kW (energy rises at this rate)")
    args = p.parse_args(argv)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
