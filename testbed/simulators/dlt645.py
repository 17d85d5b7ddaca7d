"""Simulated DL/T 645-2007 meters on one bus, over a pseudo-terminal or TCP.

Built from the standard and from what meters in the field do, not from what
the gateway expects (test-bench code: it shares the protocol codec with the
gateway, nothing of its timing):

* each meter waits its **response delay** before answering (DL/T 645 allows
  20-500 ms; set it inside the window, or beyond it for fault tests);
* with ``baud`` set, the request's and the reply's **wire time** are spent
  (11 bits per byte at 8E1): the first reply byte leaves after the request
  has arrived plus the delay, then one byte per character time;
* **clocks keep local time** (``clock_tz``, e.g. Asia/Shanghai);
* a meter may lack **block reads** (``block_reads=False``: blocks are refused);
* meters answer **only their own address**, the full wildcard ``AA``x6 and
  partial wildcards padded with ``AA`` in the high bytes (as the standard
  defines them); anything else, and broadcasts, get silence;
* faults (:class:`Faults`, changeable while running): silence, garbled or cut
  replies, **invalid or unset dates**, a **reply from a wrong address**, a
  **slow start after power returns** (:meth:`SimulatedMeter.power_on`), a
  stuck relay, clock drift, energy going backwards.

Each :class:`SimulatedMeter` has an address, energy registers that rise with
its load (split over the four rates by the hour of its own clock), voltage,
current, power, power factor, frequency, a clock, a load relay driven by 1CH
commands with a plaintext password, and status word 3.

:class:`Simulator` serves the bus:

* ``await sim.start_pty()`` opens a pseudo-terminal pair and returns the slave
  path, which the gateway opens like ``/dev/ttyUSB0``;
* ``await sim.start_tcp()`` listens on 127.0.0.1 and returns the port (like a
  serial server: the reply is sent whole once it has been "received").

Run ``python -m testbed.simulators.dlt645 --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import time
import tty
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from zoneinfo import ZoneInfo

from firmware_bridge.dlt645.codec import (
    BROADCAST,
    Frame,
    FrameParser,
    Function,
)
from firmware_bridge.dlt645.dataids import (
    BY_DI,
    Value,
    di_from_wire,
    encode_values,
)
from firmware_bridge.dlt645.errors import Dlt645Error
from firmware_bridge.dlt645.messages import (
    PLAINTEXT_LEVELS,
    ControlCommand,
    ErrorFlags,
    control_ok_reply,
    error_reply_frame,
    parse_control_request,
    parse_time_sync,
    read_address_reply,
    read_follow_up_reply,
    read_reply,
)
from testbed.simulators import wait_for_stop_signal

# Hour of the meter's clock -> rate index 1..4 (sharp, peak, flat, valley).
RATE_BY_HOUR: tuple[int, ...] = (
    4, 4, 4, 4, 4, 4, 4, 4,  # 00-07 valley
    3, 2, 2, 3, 3, 3, 3, 3,  # 08-15
    3, 2, 2, 1, 1, 2, 3, 4,  # 16-23
)  # fmt: skip
UNIT = Decimal("0.0001")  # kWh resolution kept internally
BLOCK_DIS = frozenset({0x0001FF00, 0x0201FF00, 0x0202FF00, 0x0203FF00, 0x0206FF00})
DI_DATE = 0x04000101
DI_TIME = 0x04000102


def wire_s(n_bytes: int, baud: int, bits_per_byte: int = 11) -> float:
    """Time ``n_bytes`` take on an RS-485 line (8E1: 11 bits per byte)."""
    return n_bytes * bits_per_byte / baud


def selects(pattern: str, address: str) -> bool:
    """Whether a meter at ``address`` answers a request to ``pattern``: its own
    address, or ``AA`` bytes padding the high end (``AA``x6 included). ``AA`` in
    a low byte with digits above it is no address at all: silence."""
    if len(pattern) != 12 or len(address) != 12:
        return False
    k = 0
    while k < 6 and pattern[2 * k : 2 * k + 2].upper() == "AA":
        k += 1
    return pattern[2 * k :] == address[2 * k :]


class DateFault:
    """What :attr:`Faults.date` makes the meter report for 04000101 (YYMMDDWW)."""

    WEEKDAY = "weekday"  # the right date with the wrong weekday
    UNSET = "unset"  # 00 00 00 00: the clock lost its battery
    INVALID = "invalid"  # 30 February
    NOT_BCD = "not_bcd"  # FF FF FF FF


@dataclass
class Faults:
    """Faults of one simulated meter; change them at any time."""

    no_reply: bool = False
    bad_checksum: bool = False
    garbage_prefix: bytes = b""  # sent before the reply
    partial: bool = False  # send only the first half of the reply
    slow_reply_s: float = 0.0  # extra delay before replying (beyond the window: a late reply)
    relay_stuck: bool = False  # 1CH is acknowledged but the relay does not move
    clock_offset_s: float = 0.0  # added to the meter's clock (drift)
    energy_backwards_kwh: Decimal = Decimal(0)  # subtracted from the reported total
    refuse: set[int] = field(default_factory=set)  # DIs answered "no data requested"
    ignore: set[int] = field(default_factory=set)  # DIs never answered at all (some firmware)
    date: str | None = None  # a DateFault: what the date register reports
    reply_address: str | None = None  # replies carry this address instead of the meter's


@dataclass
class SimulatedMeter:
    address: str
    password: bytes = bytes.fromhex("02000000")  # level 02, password 000000
    load_kw: Decimal = Decimal("1.2000")
    voltage_v: Decimal = Decimal("230.0")
    power_factor: Decimal = Decimal("0.950")
    frequency_hz: Decimal = Decimal("50.00")
    registers_kwh: list[Decimal] = field(default_factory=lambda: [Decimal(0)] * 4)
    relay_open: bool = False
    relay_command_open: bool = False
    alarm: bool = False
    protected: bool = False
    meter_type: int = 1  # bits 8-9 of status word 3 (00 = not prepaid)
    max_reply_data: int = 200  # longer payloads are split into 12H follow-ups
    clock_tz: dt.tzinfo = dt.UTC  # the zone its clock keeps (field meters: local time)
    response_delay_s: float = 0.0  # wait after a request before answering (DL/T 645: 0.02-0.5 s)
    block_reads: bool = True  # False: block DIs (0001FF00...) are refused as "no data"
    faults: Faults = field(default_factory=Faults)
    powered: bool = True
    boot_until_s: float = 0.0  # after power returns: silent until then...
    slow_until_s: float = 0.0  # ...then answering boot_slow_s late until then
    boot_slow_s: float = 0.0
    _time_offset_s: float = 0.0  # set by broadcast time sync
    _last_s: float | None = None
    _follow_ups: dict[int, list[bytes]] = field(default_factory=dict)

    # -- power ---------------------------------------------------------------

    def power_off(self, now_s: float) -> None:
        """Supply gone: the meter stops metering and answering."""
        self.advance(now_s)
        self.powered = False

    def power_on(
        self, now_s: float, *, boot_s: float = 3.0, slow_s: float = 0.0, slow_for_s: float = 0.0
    ) -> None:
        """Supply back: silent for ``boot_s`` while it starts, then answering ``slow_s``
        later than usual for ``slow_for_s`` (some meters rebuild their data first)."""
        self._last_s = now_s  # nothing was metered while off
        self.powered = True
        self.boot_until_s = now_s + boot_s
        self.boot_slow_s = slow_s
        self.slow_until_s = now_s + boot_s + slow_for_s

    def answers(self, now_s: float) -> bool:
        return self.powered and now_s >= self.boot_until_s and not self.faults.no_reply

    def delay_s(self, now_s: float) -> float:
        """This meter's wait before its reply begins, faults included."""
        slow = self.boot_slow_s if now_s < self.slow_until_s else 0.0
        return self.response_delay_s + self.faults.slow_reply_s + slow

    # -- state -------------------------------------------------------------

    def clock(self, now_s: float) -> dt.datetime:
        """The meter's local clock (naive) at system time ``now_s``."""
        t = now_s + self._time_offset_s + self.faults.clock_offset_s
        return dt.datetime.fromtimestamp(int(t), self.clock_tz).replace(tzinfo=None)

    @property
    def power_kw(self) -> Decimal:
        return Decimal(0) if self.relay_open else self.load_kw

    @property
    def current_a(self) -> Decimal:
        if self.relay_open:
            return Decimal("0.000")
        i = self.load_kw * 1000 / (self.voltage_v * self.power_factor)
        return i.quantize(Decimal("0.001"))

    def advance(self, now_s: float) -> None:
        """Integrate energy up to ``now_s``, each hour on the rate of the meter's clock."""
        if not self.powered:
            self._last_s = now_s
            return
        t = self._last_s if self._last_s is not None else now_s
        while t < now_s:
            seconds_into_hour = self.clock(t).minute * 60 + self.clock(t).second + (t % 1)
            end = min(now_s, t + 3600 - seconds_into_hour)
            kwh = self.power_kw * Decimal(end - t) / 3600
            self.registers_kwh[RATE_BY_HOUR[self.clock(t).hour] - 1] += kwh.quantize(
                UNIT, ROUND_DOWN
            )
            t = end
        self._last_s = now_s

    def status_word3(self) -> int:
        return (
            self.relay_open << 4
            | self.relay_command_open << 6
            | self.alarm << 7
            | (self.meter_type & 0x03) << 8
        )

    def _energy(self) -> list[Decimal]:
        cents = Decimal("0.01")
        rates = [r.quantize(cents, ROUND_DOWN) for r in self.registers_kwh]
        total = sum(self.registers_kwh, Decimal(0)) - self.faults.energy_backwards_kwh
        return [max(total, Decimal(0)).quantize(cents, ROUND_DOWN), *rates]

    def values(self, di: int, now_s: float) -> tuple[Value, ...] | None:
        """What the meter answers for ``di``, or ``None`` for "no data"."""
        energy = self._energy()
        zero_phases = [Decimal("0.0"), Decimal("0.0")]
        table: dict[int, tuple[Value, ...]] = {
            0x00000000: (energy[0],),
            0x00010000: (energy[0],),
            0x0001FF00: tuple(energy),
            0x00020000: (Decimal("0.00"),),
            0x02010100: (self.voltage_v,),
            0x0201FF00: (self.voltage_v, *zero_phases),
            0x02020100: (self.current_a,),
            0x0202FF00: (self.current_a, Decimal("0.000"), Decimal("0.000")),
            0x02030000: (self.power_kw,),
            0x02030100: (self.power_kw,),
            0x0203FF00: (self.power_kw, self.power_kw, Decimal(0), Decimal(0)),
            0x02060000: (self.power_factor,),
            0x0206FF00: (self.power_factor, self.power_factor, Decimal(0), Decimal(0)),
            0x02800002: (self.frequency_hz,),
            0x04000101: (self.clock(now_s).date(),),
            0x04000102: (self.clock(now_s).time(),),
            0x04000401: (self.address,),
            0x04000402: (self.address,),
            0x04000503: (self.status_word3(),),
        }
        for i in range(4):
            table[0x00010100 + 0x100 * i] = (energy[1 + i],)
        return table.get(di)

    # -- protocol ----------------------------------------------------------

    def handle(self, request: Frame, now_s: float) -> Frame | None:
        """The reply to ``request`` (addressed to this meter), or ``None``."""
        self.advance(now_s)
        fn = request.control.function
        if fn == Function.BROADCAST_TIME:
            with contextlib.suppress(Dlt645Error):
                wanted = parse_time_sync(request).replace(tzinfo=self.clock_tz).timestamp()
                self._time_offset_s = wanted - now_s - self.faults.clock_offset_s
            return None
        if fn == Function.READ_ADDRESS:
            return read_address_reply(self.address)
        if fn == Function.READ:
            return self._read(request, now_s)
        if fn == Function.READ_FOLLOW_UP:
            return self._follow_up(request)
        if fn == Function.CONTROL:
            return self._control(request, now_s)
        return error_reply_frame(self.address, fn, ErrorFlags.OTHER)

    def _date_payload(self, now_s: float) -> bytes:
        """04000101 as sent (WW DD MM YY), with the date fault if one is set."""
        fault = self.faults.date
        if fault == DateFault.UNSET:
            return bytes(4)
        if fault == DateFault.NOT_BCD:
            return b"\xff" * 4
        today = self.clock(now_s).date()
        weekday = today.isoweekday() % 7
        if fault == DateFault.INVALID:
            return bytes([0x01, 0x30, 0x02, 0x26])  # 2026-02-30, a Monday by its own count
        if fault == DateFault.WEEKDAY:
            weekday = (weekday + 3) % 7
        digits = f"{today:%y%m%d}{weekday:02d}"
        return bytes(int(digits[i : i + 2], 16) for i in range(6, -1, -2))

    def _read(self, request: Frame, now_s: float) -> Frame:
        try:
            di = di_from_wire(request.data[:4])
        except Dlt645Error:
            return error_reply_frame(self.address, Function.READ, ErrorFlags.OTHER)
        refused = di in self.faults.refuse or (di in BLOCK_DIS and not self.block_reads)
        if di == DI_DATE and not refused:
            return read_reply(self.address, di, self._date_payload(now_s))
        values = None if refused else self.values(di, now_s)
        if values is None:
            return error_reply_frame(self.address, Function.READ, ErrorFlags.NO_DATA)
        payload = encode_values(BY_DI[di], values)
        room = self.max_reply_data - 4
        chunks = [payload[i : i + room] for i in range(0, len(payload), room)]
        self._follow_ups[di] = chunks[1:]
        return read_reply(self.address, di, chunks[0], more=len(chunks) > 1)

    def _follow_up(self, request: Frame) -> Frame:
        try:
            di, seq = di_from_wire(request.data[:4]), request.data[4]
        except (Dlt645Error, IndexError):
            return error_reply_frame(self.address, Function.READ_FOLLOW_UP, ErrorFlags.OTHER)
        chunks = self._follow_ups.get(di, [])
        if not 1 <= seq <= len(chunks):
            return error_reply_frame(self.address, Function.READ_FOLLOW_UP, ErrorFlags.NO_DATA)
        more = seq < len(chunks)
        return read_follow_up_reply(self.address, di, chunks[seq - 1], seq, more=more)

    def _control(self, request: Frame, now_s: float) -> Frame:
        def refuse(flags: ErrorFlags) -> Frame:
            return error_reply_frame(self.address, Function.CONTROL, flags)

        if request.data[:1] and request.data[0] not in PLAINTEXT_LEVELS:
            return refuse(ErrorFlags.UNAUTHORISED)  # no security chip in the simulator
        try:
            req = parse_control_request(request)
        except Dlt645Error:
            return refuse(ErrorFlags.OTHER)
        if req.password != self.password:
            return refuse(ErrorFlags.UNAUTHORISED)
        if req.deadline < self.clock(now_s):
            return refuse(ErrorFlags.OTHER)
        cmd = req.command
        if cmd is ControlCommand.TRIP:
            if self.protected:
                return refuse(ErrorFlags.OTHER)
            self.relay_command_open = True
            if not self.faults.relay_stuck:
                self.relay_open = True
        elif cmd in (ControlCommand.CLOSE, ControlCommand.CLOSE_ALLOWED):
            self.relay_command_open = False
            if cmd is ControlCommand.CLOSE and not self.faults.relay_stuck:
                self.relay_open = False
        elif cmd in (ControlCommand.ALARM, ControlCommand.ALARM_OFF):
            self.alarm = cmd is ControlCommand.ALARM
        else:
            self.protected = cmd is ControlCommand.PROTECT
        return control_ok_reply(self.address)

    def press_button(self) -> None:
        """The customer presses the button after "close allowed" (1BH)."""
        if not self.relay_command_open and not self.faults.relay_stuck:
            self.relay_open = False


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    wait = when - loop.time()
    if wait > 0:
        await asyncio.sleep(wait)


def _collide(replies: list[bytes]) -> bytes:
    """Several meters talking at once: RS-485 lines ANDed bit by bit (0 dominates)."""
    out = bytearray(b"\xff" * max(len(r) for r in replies))
    for r in replies:
        for i, b in enumerate(r):
            out[i] &= b
    return bytes(out)


class Simulator:
    """Serves a list of :class:`SimulatedMeter` on one bus (pty and/or TCP)."""

    def __init__(
        self,
        meters: Iterable[SimulatedMeter],
        *,
        baud: int | None = None,
        response_delay_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.meters = {m.address: m for m in meters}
        self.baud = baud
        self.response_delay_s = response_delay_s
        self.clock = clock
        self.requests = 0
        self.answer_s: list[float] = []  # request received -> reply written, per reply
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._fds: list[int] = []
        self._lock = asyncio.Lock()  # one bus: one request answered at a time

    def meter(self, address: str) -> SimulatedMeter:
        return self.meters[address]

    def reply_bytes(self, request: Frame) -> tuple[bytes, float]:
        """Wire bytes answering ``request`` and the wait before they begin (the
        answering meters' response delays; several answering meters collide)."""
        self.requests += 1
        now = self.clock()
        if request.address == BROADCAST:
            for m in self.meters.values():
                if m.answers(now):
                    m.handle(request, now)
            return b"", 0.0
        targets = [m for a, m in self.meters.items() if selects(request.address, a)]
        out: list[bytes] = []
        delay = 0.0
        for m in targets:
            if not m.answers(now):
                m.advance(now)
                continue
            f = m.faults
            if request.control.function == Function.READ and request.data[:4] in {
                di.to_bytes(4, "little") for di in f.ignore
            }:
                m.advance(now)
                continue
            reply = m.handle(request, now)
            if reply is None:
                continue
            if f.reply_address is not None:
                reply = Frame(f.reply_address, reply.control, reply.data)
            raw = bytearray(reply.encode(4))
            if f.bad_checksum:
                raw[-2] ^= 0x5A
            if f.partial:
                raw = raw[: len(raw) // 2]
            out.append(f.garbage_prefix + bytes(raw))
            delay = max(delay, m.delay_s(now))
        if not out:
            return b"", 0.0
        return (out[0] if len(out) == 1 else _collide(out)), self.response_delay_s + delay

    async def _serve(
        self,
        read: Callable[[], Awaitable[bytes]],
        write: Callable[[bytes], Awaitable[None]],
        *,
        paced: bool,
    ) -> None:
        """Answer requests as they arrive. ``paced``: a line of our own (pty), where
        the reply goes out byte by byte at the baud rate; otherwise (TCP, like a
        serial server) it is sent whole when its last byte would have arrived."""
        loop = asyncio.get_running_loop()
        parser = FrameParser()
        while True:
            data = await read()
            if not data:
                return
            for event in parser.feed(data):
                if not isinstance(event, Frame) or event.control.reply:
                    continue
                arrived = loop.time()
                async with self._lock:
                    reply, delay = self.reply_bytes(event)
                    if not reply:
                        continue
                    start = arrived + delay
                    if self.baud:
                        start += wire_s(len(event.encode(4)), self.baud)
                    if not self.baud:
                        await _sleep_until(loop, start)
                        await write(reply)
                    elif paced:
                        char = wire_s(1, self.baud)
                        for i in range(len(reply)):
                            await _sleep_until(loop, start + i * char)
                            await write(reply[i : i + 1])
                    else:
                        await _sleep_until(loop, start + wire_s(len(reply), self.baud))
                        await write(reply)
                    self.answer_s.append(loop.time() - arrived)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- TCP ---------------------------------------------------------------

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = a free port); return the port."""

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def write(data: bytes) -> None:
                writer.write(data)
                await writer.drain()

            try:
                await self._serve(lambda: reader.read(4096), write, paced=False)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(client, host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    # -- pseudo-terminal ---------------------------------------------------

    async def start_pty(self) -> str:
        """Open a pseudo-terminal pair; return the slave path for the gateway to open."""
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline before the client configures it
        os.set_blocking(master, False)
        self._fds += [master, slave]
        path = os.ttyname(slave)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(master, 4096)
            except BlockingIOError:
                return
            except OSError:  # the pty is gone: stop serving it
                loop.remove_reader(master)
                data = b""
            queue.put_nowait(data)

        async def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(master, view)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                    continue
                view = view[n:]

        loop.add_reader(master, readable)
        self._spawn(self._serve(queue.get, write, paced=True))
        return path

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        for fd in self._fds:
            loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()

    async def __aenter__(self) -> Simulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def make_meters(
    n: int,
    first: int = 1,
    *,
    clock_tz: dt.tzinfo = dt.UTC,
    response_delay_s: float = 0.0,
    block_reads: bool = True,
) -> list[SimulatedMeter]:
    """``n`` meters with addresses 000000000001.. and slightly different loads."""
    return [
        SimulatedMeter(
            address=f"{first + i:012d}",
            load_kw=Decimal("0.5000") + Decimal("0.2500") * (i % 8),
            registers_kwh=[Decimal(100 * (i + 1) + r) for r in range(4)],
            clock_tz=clock_tz,
            response_delay_s=response_delay_s,
            block_reads=block_reads,
        )
        for i in range(n)
    ]


async def _main(args: argparse.Namespace) -> None:
    meters = make_meters(
        args.meters,
        clock_tz=ZoneInfo(args.tz),
        response_delay_s=args.delay,
        block_reads=not args.no_block_reads,
    )
    async with Simulator(meters, baud=args.baud) as sim:
        if args.pty:
            print(f"pty {await sim.start_pty()}", flush=True)
        if args.tcp is not None:
            print(f"tcp 127.0.0.1:{await sim.start_tcp(port=args.tcp)}", flush=True)
        print("meters " + " ".join(m.address for m in meters), flush=True)
        await wait_for_stop_signal()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m testbed.simulators.dlt645",
        description="Simulated DL/T 645-2007 meters on one bus.",
    )
    p.add_argument(
        "--pty", action="store_true", help="serve on a pseudo-terminal (prints its path)"
    )
    p.add_argument(
        "--tcp", type=int, metavar="PORT", help="serve on 127.0.0.1:PORT (0 = free port)"
    )
    p.add_argument("--meters", type=int, default=1, help="number of meters (default 1)")
    p.add_argument("--baud", type=int, default=None, help="simulate wire time at this baud rate")
    p.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="each meter's response delay in seconds (DL/T 645 allows 0.02-0.5)",
    )
    p.add_argument(
        "--tz", default="UTC", help="time zone the meter clocks keep (e.g. Asia/Shanghai)"
    )
    p.add_argument(
        "--no-block-reads", action="store_true", help="meters refuse block DIs (0001FF00...)"
    )
    args = p.parse_args(argv)
    if not args.pty and args.tcp is None:
        p.error("give --pty and/or --tcp PORT")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
