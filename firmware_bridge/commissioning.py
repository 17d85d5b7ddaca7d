"""Commissioning on site: read meters once, find meters on a bus, switch a relay.

The operations behind ``edgegw meters read|scan|relay`` (the command itself,
which reads the site's configuration, is ``gateway.meters_cli``). They work on
:class:`~firmware_bridge.settings.SiteSettings` and open buses exactly as the
daemon does (:func:`firmware_bridge.bus.open_site_bus`): the site's time zone
for meter clocks, the same timing, one operation at a time, and the same line
lock: while the daemon polls a serial line they raise
:class:`~firmware_bridge.driver.BusUnavailable` saying so, and ``force`` shares
the line anyway (the two masters will then talk over each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from firmware_bridge.bus import BusConfigError, busy_text, open_site_bus
from firmware_bridge.dlt645.driver import SearchStep, probe_each, search
from firmware_bridge.dlt645.transport import open_transport
from firmware_bridge.driver import BusUnavailable, MeterError
from firmware_bridge.errors import ProblemsError
from firmware_bridge.modbus.decode import decode_field, plan_reads
from firmware_bridge.modbus.driver import RTU_REQUEST_BYTES, rtu_reply_bytes
from firmware_bridge.modbus.profiles import Profile, ProfileError
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Quantity, Reading
from firmware_bridge.relay import RelayResult, controller_for
from firmware_bridge.serial_line import LineBusy, LineLock, check_device
from firmware_bridge.settings import BusSettings, MeterSettings, SiteSettings
from firmware_bridge.timing import line_timing


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _err(text: str) -> None:
    """A bus that could not be read, for the person at the command line."""
    print(text, file=sys.stderr, flush=True)


def reading_dict(r: Reading) -> dict[str, Any]:
    return {
        "meter": r.meter_id,
        "time_ms": r.time_ms,
        "values": {q.value: {"value": str(m.value), "quality": m.quality.value} for q, m in r.values.items()},
        "meta": dict(r.meta),
        "faults": [{"kind": f.kind, "cause": f.cause, "detail": f.detail, "raw": f.raw} for f in r.faults],
    }


def reading_lines(r: Reading, tz: dt.tzinfo) -> list[str]:
    """A reading as a technician reads it: one value a line, the meter clock in site time."""
    lines = [f"{r.meter_id}:"]
    for q, m in r.values.items():
        flag = "" if m.quality.value == "good" else f"  [{m.quality.value}]"
        text = str(m.value)
        if q is Quantity.METER_CLOCK and m.value.is_finite():
            local = dt.datetime.fromtimestamp(int(m.value), tz)
            text = f"{local:%Y-%m-%d %H:%M:%S} {tz}"
        lines.append(f"  {q.value:<22} {text}{flag}")
    for f in r.faults:
        lines.append(f"  {f.kind} fault: {f.detail} [{f.raw}]")
    if "incomplete" in r.meta:
        lines.append(f"  incomplete: {r.meta['incomplete']} (missing: {r.meta.get('missing') or '-'})")
    if r.meta.get("unsupported"):
        lines.append(f"  not supported by the meter: {r.meta['unsupported']}")
    return lines


# -- line lock for commands that open a transport themselves -----------------


@contextlib.contextmanager
def held_line(bus: BusSettings, owner: str, force: bool) -> Iterator[None]:
    """The line lock and device check of a serial bus, for an operation that opens
    its transport itself (``open_site_bus`` does the same)."""
    if bus.type != "serial" or not bus.device:
        yield
        return
    lock = LineLock(bus.device, owner)
    if not force:
        try:
            lock.acquire()
        except LineBusy as exc:
            raise BusUnavailable(bus.name, busy_text(exc)) from None
    try:
        problem = check_device(bus.device)
        if problem:
            raise BusUnavailable(bus.name, problem)
        yield
    finally:
        lock.release()


# -- progress ------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """``done/total, found, ETA`` on stderr while a scan runs.

    On a terminal the line is rewritten in place; otherwise (a log, a pipe) a
    line is written every tenth of the way and at the end. Finds go to stdout
    as they happen.
    """

    def __init__(
        self,
        what: str,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        quiet_finds: bool = False,
    ) -> None:
        self.what = what
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.clock = clock
        self.started = clock()
        self.tty = self.err.isatty()
        self.quiet_finds = quiet_finds
        self._last_tenth = -1
        self._shown = False

    def line(self, done: int, total: int, found: int) -> str:
        elapsed = self.clock() - self.started
        eta = "?" if done == 0 else _duration(elapsed / done * (total - done))
        return f"{self.what}: {done}/{total} done, {found} found, {_duration(elapsed)} elapsed, ETA {eta}"

    def update(self, done: int, total: int, found: int) -> None:
        text = self.line(done, total, found)
        if self.tty:
            self.err.write("\r" + text.ljust(78))
            self._shown = True
        else:
            tenth = 10 * done // max(1, total)
            if tenth != self._last_tenth or done == total:
                self._last_tenth = tenth
                self.err.write(text + "\n")
        self.err.flush()

    def find(self, text: str) -> None:
        if self.tty and self._shown:
            self.err.write("\r" + " " * 78 + "\r")
        if not self.quiet_finds:
            self.out.write(text + "\n")
            self.out.flush()

    def finish(self) -> None:
        if self.tty and self._shown:
            self.err.write("\n")
            self.err.flush()


# -- read -----------------------------------------------------------------


class ConfigProblems(ProblemsError):
    """Settings that do not make a bus (unknown profiles, mixed protocols...): one line each."""

    separator = "; "


async def read_meters(
    site: SiteSettings,
    wanted: set[str],
    *,
    owner: str,
    force: bool = False,
    show: Callable[[str], None] | None = None,
) -> tuple[list[Reading], dict[str, str]]:
    """Every selected meter (all when ``wanted`` is empty) once, each bus in parallel
    (lines are independent): the readings, and why each meter not read failed.

    ``show`` gets each reading (or failure) as lines for a person, as it comes.
    Raises :class:`ConfigProblems` for settings that do not make a bus.
    """
    readings: list[Reading] = []
    failures: dict[str, str] = {}
    problems: list[str] = []
    tz = ZoneInfo(site.timezone)

    async def one_bus(bus: BusSettings, meters: list[MeterSettings]) -> None:
        try:
            async with open_site_bus(site, bus, meters, owner=owner, force=force) as sched:
                for m in meters:
                    r = await sched.read_meter(m.id, _now_ms(), force=True)
                    if r is not None:
                        readings.append(r)
                        if show is not None:
                            show("\n".join(reading_lines(r, tz)))
                        continue
                    err = sched.health[m.id].last_error
                    failures[m.id] = "failed" if err is None else f"{err.kind}: {err.text}"
                    if show is not None:
                        show(f"{m.id}: FAILED {failures[m.id]}")
        except BusUnavailable as exc:
            _err(str(exc))
            for m in meters:
                failures[m.id] = f"not read: {exc}"
        except MeterError as exc:
            _err(f"bus {bus.name}: {exc.kind}: {exc.detail}")
            for m in meters:
                failures.setdefault(m.id, f"not read: {exc.detail}")
        except (BusConfigError, ProfileError) as exc:
            problems.append(str(exc))

    async with asyncio.TaskGroup() as tg:
        for bus in site.buses:
            meters = [m for m in site.meters_on(bus.name) if not wanted or m.id in wanted]
            if meters:
                tg.create_task(one_bus(bus, meters))
    if problems:
        raise ConfigProblems(problems)
    return readings, failures


# -- scan -----------------------------------------------------------------


def scan_timeout_s(bus: BusSettings, profile: Profile) -> float:
    """How long a unit-id probe waits for an answer: the bus's timing for the
    profile's first read, as the daemon reads the meters."""
    count = plan_reads(profile.fields, profile.max_gap, profile.max_count)[0].count
    line = line_timing("modbus", bus)
    return line.wire_s(RTU_REQUEST_BYTES) + line.timeout_s + line.wire_s(rtu_reply_bytes(count))


async def scan_units(
    bus: BusSettings,
    units: Sequence[int],
    profile: Profile,
    timeout_s: float,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Ask each Modbus unit id on ``bus`` for the profile's first read: a row per
    unit with its status (``answered`` with values, ``timeout``, or what the
    meter refused). Raises :class:`BusUnavailable` when the line itself fails."""
    first = plan_reads(profile.fields, profile.max_gap, profile.max_count)[0]
    if bus.type == "tcp":
        assert bus.host is not None
        transport = ModbusTransport.tcp(
            bus.host, bus.port, name=bus.name, timeout_s=timeout_s,
            rtu_over_tcp=bus.framing == "rtu", baud=bus.baud,
        )
    else:
        assert bus.device is not None
        transport = ModbusTransport.serial(
            bus.device, name=bus.name, baud=bus.baud, parity=bus.parity, stop_bits=bus.stop_bits, timeout_s=timeout_s
        )
    results: list[dict[str, Any]] = []
    found = 0
    try:
        for n, unit in enumerate(units, 1):
            row: dict[str, Any] = {"unit_id": unit}
            try:
                regs = await transport.read_registers(
                    f"unit-{unit}", unit, profile.function_code, first.address, first.count
                )
            except MeterError as exc:
                row["status"] = {"refused": "present, map does not match"}.get(exc.kind, exc.kind)
                row["detail"] = exc.detail
                if exc.kind == "transport":
                    results.append(row)
                    raise BusUnavailable(bus.name, exc.detail.removeprefix(f"bus {bus.name}: ")) from None
            else:
                row["status"] = "answered"
                row["values"] = {
                    f.quantity.value: str(decode_field(regs, first.address, f, profile.word_order).value)
                    for f in first.fields
                }
            results.append(row)
            if row["status"] != "timeout":
                found += 1
                extra = " ".join(f"{k}={v}" for k, v in row.get("values", {}).items()) or row.get("detail", "")
                progress.find(f"unit {unit:>3}: {row['status']}  {extra}")
            progress.update(n, len(units), found)
    finally:
        transport.close()
    return results


async def scan_dlt645(
    site: SiteSettings, bus: BusSettings, pattern: str, timeout_s: float | None, progress: Progress
) -> dict[str, Any]:
    """Search ``bus`` for DL/T 645 addresses by narrowing wildcards under
    ``pattern``, then probe the site's configured addresses on it."""
    configured = [(m.id, m.address) for m in site.meters_on(bus.name) if m.address]
    out: dict[str, Any] = {"bus": bus.name, "protocol": "dlt645", "pattern": pattern}

    found: list[str] = []

    def on_step(s: SearchStep) -> None:
        if s.outcome == "found" and s.address is not None:
            found.append(s.address)
            progress.find(f"found {s.address}")
        elif s.outcome == "unresolved":
            progress.find(f"unresolved {s.pattern}: {s.detail} (two meters with one address, or noise)")
        progress.update(s.asked, s.asked + s.pending, len(found))

    async with open_transport(bus, timing=line_timing("dlt645", bus)) as transport:
        result = await search(transport, pattern, timeout_s=timeout_s, on_step=on_step)
        progress.finish()
        statuses = await probe_each(transport, [a for _, a in configured], timeout_s=timeout_s)
    out["discovered"] = result.found
    out["unresolved"] = result.unresolved
    out["requests"] = result.asked
    out["configured"] = [
        {"meter": mid, "address": a, "status": statuses[a]} for mid, a in configured
    ]
    return out


# -- relay ----------------------------------------------------------------


def relay_result_dict(r: RelayResult) -> dict[str, Any]:
    return {
        "meter": r.meter_id,
        "want_open": r.want_open,
        "ok": r.ok,
        "alarm": r.alarm,
        "final_open": r.final_open,
        "reason": r.reason,
        "pending_customer": r.pending_customer,
        "refused": r.refused,
        "attempts": [
            {"drive": a.drive, "command_error": a.command_error, "read_open": a.read_open, "read_error": a.read_error}
            for a in r.attempts
        ],
    }


async def relay(site: SiteSettings, meter_id: str, action: str, *, owner: str, force: bool = False) -> dict[str, Any]:
    """``status`` reads a meter's relay; ``open``/``close`` switch it, verified by
    read-back and rate limited (:class:`~firmware_bridge.relay.RelayController`)."""
    meter = next(m for m in site.meters if m.id == meter_id)
    async with open_site_bus(site, site.bus(meter.bus), [meter], owner=owner, force=force) as sched:
        ctl = controller_for(sched)
        if action == "status":
            return {"meter": meter_id, "open": await ctl.read_open(meter_id)}
        return relay_result_dict(await ctl.set_open(meter_id, action == "open"))
