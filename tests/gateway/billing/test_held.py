"""Fixed charges over time the gateway did not live through are held, not debited.

The pure split (:func:`gateway.billing.held.plan_fixed`) is checked as a
property against the plain scan; the store and the daemon's cache are checked
on real SQLite: held charges are recorded once, survive a restart without
being raised again, are released only when their period comes round again in
normal time, and are never debited once central settled them.
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.billing import ledger_store as ls
from gateway.billing.held import DAY_MS, OFF_BILLED_MS, REWIND_SLACK_MS, Stretch, holds, plan_fixed
from gateway.billing.ledger import EntryKind
from gateway.billing.ledger_cache import LedgerCache
from gateway.billing.rating import fixed_charges_due
from gateway.billing.tariff import TariffBook
from tests.gateway.billing._util import book, ms

DAILY_AND_MONTHLY = """
id = "minigrid"
version = 1
effective_from = "2026-01-01"
price = "0.9500"
[[fixed]]
name = "standing"
period = "daily"
amount = "0.2000"
[[fixed]]
name = "meter-rent"
period = "monthly"
amount = "5.0000"
"""
BOOK: TariffBook = book(DAILY_AND_MONTHLY)
T0 = ms("2026-03-01T12:00")
YEAR_MS = 365 * DAY_MS

stretch_st = st.builds(
    lambda a, n, off: Stretch(T0 + a, T0 + a + n, off),
    st.integers(0, 120 * DAY_MS),
    st.integers(1, 60 * DAY_MS),
    st.booleans(),
)


def test_short_off_time_is_billed_anything_else_held() -> None:
    assert not holds(Stretch(0, OFF_BILLED_MS, True))
    assert holds(Stretch(0, OFF_BILLED_MS + 1, True))
    assert holds(Stretch(0, 3_000, False))  # any jump while running


@settings(max_examples=200, deadline=None)
@given(
    a=st.integers(0, 90 * DAY_MS),
    n=st.integers(0, 90 * DAY_MS),
    stretches=st.lists(stretch_st, max_size=4),
)
def test_plan_splits_exactly_the_charges_due(a: int, n: int, stretches: list[Stretch]) -> None:
    """Debited and held together are exactly the charges due, each once; a held charge
    starts in a holding stretch, a debited one in none; without holding stretches the
    plan is the plain scan."""
    since, until = T0 + a, T0 + a + n
    due = fixed_charges_due("acc", BOOK, since, until)
    plan = plan_fixed("acc", BOOK, since, until, stretches)
    held = [c for g in plan.held for c in g.charges]
    assert sorted(c.charge_id for c in [*plan.apply, *held]) == sorted(c.charge_id for c in due)
    holding = [s for s in stretches if holds(s)]

    def inside(t: int) -> bool:
        return any(s.from_ms < t <= s.to_ms for s in holding)

    assert all(inside(c.period_start_ms) for c in held)
    assert not any(inside(c.period_start_ms) for c in plan.apply)
    assert not any(g.truncated for g in plan.held)
    if not holding:
        assert plan.apply == tuple(due) and plan.held == ()


def test_a_century_ahead_is_cut_short_and_says_so() -> None:
    plan = plan_fixed("acc", BOOK, T0, T0 + 100 * YEAR_MS, [Stretch(T0, T0 + 100 * YEAR_MS, False)])
    (g,) = plan.held
    assert g.truncated and 400 <= len(g.charges) < 420 and plan.apply == ()


async def _open(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path)
    await ls.init_schema(db)
    return db


async def _fixed_entries(db: aiosqlite.Connection) -> list[str]:
    return [e.entry_id for e in await ls.entries(db, "acc") if e.kind is EntryKind.FIXED]


async def test_a_year_jump_holds_every_charge_once_and_a_restart_does_not_raise_them(tmp_path: Path) -> None:
    db = await _open(tmp_path / "g.db")
    try:
        cache = LedgerCache()
        await cache.fixed_in(db, "acc", BOOK, T0)  # starting point
        jump = Stretch(T0 + 1000, T0 + 1000 + YEAR_MS, False)
        now = jump.to_ms + 1000
        out = await cache.fixed_in(db, "acc", BOOK, now, [jump])
        await cache.flush(db)
        await db.commit()
        assert out.applied == [] and len(out.held) == 1
        g = out.held[0]
        assert len(g.charges) == 365 + 12 and g.amount_micro == 365 * 200_000 + 12 * 5_000_000
        assert await _fixed_entries(db) == []
        assert (await ls.load_view(db, "acc")).balance_micro == 0  # nothing debited
        held = await ls.held_charges(db, "acc")
        assert len(held) == 377 and {h.cause for h in held} == {"clock_jump"}
        assert await ls.load_fixed_until(db, "acc") == now  # persisted with the hold
        # restart: a fresh cache, the stretch no longer known (or known again): nothing new
        for stretches in ([], [jump]):
            again = await LedgerCache().fixed_in(db, "acc", BOOK, now + 1000, stretches)
            assert again.applied == [] and again.held == []
        # normal time goes on: the next day's charge is debited as usual
        later = await LedgerCache().fixed_in(db, "acc", BOOK, now + DAY_MS, [jump])
        assert [r.applied for r in later.applied] == [True]
        assert len(await ls.held_charges(db, "acc")) == 377
    finally:
        await db.close()


async def test_off_time_is_billed_up_to_a_day_and_held_beyond(tmp_path: Path) -> None:
    db = await _open(tmp_path / "g.db")
    try:
        await ls.fixed_in(db, "acc", BOOK, T0)
        short = Stretch(T0 + 1000, T0 + 20 * 3_600_000, True)  # off through midnight
        out = await ls.fixed_in(db, "acc", BOOK, short.to_ms, [short])
        assert [r.applied for r in out.applied] == [True] and out.held == []
        long = Stretch(short.to_ms + 1000, short.to_ms + 1000 + 3 * DAY_MS, True)
        out = await ls.fixed_in(db, "acc", BOOK, long.to_ms, [short, long])
        assert out.applied == [] and [len(g.charges) for g in out.held] == [3]
        assert {h.cause for h in await ls.held_charges(db, "acc")} == {"off_time"}
    finally:
        await db.close()


async def test_time_moved_back_rescans_and_releases_held_charges_as_their_periods_come(
    tmp_path: Path,
) -> None:
    db = await _open(tmp_path / "g.db")
    try:
        cache = LedgerCache()
        await cache.fixed_in(db, "acc", BOOK, T0)
        jump = Stretch(T0 + 1000, T0 + 1000 + 10 * DAY_MS, False)
        out = await cache.fixed_in(db, "acc", BOOK, jump.to_ms, [jump])
        assert len(out.held[0].charges) == 10
        # a lag shorter than the slack (restart) is waited out, not rescanned
        assert (await cache.fixed_in(db, "acc", BOOK, jump.to_ms - REWIND_SLACK_MS + 1)).rewound is False
        # central moves time back to the truth: the scan restarts from there
        assert (await cache.fixed_in(db, "acc", BOOK, T0 + 2000, [jump])).rewound is True
        assert await ls.load_fixed_until(db, "acc") == T0 + 2000
        # (the clock clips the stretch at the corrected time: only (from, T0 + 2000] was stepped over)
        jump = Stretch(jump.from_ms, T0 + 2000, False)
        # central settled one of them in a snapshot: it is never debited
        first = out.held[0].charges[0].charge_id
        assert await ls.settle_held(db, "acc", [first, "topup:x"], T0 + 3000) == 1
        # normal time reaches the held periods one by one: debited, marked released
        out = await cache.fixed_in(db, "acc", BOOK, T0 + 2 * DAY_MS, [jump])
        assert out.held == [] and len(out.applied) == 1  # day 1 settled, day 2 debited
        states = {h.charge_id: h.state for h in await ls.held_charges(db, "acc", state=None)}
        assert states[first] == "settled" and list(states.values()).count("released") == 1
        assert len(await _fixed_entries(db)) == 1
    finally:
        await db.close()
