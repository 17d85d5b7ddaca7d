from __future__ import annotations

import tomllib
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.billing.money import (
    AmountError,
    price_to_e4,
    register_ckwh,
    report_yuan,
    yuan_to_micro,
)
from gateway.billing.rating import fixed_charges_due
from gateway.billing.tariff import (
    FLAT_RATE,
    NoTariffInForce,
    Tariff,
    TariffBook,
    TariffError,
    local_ms,
    to_local,
)
from gateway.billing.tariff_file import load_book, load_tariff, parse_tariff
from tests.gateway.billing._util import FLAT, ms, tariff

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "tariffs"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    t = load_tariff(path)
    assert t.version >= 1 and t.tariff_id


def test_cn_residential_example_day_types_and_seasons() -> None:
    t = load_tariff(EXAMPLES / "cn-residential-tou-v1.toml")
    assert t.rate_at(ms("2026-03-02T10:00")) == "T2"  # Monday, peak
    assert t.rate_at(ms("2026-03-07T10:00")) == "T3"  # Saturday, weekend plan
    assert t.rate_at(ms("2026-02-14T10:00")) == "T2"  # Saturday listed as make-up workday
    assert t.rate_at(ms("2026-02-16T10:00")) == "T3"  # Monday listed as holiday -> weekend plan
    assert t.rate_at(ms("2026-06-30T20:00")) == "T2"  # winter-spring season: no sharp
    assert t.rate_at(ms("2026-07-01T20:00")) == "T1"  # summer season: sharp 19-21
    assert t.rate_at(ms("2026-09-01T20:00")) == "T2"  # autumn
    assert t.rate_at(ms("2026-03-02T23:30")) == "T4"
    assert t.tier is not None and t.tier.thresholds_ckwh == (288000, 480000)
    assert t.tier.values_e4 == (0, 500, 3000)
    assert t.unit_price_e4("T2", 1) == 7500 + 500


def test_book_from_example_versions() -> None:
    b = load_book([EXAMPLES / "cn-residential-tou-v2.toml", EXAMPLES / "cn-residential-tou-v1.toml"])
    assert b.at(ms("2026-06-30T23:59")).version == 1
    assert b.at(ms("2026-07-01T00:00")).version == 2
    with pytest.raises(NoTariffInForce):
        b.at(ms("2025-12-31T23:59"))


def test_effective_from_forms() -> None:
    assert tariff(FLAT).effective_from_ms == ms("2026-01-01T00:00")
    t = tariff(FLAT.replace('"2026-01-01"', "2026-01-01T00:00:00Z"))
    assert t.effective_from_ms == ms("2026-01-01T00:00:00+00:00")
    t = tariff(FLAT.replace('"2026-01-01"', '"2026-01-01T06:30:00"'))  # local in the timezone
    assert t.effective_from_ms == ms("2026-01-01T06:30")


def problems(text: str) -> list[str]:
    with pytest.raises(TariffError) as ei:
        parse_tariff(tomllib.loads(text), "bad.toml", default_timezone="Asia/Shanghai")
    return ei.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (FLAT.replace('"0.5600"', '"0.56001"'), "bad.toml: price: price '0.56001' has more than 4 decimal places"),
        (FLAT.replace('"0.5600"', '"-1"'), "bad.toml: price: must be >= 0"),
        (FLAT.replace("version = 1", "version = 0"), "bad.toml: version: must be an integer >= 1"),
        (FLAT + "colour = 1\n", "bad.toml: colour: unknown key"),
        (FLAT.replace('effective_from = "2026-01-01"\n', ""), "bad.toml: effective_from: missing"),
        (FLAT + 'timezone = "Mars/Base"\n', "bad.toml: timezone: unknown time zone 'Mars/Base'"),
        (
            'id="x"\nversion=1\neffective_from="2026-01-01"\n[prices]\nT2="0.7"\n'
            '[tou]\nworkday=[["01:00","T2"]]\n',
            "bad.toml: tou.workday[0]: the first period must start at 00:00",
        ),
        (
            'id="x"\nversion=1\neffective_from="2026-01-01"\n[prices]\nT2="0.7"\n'
            '[tou]\nworkday=[["00:00","T2"],["08:00","T3"]]\n',
            "bad.toml: tou.workday[1]: rate 'T3' has no price",
        ),
        (
            'id="x"\nversion=1\neffective_from="2026-01-01"\n[prices]\nT2="0.7"\nT9="1"\n'
            '[tou]\nworkday=[["00:00","T2"]]\n',
            "bad.toml: prices.T9: unknown rate",
        ),
        (
            'id="x"\nversion=1\neffective_from="2026-01-01"\n[prices]\nT2="0.7"\n'
            '[tou]\nworkday=[["00:00","T2"],["25:00","T2"]]\n',
            "bad.toml: tou.workday[1]: must be a time of day",
        ),
        (
            FLAT + '[tier]\nperiod="annual"\nthresholds_kwh=[10, 5]\nsurcharges=["0","0.1","0.2"]\n',
            "bad.toml: tier.thresholds_kwh[1]: thresholds must be > 0 and strictly increasing",
        ),
        (
            FLAT + '[tier]\nperiod="annual"\nthresholds_kwh=[10]\nsurcharges=["0","0.1","0.2"]\n',
            "bad.toml: tier.surcharges: needs 2 values",
        ),
        (
            FLAT + '[tier]\nperiod="monthly"\nsettlement_day=31\nthresholds_kwh=[10]\nsurcharges=["0","0.1"]\n',
            "bad.toml: tier.settlement_day: must be an integer 1..28",
        ),
        (
            FLAT + '[tier]\npreset="cn-residential-annual"\nprices=["1","2","3"]\n',
            "bad.toml: tier.prices: tier prices replace rate prices",
        ),
        (FLAT + '[[fixed]]\nname="svc"\nperiod="weekly"\namount="1"\n', "bad.toml: fixed[0].period: must be"),
        (FLAT + '[calendar]\nholidays=["2026-13-01"]\n', "bad.toml: calendar.holidays[0]: not a date"),
        (
            'id="x"\nversion=1\neffective_from="2026-01-01"\n[tier]\nperiod="annual"\n'
            'thresholds_kwh=[10]\nprices=["0.5","0.6"]\n[tou]\nworkday=[["00:00","T2"]]\n',
            "bad.toml: tou: a time-of-use schedule needs [prices]",
        ),
    ],
)
def test_errors_name_file_key_and_problem(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_reported_together() -> None:
    found = problems('id = 3\nversion = "x"\nprice = "abc"\n')
    keys = {p.split(": ")[1] for p in found}
    assert {"id", "version", "effective_from", "price"} <= keys


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text("id = [", encoding="utf-8")
    with pytest.raises(TariffError, match=r"t\.toml: TOML syntax error"):
        load_tariff(f)
    with pytest.raises(TariffError, match="cannot read file"):
        load_tariff(tmp_path / "missing.toml")


def test_book_rejects_inconsistent_versions() -> None:
    a = tariff(FLAT)
    b = tariff(FLAT.replace("version = 1", "version = 2"), "b.toml")
    with pytest.raises(TariffError, match="same instant"):
        TariffBook((a, b))
    c = tariff(FLAT.replace('"2026-01-01"', '"2027-01-01"'), "c.toml")  # later but same version
    with pytest.raises(TariffError, match="versions must increase"):
        TariffBook((a, c))


def test_flat_rate_name() -> None:
    assert tariff(FLAT).rate_at(0) == FLAT_RATE


def test_fixed_charges_monthly_and_daily() -> None:
    b = load_book([EXAMPLES / "tiered-monthly.toml"])
    due = fixed_charges_due("acc", b, ms("2026-01-15T00:00"), ms("2026-03-10T00:00"))
    assert [d.period_start_ms for d in due] == [ms("2026-02-01T00:00"), ms("2026-03-01T00:00")]
    assert all(d.amount_micro == 2_500_000 for d in due)
    assert len({d.charge_id for d in due}) == 2
    nb = load_book([EXAMPLES / "minigrid-daily.toml"])
    due = fixed_charges_due("acc", nb, ms("2026-01-01T12:00:00+03:00"), ms("2026-01-04T00:00:00+03:00"))
    assert len(due) == 3 and sum(d.amount_micro for d in due) == 600_000
    # (since, until] - a period start exactly at `since` is not charged again
    again = fixed_charges_due("acc", nb, ms("2026-01-04T00:00:00+03:00"), ms("2026-01-04T12:00:00+03:00"))
    assert again == []


def test_money_rules() -> None:
    assert yuan_to_micro("1.234567") == 1_234_567
    assert yuan_to_micro(0.1) == 100_000  # float via repr, exact
    with pytest.raises(AmountError):
        yuan_to_micro("0.0000001")
    assert price_to_e4("0.5600") == 5600
    with pytest.raises(AmountError):
        price_to_e4(True)
    assert register_ckwh(Decimal("1206.429")) == 120642
    assert report_yuan(1_239_999) == Decimal("1.23")
    assert report_yuan(-1_239_999) == Decimal("-1.23")  # toward zero
    assert report_yuan(9_999) == Decimal("0.00")
    assert report_yuan(10_000) == Decimal("0.01")


# -- what a tariff remembers (period starts of a day, settlements, the last tier period)
# is what it computes afresh, whatever the order of the questions

def _fresh_period_start(t: Tariff, t_ms: int) -> int:
    return t._period_start(t_ms)


def _fresh_rate_boundaries(t: Tariff, t0: int, t1: int) -> list[int]:
    """Tariff.rate_boundaries as it was before it remembered anything."""
    if t.tou is None:
        return []
    out: list[int] = []
    d = to_local(t.tz, t0).date()
    last = to_local(t.tz, t1).date()
    while d <= last:
        for m in t.tou.plan_for(d).starts:
            x = local_ms(t.tz, d, m // 60, m % 60)
            if t0 < x < t1:
                out.append(x)
        d += timedelta(days=1)
    return sorted(set(out))


def _fresh_settlement_boundaries(t: Tariff, t0: int, t1: int) -> list[int]:
    out: list[int] = []
    s = t._period_start(t0)
    while (s := t._next_settlement(s)) < t1:
        out.append(s)
    return out


def _variants() -> list[Tariff]:
    base = [load_tariff(EXAMPLES / "cn-residential-tou-v1.toml"), load_tariff(EXAMPLES / "tiered-monthly.toml")]
    out = []
    for t in base:
        assert t.tier is not None
        for tz in ("Asia/Shanghai", "Europe/Berlin", "America/Santiago", "Australia/Lord_Howe"):
            for tier in (t.tier, replace(t.tier, settlement_day=28, settlement_hour=2)):
                out.append(replace(t, tz=ZoneInfo(tz), tier=tier))
    return out


VARIANTS = _variants()
_T_START = ms("2025-12-20T00:00")


@settings(max_examples=300, deadline=None)
@given(
    i=st.integers(0, len(VARIANTS) - 1),
    moves=st.lists(
        st.tuples(
            st.one_of(st.integers(-3_600_000, 3_600_000), st.integers(-400 * 86_400_000, 400 * 86_400_000)),
            st.one_of(st.integers(1, 5_000), st.integers(1, 40 * 86_400_000)),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_what_a_tariff_remembers_is_what_it_computes_afresh(i: int, moves: list[tuple[int, int]]) -> None:
    t = replace(VARIANTS[i])  # a copy that remembers nothing yet
    t0 = _T_START
    for jump, length in moves:
        t0 += jump
        t1 = t0 + length
        assert t.rate_boundaries(t0, t1) == _fresh_rate_boundaries(t, t0, t1)
        assert t.tier_period_start(t0) == _fresh_period_start(t, t0)
        assert t.tier_period_start(t1) == _fresh_period_start(t, t1)
        assert t.settlement_boundaries(t0, t1) == _fresh_settlement_boundaries(t, t0, t1)
        s = _fresh_period_start(t, t0)
        n = t._next_settlement(s)
        assert t.next_settlement(s) == n
        for edge in (s - 1, s, n - 1, n):  # just before, at the period's ends
            assert t.tier_period_start(edge) == _fresh_period_start(t, edge)
        t0 = t1
