"""Ledger entry bodies at rest, on real SQLite files.

``billing_entry.body`` holds :meth:`Entry.body_json` deflated against the fixed
dictionary of :mod:`store_forward.compact` (a BLOB in the TEXT column); rows the
previous releases wrote hold the plain JSON as TEXT and stay so. Both read back
exactly; a body that does not decode stops the read with a :class:`LedgerCorrupt`
naming the entry, never a skipped entry (it is money).
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.billing import ledger_store as ls
from gateway.billing import retention
from gateway.billing.ledger import (
    Entry,
    EntryKind,
    adjustment_entry,
    debit_entry,
    fixed_entry,
    fold,
)
from gateway.billing.rating import (
    Apportioning,
    ChargeLine,
    FixedChargeDue,
    IntervalCharge,
    TierState,
    rate_interval,
)
from gateway.billing.reconcile import CentralSnapshot, snapshot_entry
from gateway.billing.topup import Authorization, Channel, Source, TopUp, credit_entry
from store_forward.compact import DEFLATED, CompactError
from tests.gateway.billing._util import FLAT, book, rr

Y = 1_000_000


def stored_body(db: Path, entry_id: str) -> Any:
    """The ``body`` column of an entry as SQLite holds it, read on a connection of its own."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        row = c.execute("SELECT body, typeof(body) FROM billing_entry WHERE entry_id = ?", (entry_id,)).fetchone()
    assert row is not None
    return row


def a_debit(hour: int = 10) -> Entry:
    r = rate_interval(
        rr("a", f"2026-03-02T{hour:02}:00", "0"), rr("b", f"2026-03-02T{hour + 1:02}:00", "1"), book(FLAT), TierState()
    )
    assert r.charge is not None
    return debit_entry("acc", r.charge)


async def test_an_appended_entry_is_stored_deflated_and_reads_back_the_same(
    tmp_path: Path, conn: aiosqlite.Connection
) -> None:
    e = a_debit()
    res = await ls.append(conn, e)
    await conn.commit()
    body, typ = stored_body(tmp_path / "billing.db", e.entry_id)
    assert typ == "blob" and isinstance(body, bytes)
    assert body[0] == DEFLATED
    assert len(body) < len(e.body_json()) // 2  # a debit's ~280 bytes of JSON, deflated
    got = await ls.get_entry(conn, e.entry_id)
    assert got is not None and got.same_content(e) and got.body_json() == e.body_json()
    assert got == res.entry
    assert [x.entry_id for x in await ls.entries(conn, "acc")] == [e.entry_id]
    # the same entry again is recognised as already there (its body compared decoded)
    again = await ls.append(conn, e)
    assert not again.applied and again.entry.same_content(e)
    assert (await ls.verify(conn, "acc")).balance_micro == e.amount_micro


async def test_rows_of_the_previous_form_read_back_and_appending_after_them_works(
    tmp_path: Path, conn: aiosqlite.Connection
) -> None:
    old = [
        replace(adjustment_entry("adj-1", "acc", 50 * Y, 1, "opening balance", "provisioning"), seq=1),
        replace(
            credit_entry(TopUp("sale-1", "acc", 1, 20 * Y, Channel.COUNTER, Source.MQTT, 2), 3, 0, False), seq=2
        ),
        replace(a_debit(10), seq=3),
    ]
    # as the previous release wrote them: the body column the plain JSON text
    await ls.open_account(conn, "acc")
    await conn.executemany(
        "INSERT INTO billing_entry (account, seq, entry_id, kind, amount_micro, time_ms, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(e.account, e.seq, e.entry_id, e.kind.value, e.amount_micro, e.time_ms, e.body_json().decode())
         for e in old],
    )  # fmt: skip
    await conn.execute(ls.SAVE_VIEW_SQL, ls.view_params(fold("acc", old)))
    await conn.commit()
    for e in old:
        assert stored_body(tmp_path / "billing.db", e.entry_id)[1] == "text"
        got = await ls.get_entry(conn, e.entry_id)
        assert got is not None and got.same_content(e) and got.seq == e.seq
    assert [x.body_json() for x in await ls.entries(conn, "acc")] == [e.body_json() for e in old]
    assert (await ls.verify(conn, "acc")).balance_micro == 70 * Y + old[2].amount_micro

    new = a_debit(12)
    res = await ls.append(conn, new)
    assert res.applied and res.entry.seq == 4
    assert not (await ls.append(conn, old[2])).applied  # an old row still counts as there
    await conn.commit()
    assert stored_body(tmp_path / "billing.db", new.entry_id)[1] == "blob"
    assert stored_body(tmp_path / "billing.db", old[2].entry_id)[1] == "text"  # old rows are left as they are
    everything = await ls.entries(conn, "acc")
    assert [x.entry_id for x in everything] == [*(e.entry_id for e in old), new.entry_id]
    assert all(a.same_content(b) for a, b in zip(everything, [*old, new], strict=True))
    assert (await ls.verify(conn, "acc")).balance_micro == 70 * Y + old[2].amount_micro + new.amount_micro


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) - 4], id="truncated"),
        pytest.param(lambda b: bytes([DEFLATED]) + b"\xff" * (len(b) - 1), id="garbled"),
        pytest.param(lambda b: bytes([0x02]) + b[1:], id="unknown-format"),
        pytest.param(lambda b: b + b"\x00", id="trailing-bytes"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
async def test_a_damaged_body_is_a_ledger_error_naming_the_entry(
    tmp_path: Path, conn: aiosqlite.Connection, damage: Any
) -> None:
    keep = await ls.append(conn, adjustment_entry("adj-1", "acc", 5 * Y, 1, "opening", "central"))
    e = a_debit()
    await ls.append(conn, e)
    await conn.commit()
    body, _ = stored_body(tmp_path / "billing.db", e.entry_id)
    await conn.execute("UPDATE billing_entry SET body = ? WHERE entry_id = ?", (damage(body), e.entry_id))
    await conn.commit()
    for read in (
        ls.get_entry(conn, e.entry_id),
        ls.entries(conn, "acc"),  # not a list without it
        ls.entries_between(conn, "acc", 0, 5),
        ls.verify(conn, "acc"),
    ):
        with pytest.raises(ls.LedgerCorrupt, match=f"ledger entry {e.entry_id}: its stored body") as exc:
            await read
        cause = exc.value.__cause__
        assert isinstance(cause, CompactError | ValueError)
        assert cause.__cause__ is None and (cause.__context__ is None or cause.__suppress_context__)
    assert exc.value.kind.value == "storage"
    got = await ls.get_entry(conn, keep.entry.entry_id)  # the other entries still read
    assert got is not None and got.same_content(keep.entry)


async def test_a_damaged_snapshot_body_stops_retention_with_the_entry_named(
    tmp_path: Path, conn: aiosqlite.Connection
) -> None:
    await ls.append(conn, adjustment_entry("adj-1", "acc", 5 * Y, 1, "opening", "central"))
    snap = await ls.apply_snapshot(conn, CentralSnapshot("s1", "acc", 1, 1, 5 * Y, 2))
    assert snap.entry is not None
    await conn.execute("UPDATE billing_entry SET body = x'01ffff' WHERE entry_id = ?", (snap.entry.entry_id,))
    await conn.commit()
    state = await retention.load_state(conn)
    with pytest.raises(ls.LedgerCorrupt, match=snap.entry.entry_id):
        await retention.prune_account_in(conn, "acc", state, 10**13, 10**13, limit=100)


def test_a_body_column_decodes_from_either_form() -> None:
    e = a_debit()
    assert ls.body_from_column(ls.body_column(e)) == ls.body_from_column(e.body_json().decode())
    assert ls.body_from_column(e.body_json()) == dict(e.body) | {"lines": [dict(x) for x in e.body["lines"]]}
    with pytest.raises(ls.LedgerCorrupt, match="ledger entry x: its stored body does not decode"):
        ls.body_from_column("[1]", "x")  # only a JSON object is a body
    with pytest.raises(ls.LedgerCorrupt, match="ledger entry x: its stored body does not decode"):
        ls.body_from_column('{"a": ', "x")


# --------------------------------------------------------------------------- property

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_:", min_size=1, max_size=24)
big = st.integers(-(2**62), 2**62)
times = st.integers(0, 2**52)
auths = st.none() | st.builds(Authorization, texts, texts, times)


@st.composite
def debits(draw: st.DrawFn, account: str) -> Entry:
    lines = draw(
        st.lists(
            st.builds(
                ChargeLine,
                texts,
                st.sampled_from(["flat", "T1", "T2", "T3", "T4"]) | texts,
                st.none() | st.integers(1, 9),
                st.none() | times,
                st.integers(0, 10**9),
                st.integers(0, 10**7),
                st.integers(0, 10**12),
            ),
            max_size=6,
        )
    )
    start = draw(times)
    charge = IntervalCharge(
        draw(texts), draw(ids), draw(ids), start, start + draw(st.integers(0, 10**9)),
        draw(st.integers(0, 10**9)), tuple(lines), draw(st.sampled_from(list(Apportioning))),
        TierState(), TierState(),
    )  # fmt: skip
    return debit_entry(account, charge)


def entries_of(account: str) -> st.SearchStrategy[Entry]:
    return st.one_of(
        debits(account),
        st.builds(
            credit_entry,
            st.builds(TopUp, ids, st.just(account), st.integers(0, 10**6), big, st.sampled_from(list(Channel)),
                      st.sampled_from(list(Source)), times, auths),
            times, big, st.booleans(),
        ),
        st.builds(
            fixed_entry,
            st.builds(FixedChargeDue, ids, st.just(account), texts, texts, st.sampled_from(["day", "month"]) | texts,
                      times, big),
        ),
        st.builds(adjustment_entry, ids, st.just(account), big, times, texts, texts),
        st.builds(
            snapshot_entry,
            st.builds(CentralSnapshot, ids, st.just(account), st.integers(0, 2**40), st.integers(0, 2**40), big,
                      times, st.frozensets(ids, max_size=8), st.integers(0, 10**6), st.none() | times,
                      st.none() | st.integers(0, 10**9), auths),
        ),
    )  # fmt: skip


async def _round_trip(db: Path, generated: list[Entry]) -> None:
    stored = [replace(e, seq=i + 1) for i, e in enumerate(generated)]
    async with aiosqlite.connect(db) as conn:
        await ls.init_schema(conn)
        await conn.executemany(ls.INSERT_ENTRY_SQL, [ls.entry_params(e) for e in stored])
        await conn.commit()
        back = await ls.entries(conn, "acc")
        assert len(back) == len(stored)
        for want, got in zip(stored, back, strict=True):
            assert got.same_content(want) and got.seq == want.seq
            assert got.body_json() == want.body_json()  # byte for byte: the entry's identity
            one = await ls.get_entry(conn, want.entry_id)
            assert one is not None and one.same_content(want)
        for (body,) in await conn.execute_fetchall("SELECT body FROM billing_entry"):
            assert isinstance(body, bytes)  # never plain text any more (plain JSON bytes if not shorter)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(entries_of("acc"), max_size=8, unique_by=lambda e: e.entry_id))
def test_every_kind_of_entry_round_trips_through_the_store_exactly(
    tmp_path_factory: pytest.TempPathFactory, generated: list[Entry]
) -> None:
    assert {e.kind for e in generated} <= set(EntryKind)
    asyncio.run(_round_trip(tmp_path_factory.mktemp("body") / "billing.db", generated))
