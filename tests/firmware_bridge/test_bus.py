from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from firmware_bridge.bus import BusConfigError, open_bus
from firmware_bridge.modbus.profiles import ProfileError
from firmware_bridge.reading import Quantity
from firmware_bridge.settings import BusSettings, MeterSettings
from testbed.simulators.modbus import ModbusSimulator


def tcp_bus(port: int) -> BusSettings:
    return BusSettings(name="tcp-1", type="tcp", host="127.0.0.1", port=port, timeout_s=0.2, retries=1)


async def test_open_bus_with_builtin_and_user_profiles() -> None:
    user = {
        "my_sdm": {
            "function_code": 4,
            "fields": {"energy_import_kwh": {"address": 0x48, "type": "float32", "unit": "kWh"}},
        }
    }
    meters = [
        MeterSettings(id="a", bus="tcp-1", protocol="modbus", profile="sdm120", unit_id=1),
        MeterSettings(id="b", bus="tcp-1", protocol="modbus", profile="my_sdm", unit_id=2),
        MeterSettings(id="other", bus="tcp-2", protocol="modbus", profile="sdm120", unit_id=3),
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
        async with open_bus(bus, [MeterSettings(id="a", bus="tcp-1", protocol="modbus", profile="nope", unit_id=1)]):
            pass
    with pytest.raises(BusConfigError, match="different protocols"):
        async with open_bus(
            bus,
            [
                MeterSettings(id="a", bus="tcp-1", protocol="modbus", profile="sdm120", unit_id=1),
                MeterSettings(id="b", bus="tcp-1", protocol="dlt645", address="000001020304"),
            ],
        ):
            pass
    with pytest.raises(ProfileError) as ei:
        async with open_bus(bus, [], {"bad": {"function_code": 5, "fields": {}}}):
            pass
    assert ei.value.path == "profiles.bad.function_code"


async def test_open_bus_dlt645_with_relay() -> None:
    from firmware_bridge.relay import RelayPolicy, controller_for
    from firmware_bridge.settings import RelaySettings
    from testbed.simulators.dlt645 import Simulator, make_meters

    sims = make_meters(3)
    sims[1].faults.no_reply = True
    async with Simulator(sims) as sim:
        port = await sim.start_tcp()
        bus = BusSettings(name="dlt", type="tcp", host="127.0.0.1", port=port, timeout_s=0.3, retries=0)
        meters = [
            MeterSettings(id=f"d{i}", bus="dlt", protocol="dlt645", address=m.address, password=m.password.hex(),
                         quantities=("energy_import_kwh", "voltage_v"),
                         relay=RelaySettings(kind="dlt645", min_interval_s=0))
            for i, m in enumerate(sims)
        ]
        async with open_bus(bus, meters) as sched:
            res = await sched.run_cycle(0)
            assert [r.meter_id for r in res.readings] == ["d0", "d2"]
            assert res.health["d1"].last_error is not None and res.health["d1"].last_error.kind == "timeout"
            assert res.readings[0].get(Quantity.ENERGY_IMPORT) is not None
            assert set(res.readings[0].values) == {Quantity.ENERGY_IMPORT, Quantity.VOLTAGE}
            relays = controller_for(sched, policy=RelayPolicy(min_interval_s=0, settle_s=0.01, max_drives=2, redrive_delays_s=(0.01,)))
            r = await relays.set_open("d0", True)
            assert r.ok and sims[0].relay_open
            sims[2].faults.relay_stuck = True
            stuck = await relays.set_open("d2", True)
            assert stuck.alarm and not sims[2].relay_open and len(stuck.attempts) == 2


async def test_meter_signals_alarm_and_protect_on_dlt645_meters() -> None:
    from firmware_bridge.relay import RelayPolicy, SignalNotSupported, controller_for
    from firmware_bridge.relay_ops import RelayOp
    from firmware_bridge.settings import RelaySettings
    from testbed.simulators.dlt645 import Simulator, make_meters

    sims = make_meters(2)
    async with Simulator(sims) as sim:
        port = await sim.start_tcp()
        bus = BusSettings(name="dlt", type="tcp", host="127.0.0.1", port=port, timeout_s=0.3, retries=0)
        meters = [
            MeterSettings(id=f"d{i}", bus="dlt", protocol="dlt645", address=m.address, password=m.password.hex(),
                         quantities=("energy_import_kwh",), relay=RelaySettings(kind="dlt645", min_interval_s=0))
            for i, m in enumerate(sims)
        ]
        async with open_bus(bus, meters) as sched:
            relays = controller_for(sched, policy=RelayPolicy(min_interval_s=0, settle_s=0.01))
            assert relays.supports_signals("d0")
            r = await relays.signal("d0", RelayOp.ALARM_ON)
            assert r.ok and sims[0].alarm and not sims[1].alarm
            assert (await relays.signal("d0", RelayOp.ALARM_OFF)).ok and not sims[0].alarm
            assert (await relays.signal("d1", RelayOp.PROTECT_ON)).ok and sims[1].protected
            # Power-protect set in the meter: it refuses a trip, and the controller says so.
            refused = await relays.set_open("d1", True)
            assert not refused.ok and refused.alarm and not sims[1].relay_open
            assert (await relays.signal("d1", RelayOp.PROTECT_OFF)).ok and not sims[1].protected
            sims[0].faults.no_reply = True
            lost = await relays.signal("d0", RelayOp.ALARM_ON)
            assert not lost.ok and "timeout" in lost.detail  # the meter may have acted: no ack, not ok
    async with ModbusSimulator([1]) as msim:
        modbus = [MeterSettings(id="m", bus="tcp-1", protocol="modbus", profile="sdm120", unit_id=1,
                               relay=RelaySettings(kind="coil"))]
        async with open_bus(tcp_bus(msim.port), modbus) as sched:
            relays = controller_for(sched)
            assert not relays.supports_signals("m")
            with pytest.raises(SignalNotSupported, match="alarm_on is not supported"):
                await relays.signal("m", RelayOp.ALARM_ON)


def test_config_problems_lists_everything() -> None:
    from firmware_bridge.bus import config_problems
    from firmware_bridge.settings import RelaySettings

    buses = [BusSettings(name="b1", type="tcp", host="h"), BusSettings(name="b2", type="serial", device="/dev/x")]
    meters = [
        MeterSettings(id="a", bus="b1", protocol="modbus", profile="nope", unit_id=1),
        MeterSettings(id="b", bus="b1", protocol="modbus", profile="broken", unit_id=2),
        MeterSettings(id="c", bus="b2", protocol="modbus", profile="sdm120", unit_id=3,
                     relay=RelaySettings(kind="register", open_value=1, closed_value=1)),
        MeterSettings(id="d", bus="b2", protocol="dlt645", address="000000000001",
                     relay=RelaySettings(kind="coil")),
        MeterSettings(id="e", bus="b1", protocol="modbus", profile="sdm120", unit_id=4,
                     relay=RelaySettings(kind="coil", open_value=2)),
    ]
    profiles = {"broken": {"function_code": 4, "fields": {"power_kw": {"address": 1, "unit": "kWh"}}}, "ok": {"function_code": 3, "fields": {"voltage_v": {"address": 0}}}}
    problems = config_problems(buses, meters, profiles)
    assert problems == [
        "profiles.broken.fields.power_kw.unit: must be one of 'kW', 'W' for power_kw, got 'kWh'",
        "bus b2: meters speak different protocols (dlt645, modbus); use one bus per protocol",
        "meter[0].profile: unknown profile 'nope' (known: ddsu666, dtsu666, ok, sdm120, sdm630)",
        "meter[2].relay: open_value and closed_value must differ",
        "meter[3].relay.kind: 'coil' relay needs a Modbus bus (this meter speaks dlt645)",
        "meter[3].relay.unit_id: required (the meter has no unit_id)",
        "meter[4].relay.open_value: a coil is 0 or 1, got 2",
    ]
    assert config_problems(buses[:1], meters[4:4], None) == []


async def test_meter_quantities_narrow_the_profile() -> None:
    async with ModbusSimulator([1]) as sim:
        bus = tcp_bus(sim.port)
        m = MeterSettings(id="a", bus="tcp-1", protocol="modbus", profile="sdm120", unit_id=1,
                         quantities=("energy_import_kwh", "energy_export_kwh"))
        async with open_bus(bus, [m]) as sched:
            res = await sched.run_cycle(0)
        assert set(res.readings[0].values) == {Quantity.ENERGY_IMPORT, Quantity.ENERGY_EXPORT}
        bad = MeterSettings(id="a", bus="tcp-1", protocol="modbus", profile="sdm120", unit_id=1,
                           quantities=("energy_import_t1_kwh",))
        with pytest.raises(BusConfigError, match="has no energy_import_t1_kwh"):
            async with open_bus(bus, [bad]):
                pass


def test_timing_keys_parse_and_a_timeout_below_the_window_is_refused(tmp_path: Path) -> None:
    from gateway.config import ConfigError, parse_config

    def site(bus: dict[str, object], meter: dict[str, object]) -> dict[str, object]:
        return {
            "gateway": {"id": "gw", "site": "s"},
            "storage": {"path": "db"},
            "bus": [{"name": "b", "type": "serial", "device": "/dev/ttyUSB0", **bus}],
            "meter": [{"id": "m", "bus": "b", "protocol": "dlt645", "address": "000000000001", **meter}],
        }

    cfg = parse_config(site({"response_time_s": 0.2}, {"response_time_s": 0.45, "timeout_s": 0.6}), tmp_path / "s.toml")
    assert cfg.buses[0].response_time_s == 0.2 and cfg.buses[0].timeout_s is None
    assert (cfg.meters[0].response_time_s, cfg.meters[0].timeout_s) == (0.45, 0.6)
    with pytest.raises(ConfigError) as info:
        parse_config(site({"timeout_s": 0.3}, {"timeout_s": 0}), tmp_path / "s.toml")
    problems = "\n".join(info.value.problems)
    assert "meter[m].timeout_s: must be 0.01..60 s, got 0" in problems
    with pytest.raises(ConfigError) as info:
        parse_config(site({"timeout_s": 0.3}, {}), tmp_path / "s.toml")
    assert info.value.problems == [
        f"{tmp_path / 's.toml'}: bus[b].timeout_s: 0.3 s is shorter than the meters' response time"
        " (0.5 s, the DL/T 645 response window): a meter answering within its allowed time would"
        " never be read; remove timeout_s, or set response_time_s to the meters' documented response time"
    ]
    # the meters' manual says 0.2 s: a 0.3 s timeout is fine then
    parse_config(site({"timeout_s": 0.3, "response_time_s": 0.2}, {}), tmp_path / "s.toml")


def test_config_problems_check_timeouts_against_documented_response_times() -> None:
    from firmware_bridge.bus import config_problems

    modbus = BusSettings(name="b1", type="tcp", host="h", timeout_s=0.3)
    meters = [
        MeterSettings(id="a", bus="b1", protocol="modbus", profile="sdm120", unit_id=1),
        MeterSettings(id="b", bus="b1", protocol="modbus", profile="sdm120", unit_id=2,
                     response_time_s=0.8, timeout_s=0.5),
    ]
    # Modbus fixes no response time: only a documented one binds
    assert config_problems([modbus], meters[:1], None) == []
    assert config_problems([modbus], meters, None) == [
        "meter[1].timeout_s: 0.5 s is shorter than the meters' response time (0.8 s): a meter"
        " answering within its allowed time would never be read; remove timeout_s, or set"
        " response_time_s to the meters' documented response time"
    ]
    slow = MeterSettings(id="c", bus="b1", protocol="modbus", profile="sdm120", unit_id=3, response_time_s=0.5)
    assert [p.split(":")[0] for p in config_problems([modbus], [slow], None)] == ["bus[0].timeout_s"]


async def test_a_missing_serial_adapter_is_one_line_for_the_bus(tmp_path: Path) -> None:
    from firmware_bridge.driver import BusUnavailable

    bus = BusSettings(name="rs485-1", type="serial", device=str(tmp_path / "ttyUSB0"))
    m = MeterSettings(id="a", bus="rs485-1", protocol="modbus", profile="sdm120", unit_id=1)
    with pytest.raises(BusUnavailable) as info:
        async with open_bus(bus, [m]):
            pass
    assert str(info.value) == (
        f"bus rs485-1: serial device {tmp_path / 'ttyUSB0'} does not exist: is the USB-RS485"
        " adapter plugged in? (ls -l /dev/serial/by-id/ lists the adapters; put its path in bus.device)"
    )
