"""Configuration: one TOML file, validated at load.

Relative file paths in the file are relative to the file's own directory.

Every problem is reported with the file, the key path and what is wrong, e.g.::

    site.toml: meter[2].bus: unknown bus 'rs485-9' (known: rs485-1, tcp-1)

All problems in a file are collected and reported together, so a technician
fixes a broken file in one pass. The result is a tree of frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class ConfigError(Exception):
    """A configuration file is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Result types


@dataclass(frozen=True)
class GatewaySection:
    id: str
    site: str
    timezone: str = "UTC"
    poll_interval_s: float = 60.0


@dataclass(frozen=True)
class StorageSection:
    path: Path
    max_bytes: int = 256 * 1024 * 1024
    reserve_bytes: int = 16 * 1024 * 1024
    key_file: Path | None = None


@dataclass(frozen=True)
class BrokerSection:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    topic_prefix: str = "edgegw/v1"


@dataclass(frozen=True)
class UplinkSection:
    batch_max_records: int = 5000
    batch_max_bytes: int = 64 * 1024
    ack_timeout_s: float = 20.0
    window: int = 4
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    headend_public_key: str | None = None  # base64 X25519: enables sealed encoding 2
    max_bytes_per_s: int | None = None  # ceiling for backlog bytes on the link


@dataclass(frozen=True)
class BusSection:
    name: str
    type: str  # "serial" | "tcp"
    device: str | None = None  # serial device path
    baud: int = 9600
    parity: str = "N"  # N, E, O
    stop_bits: int = 1
    host: str | None = None
    port: int = 502
    # Per-transaction timeout (wait for a reply's first byte after the request);
    # None: the meters' response time plus a margin (firmware_bridge/timing.py).
    timeout_s: float | None = None
    retries: int = 1
    framing: str = "socket"  # tcp buses: "socket" (Modbus TCP) or "rtu" (transparent serial server)
    # Longest wait of the bus's meters before they answer; None: the protocol's
    # (DL/T 645: 0.5 s, Modbus: 1 s).
    response_time_s: float | None = None


@dataclass(frozen=True)
class RelaySection:
    kind: str  # "dlt645" | "coil" | "register"
    address: int = 0
    unit_id: int | None = None
    open_value: int = 1
    closed_value: int = 0
    min_interval_s: float = 10.0


@dataclass(frozen=True)
class MeterSection:
    id: str
    bus: str
    protocol: str  # "modbus" | "dlt645"
    profile: str | None = None
    unit_id: int | None = None
    address: str | None = None
    account: str | None = None
    relay: RelaySection | None = None
    password: str | None = None  # DL/T 645 control password, hex, wire order (level + 3 bytes)
    operator: str | None = None  # DL/T 645 operator code, hex (4 bytes)
    quantities: tuple[str, ...] | None = None  # what to read; None = the protocol's default set
    response_time_s: float | None = None  # this meter's documented response time; None: the bus's
    timeout_s: float | None = None  # this meter's per-transaction timeout; None: the bus's


@dataclass(frozen=True)
class SecuritySection:
    trust_file: Path | None = None  # central public keys per role (docs/security.md)
    keystore: Path | None = None  # this gateway's keys (`edgegw keys init`)
    # Where `edgegw-usb@` keeps releases and its audit spool; None: derived from a
    # configuration path <dir>/current/files/<file>, else no spool is drained.
    provisioning_dir: Path | None = None

    def provisioning_root(self, config_source: Path) -> Path | None:
        if self.provisioning_dir is not None:
            return self.provisioning_dir
        parents = config_source.parents
        if len(parents) > 2 and config_source.parent.name == "files":
            if parents[1].name == "current":
                return parents[2]
            if len(parents) > 3 and parents[2].name == "releases":
                return parents[3]
        return None


@dataclass(frozen=True)
class AccountSection:
    id: str
    settings: Path  # account file: opening balance, limits, windows, protection (docs/billing.md)
    tariffs: tuple[Path, ...]  # the versions of the account's tariff (docs/tariffs.md)


@dataclass(frozen=True)
class Config:
    source: Path
    gateway: GatewaySection
    storage: StorageSection
    broker: BrokerSection
    uplink: UplinkSection
    buses: tuple[BusSection, ...]
    meters: tuple[MeterSection, ...]
    profiles: Mapping[str, Any] = field(default_factory=dict)
    accounts: tuple[AccountSection, ...] = ()
    security: SecuritySection = field(default_factory=SecuritySection)

    def bus(self, name: str) -> BusSection:
        for b in self.buses:
            if b.name == name:
                return b
        raise KeyError(name)

    def meters_on(self, bus: str) -> tuple[MeterSection, ...]:
        return tuple(m for m in self.meters if m.bus == bus)


# ---------------------------------------------------------------------------
# A tiny schema language: each section is a dict of key -> Field


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    required: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a problem or None
    convert: Callable[[Any], Any] | None = None


def _ident(v: Any) -> str | None:
    return None if _ID_RE.match(v) else f"{v!r} is not a valid identifier (letters, digits, _ . -)"


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def _port(v: Any) -> str | None:
    return None if 0 < v < 65536 else f"must be a TCP port 1..65535, got {v}"


def _one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v in choices:
            return None
        return f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}"

    return check


def _timezone(v: Any) -> str | None:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {v!r}"
    return None


def _dlt645_address(v: Any) -> str | None:
    if re.fullmatch(r"[0-9]{12}", v):
        return None
    return f"must be 12 decimal digits (meter address), got {v!r}"


def _hex_bytes(v: Any, n: int) -> str | None:
    if re.fullmatch(f"[0-9A-Fa-f]{{{2 * n}}}", v):
        return None
    return f"must be {2 * n} hex digits ({n} bytes), got {v!r}"


def _quantities(v: Any) -> str | None:
    from firmware_bridge.reading import Quantity

    known = {q.value for q in Quantity}
    bad = [q for q in v if q not in known]
    if bad:
        return f"unknown quantities {bad} (known: {', '.join(sorted(known))})"
    return None


_NUM = (int, float)
_path = Path

GATEWAY_SCHEMA = {
    "id": Field((str,), required=True, check=_ident),
    "site": Field((str,), required=True),
    "timezone": Field((str,), check=_timezone),
    "poll_interval_s": Field(_NUM, check=_positive, convert=float),
}
STORAGE_SCHEMA = {
    "path": Field((str,), required=True, convert=_path),
    "max_bytes": Field((int,), check=_positive),
    "reserve_bytes": Field((int,), check=_non_negative),
    "key_file": Field((str,), convert=_path),
}
BROKER_SCHEMA = {
    "host": Field((str,)),
    "port": Field((int,), check=_port),
    "tls": Field((bool,)),
    "ca_file": Field((str,), convert=_path),
    "cert_file": Field((str,), convert=_path),
    "key_file": Field((str,), convert=_path),
    "username": Field((str,)),
    "password": Field((str,)),
    "keepalive_s": Field((int,), check=_positive),
    "topic_prefix": Field((str,)),
}
UPLINK_SCHEMA = {
    "batch_max_records": Field((int,), check=_positive),
    "batch_max_bytes": Field((int,), check=_positive),
    "ack_timeout_s": Field(_NUM, check=_positive, convert=float),
    "window": Field((int,), check=_positive),
    "reconnect_min_s": Field(_NUM, check=_positive, convert=float),
    "reconnect_max_s": Field(_NUM, check=_positive, convert=float),
    "headend_public_key": Field((str,)),
    "max_bytes_per_s": Field((int,), check=_positive),
}
BUS_SCHEMA = {
    "name": Field((str,), required=True, check=_ident),
    "type": Field((str,), required=True, check=_one_of("serial", "tcp")),
    "device": Field((str,)),
    "baud": Field((int,), check=_one_of(1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)),
    "parity": Field((str,), check=_one_of("N", "E", "O")),
    "stop_bits": Field((int,), check=_one_of(1, 2)),
    "host": Field((str,)),
    "port": Field((int,), check=_port),
    "timeout_s": Field(_NUM, check=_positive, convert=float),
    "retries": Field((int,), check=_non_negative),
    "framing": Field((str,), check=_one_of("socket", "rtu")),
    "response_time_s": Field(_NUM, check=_positive, convert=float),
}
RELAY_SCHEMA = {
    "kind": Field((str,), required=True, check=_one_of("dlt645", "coil", "register")),
    "address": Field((int,), check=_non_negative),
    "unit_id": Field((int,), check=_one_of(*range(1, 248))),
    "open_value": Field((int,)),
    "closed_value": Field((int,)),
    "min_interval_s": Field(_NUM, check=_non_negative, convert=float),
}
METER_SCHEMA = {
    "id": Field((str,), required=True, check=_ident),
    "bus": Field((str,), required=True),
    "protocol": Field((str,), required=True, check=_one_of("modbus", "dlt645")),
    "profile": Field((str,)),
    "unit_id": Field((int,), check=_one_of(*range(1, 248))),
    "address": Field((str,), check=_dlt645_address),
    "account": Field((str,), check=_ident),
    "relay": Field((dict,)),
    "password": Field((str,), check=lambda v: _hex_bytes(v, 4)),
    "operator": Field((str,), check=lambda v: _hex_bytes(v, 4)),
    "quantities": Field((list,), check=lambda v: _quantities(v), convert=tuple),
    "response_time_s": Field(_NUM, check=_positive, convert=float),
    "timeout_s": Field(_NUM, check=_positive, convert=float),
}
SECURITY_SCHEMA = {
    "trust_file": Field((str,), convert=_path),
    "keystore": Field((str,), convert=_path),
    "provisioning_dir": Field((str,), convert=_path),
}
ACCOUNT_SCHEMA = {
    "id": Field((str,), required=True, check=_ident),
    "settings": Field((str,), required=True, convert=_path),
    "tariffs": Field((list,), required=True, check=lambda v: None if v and all(isinstance(x, str) for x in v) else "must be a non-empty array of file names"),
}
TOP_LEVEL = {
    "gateway": dict,
    "storage": dict,
    "broker": dict,
    "uplink": dict,
    "bus": list,
    "meter": list,
    "profiles": dict,
    "account": list,
    "security": dict,
}


def _type_name(types: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a table",
        list: "an array",
    }
    if types == _NUM:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


class _Collector:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.problems: list[str] = []

    def add(self, key: str, problem: str) -> None:
        self.problems.append(f"{self.source}: {key}: {problem}")

    def section(self, key: str, raw: Any, schema: Mapping[str, Field]) -> dict[str, Any]:
        """Validate one table against its schema; return the converted values."""
        out: dict[str, Any] = {}
        if not isinstance(raw, dict):
            self.add(key, f"must be a table, got {type(raw).__name__}")
            return out
        for k in raw:
            if k not in schema:
                self.add(f"{key}.{k}", f"unknown key (allowed: {', '.join(sorted(schema))})")
        for name, spec in schema.items():
            path = f"{key}.{name}"
            if name not in raw:
                if spec.required:
                    self.add(path, "missing required key")
                continue
            value = raw[name]
            # bool is an int in Python: do not accept true where a number is meant
            ok = isinstance(value, spec.types) and not (
                isinstance(value, bool) and bool not in spec.types
            )
            if not ok:
                self.add(
                    path,
                    f"must be {_type_name(spec.types)}, got {type(value).__name__} {value!r}",
                )
                continue
            if spec.check is not None:
                problem = spec.check(value)
                if problem:
                    self.add(path, problem)
                    continue
            out[name] = spec.convert(value) if spec.convert else value
        return out


def load_config(path: str | Path) -> Config:
    """Load and validate ``path``; raise :class:`ConfigError` listing every problem."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc.reason}"]) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from exc
    return parse_config(raw, source)


def parse_config(raw: Mapping[str, Any], source: Path) -> Config:
    c = _Collector(source)
    for k in raw:
        if k not in TOP_LEVEL:
            c.add(k, f"unknown top-level key (allowed: {', '.join(sorted(TOP_LEVEL))})")
    for k, t in TOP_LEVEL.items():
        if k in raw and not isinstance(raw[k], t):
            c.add(k, f"must be {'a table' if t is dict else 'an array of tables'}")

    def table(name: str) -> Any:
        v = raw.get(name, {})
        return v if isinstance(v, dict) else {}

    if "gateway" not in raw:
        c.add("gateway", "missing required table")
    if "storage" not in raw:
        c.add("storage", "missing required table")
    gw = c.section("gateway", table("gateway"), GATEWAY_SCHEMA)
    st = c.section("storage", table("storage"), STORAGE_SCHEMA)
    br = c.section("broker", table("broker"), BROKER_SCHEMA)
    ul = c.section("uplink", table("uplink"), UPLINK_SCHEMA)
    sec = c.section("security", table("security"), SECURITY_SCHEMA)

    if br.get("tls") and not br.get("ca_file"):
        c.add("broker.ca_file", "required when broker.tls = true (server verification is never off)")
    if ("cert_file" in br) != ("key_file" in br):
        c.add("broker.cert_file", "cert_file and key_file must be given together")

    buses: list[BusSection] = []
    raw_buses = raw.get("bus", [])
    seen_bus: set[str] = set()
    for i, rb in enumerate(raw_buses if isinstance(raw_buses, list) else []):
        key = f"bus[{i}]"
        b = c.section(key, rb, BUS_SCHEMA)
        if "name" not in b or "type" not in b:
            continue
        if b["name"] in seen_bus:
            c.add(f"{key}.name", f"duplicate bus name {b['name']!r}")
        seen_bus.add(b["name"])
        if b["type"] == "serial" and "device" not in b:
            c.add(f"{key}.device", "required for a serial bus (e.g. '/dev/ttyUSB0')")
        if b["type"] == "tcp" and "host" not in b:
            c.add(f"{key}.host", "required for a tcp bus")
        buses.append(BusSection(**b))

    meters: list[MeterSection] = []
    raw_meters = raw.get("meter", [])
    seen_meter: set[str] = set()
    bus_by_name = {b.name: b for b in buses}
    for i, rm in enumerate(raw_meters if isinstance(raw_meters, list) else []):
        key = f"meter[{i}]"
        m = c.section(key, rm, METER_SCHEMA)
        if not {"id", "bus", "protocol"} <= m.keys():
            continue
        if m["id"] in seen_meter:
            c.add(f"{key}.id", f"duplicate meter id {m['id']!r}")
        seen_meter.add(m["id"])
        if m["bus"] not in bus_by_name and m["bus"] not in seen_bus:
            known = ", ".join(sorted(seen_bus)) or "none defined"
            c.add(f"{key}.bus", f"unknown bus {m['bus']!r} (known: {known})")
        if m["protocol"] == "modbus":
            if "unit_id" not in m:
                c.add(f"{key}.unit_id", "required for a modbus meter (1..247)")
            if "profile" not in m:
                c.add(f"{key}.profile", "required for a modbus meter (e.g. 'sdm120')")
        if m["protocol"] == "dlt645" and "address" not in m:
            c.add(f"{key}.address", "required for a dlt645 meter (12 digits)")
        relay = None
        if "relay" in m:
            r = c.section(f"{key}.relay", m["relay"], RELAY_SCHEMA)
            if "kind" in r:
                relay = RelaySection(**r)
        m["relay"] = relay
        meters.append(MeterSection(**m))

    # Serial defaults follow the protocol: DL/T 645 meters ship at 2400 8E1, Modbus at 9600 8N1.
    for i, serial in enumerate(buses):
        raw_bus = raw_buses[i] if isinstance(raw_buses, list) and i < len(raw_buses) else {}
        if serial.type != "serial" or not isinstance(raw_bus, dict):
            continue
        dlt = any(m.protocol == "dlt645" for m in meters if m.bus == serial.name)
        defaults: dict[str, Any] = {"baud": 2400, "parity": "E"} if dlt else {"baud": 9600, "parity": "N"}
        unset = {k: v for k, v in defaults.items() if k not in raw_bus}
        if unset:
            buses[i] = dataclasses.replace(serial, **unset)

    base = source.parent
    accounts: list[AccountSection] = []
    raw_accounts = raw.get("account", [])
    for i, ra in enumerate(raw_accounts if isinstance(raw_accounts, list) else []):
        key = f"account[{i}]"
        a = c.section(key, ra, ACCOUNT_SCHEMA)
        if not {"id", "settings", "tariffs"} <= a.keys():
            continue
        if any(x.id == a["id"] for x in accounts):
            c.add(f"{key}.id", f"duplicate account id {a['id']!r}")
        accounts.append(
            AccountSection(a["id"], base / a["settings"], tuple(base / t for t in a["tariffs"]))
        )
    _check_billing(c, accounts, raw_meters, gw.get("timezone"))

    profiles = raw.get("profiles", {})
    if not c.problems:  # southbound checks need a structurally valid file
        from firmware_bridge.bus import config_problems

        for line in config_problems(buses, meters, profiles):
            c.problems.append(f"{source}: {line}")
    if c.problems:
        raise ConfigError(c.problems)
    for section, keys in (
        (st, ("path", "key_file")),
        (br, ("ca_file", "cert_file", "key_file")),
        (sec, ("trust_file", "keystore", "provisioning_dir")),
    ):
        for k in keys:
            if k in section:
                section[k] = base / section[k]  # absolute paths stay as they are
    return Config(
        source=source,
        gateway=GatewaySection(**gw),
        storage=StorageSection(**st),
        broker=BrokerSection(**br),
        uplink=UplinkSection(**ul),
        buses=tuple(buses),
        meters=tuple(meters),
        profiles=profiles if isinstance(profiles, dict) else {},
        accounts=tuple(accounts),
        security=SecuritySection(**sec),
    )


def _check_billing(
    c: _Collector, accounts: list[AccountSection], raw_meters: Any, timezone: str | None
) -> None:
    """Load every account and tariff file now, so `config check` reports their problems too."""
    from gateway.billing.account import AccountError, load_account
    from gateway.billing.tariff import TariffError, load_book

    problems = c.problems
    for a in accounts:
        try:
            settings = load_account(a.settings, timezone)
        except AccountError as exc:
            problems += exc.problems
        else:
            if settings.account != a.id:
                problems.append(
                    f"{a.settings}: account: names {settings.account!r} but the gateway"
                    f" configuration lists it as {a.id!r}"
                )
        try:
            load_book(a.tariffs, timezone)
        except TariffError as exc:
            problems += exc.problems
    if accounts:
        known = {a.id for a in accounts}
        for i, rm in enumerate(raw_meters if isinstance(raw_meters, list) else []):
            acct = rm.get("account") if isinstance(rm, dict) else None
            if isinstance(acct, str) and acct not in known:
                c.add(
                    f"meter[{i}].account",
                    f"unknown account {acct!r} (known: {', '.join(sorted(known))})",
                )
