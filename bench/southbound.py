"""Southbound benchmark: gateway CPU per poll, scheduler vs the wire limit, dead-meter cost.

Prints one JSON document to stdout (progress goes to stderr). Parts:

``cpu`` (a)
    Process CPU time per meter poll of the gateway path (``BusScheduler`` +
    driver, decoded to a canonical ``Reading``) against the minimal client
    doing the same request/reply frames on the same simulator, which runs in
    a separate process so that only the client's CPU is measured:

    * Modbus TCP: bare ``AsyncModbusTcpClient.read_input_registers`` loop vs
      ``BusScheduler`` + ``ModbusDriver`` + ``MbapTransport`` (the gateway's own
      MBAP client); beside them the socket floor (raw MBAP frames on an asyncio
      protocol) and ``lean``, the ``MbapTransport.read_registers`` loop alone;
    * DL/T 645 over TCP: plain asyncio streams writing the codec's request
      frames and reading each reply by its length byte vs ``BusScheduler`` +
      ``Dlt645Driver`` + ``Dlt645Transport``.

    Bare and gateway runs alternate (``--cpu-rounds``); the median of each side
    is reported with the ratio gateway / bare.

``wire`` (b)
    Wire-timed simulated buses on a pseudo-terminal at each ``--bauds``:
    Modbus RTU (``RtuSimulator`` with ``wire_timing``) and DL/T 645
    (``testbed.simulators.dlt645`` with ``baud``). Achieved polls/s as
    a fraction of the theoretical limit ``1 / Σ transaction wire time`` over
    the frames the cycle actually exchanged, where one transaction costs
    ``(request bytes + reply bytes) × 11 / baud + silent interval(s) +
    response delay`` (Modbus RTU: 2 × t3.5; DL/T 645: the inter-frame gap).

``dead`` (c)
    A 32-meter wire-timed Modbus RTU bus at 9600 baud with the daemon's
    defaults (timeout 1 s, 1 retry, default back-off): cycle time with one
    dead meter relative to the same bus healthy, in the cycle the meter stops
    answering (before back-off) and in the cycles after its back-off starts.
    ``--dead-dlt645`` adds the same for a DL/T 645 bus (energy reads only).

``outage``
    Every meter silent (supply outage in the area): cost per cycle in
    silent-bus mode, and the first cycle after the supply returns.

    python bench/southbound.py                      # default run, about 3 minutes
    python bench/southbound.py --parts cpu,wire     # a subset
    python bench/southbound.py --quick              # tiny scale (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pymodbus.client import AsyncModbusTcpClient

from firmware_bridge.dlt645.codec import Frame, Function
from firmware_bridge.dlt645.dataids import di_from_wire
from firmware_bridge.dlt645.driver import DEFAULT_QUANTITIES, Dlt645Driver
from firmware_bridge.dlt645.messages import read_request
from firmware_bridge.dlt645.transport import Dlt645Transport
from firmware_bridge.driver import MeterDriver
from firmware_bridge.modbus.decode import ReadBlock, plan_reads
from firmware_bridge.modbus.driver import ModbusDriver
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES
from firmware_bridge.modbus.transport import MbapTransport, ModbusTransport
from firmware_bridge.reading import Quantity
from firmware_bridge.scheduler import (
    BackoffPolicy,
    BusScheduler,
    dlt645_gap_s,
    rtu_t35_s,
)
from firmware_bridge.settings import BusSettings
from testbed.simulators.dlt645 import Simulator as Dlt645Simulator
from testbed.simulators.dlt645 import make_meters as make_dlt645_meters
from testbed.simulators.modbus import RtuSimulator

SDM120 = BUILTIN_PROFILES["sdm120"]
BITS_PER_CHAR = 11  # 8 data + parity + start + stop (8E1; 8N2 is the same on the wire)
DLT645_REPLY_PREAMBLE = 4  # the simulator sends FE x4 before each reply, like most meters
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(f"[southbound {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def r4(x: float) -> float:
    return round(x, 4)


def take(xs: list[float]) -> list[float]:
    out = list(xs)
    xs.clear()
    return out


# ---------------------------------------------------------------------------
# Machine


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


# ---------------------------------------------------------------------------
# Simulators in their own process (part a)


@contextlib.asynccontextmanager
async def simulator_process(args: Sequence[str], pattern: str) -> AsyncIterator[tuple[int, int, list[str]]]:
    """Run ``python -m <args>``; yield (pid, port, the lines it printed up to the port)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        port = 0
        async with asyncio.timeout(30):
            while not port:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"simulator {args[0]} exited: {lines}")
                lines.append(line.strip())
                m = re.search(pattern, line)
                if m:
                    port = int(m.group(1))
            # the DL/T 645 simulator prints its meters after the port
            if args[0] == "testbed.simulators.dlt645":
                lines.append((await proc.stdout.readline()).decode().strip())
        yield proc.pid, port, lines
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass
class CpuRun:
    polls: int
    cpu_s: float
    wall_s: float
    sim_cpu_s: float

    def as_dict(self) -> dict[str, float]:
        return {
            "polls": self.polls,
            "cpu_us_per_poll": round(self.cpu_s / self.polls * 1e6, 1),
            "wall_us_per_poll": round(self.wall_s / self.polls * 1e6, 1),
            "simulator_cpu_us_per_poll": round(self.sim_cpu_s / self.polls * 1e6, 1),
        }


async def timed(sim_pid: int, polls: int, body: Callable[[], Awaitable[None]]) -> CpuRun:
    s0, c0, w0 = proc_cpu_s(sim_pid), time.process_time(), time.perf_counter()
    await body()
    c1, w1, s1 = time.process_time(), time.perf_counter(), proc_cpu_s(sim_pid)
    return CpuRun(polls, c1 - c0, w1 - w0, s1 - s0)


async def warmed_and_timed(
    sim_pid: int, polls_per_cycle: int, cycles: int, one_cycle: Callable[[], Awaitable[None]]
) -> CpuRun:
    """Run ``one_cycle`` a tenth as often (at least twice) to warm up, then ``cycles`` times, timed."""

    async def loop(n: int) -> None:
        for _ in range(n):
            await one_cycle()

    await loop(max(2, cycles // 10))
    return await timed(sim_pid, cycles * polls_per_cycle, lambda: loop(cycles))


def scheduler_cycle(sched: BusScheduler, meters: int) -> Callable[[], Awaitable[None]]:
    """One gateway poll cycle of every meter, checked."""

    async def one_cycle() -> None:
        res = await sched.run_cycle(int(time.time() * 1000))
        if len(res.readings) != meters:
            raise RuntimeError(f"gateway cycle read {len(res.readings)} of {meters}")

    return one_cycle


def cpu_summary(what: str, runs: dict[str, list[CpuRun]], extra: dict[str, Any]) -> dict[str, Any]:
    def side(rs: list[CpuRun]) -> dict[str, Any]:
        per = [r.cpu_s / r.polls for r in rs]
        best = rs[per.index(min(per))]
        return {
            "cpu_us_per_poll_median": round(median(per) * 1e6, 1),
            "cpu_us_per_poll_rounds": [round(p * 1e6, 1) for p in per],
            "wall_us_per_poll_median": round(median([r.wall_s / r.polls for r in rs]) * 1e6, 1),
            "polls_per_s_median": round(1 / median([r.wall_s / r.polls for r in rs]), 1),
            "simulator_cpu_us_per_poll_median": round(median([r.sim_cpu_s / r.polls for r in rs]) * 1e6, 1),
            "best_round": best.as_dict(),
        }

    bare, gw = side(runs["bare"]), side(runs["gateway"])
    return {
        "what": what,
        **extra,
        "bare": bare,
        "gateway": gw,
        "cpu_ratio_gateway_to_bare": round(gw["cpu_us_per_poll_median"] / bare["cpu_us_per_poll_median"], 2),
    }


class _MbapFloor(asyncio.Protocol):
    """The least a Modbus TCP client can do: write a request's bytes, wait for the
    reply with that transaction id, nothing else (no retries, checks or objects)."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiting: dict[int, asyncio.Future[bytes]] = {}

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 6:
            end = 6 + int.from_bytes(self.buf[4:6], "big")
            if len(self.buf) < end:
                return
            frame, self.buf = self.buf[:end], self.buf[end:]
            fut = self.waiting.pop(int.from_bytes(frame[:2], "big"), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)


async def cpu_modbus_tcp(meters: int, cycles: int, rounds: int) -> dict[str, Any]:
    units = list(range(1, meters + 1))
    blocks = plan_reads(SDM120.fields, SDM120.max_gap, SDM120.max_count)
    sim_args = ["testbed.simulators.modbus", "--tcp", "0", "--units", ",".join(map(str, units))]
    runs: dict[str, list[CpuRun]] = {"bare": [], "gateway": [], "floor": [], "lean": []}
    async with simulator_process(sim_args, r"127\.0\.0\.1:(\d+)") as (pid, port, _):

        async def floor() -> CpuRun:
            loop = asyncio.get_running_loop()
            transport, proto = await loop.create_connection(_MbapFloor, "127.0.0.1", port)
            tid = 0
            try:

                async def one_cycle() -> None:
                    nonlocal tid
                    for u in units:
                        for b in blocks:
                            tid = (tid + 1) & 0xFFFF
                            fut = loop.create_future()
                            proto.waiting[tid] = fut
                            transport.write(
                                tid.to_bytes(2, "big") + b"\0\0\0\x06" + bytes([u, 4])
                                + b.address.to_bytes(2, "big") + b.count.to_bytes(2, "big")
                            )  # fmt: skip
                            async with asyncio.timeout(1.0):
                                frame = await fut
                            if frame[7] != 4 or frame[8] != 2 * b.count:
                                raise RuntimeError(f"floor read failed: {frame.hex()}")

                return await warmed_and_timed(pid, meters, cycles, one_cycle)
            finally:
                transport.close()

        async def bare() -> CpuRun:
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0, reconnect_delay=0)
            await client.connect()
            try:

                async def one_cycle() -> None:
                    for u in units:
                        for b in blocks:
                            rr = await client.read_input_registers(b.address, count=b.count, device_id=u)
                            if rr.isError() or len(rr.registers) != b.count:
                                raise RuntimeError(f"bare read failed: {rr}")

                return await warmed_and_timed(pid, meters, cycles, one_cycle)
            finally:
                client.close()

        async def lean() -> CpuRun:
            # the gateway's own Modbus TCP client alone: the transport's read_registers
            # loop, no scheduler, driver or decoding
            transport = MbapTransport("127.0.0.1", port, name="tcp", timeout_s=1.0)
            try:

                async def one_cycle() -> None:
                    for u in units:
                        for b in blocks:
                            regs = await transport.read_registers("m", u, 4, b.address, b.count)
                            if len(regs) != b.count:
                                raise RuntimeError(f"lean read failed: {regs}")

                return await warmed_and_timed(pid, meters, cycles, one_cycle)
            finally:
                transport.close()

        async def gateway() -> CpuRun:
            transport = ModbusTransport.tcp("127.0.0.1", port, name="tcp", timeout_s=1.0)
            try:
                drivers = [ModbusDriver(f"m{u}", u, SDM120, transport) for u in units]
                sched = BusScheduler("tcp", drivers, timeout_s=1.0)
                return await warmed_and_timed(pid, meters, cycles, scheduler_cycle(sched, meters))
            finally:
                transport.close()

        for _ in range(rounds):
            runs["bare"].append(await bare())
            runs["gateway"].append(await gateway())
            runs["floor"].append(await floor())
            runs["lean"].append(await lean())
    floor_us = median([r.cpu_s / r.polls for r in runs.pop("floor")]) * 1e6
    lean_runs = runs.pop("lean")
    lean_us = median([r.cpu_s / r.polls for r in lean_runs]) * 1e6
    out = cpu_summary(
        "Modbus TCP, SDM120 map (FC04), separate simulator process",
        runs,
        {"meters": meters, "requests_per_poll": len(blocks), "polls_per_round": cycles * meters, "rounds": rounds},
    )
    # The socket floor: raw MBAP frames on an asyncio protocol, same requests. What
    # no client library can save: the system calls, the loopback's delivery and the
    # event loop's wake-up per reply.
    out["floor_cpu_us_per_poll_median"] = round(floor_us, 1)
    out["cpu_ratio_bare_to_floor"] = round(out["bare"]["cpu_us_per_poll_median"] / floor_us, 2)
    out["cpu_ratio_gateway_to_floor"] = round(out["gateway"]["cpu_us_per_poll_median"] / floor_us, 2)
    # The gateway's own MBAP client (MbapTransport) alone, same requests: against the
    # floor it is what the client costs, against bare what it saves over pymodbus.
    out["lean"] = {
        "cpu_us_per_poll_median": round(lean_us, 1),
        "cpu_us_per_poll_rounds": [round(r.cpu_s / r.polls * 1e6, 1) for r in lean_runs],
    }
    out["cpu_ratio_lean_to_floor"] = round(lean_us / floor_us, 2)
    out["cpu_ratio_lean_to_bare"] = round(lean_us / out["bare"]["cpu_us_per_poll_median"], 2)
    return out


class RecordingTransport(Dlt645Transport):
    """A DL/T 645 transport that keeps every (request, reply) pair it exchanged."""

    def __init__(self, bus: BusSettings, **kwargs: Any) -> None:
        super().__init__(bus, **kwargs)
        self.log: list[tuple[Frame, Frame]] = []

    async def transact(self, request: Frame, *, meter_id: str | None = None, timeout_s: float | None = None) -> Frame:
        reply = await super().transact(request, meter_id=meter_id, timeout_s=timeout_s)
        self.log.append((request, reply))
        return reply


def dlt645_drivers(
    addresses: Sequence[str], transport: Dlt645Transport, quantities: Sequence[Quantity] = DEFAULT_QUANTITIES
) -> list[MeterDriver]:
    return [Dlt645Driver(f"m{a[-4:]}", a, transport, quantities=quantities) for a in addresses]


async def cpu_dlt645_tcp(meters: int, cycles: int, rounds: int) -> dict[str, Any]:
    sim_args = ["testbed.simulators.dlt645", "--tcp", "0", "--meters", str(meters)]
    runs: dict[str, list[CpuRun]] = {"bare": [], "gateway": []}
    async with simulator_process(sim_args, r"tcp 127\.0\.0\.1:(\d+)") as (pid, port, lines):
        addresses = lines[-1].split()[1:]
        if len(addresses) != meters:
            raise RuntimeError(f"simulator printed {lines}")
        bus = BusSettings("dlt", "tcp", host="127.0.0.1", port=port, timeout_s=1.0)

        # the frames one poll exchanges, as the driver asks for them
        rec = RecordingTransport(bus, gap_s=0.0)
        async with rec:
            await Dlt645Driver("probe", addresses[0], rec).read(0)
        if any(req.control.function != Function.READ for req, _ in rec.log):
            raise RuntimeError("the driver's read plan uses more than plain reads (11H)")
        dis = [di_from_wire(req.data[:4]) for req, _ in rec.log]

        async def bare() -> CpuRun:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:

                async def one_cycle() -> None:
                    for a in addresses:
                        for di in dis:
                            writer.write(read_request(a, di).encode(4))
                            head = await reader.readexactly(DLT645_REPLY_PREAMBLE + 10)  # FE.. 68 A 68 C L
                            await reader.readexactly(head[-1] + 2)  # DATA CS 16

                return await warmed_and_timed(pid, meters, cycles, one_cycle)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        async def gateway() -> CpuRun:
            # gap 0: the simulator has no RS-485 line behind it (the bare loop keeps none either)
            async with Dlt645Transport(bus, gap_s=0.0) as transport:
                sched = BusScheduler("dlt", dlt645_drivers(addresses, transport), timeout_s=1.0)
                return await warmed_and_timed(pid, meters, cycles, scheduler_cycle(sched, meters))

        for _ in range(rounds):
            runs["bare"].append(await bare())
            runs["gateway"].append(await gateway())
    return cpu_summary(
        "DL/T 645-2007 over TCP, driver's default quantities, separate simulator process",
        runs,
        {
            "meters": meters,
            "requests_per_poll": len(dis),
            "data_ids": [f"{di:08X}" for di in dis],
            "polls_per_round": cycles * meters,
            "rounds": rounds,
        },
    )


# ---------------------------------------------------------------------------
# Wire-timed buses (parts b, c, outage)


def modbus_rtu_transaction_s(baud: int, request_bytes: int, reply_bytes: int, response_delay_s: float) -> float:
    """Request + reply on the wire, t3.5 before the reply and after it, the meter's turnaround."""
    return (request_bytes + reply_bytes) * BITS_PER_CHAR / baud + 2 * rtu_t35_s(baud) + response_delay_s


def dlt645_transaction_s(baud: int, request_bytes: int, reply_bytes: int, response_delay_s: float) -> float:
    """Request + reply on the wire, the meter's turnaround, the inter-frame gap before the next request."""
    return (request_bytes + reply_bytes) * BITS_PER_CHAR / baud + dlt645_gap_s(baud) + response_delay_s


class TimedRtuSimulator(RtuSimulator):
    """The Modbus RTU simulator, recording how long each answered request took it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer_s: list[float] = []

    async def _answer(self, request: Any) -> None:
        t0, replies = time.monotonic(), self.replies
        await super()._answer(request)
        if self.replies > replies:
            self.answer_s.append(time.monotonic() - t0)


@dataclass
class Bus:
    """A scheduler on a wire-timed simulated bus, with hooks the scenarios need."""

    protocol: str
    baud: int
    sched: BusScheduler
    set_dead: Callable[[int, bool], None]  # meter index, dead?
    transactions: Callable[[], list[tuple[int, int]]]  # (request bytes, reply bytes) since last call
    transaction_s: Callable[[int, int], float]  # wire limit of one transaction
    simulator_s: Callable[[int, int], float]  # the part of it the simulator spends (request in -> reply out)
    answer_s: Callable[[], list[float]]  # what the simulator actually spent, per reply since last call
    meters: int
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def modbus_rtu_bus(
    meters: int,
    baud: int,
    *,
    response_delay_s: float,
    timeout_s: float,
    retries: int = 1,
    policy: BackoffPolicy | None = None,
) -> AsyncIterator[Bus]:
    units = list(range(1, meters + 1))
    sim = TimedRtuSimulator(units, baud=baud, wire_timing=True, response_delay_s=response_delay_s)
    async with sim:
        transport = ModbusTransport.serial(sim.path, name="rtu", baud=baud, parity="N", stop_bits=1, timeout_s=timeout_s)
        try:
            drivers = [ModbusDriver(f"m{u}", u, SDM120, transport) for u in units]
            sched = BusScheduler(
                "rtu", drivers, silent_interval_s=rtu_t35_s(baud), timeout_s=timeout_s, retries=retries, policy=policy
            )
            blocks: dict[str, tuple[ReadBlock, ...]] = {d.meter_id: d.blocks for d in drivers}
            seen = {"requests": sim.requests, "replies": sim.replies}

            def transactions() -> list[tuple[int, int]]:
                # every meter read sends its blocks in order; a cycle's answered requests are
                # exactly the blocks of the meters read (checked against the simulator's count)
                n_req = sim.requests - seen["requests"]
                n_rep = sim.replies - seen["replies"]
                seen.update(requests=sim.requests, replies=sim.replies)
                out = [(8, 5 + 2 * b.count) for bs in blocks.values() for b in bs]
                per_cycle = len(out)
                if n_req % per_cycle or n_rep != n_req:
                    raise RuntimeError(f"unexpected traffic: {n_req} requests, {n_rep} replies")
                return out * (n_req // per_cycle)

            def set_dead(i: int, dead: bool) -> None:
                sim.meter(units[i]).dead = dead

            yield Bus(
                "modbus_rtu",
                baud,
                sched,
                set_dead,
                transactions,
                lambda q, a: modbus_rtu_transaction_s(baud, q, a, response_delay_s),
                lambda q, a: modbus_rtu_transaction_s(baud, q, a, response_delay_s) - rtu_t35_s(baud),
                lambda: take(sim.answer_s),
                meters,
                {"profile": SDM120.name, "response_delay_s": response_delay_s, "t3_5_s": r4(rtu_t35_s(baud))},
            )
        finally:
            transport.close()


@contextlib.asynccontextmanager
async def dlt645_bus(
    meters: int,
    baud: int,
    *,
    response_delay_s: float,
    timeout_s: float,
    retries: int = 1,
    policy: BackoffPolicy | None = None,
    quantities: Sequence[Quantity] = DEFAULT_QUANTITIES,
) -> AsyncIterator[Bus]:
    sim_meters = make_dlt645_meters(meters)
    # the simulator spends the request's wire time, its delay and the reply's wire time
    sim = Dlt645Simulator(sim_meters, baud=baud, response_delay_s=response_delay_s)
    async with sim:
        path = await sim.start_pty()
        # parity exists only on a real UART; the simulator spends 11 bits per byte regardless
        bus = BusSettings("dlt", "serial", device=path, baud=baud, parity="N", timeout_s=timeout_s, retries=retries)
        transport = RecordingTransport(bus, gap_s=dlt645_gap_s(baud))
        async with transport:
            addresses = [m.address for m in sim_meters]
            sched = BusScheduler(
                "dlt",
                dlt645_drivers(addresses, transport, quantities),
                silent_interval_s=dlt645_gap_s(baud),
                timeout_s=timeout_s,
                retries=retries,
                policy=policy,
            )

            def transactions() -> list[tuple[int, int]]:
                out = [
                    (len(req.encode(transport.preamble)), len(rep.encode(DLT645_REPLY_PREAMBLE)))
                    for req, rep in transport.log
                ]
                transport.log.clear()
                return out

            def set_dead(i: int, dead: bool) -> None:
                sim.meter(addresses[i]).faults.no_reply = dead

            yield Bus(
                "dlt645",
                baud,
                sched,
                set_dead,
                transactions,
                lambda q, a: dlt645_transaction_s(baud, q, a, response_delay_s),
                lambda q, a: dlt645_transaction_s(baud, q, a, response_delay_s) - dlt645_gap_s(baud),
                lambda: take(sim.answer_s),
                meters,
                {
                    "quantities": [q.value for q in quantities],
                    "response_delay_s": response_delay_s,
                    "gap_s": r4(dlt645_gap_s(baud)),
                    "request_preamble": transport.preamble,
                    "reply_preamble": DLT645_REPLY_PREAMBLE,
                },
            )


class WallClock:
    """Wall milliseconds for run_cycle, as the daemon passes them."""

    def __init__(self) -> None:
        self.base_ms = int(time.time() * 1000)
        self.t0 = time.monotonic()

    def now_ms(self) -> int:
        return self.base_ms + int((time.monotonic() - self.t0) * 1000)


async def wire_efficiency(bus: Bus, cycles: int) -> dict[str, Any]:
    """Healthy bus: measured cycle vs the limit of the frames that cycle exchanged."""
    clock = WallClock()
    res = await bus.sched.run_cycle(clock.now_ms())  # open the port, warm up
    if len(res.readings) != bus.meters:
        raise RuntimeError(f"{bus.protocol} {bus.baud}: warm-up read {len(res.readings)} of {bus.meters}")
    bus.transactions()
    bus.answer_s()
    durations: list[float] = []
    limits: list[float] = []
    sim_excess: list[float] = []
    per_cycle: list[tuple[int, int]] = []
    for _ in range(cycles):
        res = await bus.sched.run_cycle(clock.now_ms())
        if len(res.readings) != bus.meters:
            raise RuntimeError(f"{bus.protocol} {bus.baud}: cycle read {len(res.readings)} of {bus.meters}")
        per_cycle = bus.transactions()
        answers = bus.answer_s()
        if len(answers) != len(per_cycle):
            raise RuntimeError(f"{len(answers)} simulator answers for {len(per_cycle)} transactions")
        durations.append(res.duration_s)
        limits.append(sum(bus.transaction_s(q, a) for q, a in per_cycle))
        sim_excess.append(sum(answers) - sum(bus.simulator_s(q, a) for q, a in per_cycle))
    limit = median(limits)
    measured = median(durations)
    n = len(per_cycle)
    # where the cycle lost time against the wire: the simulator's own lateness (timer
    # granularity, its CPU time) and the rest (gateway, event loop, pseudo-terminal)
    loss = [d - lim for d, lim in zip(durations, limits, strict=True)]
    gateway_loss = [x - e for x, e in zip(loss, sim_excess, strict=True)]
    return {
        "baud": bus.baud,
        "meters": bus.meters,
        **bus.extra,
        "transactions_per_cycle": len(per_cycle),
        "request_bytes_per_cycle": sum(q for q, _ in per_cycle),
        "reply_bytes_per_cycle": sum(a for _, a in per_cycle),
        "limit_cycle_s": r4(limit),
        "cycle_s_median": r4(measured),
        "cycle_s_best": r4(min(durations)),
        "limit_polls_per_s": round(bus.meters / limit, 3),
        "polls_per_s": round(bus.meters / measured, 3),
        "fraction_of_limit": round(limit / measured, 3),
        "fraction_of_limit_best_cycle": round(limit / min(durations), 3),
        "loss_ms_per_transaction": {
            "total": round(median(loss) / n * 1000, 2),
            "simulator": round(median(sim_excess) / n * 1000, 2),
            "gateway_and_os": round(median(gateway_loss) / n * 1000, 2),
        },
        "fraction_of_limit_without_simulator_lateness": round(limit / (measured - median(sim_excess)), 3),
        "cycles": cycles,
    }


async def dead_meter(bus: Bus, healthy_cycles: int, after_cycles: int, dead_index: int) -> dict[str, Any]:
    """One meter stops answering: cycle time relative to the healthy bus, before and after back-off."""
    clock = WallClock()
    sched = bus.sched
    await sched.run_cycle(clock.now_ms())  # warm up
    healthy = [(await sched.run_cycle(clock.now_ms())).duration_s for _ in range(healthy_cycles)]
    ref = median(healthy)
    bus.set_dead(dead_index, True)
    dead_id = list(sched.drivers)[dead_index]
    cycles: list[dict[str, Any]] = []
    t_dead = time.monotonic()
    for i in range(1 + after_cycles):
        start_s = time.monotonic() - t_dead
        res = await sched.run_cycle(clock.now_ms())
        h = res.health[dead_id]
        cycles.append(
            {
                "cycle": i + 1,
                "started_s_after_death": round(start_s, 2),
                "duration_s": r4(res.duration_s),
                "ratio": round(res.duration_s / ref, 3),
                "dead_meter_asked": dead_id not in res.skipped,
                "dead_meter_state": h.state,
                "readings": len(res.readings),
            }
        )
        if len(res.readings) != bus.meters - 1:
            raise RuntimeError(f"a healthy meter was not read: {len(res.readings)} of {bus.meters - 1}")
    before = cycles[0]
    after = cycles[1:]
    skipped = [c["duration_s"] for c in after if not c["dead_meter_asked"]]
    reprobed = [c["duration_s"] for c in after if c["dead_meter_asked"]]
    mean_after = statistics.fmean(c["duration_s"] for c in after) if after else float("nan")
    return {
        "protocol": bus.protocol,
        "baud": bus.baud,
        "meters": bus.meters,
        **bus.extra,
        "timeout_s": sched.timeout_s,
        "retries": sched.retries,
        "policy": {
            "base_ms": sched.policy.base_ms,
            "factor": sched.policy.factor,
            "max_ms": sched.policy.max_ms,
            "quarantine_after": sched.policy.quarantine_after,
            "reprobe_ms": sched.policy.reprobe_ms,
        },
        "healthy_cycle_s_median": r4(ref),
        "healthy_cycles_s": [r4(d) for d in healthy],
        "ratio_before_backoff": before["ratio"],
        "ratio_after_backoff_mean": round(mean_after / ref, 3),
        "ratio_after_backoff_skipped_cycles_median": round(median(skipped) / ref, 3) if skipped else None,
        "ratio_after_backoff_reprobe_cycles_max": round(max(reprobed) / ref, 3) if reprobed else None,
        "cycles_after_death": cycles,
    }


async def outage(bus: Bus, cycles: int) -> dict[str, Any]:
    """Every meter silent, then the supply returns."""
    clock = WallClock()
    sched = bus.sched
    await sched.run_cycle(clock.now_ms())
    healthy = (await sched.run_cycle(clock.now_ms())).duration_s
    for i in range(bus.meters):
        bus.set_dead(i, True)
    during = []
    for _ in range(cycles):
        res = await sched.run_cycle(clock.now_ms())
        during.append({"duration_s": r4(res.duration_s), "bus_silent": res.bus_silent})
    for i in range(bus.meters):
        bus.set_dead(i, False)
    res = await sched.run_cycle(clock.now_ms())
    return {
        "protocol": bus.protocol,
        "baud": bus.baud,
        "meters": bus.meters,
        "timeout_s": sched.timeout_s,
        "healthy_cycle_s": r4(healthy),
        "cycles_during_outage": during,
        "first_cycle_after_supply_returns": {
            "duration_s": r4(res.duration_s),
            "readings": len(res.readings),
            "bus_silent": res.bus_silent,
        },
    }


# ---------------------------------------------------------------------------
# Main


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    out: dict[str, Any] = {
        "benchmark": "southbound",
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(a).items() if k != "func"},
    }
    parts = set(a.parts.split(","))
    if "cpu" in parts:
        log("cpu: Modbus TCP")
        out.setdefault("cpu_per_poll", {})["modbus_tcp"] = await cpu_modbus_tcp(a.cpu_meters, a.cpu_cycles, a.cpu_rounds)
        log("cpu: DL/T 645 TCP")
        out["cpu_per_poll"]["dlt645_tcp"] = await cpu_dlt645_tcp(a.cpu_meters, a.cpu_dlt_cycles, a.cpu_rounds)
    if "wire" in parts:
        wire: dict[str, list[dict[str, Any]]] = {"modbus_rtu": [], "dlt645": []}
        for baud in a.bauds:
            cycles = a.wire_cycles if baud >= 9600 else a.wire_cycles_slow
            log(f"wire: Modbus RTU {baud}")
            async with modbus_rtu_bus(a.rtu_meters, baud, response_delay_s=a.response_delay, timeout_s=1.0) as bus:
                wire["modbus_rtu"].append(await wire_efficiency(bus, cycles))
            log(f"wire: DL/T 645 {baud}")
            async with dlt645_bus(a.dlt_meters, baud, response_delay_s=a.response_delay, timeout_s=1.0) as bus:
                wire["dlt645"].append(await wire_efficiency(bus, cycles))
        out["wire_limit"] = wire
    if "dead" in parts:
        log(f"dead: Modbus RTU {a.dead_meters} meters at {a.dead_baud}")
        dead: dict[str, Any] = {}
        async with modbus_rtu_bus(
            a.dead_meters, a.dead_baud, response_delay_s=a.response_delay, timeout_s=a.dead_timeout
        ) as bus:
            dead["modbus_rtu"] = await dead_meter(bus, a.dead_healthy_cycles, a.dead_after_cycles, a.dead_meters // 2)
        if a.dead_dlt645:
            log(f"dead: DL/T 645 {a.dead_meters} meters at {a.dead_baud}, energy only")
            async with dlt645_bus(
                a.dead_meters,
                a.dead_baud,
                response_delay_s=a.response_delay,
                timeout_s=a.dead_timeout,
                quantities=(Quantity.ENERGY_IMPORT, Quantity.ENERGY_IMPORT_T1),
            ) as bus:
                dead["dlt645"] = await dead_meter(bus, a.dead_healthy_cycles, a.dead_after_cycles, a.dead_meters // 2)
        out["dead_meter"] = dead
    if "outage" in parts:
        log("outage: Modbus RTU")
        async with modbus_rtu_bus(a.outage_meters, 9600, response_delay_s=a.response_delay, timeout_s=0.3) as bus:
            out["outage"] = await outage(bus, 4)
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--parts", default="cpu,wire,dead,outage", help="comma list of cpu, wire, dead, outage")
    p.add_argument("--quick", action="store_true", help="tiny scale: checks the benchmark runs, measures little")
    p.add_argument("--cpu-meters", type=int, default=8)
    p.add_argument("--cpu-cycles", type=int, default=60, help="Modbus TCP cycles per timed round")
    p.add_argument("--cpu-dlt-cycles", type=int, default=15, help="DL/T 645 TCP cycles per timed round")
    p.add_argument("--cpu-rounds", type=int, default=3)
    p.add_argument("--bauds", default="2400,9600", help="comma list of baud rates for the wire part")
    p.add_argument("--rtu-meters", type=int, default=8)
    p.add_argument("--dlt-meters", type=int, default=2)
    p.add_argument("--wire-cycles", type=int, default=5, help="cycles at 9600 baud and above")
    p.add_argument("--wire-cycles-slow", type=int, default=3, help="cycles below 9600 baud")
    p.add_argument("--response-delay", type=float, default=0.005, help="simulated meter turnaround, seconds")
    p.add_argument("--dead-meters", type=int, default=32)
    p.add_argument("--dead-baud", type=int, default=9600)
    p.add_argument("--dead-timeout", type=float, default=1.0, help="the daemon's default bus timeout")
    p.add_argument("--dead-healthy-cycles", type=int, default=3)
    p.add_argument("--dead-after-cycles", type=int, default=8)
    p.add_argument("--dead-dlt645", action="store_true", help="also a DL/T 645 bus with a dead meter (slow)")
    p.add_argument("--outage-meters", type=int, default=8)
    a = p.parse_args(argv)
    if a.quick:
        a.cpu_meters, a.cpu_cycles, a.cpu_dlt_cycles, a.cpu_rounds = 2, 20, 5, 1
        a.rtu_meters, a.dlt_meters, a.wire_cycles, a.wire_cycles_slow = 2, 1, 1, 1
        a.dead_meters, a.dead_timeout, a.dead_healthy_cycles, a.dead_after_cycles = 3, 0.3, 1, 2
        a.outage_meters = 2
    a.bauds = [int(b) for b in str(a.bauds).split(",") if b]
    unknown = set(a.parts.split(",")) - {"cpu", "wire", "dead", "outage"}
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if a.dead_meters < 2:
        p.error("--dead-meters must be at least 2")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    import json

    result = asyncio.run(main_async(parse_args(argv)))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
