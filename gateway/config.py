"""Configuration: one TOML file, validated at load.

Relative file paths in the file are relative to the file's own directory.

Every problem is reported with the file, the key path and what is wrong, e.g.::

    site.toml: meter[2].bus: unknown bus 'rs485-9' (known: rs485-1, tcp-1)

All problems in a file are collected and reported together, so a technician
fixes a broken file in one pass. The result is a tree of frozen dataclasses;
buses, meters and relays are the firmware bridge's own settings types
(:mod:`firmware_bridge.settings`), so the bus code reads no file and knows
nothing of this one (:attr:`Config.site` is what it needs of the whole site).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firmware_bridge.addressing import address_clashes, relay_clashes
from firmware_bridge.bus import config_problems
from firmware_bridge.dlt645.codec import BROADCAST
from firmware_bridge.errors import ProblemsError
from firmware_bridge.identifiers import is_name, name_problem
from firmware_bridge.reading import Quantity
from firmware_bridge.settings import BusSettings, MeterSettings, RelaySettings, SiteSettings
from gateway.billing.account import AccountError, load_account
from gateway.billing.retention import DEFAULT_RETENTION_DAYS, MIN_RETENTION_DAYS
from gateway.billing.tariff import TariffError
from gateway.billing.tariff_file import load_book
from gateway.problems import KeyPath, Problems, not_a_regular_file, read_toml
from gateway.toml_lines import Lines
from store_forward.settings import BrokerSettings, UplinkSettings
from store_forward.uplink_keys import UplinkKeyError, parse_public_key


class ConfigError(ProblemsError):
    """A configuration file is invalid. ``problems`` holds one line per problem."""


# ---------------------------------------------------------------------------
# Result types


# Where a provisioned gateway's configuration lives (written by the USB
# provisioning path; the unit runs the daemon with it). Commands that read a
# gateway's state take it when --config is not given; EDGEGW_CONFIG overrides it.
DEFAULT_CONFIG = Path("/var/lib/edgegw/provisioning/current/files/gateway.toml")


def default_config_path() -> Path:
    """The configuration a command uses without --config: $EDGEGW_CONFIG, else
    :data:`DEFAULT_CONFIG`."""
    env = os.environ.get("EDGEGW_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


@dataclass(frozen=True)
class GatewaySection:
    id: str
    site: str
    timezone: str = "UTC"
    poll_interval_s: float = 60.0
    # rewritten every few seconds for `edgegw status` (gateway.heartbeat.path_for)
    heartbeat_file: Path | None = None
    # a gateway.health record through the outbox this often (0: none)
    health_interval_s: float = 300.0


@dataclass(frozen=True)
class StorageSection:
    path: Path
    max_bytes: int = 256 * 1024 * 1024
    reserve_bytes: int = 16 * 1024 * 1024
    key_file: Path | None = None


# The [broker] and [uplink] tables map onto the uplink's own settings types.
BrokerSection = BrokerSettings
UplinkSection = UplinkSettings


@dataclass(frozen=True)
class MeterSection(MeterSettings):
    """A ``[[meter]]`` table: what the bus code needs, and the prepaid account it bills."""

    account: str | None = None


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
class MetricsSection:
    """``[metrics]``: the file node_exporter's textfile collector reads (gateway/metrics.py)."""

    textfile: Path | None = None  # None: no metrics file is written
    interval_s: float = 30.0


@dataclass(frozen=True)
class BillingSection:
    """``[billing]``: how the local prepaid ledger is kept (docs/billing.md, "Retention")."""

    # debits and fixed charges central acknowledged leave the local ledger after
    # this many days (0: every entry is kept)
    ledger_retention_days: int = DEFAULT_RETENTION_DAYS


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
    buses: tuple[BusSettings, ...]
    meters: tuple[MeterSection, ...]
    profiles: Mapping[str, Any] = field(default_factory=dict)
    accounts: tuple[AccountSection, ...] = ()
    security: SecuritySection = field(default_factory=SecuritySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    billing: BillingSection = field(default_factory=BillingSection)

    @property
    def site(self) -> SiteSettings:
        """What the bus code needs of the site (firmware_bridge.bus.open_site_bus)."""
        return SiteSettings(self.gateway.timezone, self.buses, self.meters, self.profiles)

    def bus(self, name: str) -> BusSettings:
        for b in self.buses:
            if b.name == name:
                return b
        raise KeyError(name)

    def meters_on(self, bus: str) -> tuple[MeterSection, ...]:
        return tuple(m for m in self.meters if m.bus == bus)


# ---------------------------------------------------------------------------
# Limits on what a file may hold. The loader also checks configurations that
# arrive from central (remote configuration), so nothing in a file may crash
# it, hang it or put the gateway off the air: every number is finite and in a
# range that works, every string is bounded.

MAX_STRING = 4096  # PATH_MAX; every string value
# MQTT keepalive (seconds). MQTT allows 0..65535 (0 = off), but the link must be
# probed often enough that a half-open connection is noticed and the mobile
# network's NAT keeps the mapping: operators drop idle TCP mappings after as
# little as ~4.5 minutes, so at most 4 minutes; at least 5 s, or a slow
# PINGRESP on a congested GPRS/satellite link would drop a working connection.
KEEPALIVE_RANGE_S = (5, 240)
POLL_INTERVAL_RANGE_S = (0.1, 86_400.0)
# A meter's reply wait and a transaction's timeout: DL/T 645 allows 0.5 s before
# the first byte and slow Modbus meters document about 1 s; a value beyond these
# bounds is a typo that would stall the bus (every dead meter costs a timeout).
RESPONSE_TIME_RANGE_S = (0.001, 10.0)
TIMEOUT_RANGE_S = (0.01, 60.0)


# ---------------------------------------------------------------------------
# A tiny schema language: each section is a dict of key -> Field


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Field:
    """One key of a table: accepted types, whether it is required, a check that
    returns a problem (or None) and a conversion of the accepted value.

    Numbers are checked finite before ``check`` runs; strings are checked for
    control characters and length."""

    types: tuple[type, ...]
    required: bool = False
    check: Check | None = None
    convert: Callable[[Any], Any] | None = None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _between(lo: float, hi: float, unit: str = "", why: str = "") -> Check:
    """``lo <= v <= hi``; the message gives the range, its unit and why."""

    def check(v: Any) -> str | None:
        if lo <= v <= hi:
            return None
        rng = f"{_num(lo)}..{_num(hi)}{' ' + unit if unit else ''}"
        return f"must be {rng}{f' ({why})' if why else ''}, got {v!r}"

    return check


def _text(max_len: int) -> Check:
    def check(v: Any) -> str | None:
        if not v.strip():
            return "must not be empty"
        return None if len(v) <= max_len else f"must be at most {max_len} characters, got {len(v)}"

    return check


def _port(v: Any) -> str | None:
    return None if 0 < v < 65536 else f"must be a TCP port 1..65535, got {v}"


def _unit_id(v: Any) -> str | None:
    return None if 1 <= v <= 247 else f"must be a Modbus unit id 1..247, got {v}"


def _one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        if v in choices:
            return None
        return f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}"

    return check


def _timezone(v: Any) -> str | None:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return f"unknown time zone {v!r}"
    return None


def _dlt645_address(v: Any) -> str | None:
    if v == BROADCAST:
        return (
            f"{v} is the broadcast address (time sync and freeze to every meter on the line):"
            " no meter answers it; give the meter's own address"
        )
    if re.fullmatch(r"[0-9]{12}", v):
        return None
    return f"must be 12 decimal digits (meter address), got {v!r}"


def _hex_bytes(v: Any, n: int) -> str | None:
    if re.fullmatch(f"[0-9A-Fa-f]{{{2 * n}}}", v):
        return None
    return f"must be {2 * n} hex digits ({n} bytes), got {v!r}"


def _quantities(v: Any) -> str | None:
    if not all(isinstance(q, str) for q in v):
        return "must be an array of quantity names (strings)"
    known = {q.value for q in Quantity}
    bad = [q for q in v if q not in known]
    if bad:
        return f"unknown quantities {bad} (known: {', '.join(sorted(known))})"
    return None


def _host(v: Any) -> str | None:
    if not v or len(v) > 253 or any(c.isspace() for c in v):
        return f"must be a host name or address (no spaces, at most 253 characters), got {v!r}"
    return None


def _mqtt_string(v: Any) -> str | None:
    return None if len(v.encode()) <= 65535 else "longer than MQTT allows (65535 bytes)"


def _topic_prefix(v: Any) -> str | None:
    """An MQTT topic prefix the gateway publishes under: no wildcards, not a
    broker-reserved ``$`` topic, no empty level, short enough for every topic."""
    if not v:
        return "must not be empty"
    if len(v.encode()) > 128:
        return f"must be at most 128 bytes, got {len(v.encode())}"
    if "#" in v or "+" in v:
        return f"must not contain MQTT wildcards '#' or '+', got {v!r}"
    if v.startswith("$"):
        return f"must not start with '$' (topics reserved for the broker), got {v!r}"
    if any(level == "" for level in v.split("/")):
        return f"must not start or end with '/' or contain '//', got {v!r}"
    return None


def _public_key(v: Any) -> str | None:
    try:
        parse_public_key(v)
    except UplinkKeyError as exc:
        return str(exc)
    return None


def _prom_file(v: Any) -> str | None:
    if (why := _text(MAX_STRING)(v)) is not None:
        return why
    if not str(v).endswith(".prom"):
        return f"must end in .prom (node_exporter's textfile collector reads only those), got {_shown(v)}"
    return None


def _file_list(v: Any) -> str | None:
    if v and all(isinstance(x, str) and x and len(x) <= MAX_STRING and not _CONTROL_RE.search(x) for x in v):
        return None
    return "must be a non-empty array of file names"


_NUM = (int, float)


def _retention_days(v: Any) -> str | None:
    if v == 0 or MIN_RETENTION_DAYS <= v <= 36_500:
        return None
    if 0 < v < MIN_RETENTION_DAYS:
        return (
            f"must be 0 (keep every entry) or at least {MIN_RETENTION_DAYS} days, got {v}:"
            f" the minimum is {MIN_RETENTION_DAYS} (entries are pruned only once central has them,"
            " and a shorter period leaves nothing to look at locally after a long weekend)"
        )
    return f"must be 0 (keep every entry) or {MIN_RETENTION_DAYS}..36500 days, got {v}"


def _health_interval(v: Any) -> str | None:
    if isinstance(v, bool) or not math.isfinite(v) or not (v == 0 or 10 <= v <= 86_400):
        return "must be 0 (no health records) or 10..86400 s"
    return None

_path = Path
_seconds = float

GATEWAY_SCHEMA = {
    "id": Field((str,), required=True, check=name_problem),
    "site": Field((str,), required=True, check=_text(200)),
    "timezone": Field((str,), check=_timezone),
    "poll_interval_s": Field(_NUM, check=_between(*POLL_INTERVAL_RANGE_S, "s"), convert=_seconds),
    "heartbeat_file": Field((str,), convert=_path),
    "health_interval_s": Field(_NUM, check=_health_interval, convert=_seconds),
}
STORAGE_SCHEMA = {
    "path": Field((str,), required=True, convert=_path),
    "max_bytes": Field((int,), check=_between(1 << 20, 1 << 40, "bytes", "1 MiB..1 TiB")),
    "reserve_bytes": Field((int,), check=_between(0, 1 << 40, "bytes")),
    "key_file": Field((str,), convert=_path),
}
BROKER_SCHEMA = {
    "host": Field((str,), check=_host),
    "port": Field((int,), check=_port),
    "tls": Field((bool,)),
    "ca_file": Field((str,), convert=_path),
    "cert_file": Field((str,), convert=_path),
    "key_file": Field((str,), convert=_path),
    "username": Field((str,), check=_mqtt_string),
    "password": Field((str,), check=_mqtt_string),
    "keepalive_s": Field(
        (int,),
        check=_between(*KEEPALIVE_RANGE_S, "s", "MQTT keepalive: a dead link must be noticed"
                       " before a mobile network drops the idle connection"),
    ),
    "topic_prefix": Field((str,), check=_topic_prefix),
}
# The shipped broker configuration refuses packets over 1 MiB (max_packet_size);
# a larger batch would be dropped with the connection, and resent forever.
BATCH_MAX_BYTES_LIMIT = 960 * 1024
UPLINK_SCHEMA = {
    "batch_max_records": Field((int,), check=_between(1, 100_000)),
    "batch_max_bytes": Field(
        (int,),
        check=_between(1024, BATCH_MAX_BYTES_LIMIT, "bytes", "a batch, its topic and MQTT header must fit"
                       " the broker's max_packet_size of 1 MiB (examples/mosquitto)"),
    ),
    "ack_timeout_s": Field(_NUM, check=_between(1, 600, "s"), convert=_seconds),
    "window": Field((int,), check=_between(1, 64)),
    "reconnect_min_s": Field(_NUM, check=_between(0.05, 600, "s"), convert=_seconds),
    "reconnect_max_s": Field(_NUM, check=_between(0.05, 3600, "s", "a gateway off the air retries"
                                                   " at least hourly"), convert=_seconds),
    "headend_public_key": Field((str,), check=_public_key),
    "max_bytes_per_s": Field((int,), check=_between(100, 1_000_000_000, "bytes/s")),
    "allow_unauthenticated_acks": Field((bool,)),
}
BUS_SCHEMA = {
    "name": Field((str,), required=True, check=name_problem),
    "type": Field((str,), required=True, check=_one_of("serial", "tcp")),
    "device": Field((str,), check=_text(MAX_STRING)),
    "baud": Field((int,), check=_one_of(1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)),
    "parity": Field((str,), check=_one_of("N", "E", "O")),
    "stop_bits": Field((int,), check=_one_of(1, 2)),
    "host": Field((str,), check=_host),
    "port": Field((int,), check=_port),
    "timeout_s": Field(_NUM, check=_between(*TIMEOUT_RANGE_S, "s"), convert=_seconds),
    "retries": Field((int,), check=_between(0, 10)),
    "framing": Field((str,), check=_one_of("socket", "rtu")),
    "response_time_s": Field(_NUM, check=_between(*RESPONSE_TIME_RANGE_S, "s"), convert=_seconds),
}
RELAY_SCHEMA = {
    "kind": Field((str,), required=True, check=_one_of("dlt645", "coil", "register")),
    "address": Field((int,), check=_between(0, 0xFFFF)),
    "unit_id": Field((int,), check=_unit_id),
    "open_value": Field((int,), check=_between(0, 0xFFFF)),
    "closed_value": Field((int,), check=_between(0, 0xFFFF)),
    "min_interval_s": Field(_NUM, check=_between(0, 86_400, "s"), convert=_seconds),
}
METER_SCHEMA = {
    "id": Field((str,), required=True, check=name_problem),
    "bus": Field((str,), required=True, check=name_problem),
    "protocol": Field((str,), required=True, check=_one_of("modbus", "dlt645")),
    "profile": Field((str,), check=_text(64)),
    "unit_id": Field((int,), check=_unit_id),
    "address": Field((str,), check=_dlt645_address),
    "account": Field((str,), check=name_problem),
    "relay": Field((dict,)),
    "password": Field((str,), check=lambda v: _hex_bytes(v, 4)),
    "operator": Field((str,), check=lambda v: _hex_bytes(v, 4)),
    "quantities": Field((list,), check=_quantities, convert=tuple),
    "response_time_s": Field(_NUM, check=_between(*RESPONSE_TIME_RANGE_S, "s"), convert=_seconds),
    "timeout_s": Field(_NUM, check=_between(*TIMEOUT_RANGE_S, "s"), convert=_seconds),
}
SECURITY_SCHEMA = {
    "trust_file": Field((str,), convert=_path),
    "keystore": Field((str,), convert=_path),
    "provisioning_dir": Field((str,), convert=_path),
}
METRICS_SCHEMA = {
    "textfile": Field((str,), check=_prom_file, convert=_path),
    "interval_s": Field(_NUM, check=_between(1, 3600, "s"), convert=_seconds),
}
BILLING_SCHEMA = {
    "ledger_retention_days": Field((int,), check=_retention_days),
}
ACCOUNT_SCHEMA = {
    "id": Field((str,), required=True, check=name_problem),
    "settings": Field((str,), required=True, convert=_path),
    "tariffs": Field((list,), required=True, check=_file_list),
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
    "metrics": dict,
    "billing": dict,
}
# Keys naming a file, resolved against the configuration's directory.
FILE_KEYS: Mapping[str, tuple[str, ...]] = {
    "gateway": ("heartbeat_file",),
    "storage": ("path", "key_file"),
    "broker": ("ca_file", "cert_file", "key_file"),
    "security": ("trust_file", "keystore", "provisioning_dir"),
    "metrics": ("textfile",),
}
# Arrays of tables and the key that names an entry in messages.
ENTRY_NAME_KEY: Mapping[str, str] = {"meter": "id", "bus": "name", "account": "id"}


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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------
# Problems and where they are


class Where:
    """Where a key is in the file: its line, and its path with ``[[meter]]``,
    ``[[bus]]`` and ``[[account]]`` entries named by their id (``meter[m-0002]``),
    or by position when the id is missing or invalid (``meter[#3]`` is the third
    ``[[meter]]``); the line is the key's, else the line of the entry's header.
    Problems in the file are collected by :meth:`collector`:
    ``FILE:LINE: meter[m-0002].unit_id: problem``.
    """

    def __init__(self, source: Path, raw: Mapping[str, Any], lines: Lines) -> None:
        self.source = source
        self.raw = raw
        self.lines = lines

    def line(self, path: KeyPath) -> int | None:
        return self.lines.line(path)

    def label(self, path: KeyPath) -> str:
        out = ""
        for k, part in enumerate(path):
            if isinstance(part, int):
                out += f"[{self._entry(path[:k], part)}]"
            else:
                out += ("." if out else "") + part
        return out

    def _entry(self, array: KeyPath, index: int) -> str:
        if len(array) == 1 and isinstance(array[0], str) and array[0] in ENTRY_NAME_KEY:
            entries = self.raw.get(array[0])
            if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
                name = entries[index].get(ENTRY_NAME_KEY[array[0]])
                if is_name(name):
                    return name
        return f"#{index + 1}"

    def collector(self) -> Problems:
        return Problems(self.source, line=self.line, label=self.label)


def _section(c: Problems, path: KeyPath, raw: Any, schema: Mapping[str, Field]) -> dict[str, Any]:
    """Validate one table against its schema; return the values that are valid, converted."""
    out: dict[str, Any] = {}
    if not isinstance(raw, dict):
        c.add(path, f"must be a table, got {type(raw).__name__}")
        return out
    c.unknown(path, raw, schema)
    for name, spec in schema.items():
        key = (*path, name)
        if name not in raw:
            if spec.required:
                c.add(key, "missing required key")
            continue
        value = raw[name]
        problem = _value_problem(value, spec)
        if problem:
            c.add(key, problem)
            continue
        out[name] = spec.convert(value) if spec.convert else value
    return out


def _value_problem(value: Any, spec: Field) -> str | None:
    # bool is an int in Python: do not accept true where a number is meant
    if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
        return f"must be {_type_name(spec.types)}, got {type(value).__name__} {_shown(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            return f"must be at most {MAX_STRING} characters, got {len(value)}"
        if _CONTROL_RE.search(value):
            return f"must not contain control characters, got {_shown(value)}"
    return spec.check(value) if spec.check is not None else None


# ---------------------------------------------------------------------------
# Loading


@dataclass
class ConfigReport:
    """Everything the loader found in one file, valid or not.

    ``values`` holds the valid settings of each single table (file paths
    resolved against the file's directory) and ``buses``/``meters`` the valid
    entries with their position in the file, so further checks
    (:mod:`gateway.preflight`) can run on a file that also has other problems
    and report everything in one pass.
    """

    source: Path
    config: Config | None
    problems: list[str]
    where: Where
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    buses: list[tuple[int, BusSettings]] = field(default_factory=list)
    meters: list[tuple[int, MeterSection]] = field(default_factory=list)
    accounts: list[tuple[int, AccountSection]] = field(default_factory=list)

    def problem(self, path: KeyPath, text: str) -> str:
        return self.where.collector().render(path, text)


def load_config(path: str | Path) -> Config:
    """Load and validate ``path``; raise :class:`ConfigError` listing every problem."""
    report = check_config(path)
    if report.config is None:
        raise ConfigError(report.problems)
    return report.config


def check_config(path: str | Path) -> ConfigReport:
    """Load and validate ``path``; never raises: every problem is in the report."""
    source = Path(path)
    found = Problems(source)
    doc = read_toml(source, found)
    if doc is None:
        return ConfigReport(source, None, found.problems, Where(source, {}, Lines.unknown()))
    where = Where(source, doc.raw, doc.lines())
    try:
        return _analyse(doc.raw, where)
    except Exception as exc:  # a loader bug must still be a reported problem, never a crash
        return ConfigReport(
            source, None, [f"{source}: internal error while checking: {type(exc).__name__}: {exc}"], where
        )


def parse_config(raw: Mapping[str, Any], source: Path) -> Config:
    """Validate an already parsed document (no line numbers); raise :class:`ConfigError`."""
    report = _analyse(raw, Where(source, raw, Lines.unknown()))
    if report.config is None:
        raise ConfigError(report.problems)
    return report.config


def _entries(raw: Mapping[str, Any], key: str) -> list[tuple[int, Any]]:
    value = raw.get(key, [])
    return list(enumerate(value)) if isinstance(value, list) else []


def _analyse(raw: Mapping[str, Any], where: Where) -> ConfigReport:
    source = where.source
    base = source.parent
    c = where.collector()
    for k in raw:
        if k not in TOP_LEVEL:
            c.add((k,), f"unknown top-level key (allowed: {', '.join(sorted(TOP_LEVEL))})")
    for k, t in TOP_LEVEL.items():
        if k in raw and not isinstance(raw[k], t):
            c.add((k,), f"must be {'a table' if t is dict else 'an array of tables'}")

    def table(name: str) -> Any:
        v = raw.get(name, {})
        return v if isinstance(v, dict) else {}

    for required in ("gateway", "storage"):
        if required not in raw:
            c.add((), f"{required}: missing required table [{required}]")
    values: dict[str, dict[str, Any]] = {
        name: _section(c, (name,), table(name), schema)
        for name, schema in (
            ("gateway", GATEWAY_SCHEMA),
            ("storage", STORAGE_SCHEMA),
            ("broker", BROKER_SCHEMA),
            ("uplink", UPLINK_SCHEMA),
            ("security", SECURITY_SCHEMA),
            ("metrics", METRICS_SCHEMA),
            ("billing", BILLING_SCHEMA),
        )
    }
    br, ul = values["broker"], values["uplink"]
    raw_broker = table("broker")
    if raw_broker.get("tls") is True and "ca_file" not in raw_broker:
        c.add(("broker", "ca_file"), "required when broker.tls = true (server verification is never off)")
    if ("cert_file" in raw_broker) != ("key_file" in raw_broker):
        missing = "key_file" if "cert_file" in raw_broker else "cert_file"
        c.add(("broker", missing), "cert_file and key_file must be given together")
    if ul.get("reconnect_min_s", UplinkSection.reconnect_min_s) > ul.get(
        "reconnect_max_s", UplinkSection.reconnect_max_s
    ):
        c.add(("uplink", "reconnect_min_s"), "must not be larger than uplink.reconnect_max_s")
    for name, keys in FILE_KEYS.items():
        for k in keys:
            if k in values[name]:
                values[name][k] = base / values[name][k]  # absolute paths stay as they are

    buses = _buses(c, raw)
    meters, flawed = _meters(c, raw)
    _serial_defaults(raw, buses, meters)
    _addresses(c, buses, meters)

    accounts = _accounts(c, raw, base)
    _check_billing(c, accounts, raw, values["gateway"].get("timezone"))
    profiles = raw.get("profiles", {})
    _southbound(c, buses, [(i, m) for i, m in meters if i not in flawed], profiles if isinstance(profiles, dict) else None)

    report = ConfigReport(source, None, c.problems, where, values, buses, meters, accounts)
    if c.problems:
        return report
    report.config = Config(
        source=source,
        gateway=GatewaySection(**values["gateway"]),
        storage=StorageSection(**values["storage"]),
        broker=BrokerSection(**br),
        uplink=UplinkSection(**ul),
        buses=tuple(b for _, b in buses),
        meters=tuple(m for _, m in meters),
        profiles=profiles if isinstance(profiles, dict) else {},
        accounts=tuple(a for _, a in accounts),
        security=SecuritySection(**values["security"]),
        metrics=MetricsSection(**values["metrics"]),
        billing=BillingSection(**values["billing"]),
    )
    return report


def _buses(c: Problems, raw: Mapping[str, Any]) -> list[tuple[int, BusSettings]]:
    buses: list[tuple[int, BusSettings]] = []
    first: dict[str, int] = {}
    for i, rb in _entries(raw, "bus"):
        key = ("bus", i)
        b = _section(c, key, rb, BUS_SCHEMA)
        if not isinstance(rb, dict) or "name" not in b or "type" not in b:
            continue
        if b["name"] in first:
            c.add((*key, "name"), f"duplicate bus name {b['name']!r}{_also_at(c, ('bus', first[b['name']]))}")
            continue
        first[b["name"]] = i
        if b["type"] == "serial" and "device" not in rb:
            c.add((*key, "device"), "required for a serial bus (e.g. '/dev/ttyUSB0')")
        if b["type"] == "tcp" and "host" not in rb:
            c.add((*key, "host"), "required for a tcp bus")
        buses.append((i, BusSettings(**b)))
    return buses


def _also_at(c: Problems, path: KeyPath) -> str:
    line = c.line_of(path)
    return f" (first at line {line})" if line else ""


def _meters(
    c: Problems, raw: Mapping[str, Any]
) -> tuple[list[tuple[int, MeterSection]], set[int]]:
    """The valid meters with their position, and the positions of those with a
    problem of their own (checks that combine keys skip them: a bad unit_id must
    not also read as a missing one)."""
    meters: list[tuple[int, MeterSection]] = []
    flawed: set[int] = set()
    first: dict[str, int] = {}
    named = sorted({rb["name"] for _, rb in _entries(raw, "bus") if isinstance(rb, dict) and isinstance(rb.get("name"), str)})
    for i, rm in _entries(raw, "meter"):
        key = ("meter", i)
        before = len(c.problems)
        m = _section(c, key, rm, METER_SCHEMA)
        if not isinstance(rm, dict):
            continue
        relay = None
        if "relay" in m:
            r = _section(c, (*key, "relay"), m["relay"], RELAY_SCHEMA)
            if "kind" in r:
                relay = RelaySettings(**r)
        m["relay"] = relay
        if len(c.problems) > before:
            flawed.add(i)
        if "id" in m:
            if m["id"] in first:
                c.add((*key, "id"), f"duplicate meter id {m['id']!r}{_also_at(c, ('meter', first[m['id']]))}")
            else:
                first[m["id"]] = i
        if "bus" in m and m["bus"] not in named:
            c.add((*key, "bus"), f"unknown bus {m['bus']!r} (known: {', '.join(named) or 'none defined'})")
        protocol = m.get("protocol")
        if protocol == "modbus":
            if "unit_id" not in rm:
                c.add((*key, "unit_id"), "required for a modbus meter (1..247)")
            if "profile" not in rm:
                c.add((*key, "profile"), "required for a modbus meter (e.g. 'sdm120')")
        if protocol == "dlt645" and "address" not in rm:
            c.add((*key, "address"), "required for a dlt645 meter (12 digits)")
        if {"id", "bus", "protocol"} <= m.keys() and first.get(m["id"]) == i:
            meters.append((i, MeterSection(**m)))
    return meters, flawed


def _addresses(
    c: Problems, buses: list[tuple[int, BusSettings]], meters: list[tuple[int, MeterSection]]
) -> None:
    """Two entries that reach one device (the same DL/T 645 address or Modbus unit id
    on one line) or one relay (the same coil or holding register at one unit id),
    firmware_bridge.addressing: refused on the later entry, naming the first."""
    settings = [b for _, b in buses], [m for _, m in meters]
    for clash in [*address_clashes(*settings), *relay_clashes(*settings)]:
        first = ("meter", meters[clash.first][0])
        c.add(("meter", meters[clash.index][0], *clash.path), clash.problem(_also_at(c, first)))


def _serial_defaults(
    raw: Mapping[str, Any], buses: list[tuple[int, BusSettings]], meters: list[tuple[int, MeterSection]]
) -> None:
    """Serial defaults follow the protocol: DL/T 645 meters ship at 2400 8E1, Modbus at 9600 8N1."""
    raw_buses = raw.get("bus")
    for k, (i, serial) in enumerate(buses):
        raw_bus = raw_buses[i] if isinstance(raw_buses, list) else {}
        if serial.type != "serial" or not isinstance(raw_bus, dict):
            continue
        dlt = any(m.protocol == "dlt645" for _, m in meters if m.bus == serial.name)
        defaults: dict[str, Any] = {"baud": 2400, "parity": "E"} if dlt else {"baud": 9600, "parity": "N"}
        unset = {key: v for key, v in defaults.items() if key not in raw_bus}
        if unset:
            buses[k] = (i, dataclasses.replace(serial, **unset))


def _accounts(c: Problems, raw: Mapping[str, Any], base: Path) -> list[tuple[int, AccountSection]]:
    accounts: list[tuple[int, AccountSection]] = []
    for i, ra in _entries(raw, "account"):
        key = ("account", i)
        a = _section(c, key, ra, ACCOUNT_SCHEMA)
        if not {"id", "settings", "tariffs"} <= a.keys():
            continue
        if any(x.id == a["id"] for _, x in accounts):
            c.add((*key, "id"), f"duplicate account id {a['id']!r}")
            continue
        accounts.append((i, AccountSection(a["id"], base / a["settings"], tuple(base / t for t in a["tariffs"]))))
    return accounts


_SOUTHBOUND_ENTRY = re.compile(r"(meter|bus)\[(\d+)\]((?:\.[A-Za-z_]+)*): (.*)", re.S)
_SOUTHBOUND_BUS = re.compile(r"bus (\S+): (.*)", re.S)


def _southbound(
    c: Problems,
    buses: list[tuple[int, BusSettings]],
    meters: list[tuple[int, MeterSection]],
    profiles: Any,
) -> None:
    """Profiles, protocols per bus and relay tables (firmware_bridge.bus), on the
    valid entries, with each problem put back at its place in the file."""
    bus_index = {b.name: i for i, b in buses}
    for line in config_problems([b for _, b in buses], [m for _, m in meters], profiles):
        if mm := _SOUTHBOUND_ENTRY.fullmatch(line):  # index into the lists passed: back to the file's
            entries: Sequence[tuple[int, Any]] = meters if mm.group(1) == "meter" else buses
            keys = [k for k in mm.group(3).split(".") if k]
            c.add((mm.group(1), entries[int(mm.group(2))][0], *keys), mm.group(4))
        elif (mb := _SOUTHBOUND_BUS.fullmatch(line)) and mb.group(1) in bus_index:
            c.add(("bus", bus_index[mb.group(1)]), mb.group(2))
        elif line.startswith("profiles"):
            path, _, problem = line.partition(": ")
            c.add(path, problem, at=tuple(path.split(".")[:2]))
        else:
            c.add("", line)


def _check_billing(
    c: Problems, accounts: list[tuple[int, AccountSection]], raw: Mapping[str, Any], timezone: str | None
) -> None:
    """Load every account and tariff file now, so `config check` reports their problems too."""
    for i, a in accounts:
        unusable = [(k, p, why) for k, p in (("settings", a.settings), *(("tariffs", t) for t in a.tariffs))
                    if (why := not_a_regular_file(p)) is not None]
        for key, p, why in unusable:
            c.add(("account", i, key), f"{p}: {why}")
        if unusable:
            continue
        try:
            settings = load_account(a.settings, timezone)
        except AccountError as exc:
            c.extend(exc.problems)
        else:
            if settings.account != a.id:
                in_file = Problems(a.settings)
                in_file.add(
                    "account", f"names {settings.account!r} but the gateway configuration lists it as {a.id!r}"
                )
                c.extend(in_file)
        try:
            load_book(a.tariffs, timezone)
        except TariffError as exc:
            c.extend(exc.problems)
    if accounts:
        known = {a.id for _, a in accounts}
        for i, rm in _entries(raw, "meter"):
            acct = rm.get("account") if isinstance(rm, dict) else None
            if is_name(acct) and acct not in known:
                c.add(("meter", i, "account"), f"unknown account {acct!r} (known: {', '.join(sorted(known))})")
