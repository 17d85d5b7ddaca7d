from __future__ import annotations

from decimal import Decimal

import pytest

from firmware_bridge.bus import BusConfigError, open_bus
from firmware_bridge.modbus.profiles import ProfileError
from firmware_bridge.modbus.simulator import ModbusSimulator
from firmware_bridge.reading import Quantity
from gateway.config import BusSection, MeterSection


def tcp_bus(port: int) -> BusSection:
    return BusSection(name="tcp-1", type="tcp", host="127.0.0.1", port=port, timeout_s=0.2, retries=1)


async def test_open_bus_with_builtin_and_user_profiles() -> None:
    user = {
        "my_sdm": {
            "function_code": 4,
            "fields": {"energy_import_kwh": {"address": 0x48, "type": "float32", "unit": "kWh"}},
        }
    }
    meters = [
        MeterSection(id="a", bus="tcp-1", protocol="modbus", profile="sdm120", unit_id=1),
        MeterSection(id="b", bus="tcp-1", protocol="modbus", profile="my_sdm", unit_id=2),
        MeterSection(id="other", bus="tcp-2", protocol="modbus", profile="sdm120", unit_id=3),
    ]
    async with ModbusSimulator([1, 2]) as sim, open_bus(tcp_bus(sim.port), meters, user) as sched:
        assert list(sched.drivers) == ["a", "b"]  # meters of other buses ignored
        res = await sched.run_cycle(0)
    by_id = {r.meter_id: r for r in res.readings}
    assert by_id["a"].get(Quantity.VOLTAGE) == Decimal("230.4")
    assert set(by_id["b"].values) == {Quantity.ENERGY_IMPORT}


async def test_config_errors() -> None:
    bus = tcp_bus(1)
    with pytest.raises(BusConfigError, match="unknown profile 'nope'"):
        async with open_bus(bus, [MeterSection(id="a", bus="tcp-1", protocol="modbus", profile="nope", unit_id=1)]):
            pass
    with pytest.raises(BusConfigError, match="different protocols"):
        async with open_bus(
            bus,
            [
                MeterSection(id="a", bus="tcp-1", protocol="modbus", profile="sdm120", unit_id=1),
                MeterSection(id="b", bus="tcp-1", protocol="dlt645", address="000001020304"),
            ],
        ):
            pass
    with pytest.raises(ProfileError) as ei:
        async with open_bus(bus, [], {"bad": {"function_code": 5, "fields": {}}}):
            pass
    assert ei.value.path == "profiles.bad.function_code"
