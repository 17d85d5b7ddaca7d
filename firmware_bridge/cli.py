"""``edgegw meters``: read, scan and relay commands for commissioning.

    edgegw meters read  --config site.toml [--meter ID ...] [--json] [--force]
    edgegw meters scan  --config site.toml --bus rs485-1 [--units 1-32] [--profile sdm120]
                        [--timeout S] [--json] [--force]
                        (DL/T 645 bus: search by narrowing wildcards [--pattern], then a
                        probe of the configured addresses)
    edgegw meters relay --config site.toml --meter ID {status,open,close} [--force]

The commands open buses exactly as the daemon does
(:func:`firmware_bridge.bus.open_site_bus`): the site's time zone for meter
clocks, the same timing, one operation at a time, and the same line lock: while
the daemon polls a serial line they refuse with a message saying so, and
``--force`` shares the line anyway (the two masters will then talk over each
other). Errors are one line naming the bus, meter or device and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import orjson

from firmware_bridge.bus import BusConfigError, busy_text, open_site_bus, resolve_profiles
from firmware_bridge.driver import BusUnavailable, MeterError
from firmware_bridge.modbus.decode import decode_field, plan_reads
from firmware_bridge.modbus.driver import RTU_REQUEST_BYTES, rtu_reply_bytes
from firmware_bridge.modbus.profiles import ProfileError
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Quantity, Reading
from firmware_bridge.relay import RelayRateLimited, RelayRefused, RelayResult, controller_for
from firmware_bridge.serial_line import LineBusy, LineLock, check_device
from firmware_bridge.timing import line_timing
from gateway.config import BusSection, Config, ConfigError, load_config


def _owner(action: str) -> str:
    return f"edgegw meters {action}"


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError


def _emit(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, default=_json_default, option=orjson.OPT_INDENT_2).decode() + "\n")


def _err(text: str) -> None:
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
def _line(bus: BusSection, action: str, force: bool) -> Iterator[None]:
    """The line lock and device check of a serial bus (``open_site_bus`` does the same)."""
    if bus.type != "serial" or not bus.device:
        yield
        return
    lock = LineLock(bus.device, _owner(action))
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


class _ConfigProblems(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


async def _read(
    cfg: Config, wanted: set[str], force: bool, show: Callable[[str], None] | None
) -> tuple[list[Reading], dict[str, str]]:
    """Every selected meter, each bus in parallel (lines are independent)."""
    readings: list[Reading] = []
    failures: dict[str, str] = {}
    problems: list[str] = []
    tz = ZoneInfo(cfg.gateway.timezone)

    async def one_bus(bus: BusSection, meters: list[Any]) -> None:
        try:
            async with open_site_bus(cfg, bus, meters, owner=_owner("read"), force=force) as sched:
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
        for bus in cfg.buses:
            meters = [m for m in cfg.meters_on(bus.name) if not wanted or m.id in wanted]
            if meters:
                tg.create_task(one_bus(bus, meters))
    if problems:
        raise _ConfigProblems(problems)
    return readings, failures


def cmd_read(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    wanted = set(args.meter or [])
    unknown = wanted - {m.id for m in cfg.meters}
    if unknown:
        _err(f"unknown meter(s): {', '.join(sorted(unknown))} (known: {', '.join(m.id for m in cfg.meters)})")
        return 2
    show = None if args.json else (lambda text: print(text, flush=True))
    try:
        readings, failures = asyncio.run(_read(cfg, wanted, args.force, show))
    except _ConfigProblems as exc:
        for line in exc.problems:
            _err(f"{args.config}: {line}")
        return 2
    if args.json:
        _emit({"readings": [reading_dict(r) for r in readings], "failures": failures})
    return 0 if not failures else 1


# -- scan -----------------------------------------------------------------


def parse_units(text: str) -> list[int]:
    """``1-32``, ``1,2,5-7`` → unit ids (1..247)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"unit range {part!r} is not a number or a-b") from None
        if not 1 <= a <= b <= 247:
            raise argparse.ArgumentTypeError(f"unit range {part!r} outside 1..247")
        out.extend(range(a, b + 1))
    if not out:
        raise argparse.ArgumentTypeError("no unit ids")
    return sorted(set(out))


async def _scan(
    bus: BusSection,
    units: Sequence[int],
    profile: Any,
    timeout_s: float,
    progress: Progress,
) -> list[dict[str, Any]]:
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


def cmd_scan(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    try:
        bus = cfg.bus(args.bus)
    except KeyError:
        _err(f"unknown bus {args.bus!r} (known: {', '.join(b.name for b in cfg.buses)})")
        return 2
    protocols = {m.protocol for m in cfg.meters_on(bus.name)}
    if len(protocols) > 1:
        _err(f"bus {bus.name}: meters speak different protocols ({', '.join(sorted(protocols))})")
        return 2
    if protocols == {"dlt645"}:
        return _scan_dlt645(cfg, bus, args)
    try:
        profiles = resolve_profiles(cfg.profiles)
    except ProfileError as exc:
        _err(f"{args.config}: {exc}")
        return 2
    if args.profile not in profiles:
        _err(f"unknown profile {args.profile!r} (known: {', '.join(sorted(profiles))})")
        return 2
    profile = profiles[args.profile]
    count = plan_reads(profile.fields, profile.max_gap, profile.max_count)[0].count
    line = line_timing("modbus", bus)
    timeout = args.timeout
    if timeout is None:  # the bus's timing, as the daemon reads the meters
        timeout = line.wire_s(RTU_REQUEST_BYTES) + line.timeout_s + line.wire_s(rtu_reply_bytes(count))
    progress = Progress(f"bus {bus.name}: units", quiet_finds=args.json)
    try:
        with _line(bus, "scan", args.force):
            rows = asyncio.run(_scan(bus, args.units, profile, timeout, progress))
    except BusUnavailable as exc:
        progress.finish()
        _err(str(exc))
        return 1
    progress.finish()
    answered = sum(r["status"] == "answered" for r in rows)
    if args.json:
        _emit({"bus": bus.name, "profile": args.profile, "units": rows})
    else:
        print(f"{answered} of {len(rows)} unit(s) answered with the {args.profile} map")
    return 0


async def _dlt645_scan(
    cfg: Config, bus: BusSection, pattern: str, timeout_s: float | None, progress: Progress
) -> dict[str, Any]:
    dlt = importlib.import_module("firmware_bridge.dlt645")
    configured = [(m.id, m.address) for m in cfg.meters_on(bus.name) if m.address]
    out: dict[str, Any] = {"bus": bus.name, "protocol": "dlt645", "pattern": pattern}

    found: list[str] = []

    def on_step(s: Any) -> None:
        if s.outcome == "found":
            found.append(s.address)
            progress.find(f"found {s.address}")
        elif s.outcome == "unresolved":
            progress.find(f"unresolved {s.pattern}: {s.detail} (two meters with one address, or noise)")
        progress.update(s.asked, s.asked + s.pending, len(found))

    async with dlt.open_transport(bus, timing=line_timing("dlt645", bus)) as transport:
        result = await dlt.search(transport, pattern, timeout_s=timeout_s, on_step=on_step)
        progress.finish()
        statuses = await dlt.probe_each(transport, [a for _, a in configured], timeout_s=timeout_s)
    out["discovered"] = result.found
    out["unresolved"] = result.unresolved
    out["requests"] = result.asked
    out["configured"] = [
        {"meter": mid, "address": a, "status": statuses[a]} for mid, a in configured
    ]
    return out


def _scan_dlt645(cfg: Config, bus: BusSection, args: argparse.Namespace) -> int:
    dlt = importlib.import_module("firmware_bridge.dlt645")
    try:
        dlt.narrow(args.pattern)
    except ValueError as exc:
        _err(f"--pattern: {exc}")
        return 2
    progress = Progress(f"bus {bus.name}: address search", quiet_finds=args.json)
    try:
        with _line(bus, "scan", args.force):
            out = asyncio.run(_dlt645_scan(cfg, bus, args.pattern, args.timeout, progress))
    except BusUnavailable as exc:
        progress.finish()
        _err(str(exc))
        return 1
    except MeterError as exc:
        progress.finish()
        _err(f"bus {bus.name}: {exc.detail}")
        return 1
    if args.json:
        _emit(out)
    else:
        for row in out["configured"]:
            print(f"configured {row['meter']} {row['address']}: {row['status']}")
        print(f"{len(out['discovered'])} meter(s) found with {out['requests']} request(s)")
    return 0


# -- relay ----------------------------------------------------------------


def _result_dict(r: RelayResult) -> dict[str, Any]:
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


async def _relay(cfg: Config, meter_id: str, action: str, force: bool) -> dict[str, Any]:
    meter = next(m for m in cfg.meters if m.id == meter_id)
    async with open_site_bus(cfg, cfg.bus(meter.bus), [meter], owner=_owner("relay"), force=force) as sched:
        ctl = controller_for(sched)
        if action == "status":
            return {"meter": meter_id, "open": await ctl.read_open(meter_id)}
        return _result_dict(await ctl.set_open(meter_id, action == "open"))


def cmd_relay(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    meter = next((m for m in cfg.meters if m.id == args.meter), None)
    if meter is None:
        _err(f"unknown meter {args.meter!r} (known: {', '.join(m.id for m in cfg.meters)})")
        return 2
    if meter.relay is None:
        _err(f"meter {args.meter}: has no relay (add a [meter.relay] table to its [[meter]] entry)")
        return 2
    try:
        out = asyncio.run(_relay(cfg, args.meter, args.action, args.force))
    except BusUnavailable as exc:
        _err(str(exc))
        return 1
    except MeterError as exc:
        _err(f"meter {args.meter}: {exc.kind}: {exc.detail}")
        return 1
    except (RelayRateLimited, RelayRefused, BusConfigError, ProfileError) as exc:
        _err(str(exc))
        return 1
    _emit(out)
    if not out.get("ok", True):
        _err(f"meter {args.meter}: {out['reason']}")
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("meters", help="read, scan and switch meters directly (commissioning)")
    sub = p.add_subparsers(dest="meters_command", required=True, metavar="ACTION")
    force_help = "use the line even while another process (the daemon) holds it"

    r = sub.add_parser("read", help="read configured meters once")
    r.add_argument("--config", required=True, help="TOML configuration file")
    r.add_argument("--meter", action="append", metavar="ID", help="only this meter (repeatable)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--force", action="store_true", help=force_help)
    r.set_defaults(func=cmd_read)

    s = sub.add_parser("scan", help="find Modbus unit ids, or DL/T 645 addresses, on a bus")
    s.add_argument("--config", required=True)
    s.add_argument("--bus", required=True)
    s.add_argument("--units", type=parse_units, default=list(range(1, 33)), help="e.g. 1-32 or 1,2,10-12")
    s.add_argument("--profile", default="sdm120", help="map used for the probe read (Modbus)")
    s.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for each answer (default: from the bus's timing, as the daemon)",
    )
    s.add_argument(
        "--pattern",
        default="AAAAAAAAAAAA",
        help="DL/T 645: where to search (AA = wildcard byte, padding the high end; e.g. AAAAAAAA0012)",
    )
    s.add_argument("--json", action="store_true")
    s.add_argument("--force", action="store_true", help=force_help)
    s.set_defaults(func=cmd_scan)

    rl = sub.add_parser("relay", help="read or switch a meter's relay (verified, rate limited)")
    rl.add_argument("--config", required=True)
    rl.add_argument("--meter", required=True)
    rl.add_argument("action", choices=["status", "open", "close"])
    rl.add_argument("--force", action="store_true", help=force_help)
    rl.set_defaults(func=cmd_relay)
