"""``edgegw meters``: read, scan and relay commands for commissioning.

    edgegw meters read  --config site.toml [--meter ID ...] [--json]
    edgegw meters scan  --config site.toml --bus rs485-1 [--units 1-32] [--profile sdm120] [--json]
                        (DL/T 645 bus: read-address discovery + probe of the configured addresses)
    edgegw meters relay --config site.toml --meter ID {status,open,close}

All commands use the same bus code as the daemon (``open_bus``): one
operation at a time per bus, same timeouts, same error kinds. Do not run
them against a bus the daemon is polling at the same moment: RS-485 has one
master.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson

from firmware_bridge.bus import BusConfigError, open_bus, resolve_profiles
from firmware_bridge.driver import MeterError
from firmware_bridge.modbus.decode import decode_field, plan_reads
from firmware_bridge.modbus.profiles import ProfileError
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Reading
from firmware_bridge.relay import RelayRateLimited, RelayRefused, RelayResult, controller_for
from gateway.config import Config, ConfigError, load_config


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


def reading_dict(r: Reading) -> dict[str, Any]:
    return {
        "meter": r.meter_id,
        "time_ms": r.time_ms,
        "values": {q.value: {"value": str(m.value), "quality": m.quality.value} for q, m in r.values.items()},
        "meta": dict(r.meta),
    }


# -- read -----------------------------------------------------------------


async def _read(cfg: Config, wanted: set[str]) -> tuple[list[Reading], dict[str, str]]:
    readings: list[Reading] = []
    failures: dict[str, str] = {}
    for bus in cfg.buses:
        meters = [m for m in cfg.meters_on(bus.name) if not wanted or m.id in wanted]
        if not meters:
            continue
        async with open_bus(bus, meters, cfg.profiles) as sched:
            for m in meters:
                r = await sched.read_meter(m.id, _now_ms(), force=True)
                if r is not None:
                    readings.append(r)
                else:
                    err = sched.health[m.id].last_error
                    failures[m.id] = "failed" if err is None else f"{err.kind}: {err.text}"
    return readings, failures


def cmd_read(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    wanted = set(args.meter or [])
    unknown = wanted - {m.id for m in cfg.meters}
    if unknown:
        print(f"unknown meter(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    try:
        readings, failures = asyncio.run(_read(cfg, wanted))
    except (BusConfigError, ProfileError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        _emit({"readings": [reading_dict(r) for r in readings], "failures": failures})
    else:
        for r in readings:
            print(f"{r.meter_id}:")
            for q, m in r.values.items():
                flag = "" if m.quality.value == "good" else f"  [{m.quality.value}]"
                print(f"  {q.value:<22} {m.value}{flag}")
        for mid, text in failures.items():
            print(f"{mid}: FAILED {text}")
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
        a, b = int(lo), int(hi or lo)
        if not 1 <= a <= b <= 247:
            raise argparse.ArgumentTypeError(f"unit range {part!r} outside 1..247")
        out.extend(range(a, b + 1))
    if not out:
        raise argparse.ArgumentTypeError("no unit ids")
    return sorted(set(out))


async def _scan(cfg: Config, bus_name: str, units: Sequence[int], profile_name: str, timeout_s: float) -> list[dict[str, Any]]:
    bus = cfg.bus(bus_name)
    profile = resolve_profiles(cfg.profiles)[profile_name]
    first = plan_reads(profile.fields, profile.max_gap, profile.max_count)[0]
    if bus.type == "tcp":
        assert bus.host is not None
        transport = ModbusTransport.tcp(bus.host, bus.port, name=bus.name, timeout_s=timeout_s)
    else:
        assert bus.device is not None
        transport = ModbusTransport.serial(
            bus.device, name=bus.name, baud=bus.baud, parity=bus.parity, stop_bits=bus.stop_bits, timeout_s=timeout_s
        )
    results: list[dict[str, Any]] = []
    try:
        for unit in units:
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
                    break
            else:
                row["status"] = "answered"
                row["values"] = {
                    f.quantity.value: str(decode_field(regs, first.address, f, profile.word_order).value)
                    for f in first.fields
                }
            results.append(row)
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
        print(f"unknown bus {args.bus!r} (known: {', '.join(b.name for b in cfg.buses)})", file=sys.stderr)
        return 2
    protocols = {m.protocol for m in cfg.meters_on(bus.name)}
    if len(protocols) > 1:
        print(f"bus {bus.name}: meters speak different protocols", file=sys.stderr)
        return 2
    if protocols == {"dlt645"}:
        return _scan_dlt645(cfg, bus.name, args)
    try:
        if args.profile not in resolve_profiles(cfg.profiles):
            print(f"unknown profile {args.profile!r}", file=sys.stderr)
            return 2
        rows = asyncio.run(_scan(cfg, bus.name, args.units, args.profile, args.timeout))
    except ProfileError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        _emit({"bus": bus.name, "profile": args.profile, "units": rows})
    else:
        for row in rows:
            if row["status"] == "timeout":
                continue
            extra = " ".join(f"{k}={v}" for k, v in row.get("values", {}).items()) or row.get("detail", "")
            print(f"unit {row['unit_id']:>3}: {row['status']}  {extra}")
        print(f"{sum(r['status'] == 'answered' for r in rows)} of {len(rows)} unit(s) answered")
    return 0


async def _dlt645_scan(cfg: Config, bus_name: str, pattern: str) -> dict[str, Any]:
    dlt = importlib.import_module("firmware_bridge.dlt645")
    configured = [m.address for m in cfg.meters_on(bus_name) if m.address]
    out: dict[str, Any] = {"bus": bus_name, "protocol": "dlt645"}
    async with dlt.open_transport(cfg.bus(bus_name)) as transport:
        try:
            out["discovered"] = await dlt.discover(transport, pattern)
        except MeterError as exc:
            out["discovered"] = []
            out["discover_error"] = f"{exc.kind}: {exc.detail} (several meters answer a full wildcard at once)"
        present = set(await dlt.probe(transport, configured))
    out["configured"] = [{"address": a, "status": "answered" if a in present else "silent"} for a in configured]
    return out


def _scan_dlt645(cfg: Config, bus_name: str, args: argparse.Namespace) -> int:
    try:
        out = asyncio.run(_dlt645_scan(cfg, bus_name, args.pattern))
    except (MeterError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        _emit(out)
    else:
        for a in out["discovered"]:
            print(f"discovered {a}")
        if "discover_error" in out:
            print(f"discover: {out['discover_error']}")
        for row in out["configured"]:
            print(f"configured {row['address']}: {row['status']}")
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
        "attempts": [
            {"drive": a.drive, "command_error": a.command_error, "read_open": a.read_open, "read_error": a.read_error}
            for a in r.attempts
        ],
    }


async def _relay(cfg: Config, meter_id: str, action: str) -> dict[str, Any]:
    meter = next(m for m in cfg.meters if m.id == meter_id)
    async with open_bus(cfg.bus(meter.bus), [meter], cfg.profiles) as sched:
        ctl = controller_for(sched)
        if action == "status":
            return {"meter": meter_id, "open": await ctl.read_open(meter_id)}
        return _result_dict(await ctl.set_open(meter_id, action == "open"))


def cmd_relay(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    meter = next((m for m in cfg.meters if m.id == args.meter), None)
    if meter is None or meter.relay is None:
        print(f"meter {args.meter}: unknown or has no [meter.relay] table", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(_relay(cfg, args.meter, args.action))
    except (MeterError, RelayRateLimited, RelayRefused, BusConfigError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    _emit(out)
    return 0 if out.get("ok", True) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("meters", help="read, scan and switch meters directly (commissioning)")
    sub = p.add_subparsers(dest="meters_command", required=True, metavar="ACTION")

    r = sub.add_parser("read", help="read configured meters once")
    r.add_argument("--config", required=True, help="TOML configuration file")
    r.add_argument("--meter", action="append", metavar="ID", help="only this meter (repeatable)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_read)

    s = sub.add_parser("scan", help="probe Modbus unit ids, or DL/T 645 addresses, on a bus")
    s.add_argument("--config", required=True)
    s.add_argument("--bus", required=True)
    s.add_argument("--units", type=parse_units, default=list(range(1, 33)), help="e.g. 1-32 or 1,2,10-12")
    s.add_argument("--profile", default="sdm120", help="map used for the probe read")
    s.add_argument("--timeout", type=float, default=0.3, help="per-unit timeout in seconds (Modbus)")
    s.add_argument("--pattern", default="AAAAAAAAAAAA", help="DL/T 645 read-address pattern (AA = wildcard digit pair)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_scan)

    rl = sub.add_parser("relay", help="read or switch a meter's relay (verified, rate limited)")
    rl.add_argument("--config", required=True)
    rl.add_argument("--meter", required=True)
    rl.add_argument("action", choices=["status", "open", "close"])
    rl.set_defaults(func=cmd_relay)
