"""Prepaid enforcement benchmark: reading → trip on the wire, top-up → restore on the wire.

Runs the real daemon (:class:`gateway.daemon.Daemon`: bus pollers, one SQLite
writer committing each slice of a poll cycle with rating, ledger and cutoff policy, relay
operations on the meter's bus after the commit, verified by read-back) against
Modbus TCP simulators serving ``--meters`` SDM120 meters with a supply relay on
coil 0, spread over several simulated buses (at most 200 unit ids per server).
Every meter bills to its own prepaid account on a flat tariff. Most accounts
have ample credit; ``--tripping`` of them hold just enough to run out at
staggered moments during the run (no no-disconnect windows, no protection,
relay minimum interval 1 s).

The simulators run in a child process, so the daemon's CPU time
(``resource.getrusage``) is its own. The child records ``time.monotonic()``
when each relay-coil write arrives at a simulated meter (``SimMeter.set``);
CLOCK_MONOTONIC is system-wide, so those times compare directly with the
daemon's. The daemon runs on a clock that is the wall clock at start advanced
by the monotonic clock, so a reading's ``time_ms`` (stamped by the bus
scheduler when the bus became the read's) converts to monotonic time within
1 ms.

Measured, for each account that runs out of credit:

* ``cutoff_latency_s`` = t_wire(trip coil write) − t_poll(start of the read
  whose rating took the balance to the trip level), with its parts: until the
  reading's slice of the poll cycle was queued for the writer (0.2 s after the
  slice's first reading, plus at most one meter's read; ``gateway.daemon.poller.Slicer``),
  queue + commit of the slice (rating, ledger, policy), and hand-over to the
  bus until the write is on the wire;
* ``restore_latency_s`` = t_wire(close coil write) − the moment the top-up
  transaction (``Prepaid.apply_topup_in`` inside ``Outbox.transaction()``)
  was started, ``--topup-delay`` seconds after the trip's coil write arrived
  at the meter (the child process pushes every relay-coil write to the
  benchmark as it happens).

Context: readings committed per second, poll-cycle time per bus, commit time
per writer transaction (work queued together — slices and ends of poll
cycles, billing ticks — commits together) and per transaction holding only a
billing tick, work items per transaction, CPU time of the daemon process, and the same
numbers from a baseline run with prepaid disabled (same meters and buses, no
accounts) in the same invocation, as ratios.

    python bench/rating.py                   # 1,000 meters on 5 buses, ~2.5 min
    python bench/rating.py --quick           # tiny run (smoke test)
    python bench/rating.py --meters 400 --poll-interval 1

Prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gateway.daemon.poller as poller_mod  # noqa: E402
from firmware_bridge.modbus.profiles import BUILTIN_PROFILES  # noqa: E402
from firmware_bridge.relay import RelayPolicy  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.daemon import Cycle, Daemon, Tick  # noqa: E402
from testbed.simulators.modbus import ModbusSimulator, SimMeter  # noqa: E402

log = logging.getLogger("bench.rating")

SDM120 = BUILTIN_PROFILES["sdm120"]
FLAT_TARIFF = ROOT / "examples" / "tariffs" / "flat.toml"
PRICE_YUAN_PER_KWH = Decimal("0.5600")  # examples/tariffs/flat.toml
MAX_PER_BUS = 200
AMPLE_BALANCE = "100000.00"
TOPUP_MICRO = 50_000_000  # 50 yuan: far above the close permit, no second trip in the run
RELAY_MIN_INTERVAL_S = 1
RELAY_SETTLE_S = RelayPolicy().settle_s  # the daemon drives relays with the default policy


# ---------------------------------------------------------------------------
# Simulated meters (child process)

WireLog = list[tuple[int, int, bool, float]]  # (bus index, unit id, coil value, monotonic s)


@dataclass
class WireLoggingMeter(SimMeter):
    """A simulated meter that notes when a write to its relay coil arrives."""

    bus: int = 0
    wire_log: WireLog = field(default_factory=list)
    notify: Callable[[tuple[int, int, bool, float]], None] | None = None

    def set(self, func_code: int, address: int, values: Sequence[int] | Sequence[bool], now_s: float) -> Any:
        t = time.monotonic()
        coil = self.relay_coil
        if func_code in (5, 15) and coil is not None and address <= coil < address + len(values):
            write = (self.bus, self.unit_id, bool(values[coil - address]), t)
            self.wire_log.append(write)
            if self.notify is not None:
                self.notify(write)
        return super().set(func_code, address, values, now_s)


def rusage_self() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": ru.ru_utime, "system_s": ru.ru_stime, "max_rss_kib": float(ru.ru_maxrss)}


async def _simulators(conn: Connection, units_per_bus: list[int], load_kw: str) -> None:
    wire_log: WireLog = []
    sims: list[ModbusSimulator] = []

    def notify(write: tuple[int, int, bool, float]) -> None:
        conn.send(("wire", *write))  # the parent reacts to a trip on the wire (top-up)

    for b, n in enumerate(units_per_bus):
        meters: dict[int, SimMeter] = {
            u: WireLoggingMeter(
                unit_id=u, profile=SDM120, load_kw=Decimal(load_kw), bus=b, wire_log=wire_log, notify=notify
            )
            for u in range(1, n + 1)
        }
        sim = ModbusSimulator(meters=meters)
        await sim.start()
        sims.append(sim)
    conn.send({"ports": [s.port for s in sims]})
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_command() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            done.set()
            return
        if msg == "reset":  # every relay closed, log cleared
            for s in sims:
                for m in s.meters.values():
                    m.coils.clear()
            wire_log.clear()
            conn.send("ok")
        elif msg == "log":
            conn.send(list(wire_log))
        elif msg == "stop":
            conn.send(rusage_self())
            done.set()

    loop.add_reader(conn.fileno(), on_command)
    try:
        await done.wait()
    finally:
        loop.remove_reader(conn.fileno())
        for s in sims:
            await s.stop()


def simulator_main(conn: Connection, units_per_bus: list[int], load_kw: str) -> None:
    """Entry point of the simulator process."""
    asyncio.run(_simulators(conn, units_per_bus, load_kw))


class SimulatorProcess:
    """The simulators' child process: commands over a pipe, relay-coil writes pushed back."""

    def __init__(self, units_per_bus: list[int], load_kw: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=simulator_main, args=(child, units_per_bus, load_kw), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            raise RuntimeError("simulator process did not start within 60 s")
        self.ports: list[int] = self.conn.recv()["ports"]
        self.on_wire: Callable[[int, int, bool, float], None] | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while self.conn.poll():
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                assert self._loop is not None
                self._loop.remove_reader(self.conn.fileno())
                for fut in self._pending:
                    fut.set_exception(RuntimeError("simulator process went away"))
                return
            if isinstance(msg, tuple) and msg and msg[0] == "wire":
                if self.on_wire is not None:
                    self.on_wire(*msg[1:])
            elif self._pending:
                self._pending.popleft().set_result(msg)

    async def ask(self, msg: str, timeout_s: float = 30.0) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self.conn.send(msg)
        return await asyncio.wait_for(fut, timeout_s)

    async def stop(self) -> dict[str, float]:
        usage: dict[str, float] = await self.ask("stop")
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        return usage


# ---------------------------------------------------------------------------
# Plan and configuration


@dataclass(frozen=True)
class Plan:
    meters: int
    units_per_bus: list[int]
    tripping: dict[str, float]  # meter id -> seconds of credit at start
    load_kw: Decimal
    poll_interval_s: float
    baseline_s: float
    deadline_s: float  # prepaid phase: give up waiting for trips/restores after this
    stop_timeout_s: float  # cancel the daemon if it has not stopped by then
    topup_delay_s: float  # after the trip was verified
    seed: int

    @property
    def yuan_per_s(self) -> Decimal:
        return PRICE_YUAN_PER_KWH * self.load_kw / Decimal(3600)


def meter_id(bus: int, unit: int) -> str:
    return f"m{bus}-{unit:03d}"


def account_id(mid: str) -> str:
    return f"a{mid[1:]}"


def make_plan(args: argparse.Namespace) -> Plan:
    buses = args.buses or max(1, math.ceil(args.meters / MAX_PER_BUS))
    if args.meters / buses > 247:
        raise SystemExit("at most 247 meters per bus (Modbus unit ids 1..247): raise --buses")
    base, extra = divmod(args.meters, buses)
    units = [base + (1 if b < extra else 0) for b in range(buses)]
    all_meters = [meter_id(b, u) for b, n in enumerate(units) for u in range(1, n + 1)]
    rng = random.Random(args.seed)
    chosen = rng.sample(all_meters, min(args.tripping, len(all_meters)))
    lo, hi = args.cross_from, args.cross_to
    secs = [lo + (hi - lo) * (i + 0.5) / len(chosen) for i in range(len(chosen))] if chosen else []
    rng.shuffle(secs)
    return Plan(
        meters=args.meters,
        units_per_bus=units,
        tripping=dict(zip(chosen, secs, strict=True)),
        load_kw=Decimal(str(args.load_kw)),
        poll_interval_s=args.poll_interval,
        baseline_s=args.baseline_s,
        deadline_s=hi + args.tail_s,
        stop_timeout_s=args.stop_timeout,
        topup_delay_s=args.topup_delay,
        seed=args.seed,
    )


ACCOUNT_FILE = """account = "{account}"
timezone = "Asia/Shanghai"
opening_balance = "{balance}"
meters = ["{meter}"]
protected = false

[limits]
alarm1 = "0.05"
alarm2 = "0.02"
overdraft = "0.00"
close_permit = "0.01"
close_mode = "direct"
reconnect_delay_s = 0
relay_min_interval_s = {interval}
"""


def write_config(tmp: Path, plan: Plan, ports: list[int], *, prepaid: bool) -> Path:
    """Site configuration (and account files when ``prepaid``); returns the site file."""
    shutil.copy(FLAT_TARIFF, tmp / "flat.toml")
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        broker_port = s.getsockname()[1]  # closed again: nobody listens, the link stays down
    parts = [
        f"""[gateway]
id = "gw-bench"
site = "bench"
timezone = "Asia/Shanghai"
poll_interval_s = {plan.poll_interval_s}

[storage]
path = "gw.db"

[broker]
port = {broker_port}

[uplink]
reconnect_min_s = 30
reconnect_max_s = 60
"""
    ]
    for b, port in enumerate(ports):
        parts.append(
            f"""[[bus]]
name = "lan{b}"
type = "tcp"
host = "127.0.0.1"
port = {port}
timeout_s = 1.0
retries = 0
"""
        )
    for b, n in enumerate(plan.units_per_bus):
        for u in range(1, n + 1):
            mid = meter_id(b, u)
            acct = f'account = "{account_id(mid)}"\n' if prepaid else ""
            parts.append(
                f"""[[meter]]
id = "{mid}"
bus = "lan{b}"
protocol = "modbus"
unit_id = {u}
profile = "sdm120"
{acct}[meter.relay]
kind = "coil"
address = 0
min_interval_s = {RELAY_MIN_INTERVAL_S}
"""
            )
            if not prepaid:
                continue
            if mid in plan.tripping:
                yuan = (plan.yuan_per_s * Decimal(repr(plan.tripping[mid]))).quantize(
                    Decimal("0.01"), rounding=ROUND_FLOOR
                )
                balance = str(max(yuan, Decimal("0.01")))
            else:
                balance = AMPLE_BALANCE
            acct_id = account_id(mid)
            (tmp / f"{acct_id}.toml").write_text(
                ACCOUNT_FILE.format(account=acct_id, balance=balance, meter=mid, interval=RELAY_MIN_INTERVAL_S)
            )
            parts.append(
                f"""[[account]]
id = "{acct_id}"
settings = "{acct_id}.toml"
tariffs = ["flat.toml"]
"""
            )
    path = tmp / "site.toml"
    path.write_text("\n".join(parts))
    return path


# ---------------------------------------------------------------------------
# Clock: wall time at start, advanced by the monotonic clock

_BASE_MONO_NS = time.monotonic_ns()
_BASE_WALL_MS = time.time_ns() // 1_000_000


def mono_clock_ms() -> int:
    return _BASE_WALL_MS + (time.monotonic_ns() - _BASE_MONO_NS) // 1_000_000


def ms_to_mono(t_ms: int) -> float:
    return _BASE_MONO_NS / 1e9 + (t_ms - _BASE_WALL_MS) / 1000.0


# ---------------------------------------------------------------------------
# Observation of one daemon run


@dataclass
class TripDecision:
    meter: str
    t_poll: float  # start of the read whose rating reached the trip level
    t_handed: float  # its slice of the poll cycle was queued for the writer
    t_decided: float  # the commit of that slice returned the trip


@dataclass
class Recorder:
    """Observes the daemon: bus cycles, commits, relay events. Changes nothing it observes."""

    cycles: list[tuple[str, float, float, int]] = field(default_factory=list)  # bus, start, end, readings
    commits: list[tuple[str, float, int]] = field(default_factory=list)  # kind, seconds, readings
    trips: dict[str, TripDecision] = field(default_factory=dict)
    last_read_ms: dict[str, int] = field(default_factory=dict)
    last_handed: dict[str, float] = field(default_factory=dict)
    group_sizes: list[int] = field(default_factory=list)  # work items per writer transaction
    readings: int = 0
    relay_events: list[dict[str, Any]] = field(default_factory=list)
    committed: list[tuple[float, int]] = field(default_factory=list)  # commit time, readings
    queue_depth: list[int] = field(default_factory=list)  # writer queue, sampled every 0.25 s
    first_cycle: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.contextmanager
    def observing_buses(self) -> Any:
        """Time every poll cycle of every bus the daemon opens."""
        original = poller_mod.open_site_bus

        @contextlib.asynccontextmanager
        async def recording_open_bus(cfg: Any, bus: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async with original(cfg, bus, *args, **kwargs) as scheduler:
                run_cycle = scheduler.run_cycle

                async def timed_cycle(now_ms: int, **kwargs: Any) -> Any:
                    start = time.monotonic()
                    result = await run_cycle(now_ms, **kwargs)
                    self.cycles.append((bus.name, start, time.monotonic(), len(result.readings)))
                    return result

                scheduler.run_cycle = timed_cycle  # type: ignore[method-assign, assignment]
                yield scheduler

        poller_mod.open_site_bus = recording_open_bus  # type: ignore[assignment]
        try:
            yield
        finally:
            poller_mod.open_site_bus = original

    def observe_commits(self, daemon: Daemon) -> None:
        commit = daemon.writer.commit

        async def timed_commit(outbox: Any, items: list[Cycle | Tick]) -> Any:
            t0 = time.monotonic()
            intents = await commit(outbox, items)
            t1 = time.monotonic()
            readings = sum(len(i.readings) for i in items if isinstance(i, Cycle))
            if readings:
                self.commits.append(("cycle", t1 - t0, readings))
            elif any(isinstance(i, Tick) for i in items):
                self.commits.append(("tick", t1 - t0, 0))
            else:
                self.commits.append(("relay_event", t1 - t0, 0))
            self.group_sizes.append(len(items))
            for item in items:
                if isinstance(item, Cycle):
                    for r in item.readings:
                        self.last_read_ms[r.meter_id] = r.time_ms
                        self.last_handed[r.meter_id] = item.handed_mono
            for intent in intents:
                if intent.open and intent.meter not in self.trips and intent.meter in self.last_read_ms:
                    # the latest committed reading of the meter is the one that crossed:
                    # before it the balance was above the trip level
                    t_poll = ms_to_mono(self.last_read_ms[intent.meter])
                    t_handed = self.last_handed[intent.meter]
                    self.trips[intent.meter] = TripDecision(intent.meter, t_poll, t_handed, t1)
            return intents

        daemon.writer.commit = timed_commit  # type: ignore[method-assign]

    def on_cycle(self, item: Cycle) -> None:
        if item.readings:
            self.readings += len(item.readings)
            self.committed.append((time.monotonic(), len(item.readings)))
            self.first_cycle.set()
        for e in item.events:
            if e.get("type") in ("relay.operation", "relay.alarm"):
                self.relay_events.append(e)


# ---------------------------------------------------------------------------
# Statistics


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(pct(values, 50), digits),
        "p99": round(pct(values, 99), digits),
        "max": round(max(values), digits),
        "mean": round(sum(values) / len(values), digits),
    }


def cpu_s(a: dict[str, float], b: dict[str, float]) -> float:
    return (b["user_s"] - a["user_s"]) + (b["system_s"] - a["system_s"])


# ---------------------------------------------------------------------------
# One daemon run


@dataclass
class PhaseResult:
    recorder: Recorder
    t0: float  # measurement window (monotonic): first cycle committed ..
    t1: float  # .. stop requested
    cpu_s: float
    topups: dict[str, tuple[float, float, str]]  # meter -> (started, committed, status)
    wire_log: WireLog
    setup_s: float
    stop_s: float  # stop requested -> daemon stopped (commits what was polled first)
    stopped_cleanly: bool

    @property
    def window_s(self) -> float:
        return self.t1 - self.t0


async def run_phase(plan: Plan, sim: SimulatorProcess, *, prepaid: bool) -> PhaseResult:
    tmp = Path(tempfile.mkdtemp(prefix="bench-rating-"))
    try:
        await sim.ask("reset")
        t_setup = time.monotonic()
        cfg = load_config(write_config(tmp, plan, sim.ports, prepaid=prepaid))
        rec = Recorder()
        daemon = Daemon(cfg, clock_ms=mono_clock_ms, on_cycle=rec.on_cycle)
        rec.observe_commits(daemon)
        topups: dict[str, tuple[float, float, str]] = {}
        tripped: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        seen_trip: set[str] = set()
        restored: set[str] = set()
        all_restored = asyncio.Event()

        def on_wire(bus: int, unit: int, value: bool, t: float) -> None:
            m = meter_id(bus, unit)
            if m not in plan.tripping:
                return
            if value and m not in seen_trip:  # the trip is on the wire: the customer pays
                seen_trip.add(m)
                tripped.put_nowait((m, t))
            elif not value and m in seen_trip:
                restored.add(m)
                if restored >= set(plan.tripping):
                    all_restored.set()

        sim.on_wire = on_wire

        async def top_up_after_trips() -> None:
            assert daemon.outbox is not None and daemon.prepaid is not None
            while True:
                m, seen = await tripped.get()
                await asyncio.sleep(max(0.0, seen + plan.topup_delay_s - time.monotonic()))
                started = time.monotonic()
                async with daemon.outbox.transaction() as db:
                    res = await daemon.prepaid.apply_topup_in(
                        db,
                        {
                            "account": account_id(m),
                            "amount_micro": TOPUP_MICRO,
                            "purchase_counter": 1,
                            "payment_channel": "counter",
                        },
                        command_id=f"bench-topup-{m}",
                        channel="cli",
                        now_ms=daemon.clock_ms(),
                        outbox=daemon.outbox,
                    )
                topups[m] = (started, time.monotonic(), str(res["status"]))

        async def sample_queue() -> None:
            while True:
                await asyncio.sleep(0.25)
                if daemon._work is not None:
                    rec.queue_depth.append(daemon._work.qsize())

        stop = asyncio.Event()
        stop_s, stopped_cleanly = 0.0, True
        with rec.observing_buses():
            run = asyncio.create_task(daemon.run(stop))
            sampler = asyncio.create_task(sample_queue())
            try:
                await asyncio.wait_for(daemon.ready.wait(), 120)
                await asyncio.wait_for(rec.first_cycle.wait(), 120)
                setup_s = time.monotonic() - t_setup
                t0, ru0 = time.monotonic(), rusage_self()
                if prepaid and plan.tripping:
                    driver = asyncio.create_task(top_up_after_trips())
                    try:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(all_restored.wait(), plan.deadline_s)
                        # a little more steady state after the last restore
                        await asyncio.sleep(min(2.0, plan.poll_interval_s * 2))
                    finally:
                        driver.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await driver
                else:
                    await asyncio.sleep(plan.baseline_s)
                t1, ru1 = time.monotonic(), rusage_self()
            finally:
                sampler.cancel()
                stop.set()
                t_stop = time.monotonic()
                # the daemon commits every cycle already polled before it stops; a writer
                # that fell behind makes this long (reported), so it is bounded here
                done, _ = await asyncio.wait({run}, timeout=plan.stop_timeout_s)
                if not done:
                    stopped_cleanly = False
                    run.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await run
                stop_s = time.monotonic() - t_stop
                if run.done() and not run.cancelled() and run.exception() is not None:
                    raise RuntimeError("the daemon failed") from run.exception()
        sim.on_wire = None
        wire_log: WireLog = await sim.ask("log")
        return PhaseResult(
            rec, t0, t1, cpu_s(ru0, ru1), topups, wire_log, setup_s, stop_s, stopped_cleanly
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# Analysis


def first_write(wire_log: WireLog, mid: str, value: bool, after: float) -> float | None:
    bus, unit = mid[1:].split("-")
    b, u = int(bus), int(unit)
    times = [t for (wb, wu, v, t) in wire_log if wb == b and wu == u and v is value and t >= after]
    return min(times) if times else None


def context(ph: PhaseResult) -> dict[str, Any]:
    rec = ph.recorder
    per_bus: dict[str, list[float]] = {}
    for name, start, end, n in rec.cycles:
        if n:
            per_bus.setdefault(name, []).append(end - start)
    commits = [d for k, d, _ in rec.commits if k == "cycle"]
    per_reading = [d / n for k, d, n in rec.commits if k == "cycle" and n]
    ticks = [d for k, d, _ in rec.commits if k == "tick"]
    all_cycles = [d for v in per_bus.values() for d in v]
    in_window = sum(n for t, n in rec.committed if ph.t0 < t <= ph.t1)
    # achieved poll rate per bus between the first and the last cycle started in the
    # window (not quantised by where the window cuts a poll interval)
    rate = 0.0
    polled = 0
    for name in per_bus:
        starts = [(start, n) for b, start, _, n in rec.cycles if b == name and ph.t0 <= start <= ph.t1]
        if len(starts) >= 2:
            rate += sum(n for _, n in starts[:-1]) / (starts[-1][0] - starts[0][0])
        polled += sum(n for _, n in starts)
    depth = rec.queue_depth
    return {
        "window_s": round(ph.window_s, 2),
        "setup_s": round(ph.setup_s, 2),
        "stop_s": round(ph.stop_s, 2),
        "stopped_cleanly": ph.stopped_cleanly,
        "readings_committed_in_window": in_window,
        "readings_polled_in_window": polled,
        "polls_per_s": round(rate, 1),
        "writer_queue_depth": {"p50": pct(depth, 50), "max": max(depth)} if depth else {},
        "cycle_s_all_buses": summary(all_cycles),
        "cycle_s_p50_by_bus": {b: round(pct(v, 50), 4) for b, v in sorted(per_bus.items())},
        "commit_s_per_batch": summary(commits),
        "work_items_per_transaction": summary([float(n) for n in rec.group_sizes], 1),
        "commit_ms_per_reading": summary([x * 1000 for x in per_reading], 3),
        "billing_tick_commit_s": summary(ticks),
        "cpu_s": round(ph.cpu_s, 2),
        "cpu_fraction_of_one_core": round(ph.cpu_s / ph.window_s, 3) if ph.window_s else 0.0,
        "cpu_ms_per_reading": round(1000 * ph.cpu_s / polled, 3) if polled else None,
    }


def analyse(plan: Plan, base: PhaseResult, pre: PhaseResult) -> dict[str, Any]:
    rec = pre.recorder
    cutoff: list[float] = []
    rest_of_cycle: list[float] = []
    queue_commit: list[float] = []
    to_wire: list[float] = []
    missing_trip: list[str] = []
    behind = 0
    for mid in plan.tripping:
        d = rec.trips.get(mid)
        t_wire = first_write(pre.wire_log, mid, True, d.t_poll) if d else None
        if d is None or t_wire is None:
            missing_trip.append(mid)
            continue
        cutoff.append(t_wire - d.t_poll)
        rest_of_cycle.append(d.t_handed - d.t_poll)
        queue_commit.append(d.t_decided - d.t_handed)
        to_wire.append(t_wire - d.t_decided)
        # another relay operation on the same bus just before: this one waited behind it
        bus = mid[1:].split("-")[0]
        if any(
            str(wb) == bus and meter_id(wb, wu) != mid and d.t_decided - RELAY_SETTLE_S - 0.05 <= t < t_wire
            for wb, wu, _, t in pre.wire_log
        ):
            behind += 1
    restore: list[float] = []
    topup_commit: list[float] = []
    missing_restore: list[str] = []
    for mid in plan.tripping:
        tu = pre.topups.get(mid)
        t_wire = first_write(pre.wire_log, mid, False, tu[0]) if tu else None
        if tu is None or t_wire is None:
            missing_restore.append(mid)
            continue
        restore.append(t_wire - tu[0])
        topup_commit.append(tu[1] - tu[0])
    b, p = context(base), context(pre)
    ticks = [d for k, d, _ in rec.commits if k == "tick"]
    p["billing_tick_ms_per_account_p50"] = round(1000 * pct(ticks, 50) / plan.meters, 3) if ticks else None

    def ratio(x: float | None, y: float | None) -> float | None:
        return round(x / y, 2) if x and y else None

    ops = rec.relay_events
    return {
        "cutoff_latency_s": summary(cutoff),
        "cutoff_parts_s": {
            "until_handed_to_writer": summary(rest_of_cycle),
            "queue_and_commit": summary(queue_commit),
            "handover_to_wire": summary(to_wire),
            "trips_queued_behind_another_relay_operation": behind,
        },
        "cutoff_target_p99_s": 1.0,
        "cutoff_p99_under_target": bool(cutoff) and pct(cutoff, 99) < 1.0,
        "restore_latency_s": summary(restore),
        "topup_transaction_s": summary(topup_commit),
        "accounts_tripping": len(plan.tripping),
        "trips_measured": len(cutoff),
        "restores_measured": len(restore),
        "missing_trips": sorted(missing_trip),
        "missing_restores": sorted(missing_restore),
        "relay_operations": {
            "events": len(ops),
            "ok": sum(1 for e in ops if e.get("ok")),
            "not_ok": [
                {k: e.get(k) for k in ("meter", "want_open", "detail")} for e in ops if not e.get("ok")
            ][:10],
        },
        "prepaid": p,
        "baseline_no_prepaid": b,
        "ratios_prepaid_over_baseline": {
            "cycle_s_p50": ratio(p["cycle_s_all_buses"].get("p50"), b["cycle_s_all_buses"].get("p50")),
            "commit_s_per_batch_p50": ratio(p["commit_s_per_batch"].get("p50"), b["commit_s_per_batch"].get("p50")),
            "cpu_ms_per_reading": ratio(p["cpu_ms_per_reading"], b["cpu_ms_per_reading"]),
            "polls_per_s": ratio(p["polls_per_s"], b["polls_per_s"]),
        },
    }


# ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    import sqlite3

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": mem_gib,
        "sqlite": sqlite3.sqlite_version,
    }


async def main_async(plan: Plan) -> dict[str, Any]:
    load_before = os.getloadavg()
    sim = SimulatorProcess(plan.units_per_bus, str(plan.load_kw))
    sim.attach()
    try:
        print(f"baseline (prepaid off): {plan.meters} meters, {plan.baseline_s:.0f} s", file=sys.stderr)
        base = await run_phase(plan, sim, prepaid=False)
        print(
            f"prepaid: {plan.meters} accounts, {len(plan.tripping)} running out "
            f"(up to {plan.deadline_s:.0f} s)",
            file=sys.stderr,
        )
        pre = await run_phase(plan, sim, prepaid=True)
    finally:
        sim_usage = await sim.stop()
    out: dict[str, Any] = {
        "benchmark": "rating",
        # other processes on the machine distort the timings: say how busy it was
        "machine": machine() | {"loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "setup": {
            "meters": plan.meters,
            "buses": len(plan.units_per_bus),
            "meters_per_bus": plan.units_per_bus,
            "transport": "modbus tcp, 127.0.0.1, simulators in a child process",
            "profile": "sdm120 (2 read requests per meter) + relay coil 0",
            "tariff": f"flat {PRICE_YUAN_PER_KWH} yuan/kWh",
            "load_kw_per_meter": str(plan.load_kw),
            "poll_interval_s": plan.poll_interval_s,
            "relay_min_interval_s": RELAY_MIN_INTERVAL_S,
            "relay_settle_s": RELAY_SETTLE_S,
            "tripping_accounts": len(plan.tripping),
            "credit_runs_out_after_s": [
                round(min(plan.tripping.values()), 1) if plan.tripping else None,
                round(max(plan.tripping.values()), 1) if plan.tripping else None,
            ],
            "topup_after_trip_on_wire_s": plan.topup_delay_s,
            "seed": plan.seed,
        },
        "simulator_process_cpu_s": round(sim_usage["user_s"] + sim_usage["system_s"], 2),
        "daemon_process_max_rss_mib": round(rusage_self()["max_rss_kib"] / 1024, 1),
    }
    out.update(analyse(plan, base, pre))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meters", type=int, default=1000)
    p.add_argument("--buses", type=int, default=0, help="default: one per 200 meters")
    p.add_argument("--tripping", type=int, default=50, help="accounts whose credit runs out")
    p.add_argument("--poll-interval", type=float, default=5.0, help="poll_interval_s of the gateway")
    p.add_argument("--load-kw", type=float, default=36.0, help="load of every meter")
    p.add_argument("--cross-from", type=float, default=10.0, help="first account runs out after (s)")
    p.add_argument("--cross-to", type=float, default=40.0, help="last account runs out after (s)")
    p.add_argument("--tail-s", type=float, default=60.0, help="wait this long after --cross-to at most")
    p.add_argument("--topup-delay", type=float, default=3.0, help="top-up this long after the trip is on the wire")
    p.add_argument("--baseline-s", type=float, default=20.0, help="length of the prepaid-off run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stop-timeout", type=float, default=30.0, help="cancel a daemon that has not stopped by then")
    p.add_argument("--quick", action="store_true", help="tiny run: 20 meters on 2 buses, 4 running out")
    args = p.parse_args(argv)
    if args.quick:
        args.meters, args.buses, args.tripping = 20, 2, 4
        args.poll_interval, args.cross_from, args.cross_to = 0.5, 1.5, 3.5
        args.tail_s, args.baseline_s, args.topup_delay = 20.0, 2.0, 1.5
    if args.meters < 1 or args.tripping < 0 or args.poll_interval <= 0:
        p.error("--meters must be >= 1, --tripping >= 0, --poll-interval > 0")
    if not 0 < args.cross_from <= args.cross_to:
        p.error("need 0 < --cross-from <= --cross-to")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    plan = make_plan(parse_args(argv))
    result = asyncio.run(main_async(plan))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
