"""Which device each meter entry reaches, and entries that reach the same one.

A meter entry is a bus and an address on it: a DL/T 645 address or a Modbus
unit id. Two entries that reach the same device read it twice under two meter
ids: its energy is billed to both accounts, and the meter that was meant to be
there is never read. :func:`address_clashes` finds them, without opening
anything; the configuration loader reports them (``edgegw config check``, the
daemon's start, changes from central, provisioning) and :func:`firmware_bridge.bus.open_bus`
refuses to build a bus with them.

The rules:

* **The line, not the bus name.** Meters share an address space when their
  buses reach the same line: a serial bus is its device, a tcp bus its
  ``host:port`` (a Modbus TCP meter or gateway, or a serial server; meters
  have no host of their own). Two buses with the same endpoint are one line.
* **DL/T 645**: one address per line. A meter's address is its own: the
  loader and the driver (:class:`~firmware_bridge.dlt645.driver.Dlt645Driver`)
  take 12 decimal digits and refuse the broadcast address ``999999999999``,
  so a wildcard (``AA`` bytes), which every meter it matches would answer,
  never names a meter and needs no rule here.
* **Modbus**: one unit id per line, whatever the profile. A profile maps one
  metering point (each canonical quantity at most once: one import register,
  one power...); the product has no multi-channel devices that answer for
  several metering points at one unit id, so a second entry at the same unit
  id, with another profile or not, reads the same device again.
* **Relays**: one Modbus relay (a coil, or a holding register: two address
  spaces) at one unit id and address per line. Two meters whose
  ``[meter.relay]`` tables name the same one would cut each other's supply:
  the trip of one account would leave the other in the dark. A DL/T 645
  relay is the meter's own (its address), so the address rule covers it.
* Meters on different lines may share addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from firmware_bridge.settings import BusSettings, MeterSettings


def line_of(bus: BusSettings) -> tuple[str, ...]:
    """The line ``bus`` reaches: buses with the same line share one address space."""
    if bus.type == "tcp" and bus.host:
        return ("tcp", bus.host.lower(), str(bus.port))
    if bus.type == "serial" and bus.device:
        return ("serial", bus.device)
    return ("bus", bus.name)


def _line_text(bus: BusSettings) -> str:
    kind, *rest = line_of(bus)
    if kind == "tcp":
        host, port = rest
        return f"{'[' + host + ']' if ':' in host else host}:{port}"
    return rest[0]


@dataclass(frozen=True)
class AddressClash:
    """A meter entry that reaches the same device as an earlier one.

    ``index`` and ``first`` are positions in the meter list given to
    :func:`address_clashes`; ``key`` is the key that clashes (``unit_id`` or
    ``address``). :meth:`problem` says what is wrong, naming the bus, the
    address and the first entry.
    """

    index: int
    first: int
    key: str
    meter: MeterSettings
    first_meter: MeterSettings
    bus: BusSettings
    first_bus: BusSettings

    @property
    def path(self) -> tuple[str, ...]:
        """The clashing setting's keys below the meter (``relay.address`` for a relay)."""
        return ("relay", "address") if self.key == "relay" else (self.key,)

    def problem(self, first_at: str = "") -> str:
        """The problem, for the later entry; ``first_at`` is put after the first
        entry's id (e.g. ``" (first at line 12)"``)."""
        m, f = self.meter, self.first_meter
        on = f"bus {m.bus}"
        if f.bus != m.bus:
            on += f" ({_line_text(self.bus)}, the same line as bus {f.bus})"
        twice = (
            "both entries would read that one device, billing its energy twice,"
            " and the meter meant to be here would never be read"
        )
        if self.key == "relay":
            r, fr = m.relay, f.relay
            assert r is not None and fr is not None
            return (
                f"relay {r.kind} {r.address} at unit id {relay_unit(m)} on {on} is already meter {f.id}'s"
                f" relay{first_at}: tripping either account would cut the other's supply too"
            )
        if self.key == "unit_id":
            what = f"unit id {m.unit_id} on {on} is already meter {f.id}'s{first_at}"
            if f.profile == m.profile:
                return f"{what}: {twice}"
            return (
                f"{what}, with profile {f.profile}: one unit id is one device whatever the profile"
                f" (a profile maps one metering point; there are no multi-channel devices), so {twice}"
            )
        return f"address {m.address} on {on} is already meter {f.id}'s{first_at}: {twice}"


def _clashes(
    buses: Sequence[BusSettings],
    meters: Sequence[MeterSettings],
    target: Callable[[MeterSettings], tuple[str, Hashable] | None],
) -> list[AddressClash]:
    """Every meter whose ``target`` (key, value) on its line is an earlier meter's, in
    order (pure). Meters whose bus is not in ``buses``, or without a target, are left
    out (other checks report them). Each clash names the earliest entry."""
    bus_of = {b.name: b for b in buses}
    first: dict[tuple[tuple[str, ...], str, Hashable], int] = {}  # (line, key, value) -> first position
    out: list[AddressClash] = []
    for i, m in enumerate(meters):
        bus, aim = bus_of.get(m.bus), target(m)
        if bus is None or aim is None:
            continue
        key, value = aim
        j = first.setdefault((line_of(bus), key, value), i)
        if j != i:
            out.append(AddressClash(i, j, key, m, meters[j], bus, bus_of[meters[j].bus]))
    return out


def _device(m: MeterSettings) -> tuple[str, Hashable] | None:
    """The device a meter entry reads: its Modbus unit id or its DL/T 645 address."""
    if m.protocol == "modbus" and m.unit_id is not None:
        return "unit_id", m.unit_id
    if m.protocol == "dlt645" and m.address is not None:
        return "address", m.address
    return None


def address_clashes(buses: Sequence[BusSettings], meters: Sequence[MeterSettings]) -> list[AddressClash]:
    """Every meter that reaches the same device as an earlier one, in order (pure).

    Meters whose bus is not in ``buses``, and meters without an address or
    unit id, are left out (other checks report them). Each clash names the
    earliest entry it clashes with.
    """
    return _clashes(buses, meters, _device)


def relay_unit(m: MeterSettings) -> int | None:
    """The unit id a meter's Modbus relay answers at (its own unless the relay names one)."""
    if m.relay is None:
        return None
    return m.relay.unit_id if m.relay.unit_id is not None else m.unit_id


def _relay(m: MeterSettings) -> tuple[str, Hashable] | None:
    """A meter's Modbus relay: its kind (coil and holding register are two address
    spaces), unit id and address."""
    unit = relay_unit(m)
    if m.relay is None or m.relay.kind not in ("coil", "register") or unit is None:
        return None
    return "relay", (m.relay.kind, unit, m.relay.address)


def relay_clashes(buses: Sequence[BusSettings], meters: Sequence[MeterSettings]) -> list[AddressClash]:
    """Every meter whose Modbus relay (coil or holding register) is an earlier meter's
    relay on the same line, in order (pure; key ``relay``). Meters without a Modbus
    relay, or whose relay has no unit id or bus, are left out (other checks report them)."""
    return _clashes(buses, meters, _relay)
