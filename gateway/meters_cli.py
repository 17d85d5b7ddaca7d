"""``edgegw meters``: read, scan and relay commands for commissioning.

    edgegw meters read  --config site.toml [--meter ID ...] [--json] [--force]
    edgegw meters scan  --config site.toml --bus rs485-1 [--units 1-32] [--profile sdm120]
                        [--timeout S] [--json] [--force]
                        (DL/T 645 bus: search by narrowing wildcards [--pattern], then a
                        probe of the configured addresses)
    edgegw meters relay --config site.toml --meter ID {status,open,close} [--force]

The commands read the site's configuration and run the operations of
:mod:`firmware_bridge.commissioning`, which open buses exactly as the daemon
does (:func:`firmware_bridge.bus.open_site_bus`): the site's time zone for
meter clocks, the same timing, one operation at a time, and the same line
lock: while the daemon polls a serial line they refuse with a message saying
so, and ``--force`` shares the line anyway (the two masters will then talk
over each other). Errors are one line naming the bus, meter or device and
what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from decimal import Decimal
from typing import Any

import orjson

from firmware_bridge.bus import BusConfigError, resolve_profiles
from firmware_bridge.commissioning import (
    ConfigProblems,
    Progress,
    held_line,
    read_meters,
    reading_dict,
    relay,
    scan_dlt645,
    scan_timeout_s,
    scan_units,
)
from firmware_bridge.dlt645.driver import narrow
from firmware_bridge.driver import BusUnavailable, MeterError
from firmware_bridge.modbus.profiles import ProfileError
from firmware_bridge.relay import RelayRateLimited, RelayRefused
from firmware_bridge.settings import BusSettings
from gateway.config import Config, ConfigError, load_config


def _owner(action: str) -> str:
    return f"edgegw meters {action}"


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError


def _emit(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, default=_json_default, option=orjson.OPT_INDENT_2).decode() + "\n")


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- read -----------------------------------------------------------------


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
        readings, failures = asyncio.run(
            read_meters(cfg.site, wanted, owner=_owner("read"), force=args.force, show=show)
        )
    except ConfigProblems as exc:
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
    timeout = args.timeout
    if timeout is None:  # the bus's timing, as the daemon reads the meters
        timeout = scan_timeout_s(bus, profile)
    progress = Progress(f"bus {bus.name}: units", quiet_finds=args.json)
    try:
        with held_line(bus, _owner("scan"), args.force):
            rows = asyncio.run(scan_units(bus, args.units, profile, timeout, progress))
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


def _scan_dlt645(cfg: Config, bus: BusSettings, args: argparse.Namespace) -> int:
    try:
        narrow(args.pattern)
    except ValueError as exc:
        _err(f"--pattern: {exc}")
        return 2
    progress = Progress(f"bus {bus.name}: address search", quiet_finds=args.json)
    try:
        with held_line(bus, _owner("scan"), args.force):
            out = asyncio.run(scan_dlt645(cfg.site, bus, args.pattern, args.timeout, progress))
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
        out = asyncio.run(relay(cfg.site, args.meter, args.action, owner=_owner("relay"), force=args.force))
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
