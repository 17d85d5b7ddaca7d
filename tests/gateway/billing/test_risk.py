from __future__ import annotations

from decimal import Decimal

from firmware_bridge.reading import Measurement, Quantity, Reading, TimeSource
from gateway.billing.risk import (
    RiskConfig,
    RiskKind,
    check_consumption_while_open,
    check_reading,
    check_sudden_drop,
    check_zero_consumption,
)
from tests.gateway.billing._util import rr

DAY = 86_400_000


def reading(t: int, kwh: str | None = None, relay_open: int | None = None, power: str | None = None,
            clock_s: int | None = None, source: TimeSource = TimeSource.SYSTEM_SYNCED) -> Reading:
    v: dict[Quantity, Measurement] = {}
    if kwh is not None:
        v[Quantity.ENERGY_IMPORT] = Measurement(Decimal(kwh))
    if relay_open is not None:
        v[Quantity.RELAY_OPEN] = Measurement(Decimal(relay_open))
    if power is not None:
        v[Quantity.POWER] = Measurement(Decimal(power))
    if clock_s is not None:
        v[Quantity.METER_CLOCK] = Measurement(Decimal(clock_s))
    return Reading("m1", t, v, source)


def test_backwards_drift_mismatch_from_one_reading_pair() -> None:
    t = 1_772_400_000_000
    prev = reading(t, "100.00", relay_open=0)
    cur = reading(t + 60_000, "99.50", relay_open=1, clock_s=t // 1000 + 60 + 301)
    found = check_reading(prev, cur, commanded_open=False, commanded_at_ms=t - 60_000)
    kinds = {e.kind for e in found}
    assert kinds == {RiskKind.REGISTER_BACKWARDS, RiskKind.CLOCK_DRIFT, RiskKind.RELAY_MISMATCH}
    drift = next(e for e in found if e.kind is RiskKind.CLOCK_DRIFT)
    assert drift.evidence["drift_s"] == "301"


def test_no_findings_for_a_normal_pair() -> None:
    t = 1_772_400_000_000
    prev = reading(t, "100.00", relay_open=0, clock_s=t // 1000)
    cur = reading(t + 60_000, "100.10", relay_open=0, clock_s=t // 1000 + 62)
    assert check_reading(prev, cur, commanded_open=False, commanded_at_ms=t - 60_000) == []


def test_clock_drift_needs_trusted_time_and_mismatch_waits_for_settle() -> None:
    t = 1_772_400_000_000
    cur = reading(t, "1", relay_open=1, clock_s=t // 1000 + 9999, source=TimeSource.SYSTEM)
    assert check_reading(None, cur, commanded_open=False, commanded_at_ms=t - 1000) == []


def test_consumption_while_open() -> None:
    t = 0
    assert check_consumption_while_open(reading(t, "5.00", 1), reading(t + DAY, "5.01", 1)) is None  # creep
    e = check_consumption_while_open(reading(t, "5.00", 1), reading(t + DAY, "5.20", 1, power="0.5"))
    assert e is not None and e.evidence["energy_kwh"] == "0.20" and e.evidence["power_kw"] == "0.5"
    assert check_consumption_while_open(reading(t, "5.00", 0), reading(t + DAY, "9.00", 1)) is None


def test_sudden_drop_against_own_history() -> None:
    history = [800] * 14
    assert check_sudden_drop("m1", [*history, 700, 650, 600], 0) is None
    e = check_sudden_drop("m1", [*history, 200, 150, 100], 0)
    assert e is not None and e.evidence["history_median_kwh_per_day"] == "8.00"
    assert check_sudden_drop("m1", [50] * 14 + [0, 0, 0], 0) is None  # tiny user: ignored
    assert check_sudden_drop("m1", [800] * 5, 0) is None  # not enough history


def test_zero_consumption_with_relay_closed() -> None:
    a = rr("a", "2026-03-01T00:00", "10.00")
    b = rr("b", "2026-03-04T00:00", "10.00")
    assert check_zero_consumption(a, b, relay_closed_throughout=True) is not None
    assert check_zero_consumption(a, b, relay_closed_throughout=False) is None
    assert check_zero_consumption(a, rr("b", "2026-03-03T23:00", "10.00"), True) is None
    assert check_zero_consumption(a, b, True, RiskConfig(zero_days=4)) is None


def test_daily_ckwh_buckets_by_local_day() -> None:
    from gateway.billing.risk import daily_ckwh
    from tests.gateway.billing._util import ms

    iv = [(ms("2026-03-01T12:00"), 100), (ms("2026-03-02T00:00"), 50),  # ends at midnight: 1 March
          (ms("2026-03-03T08:00"), 70), (ms("2026-03-04T09:00"), 5)]
    assert daily_ckwh(iv, "Asia/Shanghai", ms("2026-03-04T10:00")) == [150, 0, 70]
    assert daily_ckwh([], "Asia/Shanghai", 0) == []
