"""Meter entries that reach one device (firmware_bridge/addressing.py), and open_bus refusing them."""

from __future__ import annotations

import pytest

from firmware_bridge.addressing import address_clashes, line_of
from firmware_bridge.bus import BusConfigError, open_bus
from firmware_bridge.reading import Quantity
from firmware_bridge.settings import BusSettings, MeterSettings, RelaySettings
from testbed.simulators.dlt645 import Simulator, make_meters

SERIAL_1 = BusSettings(name="rs485-1", type="serial", device="/dev/ttyNOPE0")
SERIAL_2 = BusSettings(name="rs485-2", type="serial", device="/dev/ttyNOPE1")
LAN = BusSettings(name="lan", type="tcp", host="Meters.example", port=502)
LAN_ALIAS = BusSettings(name="lan-b", type="tcp", host="meters.example", port=502)
LAN_OTHER_PORT = BusSettings(name="lan-c", type="tcp", host="meters.example", port=503)
BUSES = [SERIAL_1, SERIAL_2, LAN, LAN_ALIAS, LAN_OTHER_PORT]


def d(mid: str, address: str, bus: str = "rs485-1") -> MeterSettings:
    return MeterSettings(id=mid, bus=bus, protocol="dlt645", address=address)


def m(mid: str, unit: int, bus: str = "lan", profile: str = "sdm120") -> MeterSettings:
    return MeterSettings(id=mid, bus=bus, protocol="modbus", unit_id=unit, profile=profile)


def clashes(*meters: MeterSettings) -> list[tuple[str, str, str]]:
    return [(c.meter.id, c.first_meter.id, c.key) for c in address_clashes(BUSES, meters)]


def test_a_line_is_its_device_or_endpoint() -> None:
    assert line_of(LAN) == line_of(LAN_ALIAS) == ("tcp", "meters.example", "502")
    assert line_of(LAN) != line_of(LAN_OTHER_PORT)
    assert line_of(SERIAL_1) == ("serial", "/dev/ttyNOPE0") != line_of(SERIAL_2)


def test_one_address_per_line() -> None:
    assert clashes(d("a", "000000000001"), d("b", "000000000002"), d("c", "000000000001")) == [("c", "a", "address")]
    assert clashes(m("a", 1), m("b", 2), m("c", 1, profile="ddsu666"), m("e", 1)) == [
        ("c", "a", "unit_id"),
        ("e", "a", "unit_id"),
    ]
    assert clashes(m("a", 1), m("b", 1, bus="lan-b")) == [("b", "a", "unit_id")]  # one endpoint, two names


def test_other_lines_and_meters_without_a_known_bus_are_left_alone() -> None:
    assert clashes(d("a", "000000000001"), d("b", "000000000001", bus="rs485-2")) == []
    assert clashes(m("a", 1), m("b", 1, bus="lan-c")) == []
    assert clashes(m("a", 1), m("b", 1, bus="nowhere")) == []
    assert clashes(m("a", 1), MeterSettings(id="b", bus="lan", protocol="modbus")) == []  # no unit id: reported elsewhere


def test_the_problem_names_the_bus_the_address_and_the_first_entry() -> None:
    (dup,) = address_clashes(BUSES, [m("m-1", 5), m("m-2", 5, bus="lan-b", profile="ddsu666")])
    text = dup.problem(" (first at line 12)")
    assert text.startswith(
        "unit id 5 on bus lan-b (meters.example:502, the same line as bus lan) is already meter m-1's"
        " (first at line 12), with profile sdm120: one unit id is one device whatever the profile"
    )


async def test_open_bus_refuses_two_meters_at_one_address_before_touching_the_line() -> None:
    # The device does not exist: a refusal after opening would say so instead.
    with pytest.raises(BusConfigError) as info:
        async with open_bus(SERIAL_1, [d("d-1", "000000000001"), d("d-2", "000000000001")]):
            pass
    assert info.value.path == "meter d-2.address"
    assert "address 000000000001 on bus rs485-1 is already meter d-1's" in info.value.problem


async def test_open_bus_refuses_two_meters_with_one_relay_before_touching_the_line() -> None:
    serial = BusSettings(name="rs485-1", type="serial", device="/dev/ttyNOPE0")
    coil = RelaySettings(kind="coil", address=0, unit_id=10)
    meters = [
        MeterSettings(id="m-1", bus="rs485-1", protocol="modbus", unit_id=1, profile="sdm120", relay=coil),
        MeterSettings(id="m-2", bus="rs485-1", protocol="modbus", unit_id=2, profile="sdm120", relay=coil),
    ]
    with pytest.raises(BusConfigError) as info:
        async with open_bus(serial, meters):
            pass
    assert info.value.path == "meter m-2.relay.address"
    assert "already meter m-1's relay" in str(info.value)


async def test_a_wildcard_or_the_broadcast_address_is_never_a_meters_address() -> None:
    """Why no rule is needed for them: a meter entry cannot hold one (the loader
    refuses them too, tests/gateway/test_config_addresses.py)."""
    for address in ("AAAAAAAAAAAA", "AAAAAA000001", "999999999999"):
        with pytest.raises(BusConfigError, match=r"12 digits|broadcast"):
            async with open_bus(LAN, [d("w", address, bus="lan")]):
                pass


async def test_the_same_address_on_two_lines_is_read_from_each() -> None:
    """Two DL/T 645 lines (two simulators), one address on each: no clash, both read."""
    sims_a, sims_b = make_meters(1), make_meters(1)
    address = sims_a[0].address
    assert sims_b[0].address == address
    async with Simulator(sims_a) as sim_a, Simulator(sims_b) as sim_b:
        buses = [
            BusSettings(name=name, type="tcp", host="127.0.0.1", port=await sim.start_tcp(), timeout_s=0.5, retries=0)
            for name, sim in (("a", sim_a), ("b", sim_b))
        ]
        meters = [MeterSettings(id=f"d-{b.name}", bus=b.name, protocol="dlt645", address=address,
                                quantities=("energy_import_kwh",)) for b in buses]
        assert address_clashes(buses, meters) == []
        for bus in buses:
            async with open_bus(bus, meters) as sched:
                res = await sched.run_cycle(0)
            assert [r.meter_id for r in res.readings] == [f"d-{bus.name}"]
            assert res.readings[0].get(Quantity.ENERGY_IMPORT) is not None
