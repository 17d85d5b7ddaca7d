"""Build a bus from its settings: transport, drivers, scheduler.

:func:`open_site_bus` is the one way the daemon and the commissioning
commands open a bus: with the site's time zone (:class:`SiteSettings`
``timezone``, the zone meter clocks keep), the line lock of a serial bus, and
every meter's timing from the standards (firmware_bridge/timing.py)::

    async with open_site_bus(site, site.bus("rs485-1"), owner="edgegw daemon") as sched:
        while True:
            result = await sched.run_cycle(now_ms())
            ...

Every meter on a bus must speak the bus's protocol (one framing per RS-485
line). A serial bus's device is checked and locked before anything else
(:class:`~firmware_bridge.driver.BusUnavailable` names the device and what to
do); transports are closed and the lock released when the context exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from firmware_bridge.addressing import address_clashes, relay_clashes
from firmware_bridge.dlt645.driver import Dlt645Driver
from firmware_bridge.dlt645.transport import Dlt645Transport, open_transport
from firmware_bridge.driver import BusUnavailable, MeterDriver
from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.modbus.driver import RTU_REQUEST_BYTES, RTU_WRITE_BYTES, ModbusDriver
from firmware_bridge.modbus.profiles import Profile, ProfileError, parse_profile, parse_profiles
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.reading import Quantity
from firmware_bridge.relay import Dlt645RelayActuator, actuator_from_config
from firmware_bridge.scheduler import BackoffPolicy, BusScheduler, silent_interval_s
from firmware_bridge.serial_line import LineBusy, LineLock, check_device
from firmware_bridge.settings import BusSettings, MeterSettings, SiteSettings
from firmware_bridge.timing import LineTiming, line_timing, standard_response_s, timeout_problem


class BusConfigError(EdgeGwError, ValueError):
    """A bus cannot be built from its configuration (``path``: ``problem``)."""

    kind = ErrorKind.INVALID

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def config_problems(
    buses: Sequence[BusSettings], meters: Sequence[MeterSettings], profiles: Mapping[str, Any] | None
) -> list[str]:
    """Every southbound configuration problem, without opening anything.

    For ``edgegw config check``: user profiles (one problem per broken profile),
    unknown profile names, mixed protocols on one bus, relay tables that do not
    fit their meter. Each line is ``key.path: problem``. Two meters at one
    address or with one relay are :func:`firmware_bridge.addressing.address_clashes`
    and :func:`~firmware_bridge.addressing.relay_clashes` (the loader reports them
    with the line of the first entry).
    """
    problems: list[str] = []
    known: dict[str, Profile] = dict(parse_profiles(None))
    broken: set[str] = set()
    if profiles is not None and not isinstance(profiles, Mapping):
        return ["profiles: must be a table of [profiles.NAME] tables"]
    for name, raw in (profiles or {}).items():
        try:
            known[name] = parse_profile(name, raw)
        except ProfileError as exc:
            problems.append(str(exc))
            broken.add(name)  # reported once, not again as unknown
    protocol_of: dict[str, str] = {}
    for bi, bus in enumerate(buses):
        on_bus = [m for m in meters if m.bus == bus.name]
        try:
            protocol_of[bus.name] = bus_protocol(bus, on_bus)
        except BusConfigError as exc:
            problems.append(str(exc))
            continue
        # Modbus fixes no response time: only a documented one (response_time_s) binds
        declared = [bus.response_time_s or standard_response_s(protocol_of[bus.name])]
        declared += [m.response_time_s for m in on_bus if m.timeout_s is None]
        documented = [r for r in declared if r is not None]
        if documented:
            problem = timeout_problem(bus.timeout_s, max(documented), protocol_of[bus.name])
            if problem:
                problems.append(f"bus[{bi}].timeout_s: {problem}")
    for i, m in enumerate(meters):
        key = f"meter[{i}]"
        if m.bus in protocol_of and m.timeout_s is not None:
            bus = next(b for b in buses if b.name == m.bus)
            response = m.response_time_s or bus.response_time_s or standard_response_s(m.protocol)
            if response is not None:
                problem = timeout_problem(m.timeout_s, response, m.protocol)
                if problem:
                    problems.append(f"{key}.timeout_s: {problem}")
        if m.protocol == "modbus" and m.profile in broken:
            pass
        elif m.protocol == "modbus" and m.profile is not None and m.profile not in known:
            problems.append(f"{key}.profile: unknown profile {m.profile!r} (known: {', '.join(sorted(known))})")
        elif m.protocol == "modbus" and m.profile is not None and m.quantities:
            have = {f.quantity.value for f in known[m.profile].fields}
            missing = [q for q in m.quantities if q not in have]
            if missing:
                problems.append(f"{key}.quantities: profile {m.profile!r} has no {', '.join(missing)}")
        if m.relay is None:
            continue
        r = m.relay
        if r.kind == "dlt645" and m.protocol != "dlt645":
            problems.append(f"{key}.relay.kind: 'dlt645' relay needs a dlt645 meter")
        if r.kind in ("coil", "register"):
            if m.protocol != "modbus":
                problems.append(f"{key}.relay.kind: {r.kind!r} relay needs a Modbus bus (this meter speaks {m.protocol})")
            if r.unit_id is None and m.unit_id is None:
                problems.append(f"{key}.relay.unit_id: required (the meter has no unit_id)")
            if r.kind == "coil" and r.open_value not in (0, 1):
                problems.append(f"{key}.relay.open_value: a coil is 0 or 1, got {r.open_value}")
            if r.kind == "register":
                if r.open_value == r.closed_value:
                    problems.append(f"{key}.relay: open_value and closed_value must differ")
                for k, v in (("open_value", r.open_value), ("closed_value", r.closed_value)):
                    if not 0 <= v <= 0xFFFF:
                        problems.append(f"{key}.relay.{k}: must be 0..65535, got {v}")
            if r.address > 0xFFFF:
                problems.append(f"{key}.relay.address: must be 0..65535, got {r.address}")
    return problems


def bus_protocol(bus: BusSettings, meters: Sequence[MeterSettings]) -> str:
    """The single protocol spoken on ``bus`` (modbus when the bus has no meters)."""
    protocols = {m.protocol for m in meters}
    if len(protocols) > 1:
        raise BusConfigError(
            f"bus {bus.name}", f"meters speak different protocols ({', '.join(sorted(protocols))}); use one bus per protocol"
        )
    return protocols.pop() if protocols else "modbus"


def resolve_profiles(profiles: Mapping[str, Any] | None) -> dict[str, Profile]:
    """Built-ins plus user maps; values may already be :class:`Profile` objects."""
    if profiles and all(isinstance(p, Profile) for p in profiles.values()):
        out = parse_profiles(None)
        out.update(profiles)
        return out
    return parse_profiles(profiles)


def meter_timing(protocol: str, bus: BusSettings, meter: MeterSettings | None = None) -> LineTiming:
    """The timing of ``meter`` on ``bus`` (bus defaults without a meter)."""
    return line_timing(protocol, bus, meter)


def _modbus_transport(bus: BusSettings) -> ModbusTransport:
    line = meter_timing("modbus", bus)
    # default limit of one request (relay writes and read-backs): a short frame each way
    limit = line.wire_s(RTU_REQUEST_BYTES) + line.timeout_s + line.wire_s(RTU_WRITE_BYTES)
    if bus.type == "tcp":
        if not bus.host:
            raise BusConfigError(f"bus {bus.name}.host", "required for a tcp bus")
        rtu = bus.framing == "rtu"  # transparent RS-485/Ethernet converters
        return ModbusTransport.tcp(
            bus.host, bus.port, name=bus.name, timeout_s=limit, rtu_over_tcp=rtu, baud=bus.baud
        )
    if not bus.device:
        raise BusConfigError(f"bus {bus.name}.device", "required for a serial bus")
    return ModbusTransport.serial(
        bus.device,
        name=bus.name,
        baud=bus.baud,
        parity=bus.parity,
        stop_bits=bus.stop_bits,
        timeout_s=limit,
    )


def profile_for_meter(m: MeterSettings, profiles: Mapping[str, Profile]) -> Profile:
    """The meter's profile, narrowed to its ``quantities`` when the meter lists some."""
    if m.profile is None:
        raise BusConfigError(f"meter {m.id}.profile", "required for a modbus meter")
    profile = profiles.get(m.profile)
    if profile is None:
        raise BusConfigError(
            f"meter {m.id}.profile", f"unknown profile {m.profile!r} (known: {', '.join(sorted(profiles))})"
        )
    if not m.quantities:
        return profile
    available = {f.quantity.value for f in profile.fields}
    missing = [q for q in m.quantities if q not in available]
    if missing:
        raise BusConfigError(
            f"meter {m.id}.quantities",
            f"profile {profile.name!r} has no {', '.join(missing)} (it has: {', '.join(sorted(available))})",
        )
    wanted = set(m.quantities)
    return dataclasses.replace(profile, fields=tuple(f for f in profile.fields if f.quantity.value in wanted))


def modbus_drivers(
    meters: Sequence[MeterSettings],
    profiles: Mapping[str, Profile],
    transport: ModbusTransport,
    bus: BusSettings | None = None,
) -> list[ModbusDriver]:
    drivers: list[ModbusDriver] = []
    for m in meters:
        if m.unit_id is None:
            raise BusConfigError(f"meter {m.id}.unit_id", "required for a modbus meter")
        timing = None if bus is None else meter_timing("modbus", bus, m)
        drivers.append(
            ModbusDriver(m.id, m.unit_id, profile_for_meter(m, profiles), transport, timing=timing)
        )
    return drivers


def open_site_bus(
    site: SiteSettings,
    bus: BusSettings,
    meters: Sequence[MeterSettings] | None = None,
    *,
    owner: str,
    force: bool = False,
    policy: BackoffPolicy | None = None,
) -> contextlib.AbstractAsyncContextManager[BusScheduler]:
    """Open ``bus`` the way the daemon and the commissioning commands both do.

    Meter clocks run in the site's zone (``site.timezone``); ``meters``
    defaults to every meter of the bus. ``owner`` is what a refused process is
    told holds the line (e.g. ``edgegw daemon (gateway gw-01)``); ``force`` uses
    a serial line even while another process holds its lock (the two will talk
    over each other).
    """
    return open_bus(
        bus,
        site.meters_on(bus.name) if meters is None else meters,
        site.profiles,
        policy=policy,
        meter_tz=ZoneInfo(site.timezone),
        lock_owner=owner,
        force=force,
    )


@contextlib.asynccontextmanager
async def open_bus(
    bus: BusSettings,
    meters: Sequence[MeterSettings],
    profiles: Mapping[str, Any] | None = None,
    *,
    policy: BackoffPolicy | None = None,
    meter_tz: dt.tzinfo | None = None,
    lock_owner: str | None = None,
    force: bool = False,
) -> AsyncIterator[BusScheduler]:
    """Open ``bus`` and yield its :class:`BusScheduler`; close the transport on exit.

    ``meter_tz`` is the time zone DL/T 645 meter clocks run in (they keep local
    time; relay-command deadlines are converted to it), e.g.
    ``ZoneInfo(site.timezone)``: use :func:`open_site_bus`, which passes it.
    Meter ``password``/``operator`` (hex), ``quantities`` and timing overrides
    from the settings are passed to the drivers. With
    ``lock_owner`` a serial bus's line lock is taken (unless ``force``).

    Raises :class:`BusConfigError` / :class:`ProfileError` (both ``ValueError``) for
    settings problems before anything is opened (two meters at one address or
    with one relay included, :mod:`firmware_bridge.addressing`), and
    :class:`~firmware_bridge.driver.BusUnavailable` when a serial device is
    missing, not accessible or in use.
    """
    on_bus = [m for m in meters if m.bus == bus.name]
    protocol = bus_protocol(bus, on_bus)
    clashes = [*address_clashes([bus], on_bus), *relay_clashes([bus], on_bus)]  # the loader refuses these too
    if clashes:
        raise BusConfigError(f"meter {clashes[0].meter.id}.{'.'.join(clashes[0].path)}", clashes[0].problem())
    gap = silent_interval_s(protocol, bus.type, bus.baud, bus.parity, bus.stop_bits)
    if protocol == "modbus":
        resolved = resolve_profiles(profiles)
        for m in on_bus:
            profile_for_meter(m, resolved)  # configuration problems before the line is touched
    async with contextlib.AsyncExitStack() as stack:
        if bus.type == "serial" and bus.device:
            if lock_owner is not None and not force:
                lock = LineLock(bus.device, lock_owner)
                try:
                    lock.acquire()
                except LineBusy as exc:
                    raise BusUnavailable(bus.name, busy_text(exc)) from None
                stack.callback(lock.release)
            problem = check_device(bus.device)
            if problem:
                raise BusUnavailable(bus.name, problem)
        drivers: list[MeterDriver]
        extra: dict[str, Any] = {}
        if protocol == "modbus":
            transport = _modbus_transport(bus)
            stack.callback(transport.close)
            drivers = list(modbus_drivers(on_bus, resolved, transport, bus))
            extra["modbus_transport"] = transport
        elif protocol == "dlt645":
            drivers, dtransport = await _dlt645(bus, on_bus, stack, meter_tz)
            extra["dlt645_transport"] = dtransport
        else:
            raise BusConfigError(f"bus {bus.name}", f"unknown protocol {protocol!r}")
        bus_line = meter_timing(protocol, bus)
        scheduler = BusScheduler(
            bus.name,
            drivers,
            silent_interval_s=gap,
            timeout_s=bus_line.timeout_s,
            retries=bus.retries,
            policy=policy,
        )
        scheduler.transports = extra
        for m in on_bus:
            if m.relay is None:
                continue
            scheduler.relays[m.id] = _relay_actuator(m, scheduler, extra)
            scheduler.relay_min_interval_s[m.id] = m.relay.min_interval_s
        yield scheduler


def busy_text(exc: LineBusy) -> str:
    """One line for a line held by another process, saying what to do."""
    return (
        f"{exc.device} is in use by {exc.holder or 'another edgegw process'}:"
        " stop it first (the daemon: sudo systemctl stop edgegw), or pass --force"
        " to share the line (the two masters will talk over each other)"
    )


def _relay_actuator(m: MeterSettings, scheduler: BusScheduler, transports: Mapping[str, Any]) -> Any:
    assert m.relay is not None
    if m.relay.kind == "dlt645":
        if m.protocol != "dlt645":
            raise BusConfigError(f"meter {m.id}.relay.kind", "'dlt645' relay needs a dlt645 meter")
        driver = scheduler.drivers[m.id]
        if not hasattr(driver, "control") or not hasattr(driver, "read_relay_open"):
            raise BusConfigError(f"meter {m.id}.relay", "the DL/T 645 driver has no relay control")
        return Dlt645RelayActuator(driver)
    transport = transports.get("modbus_transport")
    if transport is None:
        raise BusConfigError(
            f"meter {m.id}.relay.kind", f"{m.relay.kind!r} relay needs a Modbus bus (this bus speaks {m.protocol})"
        )
    try:
        return actuator_from_config(m.id, m.relay, transport, m.unit_id)
    except ValueError as exc:
        raise BusConfigError(f"meter {m.id}.relay", str(exc)) from None


async def _dlt645(
    bus: BusSettings,
    meters: Sequence[MeterSettings],
    stack: contextlib.AsyncExitStack,
    meter_tz: dt.tzinfo | None,
) -> tuple[list[MeterDriver], Dlt645Transport]:
    """DL/T 645 drivers on one shared transport, entered on ``stack``."""
    drivers: list[MeterDriver] = []
    transport = open_transport(bus, timing=meter_timing("dlt645", bus))
    for m in meters:
        if m.address is None:
            raise BusConfigError(f"meter {m.id}.address", "required for a dlt645 meter")
        kwargs: dict[str, Any] = {"timing": meter_timing("dlt645", bus, m)}
        if m.password:
            kwargs["password"] = bytes.fromhex(m.password)
        if m.operator:
            kwargs["operator"] = bytes.fromhex(m.operator)
        if m.quantities:
            kwargs["quantities"] = [Quantity(q) for q in m.quantities]
        if meter_tz is not None:
            kwargs["clock_tz"] = meter_tz
        try:
            drivers.append(Dlt645Driver(m.id, m.address, transport, **kwargs))
        except ValueError as exc:
            raise BusConfigError(f"meter {m.id}", str(exc)) from None
    await stack.enter_async_context(transport)
    return drivers, transport
