"""Revenue-protection checks (pure): each finding is a :class:`RiskEvent` with evidence.

* ``register_backwards`` — the import register decreased;
* ``sudden_drop`` — recent daily consumption far below the meter's own history;
* ``zero_consumption`` — no energy for days although the relay was closed;
* ``consumption_while_open`` — energy or power while the relay reports open
  (bypass or a welded/failed relay);
* ``clock_drift`` — the meter's clock differs from trusted gateway time;
* ``relay_mismatch`` — the relay state differs from the last command.

The checks only report; deciding what to do (alarm, ticket, central) is the
caller's. Thresholds are in :class:`RiskConfig`.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from firmware_bridge.reading import Quantity, Reading, TimeSource
from gateway.billing.money import ckwh_to_kwh, register_ckwh
from gateway.billing.rating import RegisterReading


class RiskKind(enum.StrEnum):
    REGISTER_BACKWARDS = "register_backwards"
    SUDDEN_DROP = "sudden_drop"
    ZERO_CONSUMPTION = "zero_consumption"
    CONSUMPTION_WHILE_OPEN = "consumption_while_open"
    CLOCK_DRIFT = "clock_drift"
    RELAY_MISMATCH = "relay_mismatch"


@dataclass(frozen=True)
class RiskEvent:
    kind: RiskKind
    meter_id: str
    time_ms: int
    evidence: Mapping[str, str]


@dataclass(frozen=True)
class RiskConfig:
    drop_ratio: Decimal = Decimal("0.3")  # recent mean below this share of the history median
    drop_recent_days: int = 3
    drop_history_days: int = 14
    drop_min_history_ckwh: int = 100  # ignore meters using under 1 kWh/day
    zero_days: int = 3
    open_tolerance_ckwh: int = 1  # register creep allowed while open
    open_power_kw: Decimal = Decimal("0.010")
    clock_drift_s: int = 300
    relay_settle_ms: int = 30_000  # after a command, before a mismatch counts


def check_register_backwards(prev: RegisterReading, cur: RegisterReading) -> RiskEvent | None:
    if register_ckwh(cur.import_kwh) >= register_ckwh(prev.import_kwh):
        return None
    return RiskEvent(
        RiskKind.REGISTER_BACKWARDS,
        cur.meter_id,
        cur.time_ms,
        {
            "prev_reading": prev.reading_id,
            "prev_kwh": str(prev.import_kwh),
            "reading": cur.reading_id,
            "kwh": str(cur.import_kwh),
        },
    )


def check_sudden_drop(
    meter_id: str, daily_ckwh: Sequence[int], now_ms: int, cfg: RiskConfig = RiskConfig()
) -> RiskEvent | None:
    """``daily_ckwh``: complete days, oldest first. Compares the mean of the last
    ``drop_recent_days`` with the median of the ``drop_history_days`` before them."""
    need = cfg.drop_recent_days + cfg.drop_history_days
    if len(daily_ckwh) < need:
        return None
    days = list(daily_ckwh[-need:])
    history, recent = days[: cfg.drop_history_days], days[cfg.drop_history_days :]
    median = Decimal(statistics.median(history))
    if median < cfg.drop_min_history_ckwh:
        return None
    mean = Decimal(sum(recent)) / len(recent)
    if mean >= median * cfg.drop_ratio:
        return None
    return RiskEvent(
        RiskKind.SUDDEN_DROP,
        meter_id,
        now_ms,
        {
            "recent_mean_kwh_per_day": str((mean / 100).quantize(Decimal("0.01"))),
            "history_median_kwh_per_day": str((median / 100).quantize(Decimal("0.01"))),
            "ratio_limit": str(cfg.drop_ratio),
            "recent_days": str(cfg.drop_recent_days),
            "history_days": str(cfg.drop_history_days),
        },
    )


def check_zero_consumption(
    first: RegisterReading, last: RegisterReading, relay_closed_throughout: bool, cfg: RiskConfig = RiskConfig()
) -> RiskEvent | None:
    """No energy between two readings at least ``zero_days`` apart while supply was on."""
    span = last.time_ms - first.time_ms
    if not relay_closed_throughout or span < cfg.zero_days * 86_400_000:
        return None
    if register_ckwh(last.import_kwh) != register_ckwh(first.import_kwh):
        return None
    return RiskEvent(
        RiskKind.ZERO_CONSUMPTION,
        last.meter_id,
        last.time_ms,
        {
            "from_reading": first.reading_id,
            "to_reading": last.reading_id,
            "kwh": str(last.import_kwh),
            "days": str(Decimal(span) / 86_400_000),
        },
    )


def check_consumption_while_open(prev: Reading, cur: Reading, cfg: RiskConfig = RiskConfig()) -> RiskEvent | None:
    """Energy registered, or power measured, while the relay reported open at both readings."""
    if prev.good(Quantity.RELAY_OPEN) != 1 or cur.good(Quantity.RELAY_OPEN) != 1:
        return None
    evidence: dict[str, str] = {}
    e0, e1 = prev.good(Quantity.ENERGY_IMPORT), cur.good(Quantity.ENERGY_IMPORT)
    if e0 is not None and e1 is not None:
        delta = register_ckwh(e1) - register_ckwh(e0)
        if delta > cfg.open_tolerance_ckwh:
            evidence["energy_kwh"] = str(ckwh_to_kwh(delta))
    p = cur.good(Quantity.POWER)
    if p is not None and abs(p) > cfg.open_power_kw:
        evidence["power_kw"] = str(p)
    if not evidence:
        return None
    evidence["from_ms"] = str(prev.time_ms)
    evidence["to_ms"] = str(cur.time_ms)
    return RiskEvent(RiskKind.CONSUMPTION_WHILE_OPEN, cur.meter_id, cur.time_ms, evidence)


def check_clock_drift(reading: Reading, cfg: RiskConfig = RiskConfig()) -> RiskEvent | None:
    """Only against a trusted gateway time (central sync or NTP-synchronised)."""
    if reading.time_source not in (TimeSource.CENTRAL, TimeSource.SYSTEM_SYNCED):
        return None
    mc = reading.good(Quantity.METER_CLOCK)
    if mc is None:
        return None
    drift = mc - Decimal(reading.time_ms) / 1000
    if abs(drift) <= cfg.clock_drift_s:
        return None
    return RiskEvent(
        RiskKind.CLOCK_DRIFT,
        reading.meter_id,
        reading.time_ms,
        {"meter_clock_s": str(mc), "gateway_time_ms": str(reading.time_ms), "drift_s": str(drift)},
    )


def check_relay_mismatch(
    reading: Reading, commanded_open: bool | None, commanded_at_ms: int | None, cfg: RiskConfig = RiskConfig()
) -> RiskEvent | None:
    if commanded_open is None or commanded_at_ms is None:
        return None
    reported = reading.good(Quantity.RELAY_OPEN)
    if reported is None or reading.time_ms - commanded_at_ms < cfg.relay_settle_ms:
        return None
    if (reported == 1) == commanded_open:
        return None
    return RiskEvent(
        RiskKind.RELAY_MISMATCH,
        reading.meter_id,
        reading.time_ms,
        {
            "commanded": "open" if commanded_open else "closed",
            "commanded_at_ms": str(commanded_at_ms),
            "reported": "open" if reported == 1 else "closed",
        },
    )


def check_reading(
    prev: Reading | None,
    cur: Reading,
    *,
    commanded_open: bool | None = None,
    commanded_at_ms: int | None = None,
    cfg: RiskConfig = RiskConfig(),
) -> list[RiskEvent]:
    """The per-reading checks (history-based ones are called separately)."""
    found: list[RiskEvent | None] = [
        check_clock_drift(cur, cfg),
        check_relay_mismatch(cur, commanded_open, commanded_at_ms, cfg),
    ]
    if prev is not None:
        found.append(check_consumption_while_open(prev, cur, cfg))
        a = RegisterReading.from_reading(prev, "prev")
        b = RegisterReading.from_reading(cur, "cur")
        if a is not None and b is not None:
            found.append(check_register_backwards(a, b))
    return [f for f in found if f is not None]



def daily_ckwh(intervals: Sequence[tuple[int, int]], tz_name: str, until_ms: int) -> list[int]:
    """Energy per complete local day, oldest first, from (end_ms, ckwh) of rated intervals
    (e.g. the debits of a meter), for :func:`check_sudden_drop`. An interval is counted on
    the local day its last millisecond falls in; the day containing ``until_ms`` is
    incomplete and left out; days without intervals count as 0."""
    tz = ZoneInfo(tz_name)
    per_day: dict[date, int] = {}
    for end_ms, ck in intervals:
        d = datetime.fromtimestamp((end_ms - 1) / 1000, tz=tz).date()
        per_day[d] = per_day.get(d, 0) + ck
    if not per_day:
        return []
    today = datetime.fromtimestamp(until_ms / 1000, tz=tz).date()
    out: list[int] = []
    d = min(per_day)
    while d < today:
        out.append(per_day.get(d, 0))
        d += timedelta(days=1)
    return out
