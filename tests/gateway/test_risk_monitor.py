"""Revenue-protection events from the daemon's risk monitor, on a real outbox."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from firmware_bridge.reading import Measurement, Quantity, Reading, TimeSource
from gateway.database import open_database
from gateway.risk_monitor import RiskMonitor
from store_forward.outbox import Outbox

DAY = 86_400_000
T0 = 1_790_000_000_000  # a Unix time in ms


def r(meter: str, t: int, kwh: str, *, relay_open: int | None = 0, power: str | None = None,
      clock_s: int | None = None, source: TimeSource = TimeSource.SYSTEM) -> Reading:
    values = {Quantity.ENERGY_IMPORT: Measurement(Decimal(kwh))}
    if relay_open is not None:
        values[Quantity.RELAY_OPEN] = Measurement(Decimal(relay_open))
    if power is not None:
        values[Quantity.POWER] = Measurement(Decimal(power))
    if clock_s is not None:
        values[Quantity.METER_CLOCK] = Measurement(Decimal(clock_s))
    return Reading(meter, t, values, time_source=source)


async def feed(ob: Outbox, mon: RiskMonitor, readings: list[Reading]) -> list[str]:
    kinds: list[str] = []
    for reading in readings:
        async with ob.transaction() as db:
            kinds += [e.kind.value for e in await mon.on_readings_in(db, ob, [reading], reading.time_ms)]
    return kinds


async def test_each_check_reports_once_with_evidence(tmp_path: Path) -> None:
    ob = await open_database(tmp_path / "gw.db")
    mon = RiskMonitor("Asia/Shanghai")
    try:
        # energy keeps rising while the relay says open: bypass; reported once per day
        assert await feed(ob, mon, [
            r("bypass", T0, "10.00", relay_open=1),
            r("bypass", T0 + 60_000, "10.50", relay_open=1, power="2.1"),
            r("bypass", T0 + 120_000, "11.00", relay_open=1, power="2.1"),
        ]) == ["consumption_while_open"]
        # the register goes backwards
        assert await feed(ob, mon, [r("back", T0, "50.00"), r("back", T0 + 60_000, "49.00")]) == [
            "register_backwards"
        ]
        # no energy for more than three days with the supply on
        zero = [r("idle", T0 + k * DAY // 2, "7.00") for k in range(8)]
        assert await feed(ob, mon, zero) == ["zero_consumption"]
        # meter clock ten minutes off against a synchronised gateway clock
        assert await feed(ob, mon, [
            r("clock", T0, "1.00", clock_s=T0 // 1000 + 600, source=TimeSource.SYSTEM_SYNCED)
        ]) == ["clock_drift"]
        # relay reported closed a minute after the gateway commanded it open
        mon.relay_commanded("stuck", True, T0)
        assert await feed(ob, mon, [r("stuck", T0 + 60_000, "1.00", relay_open=0)]) == ["relay_mismatch"]
        # 17 days of ~10 kWh/day, then ~1 kWh/day for three days: a sudden drop
        drop, kwh = [], Decimal(0)
        for day in range(21):
            drop.append(r("drop", T0 + day * DAY, str(kwh)))
            kwh += Decimal(10) if day < 17 else Decimal(1)
        assert await feed(ob, mon, drop) == ["sudden_drop"]
        # a normal meter raises nothing
        assert await feed(ob, mon, [r("ok", T0 + k * 60_000, str(k)) for k in range(5)]) == []
        st = await ob.stats()
        assert st.records == 6  # one event per finding, in the outbox for central
    finally:
        await ob.close()
