"""Golden table: hand-computed charges, each with its derivation.

Units: energy in 0.01 kWh (ckwh), prices in 1e-4 yuan/kWh, money in
micro-yuan; amount = ckwh x price_e4 exactly (0.01 kWh x 0.0001 yuan = 1e-6 yuan).
All local times are Asia/Shanghai (UTC+8). 2026-03-02 is a Monday.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pytest

from gateway.billing.rating import (
    AnomalyKind,
    Apportioning,
    MeterReplacement,
    RegisterReading,
    TierState,
    rate_chain,
    rate_interval,
)
from gateway.billing.tariff import TariffBook
from tests.gateway.billing._util import (
    FLAT,
    FLAT_TIER,
    TIER_PRICES_MONTHLY,
    TOU,
    TOU_TIER,
    book,
    ms,
    rr,
)


@dataclass(frozen=True)
class Case:
    name: str
    tariffs: tuple[str, ...]
    prev: RegisterReading
    cur: RegisterReading
    tier: TierState
    ckwh_by_rate: dict[str, int]
    ckwh_by_tier: dict[int, int]
    amount_micro: int
    tier_after: TierState
    derivation: str
    apportioning: Apportioning | None = None


P2026 = ms("2026-01-01T00:00")  # annual period start for FLAT_TIER

CASES = [
    Case(
        "flat basic",
        (FLAT,),
        rr("a", "2026-03-02T10:00", "100.00"),
        rr("b", "2026-03-02T11:00", "101.23"),
        TierState(),
        {"flat": 123},
        {},
        688_800,
        TierState(),
        "1.23 kWh = 123 ckwh x 5600 = 688 800 micro-yuan = 0.6888 yuan",
    ),
    Case(
        "register truncated to 0.01 kWh before differencing",
        (FLAT,),
        rr("a", "2026-03-02T10:00", "100.009"),
        rr("b", "2026-03-02T11:00", "100.011"),
        TierState(),
        {"flat": 1},
        {},
        5_600,
        TierState(),
        "floor(10000.9)=10000, floor(10001.1)=10001 -> 1 ckwh x 5600 = 5600",
    ),
    Case(
        "zero consumption",
        (FLAT,),
        rr("a", "2026-03-02T10:00", "7.00"),
        rr("b", "2026-03-02T11:00", "7.00"),
        TierState(),
        {},
        {},
        0,
        TierState(),
        "no energy, no lines, amount 0",
    ),
    Case(
        "TOU boundary, no rate registers: split by time",
        (TOU,),
        rr("a", "2026-03-02T07:00", "10.00"),
        rr("b", "2026-03-02T09:00", "12.00"),
        TierState(),
        {"T4": 100, "T2": 100},
        {},
        1_100_000,
        TierState(),
        "07-08 valley 1h, 08-09 peak 1h: 200 ckwh -> 100/100; 100x3500 + 100x7500 = 1 100 000",
        Apportioning.TIME,
    ),
    Case(
        "TOU boundary, unequal times",
        (TOU,),
        rr("a", "2026-03-02T07:30", "10.00"),
        rr("b", "2026-03-02T08:10", "11.00"),
        TierState(),
        {"T4": 75, "T2": 25},
        {},
        450_000,
        TierState(),
        "30 min T4, 10 min T2: 100 ckwh x 30/40 = 75, x 10/40 = 25; 75x3500 + 25x7500 = 450 000",
    ),
    Case(
        "largest remainder: one ckwh over 1 + 2 minutes",
        (TOU,),
        rr("a", "2026-03-02T07:59", "10.00"),
        rr("b", "2026-03-02T08:02", "10.01"),
        TierState(),
        {"T2": 1},
        {},
        7_500,
        TierState(),
        "1 ckwh: shares 1x1/3 = 0 rem 1, 1x2/3 = 0 rem 2 -> the unit goes to the larger remainder (T2)",
    ),
    Case(
        "TOU boundary with rate registers: registers decide",
        (TOU,),
        rr("a", "2026-03-02T07:00", "70.00", t2="20.00", t4="50.00"),
        rr("b", "2026-03-02T09:00", "72.00", t2="21.60", t4="50.40"),
        TierState(),
        {"T4": 40, "T2": 160},
        {},
        1_340_000,
        TierState(),
        "T4 +0.40, T2 +1.60 (not 1.00/1.00 by time): 40x3500 + 160x7500 = 140 000 + 1 200 000",
        Apportioning.REGISTERS,
    ),
    Case(
        "rate registers one ckwh short of the total: residue to the largest rate",
        (TOU,),
        rr("a", "2026-03-02T07:00", "70.00", t2="20.00", t4="50.00"),
        rr("b", "2026-03-02T09:00", "72.01", t2="21.60", t4="50.40"),
        TierState(),
        {"T4": 40, "T2": 161},
        {},
        1_347_500,
        TierState(),
        "total 201 ckwh, rates 200: +1 to T2 (largest); 40x3500 + 161x7500 = 140 000 + 1 207 500",
    ),
    Case(
        "tier crossing inside one interval",
        (FLAT_TIER,),
        rr("a", "2026-03-02T10:00", "100.00"),
        rr("b", "2026-03-02T11:00", "101.00"),
        TierState(P2026, 950),
        {"flat": 100},
        {1: 50, 2: 50},
        525_000,
        TierState(P2026, 1050),
        "cum 9.50 + 1.00: 0.50 to reach 10.00 in tier 1 at 0.5000 (50x5000 = 250 000), "
        "0.50 in tier 2 at 0.5000+0.05 (50x5500 = 275 000)",
    ),
    Case(
        "usage landing exactly on a threshold stays in the lower tier",
        (FLAT_TIER,),
        rr("a", "2026-03-02T10:00", "100.00"),
        rr("b", "2026-03-02T11:00", "101.00"),
        TierState(P2026, 900),
        {"flat": 100},
        {1: 100},
        500_000,
        TierState(P2026, 1000),
        "cum 9.00 + 1.00 = 10.00 exactly: all tier 1, 100x5000",
    ),
    Case(
        "first unit above a threshold is in the upper tier",
        (FLAT_TIER,),
        rr("a", "2026-03-02T10:00", "100.00"),
        rr("b", "2026-03-02T11:00", "100.01"),
        TierState(P2026, 1000),
        {"flat": 1},
        {2: 1},
        5_500,
        TierState(P2026, 1001),
        "cum 10.00 + 0.01 -> 10.01 is in tier 2: 1x5500",
    ),
    Case(
        "two thresholds in one interval",
        (FLAT_TIER,),
        rr("a", "2026-03-02T10:00", "100.00"),
        rr("b", "2026-03-02T11:00", "110.02"),
        TierState(P2026, 999),
        {"flat": 1002},
        {1: 1, 2: 1000, 3: 1},
        5_513_000,
        TierState(P2026, 2001),
        "cum 9.99 + 10.02: 1 ckwh tier 1 (5000) + 1000 ckwh tier 2 (5 500 000) + 1 ckwh tier 3 (8000)",
    ),
    Case(
        "settlement (annual reset) inside the interval",
        (FLAT_TIER,),
        rr("a", "2026-12-31T23:00", "500.00"),
        rr("b", "2027-01-01T01:00", "502.00"),
        TierState(P2026, 1990),
        {"flat": 200},
        {2: 10, 3: 90, 1: 100},
        1_275_000,
        TierState(ms("2027-01-01T00:00"), 100),
        "cut at 2027-01-01 00:00; 1h/1h -> 100/100 ckwh. Before: cum 19.90 -> 10 ckwh tier 2 (55 000) "
        "+ 90 ckwh tier 3 (720 000); after reset: 100 ckwh tier 1 (500 000)",
    ),
    Case(
        "tier state from an older period is reset",
        (FLAT_TIER,),
        rr("a", "2027-03-02T10:00", "500.00"),
        rr("b", "2027-03-02T11:00", "501.00"),
        TierState(P2026, 4000),
        {"flat": 100},
        {1: 100},
        500_000,
        TierState(ms("2027-01-01T00:00"), 100),
        "state belongs to 2026; the interval is in the 2027 period: cumulative starts at 0",
    ),
    Case(
        "plain tier prices, monthly period settled on the 25th",
        (TIER_PRICES_MONTHLY,),
        rr("a", "2026-03-10T10:00", "100.00"),
        rr("b", "2026-03-10T11:00", "100.02"),
        TierState(ms("2026-02-25T00:00"), 17999),
        {"flat": 2},
        {1: 1, 2: 1},
        11_266,
        TierState(ms("2026-02-25T00:00"), 18001),
        "cum 179.99 + 0.02: 1 ckwh at 0.5383 + 1 ckwh at 0.5883 = 5383 + 5883",
    ),
    Case(
        "TOU + tier surcharge: the threshold falls in the valley part",
        (TOU_TIER,),
        rr("a", "2026-03-02T07:00", "0.00"),
        rr("b", "2026-03-02T09:00", "2.00"),
        TierState(ms("2026-03-01T00:00"), 950),
        {"T4": 100, "T2": 100},
        {1: 50, 2: 150},
        1_250_000,
        TierState(ms("2026-03-01T00:00"), 1150),
        "time split 100 ckwh T4 (07-08) then 100 ckwh T2 (08-09). cum 9.50, room 50 in tier 1: "
        "T4 50 tier 1 at 0.35 (175 000) + T4 50 tier 2 at 0.35+0.10 (225 000) + T2 100 tier 2 at "
        "0.75+0.10 (850 000) = 1 250 000",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Case) -> None:
    res = rate_interval(case.prev, case.cur, book(*case.tariffs), case.tier)
    assert res.anomalies == ()
    assert res.advance
    ch = res.charge
    assert ch is not None
    assert ch.ckwh_by_rate() == case.ckwh_by_rate, case.derivation
    assert ch.ckwh_by_tier() == case.ckwh_by_tier, case.derivation
    assert ch.amount_micro == case.amount_micro, case.derivation
    assert res.tier_state == case.tier_after, case.derivation
    assert ch.ckwh == sum(case.ckwh_by_rate.values())
    assert (ch.start_reading_id, ch.end_reading_id) == (case.prev.reading_id, case.cur.reading_id)
    if case.apportioning is not None:
        assert ch.apportioning is case.apportioning


V1 = FLAT.replace('price = "0.5600"', 'price = "0.5000"')
V2 = V1.replace("version = 1", "version = 2").replace(
    'effective_from = "2026-01-01"', 'effective_from = "2026-03-01T00:00:00+08:00"'
).replace('price = "0.5000"', 'price = "0.6000"')


def test_tariff_change_splits_the_interval_at_effective_from() -> None:
    # 23:00-01:00 across the v2 start: 1 h / 1 h -> 100 ckwh at 0.50 + 100 ckwh at 0.60
    res = rate_interval(
        rr("a", "2026-02-28T23:00", "0.00"), rr("b", "2026-03-01T01:00", "2.00"), book(V1, V2), TierState()
    )
    assert res.charge is not None
    lines = {(ln.tariff, ln.ckwh, ln.price_e4) for ln in res.charge.lines}
    assert lines == {("flat@1", 100, 5000), ("flat@2", 100, 6000)}
    assert res.charge.amount_micro == 500_000 + 600_000


def test_tariff_change_exactly_at_reading_time_uses_new_price_after() -> None:
    b = book(V1, V2)
    before = rate_interval(rr("a", "2026-02-28T23:00", "0"), rr("b", "2026-03-01T00:00", "1"), b, TierState())
    after = rate_interval(rr("b", "2026-03-01T00:00", "1"), rr("c", "2026-03-01T01:00", "2"), b, TierState())
    assert before.charge is not None and after.charge is not None
    assert before.charge.amount_micro == 100 * 5000
    assert after.charge.amount_micro == 100 * 6000


def test_register_backwards_is_an_anomaly_not_a_negative_charge() -> None:
    res = rate_interval(rr("a", "2026-03-02T10:00", "100.00"), rr("b", "2026-03-02T11:00", "99.99"),
                        book(FLAT), TierState(P2026, 5))
    assert res.charge is None and not res.advance
    assert [a.kind for a in res.anomalies] == [AnomalyKind.REGISTER_BACKWARDS]
    assert res.tier_state == TierState(P2026, 5)


@pytest.mark.parametrize(
    ("prev", "cur", "kind"),
    [
        (rr("a", "2026-03-02T10:00", "1"), rr("b", "2026-03-02T10:00", "2"), AnomalyKind.TIME_NOT_INCREASING),
        (rr("a", "2026-03-02T11:00", "1"), rr("b", "2026-03-02T10:00", "2"), AnomalyKind.TIME_NOT_INCREASING),
        (rr("a", "2026-03-02T10:00", "1"), rr("b", "2026-03-02T11:00", "2", meter="m2"), AnomalyKind.METER_MISMATCH),
    ],
)
def test_refused_intervals(prev: RegisterReading, cur: RegisterReading, kind: AnomalyKind) -> None:
    res = rate_interval(prev, cur, book(FLAT), TierState())
    assert res.charge is None and not res.advance
    assert [a.kind for a in res.anomalies] == [kind]


def test_gap_is_charged_and_reported() -> None:
    res = rate_interval(rr("a", "2026-03-02T10:00", "1.00"), rr("b", "2026-03-05T10:00", "31.00"),
                        book(FLAT), TierState(), max_gap_ms=3_600_000)
    assert res.charge is not None and res.charge.amount_micro == 3000 * 5600
    assert [a.kind for a in res.anomalies] == [AnomalyKind.GAP]


def test_inconsistent_rate_registers_fall_back_to_time() -> None:
    # energy in T1 although the schedule has no T1 at all -> split by time, reported
    prev = rr("a", "2026-03-02T07:00", "70.00", t1="0", t2="20.00", t4="50.00")
    cur = rr("b", "2026-03-02T09:00", "72.00", t1="1.00", t2="20.50", t4="50.50")
    res = rate_interval(prev, cur, book(TOU), TierState())
    assert res.charge is not None
    assert res.charge.ckwh_by_rate() == {"T4": 100, "T2": 100}
    assert [a.kind for a in res.anomalies] == [AnomalyKind.RATE_REGISTERS_INCONSISTENT]


def test_meter_replacement_chain() -> None:
    # old meter 100 -> 105 -> final 106 at exchange; new meter starts 0.50 -> 2.00
    rep = MeterReplacement("ex1", "m1", ms("2026-03-02T12:00"), Decimal("106.00"),
                           Decimal("0.50"))
    items = [
        rr("a", "2026-03-02T10:00", "100.00"),
        rr("b", "2026-03-02T11:00", "105.00"),
        rep,
        rr("c", "2026-03-02T13:00", "2.00"),
    ]
    results, _ = rate_chain(items, book(FLAT), TierState())
    charges = [r.charge for r in results]
    assert all(c is not None for c in charges)
    assert [c.ckwh for c in charges if c] == [500, 100, 150]
    assert [(c.start_reading_id, c.end_reading_id) for c in charges if c] == [
        ("a", "b"), ("b", "ex1/old"), ("ex1/new", "c")
    ]


def test_replacement_without_event_is_refused_then_resumes() -> None:
    # a new meter's low register without an explicit event: refused, baseline kept
    items = [rr("a", "2026-03-02T10:00", "100.00"), rr("b", "2026-03-02T11:00", "0.40"),
             rr("c", "2026-03-02T12:00", "101.00")]
    results, _ = rate_chain(items, book(FLAT), TierState())
    assert results[0].charge is None
    assert results[1].charge is not None and results[1].charge.ckwh == 100


def test_book_lookup_and_ordering() -> None:
    b = book(V2, V1)
    assert [t.version for t in b.versions] == [1, 2]
    assert b.at(ms("2026-02-28T23:59")).version == 1
    assert b.at(ms("2026-03-01T00:00")).version == 2
    assert isinstance(b, TariffBook)


def test_energy_before_the_first_tariff_version_is_reported_not_charged() -> None:
    b = book(FLAT)  # effective from 2026-01-01 00:00
    before = rate_interval(rr("a", "2025-12-31T22:00", "1"), rr("b", "2025-12-31T23:00", "2"), b, TierState())
    assert before.charge is None and before.advance  # the baseline moves on
    assert [a.kind for a in before.anomalies] == [AnomalyKind.NO_TARIFF]
    # 23:00-01:00 straddling the start, 2.00 kWh: 1 h / 1 h -> 100 ckwh unbilled, 100 charged
    res = rate_interval(rr("a", "2025-12-31T23:00", "1"), rr("b", "2026-01-01T01:00", "3"), b, TierState())
    assert res.charge is not None and res.charge.ckwh == 100
    assert res.charge.amount_micro == 100 * 5600
    assert res.charge.start_ms == ms("2026-01-01T00:00")
    assert (res.charge.start_reading_id, res.charge.end_reading_id) == ("a", "b")
    assert [a.kind for a in res.anomalies] == [AnomalyKind.NO_TARIFF] and "1.00 kWh before" in res.anomalies[0].detail


BERLIN_TOU = """
id = "berlin"
version = 1
effective_from = "2026-01-01"
timezone = "Europe/Berlin"
[prices]
T2 = "0.4000"
T4 = "0.2000"
[tou]
workday = [["00:00", "T4"], ["02:30", "T2"], ["03:00", "T4"]]
"""


def test_dst_skipped_hour_keeps_energy_and_one_rate_per_instant() -> None:
    # 2026-03-29 (Sunday) Europe/Berlin skips 02:00-03:00; the 02:30 period start does not exist
    b = book(BERLIN_TOU)
    prev = rr("a", "2026-03-29T00:00:00+01:00", "0")
    cur = rr("b", "2026-03-29T05:00:00+02:00", "4.00")  # 4 real hours
    res = rate_interval(prev, cur, b, TierState())
    assert res.charge is not None and res.charge.ckwh == 400
    assert sum(ln.ckwh for ln in res.charge.lines) == 400
    # 25 October: the repeated hour 02:00-03:00 happens twice; energy still conserved
    prev = rr("a", "2026-10-25T00:00:00+02:00", "0")
    cur = rr("b", "2026-10-25T05:00:00+01:00", "6.00")  # 6 real hours
    res = rate_interval(prev, cur, b, TierState())
    assert res.charge is not None and sum(ln.ckwh for ln in res.charge.lines) == 600
    assert set(res.charge.ckwh_by_rate()) <= {"T2", "T4"}
