"""Meter replacement and register resets: a replaced meter bills exactly its
consumption on both registers, however late the replacement is declared; an
undeclared reset is never a negative charge and never silent."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.billing.rating import (
    AnomalyKind,
    MeterReplacement,
    MeterTrack,
    RatingResult,
    RegisterReading,
    ReplacementError,
    ResetNotice,
    TierState,
    track_reading,
    track_replacement,
)
from gateway.billing.tariff import TariffBook
from tests.gateway.billing._util import FLAT, TOU, book, ms, rr

H = 3_600_000
T0 = ms("2026-03-02T00:00")


def run(
    items: Sequence[RegisterReading | MeterReplacement], b: TariffBook | None = None
) -> tuple[list[RatingResult], MeterTrack, list[ResetNotice]]:
    bk = book(FLAT) if b is None else b
    track, tier = MeterTrack(), TierState()
    results: list[RatingResult] = []
    notices: list[ResetNotice] = []
    for it in items:
        if isinstance(it, MeterReplacement):
            step = track_replacement(track, it, bk, tier)
        else:
            step = track_reading(track, it, bk, tier)
        results += step.results
        track, tier = step.track, step.tier_state
        if step.reset is not None:
            notices.append(step.reset)
    return results, track, notices


def billed(results: list[RatingResult]) -> int:
    return sum(r.charge.ckwh for r in results if r.charge is not None)


def test_undeclared_reset_is_reported_and_billing_continues_on_the_new_register() -> None:
    items = [rr("a", "2026-03-02T10:00", "100.00"), rr("b", "2026-03-02T11:00", "101.00"),
             rr("c", "2026-03-02T13:00", "0.50"),  # new meter, nobody said so
             rr("d", "2026-03-02T14:00", "1.70"), rr("e", "2026-03-02T15:00", "2.00")]
    results, track, notices = run(items)
    # a -> b billed; c refused (backwards, no negative charge); c -> d, d -> e billed
    assert [(r.charge.start_reading_id, r.charge.end_reading_id) for r in results if r.charge] == [
        ("a", "b"), ("c", "d"), ("d", "e")]
    assert [a.kind for r in results for a in r.anomalies] == [AnomalyKind.REGISTER_BACKWARDS]
    assert billed(results) == 100 + 120 + 30
    (n,) = notices
    assert (n.last_good.reading_id, n.first_after.reading_id, n.confirmed_by.reading_id) == ("b", "c", "d")
    (span,) = track.held
    assert (span.last_good.reading_id, span.first_after.reading_id) == ("b", "c")
    # declared later: the held span is billed exactly (old 101.00 -> 101.80, new 0.10 -> 0.50)
    rep = MeterReplacement("x", "m1", ms("2026-03-02T12:00"), Decimal("101.80"), Decimal("0.10"))
    step = track_replacement(track, rep, book(FLAT), TierState())
    assert [r.charge.ckwh for r in step.results if r.charge] == [80, 40]
    assert step.track.held == () and step.track.baseline == track.baseline


def test_a_single_bad_low_reading_is_not_a_reset() -> None:
    items = [rr("a", "2026-03-02T10:00", "100.00"), rr("b", "2026-03-02T11:00", "0.40"),
             rr("c", "2026-03-02T12:00", "101.00")]
    results, track, notices = run(items)
    assert billed(results) == 100 and not notices and track.held == ()


def test_replacement_declared_before_the_new_register_is_confirmed() -> None:
    items: list[RegisterReading | MeterReplacement] = [rr("a", "2026-03-02T10:00", "100.00"), rr("b", "2026-03-02T13:00", "0.50"),
             MeterReplacement("x", "m1", ms("2026-03-02T12:00"), Decimal("100.60"), Decimal("0.00")),
             rr("c", "2026-03-02T14:00", "1.00")]
    results, track, notices = run(items)
    assert billed(results) == 60 + 50 + 50 and not notices and track.held == ()


@pytest.mark.parametrize(
    ("rep", "code"),
    [
        (MeterReplacement("x", "m1", ms("2026-03-02T12:00"), Decimal("99.00"), Decimal("0")),
         "old_final_below_billed"),
        (MeterReplacement("x", "m1", ms("2026-03-02T09:00"), Decimal("101.00"), Decimal("0")),
         "replacement_before_billed"),
    ],
)
def test_replacements_that_contradict_the_bill_are_refused(rep: MeterReplacement, code: str) -> None:
    _, track, _ = run([rr("a", "2026-03-02T10:00", "100.00")])
    with pytest.raises(ReplacementError) as exc:
        track_replacement(track, rep, book(FLAT), TierState())
    assert exc.value.code == code


@settings(max_examples=150, deadline=None)
@given(
    old=st.lists(st.integers(0, 500), min_size=1, max_size=6),
    new=st.lists(st.integers(0, 500), min_size=2, max_size=6),
    gap=st.integers(0, 300),
    new_start=st.integers(0, 3_000),
    declared=st.sampled_from(["before", "after_first", "late", "never"]),
    tou=st.booleans(),
)
def test_a_replaced_meter_bills_exactly_both_registers(
    old: list[int], new: list[int], gap: int, new_start: int, declared: str, tou: bool
) -> None:
    """Old register from 10000 ckwh, then exchanged (old final = last + gap), new register
    from ``new_start`` (staying below the old one, as a new meter does); the replacement
    declared before the new meter's readings, after its first, after all, or never."""
    t, reg = T0, 10_000
    items: list[RegisterReading | MeterReplacement] = [RegisterReading("o0", "m1", t, Decimal(reg) / 100)]
    for i, d in enumerate(old, 1):
        t += H
        reg += d
        items.append(RegisterReading(f"o{i}", "m1", t, Decimal(reg) / 100))
    old_first, old_final = 10_000, reg + gap
    t += H // 2
    rep = MeterReplacement("x", "m1", t, Decimal(old_final) / 100, Decimal(new_start) / 100)
    news: list[RegisterReading] = []
    nreg = new_start
    for i, d in enumerate(new):
        t += H
        nreg += d
        news.append(RegisterReading(f"n{i}", "m1", t, Decimal(nreg) / 100))
    where = {"before": 0, "after_first": 1, "late": len(news), "never": None}[declared]
    seq: list[RegisterReading | MeterReplacement] = list(items)
    seq += news[: where or 0]
    if where is not None:
        seq.append(rep)
    seq += news[where or 0 :]
    results, track, notices = run(seq, book(TOU) if tou else None)
    assert all(r.charge is None or all(ln.amount_micro >= 0 for ln in r.charge.lines) for r in results)
    total = billed(results)
    if where is not None:
        assert total == (old_final - old_first) + (nreg - new_start)
        assert track.held == ()
    elif notices:
        # confirmed reset: billed up to the old register's last reading and from the new
        # register's first reading; the rest is held, waiting for the declaration
        (span,) = track.held
        first_after = new_start + new[0]
        assert span.first_after.reading_id == "n0"
        assert total == (reg - old_first) + (nreg - first_after)
    else:
        raise AssertionError("two readings of the new register confirm a reset: an event must follow")
