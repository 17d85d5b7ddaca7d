"""What the bus code needs to know about a site: buses, meters, relays, timing.

Plain frozen values, checked by whoever builds them: the gateway's
configuration loader (``gateway.config``) validates the TOML file and builds
these types from its ``[[bus]]`` and ``[[meter]]`` tables (the keys are in
the README's configuration section). The firmware bridge itself never reads a
file.

Timing (``response_time_s``, ``timeout_s``, ``retries``) is set per bus and may
be overridden per meter; :func:`firmware_bridge.timing.line_timing` turns it
into the numbers a transaction waits for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BusSettings:
    """One RS-485 line, or a TCP connection to a serial server or a Modbus TCP meter."""

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
class RelaySettings:
    """A meter's supply relay: a DL/T 645 control, or a Modbus coil or register."""

    kind: str  # "dlt645" | "coil" | "register"
    address: int = 0
    unit_id: int | None = None
    open_value: int = 1
    closed_value: int = 0
    min_interval_s: float = 10.0


@dataclass(frozen=True)
class MeterSettings:
    """One meter on a bus, with its protocol's addressing and optional relay."""

    id: str
    bus: str
    protocol: str  # "modbus" | "dlt645"
    profile: str | None = None  # Modbus register map (built-in or [profiles.NAME])
    unit_id: int | None = None  # Modbus
    address: str | None = None  # DL/T 645, 12 digits
    relay: RelaySettings | None = None
    password: str | None = None  # DL/T 645 control password, hex, wire order (level + 3 bytes)
    operator: str | None = None  # DL/T 645 operator code, hex (4 bytes)
    quantities: tuple[str, ...] | None = None  # what to read; None = the protocol's default set
    response_time_s: float | None = None  # this meter's documented response time; None: the bus's
    timeout_s: float | None = None  # this meter's per-transaction timeout; None: the bus's


@dataclass(frozen=True)
class SiteSettings:
    """Every bus and meter of a site, the user register maps and the site's time zone.

    ``timezone`` is the IANA zone meter clocks keep (DL/T 645 meters run on
    local time); ``profiles`` holds the user's ``[profiles.NAME]`` tables (or
    parsed :class:`~firmware_bridge.modbus.profiles.Profile` objects) on top of
    the built-in maps.
    """

    timezone: str = "UTC"
    buses: tuple[BusSettings, ...] = ()
    meters: tuple[MeterSettings, ...] = ()
    profiles: Mapping[str, Any] = field(default_factory=dict)

    def bus(self, name: str) -> BusSettings:
        for b in self.buses:
            if b.name == name:
                return b
        raise KeyError(name)

    def meters_on(self, bus: str) -> tuple[MeterSettings, ...]:
        return tuple(m for m in self.meters if m.bus == bus)
