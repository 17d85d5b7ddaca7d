"""Retention on the gateway's real database: the real Prepaid shell, outbox, acks and
ledger store. Entries leave only once central acknowledged them and they are old;
verification, top-up de-duplication and snapshots keep working from the fold base."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.billing import ledger_store as ls
from gateway.billing import retention
from gateway.billing.tariff_file import load_book
from gateway.commands.bodies import CommandRefused
from gateway.database import open_database
from gateway.prepaid import Prepaid
from gateway.status_cli import gather_status
from store_forward.outbox import Outbox
from store_forward.records import RecordClass, RecordKind
from store_forward.storage_policy import EvictionPlan
from tests.gateway.test_prepaid_shell import T0, open_shell, rate
from tests.harness.walcommits import commits_since, log_mark

DAY = 86_400_000
MINIGRID = Path(__file__).resolve().parents[3] / "examples" / "tariffs" / "minigrid-daily.toml"
ACC = "acct-001"
NOW = T0 + 10 * DAY  # the story below is 10 days old
SALE = {"account": ACC, "amount_micro": 2_000_000, "purchase_counter": 1, "payment_channel": "counter"}


async def story(prepaid: Prepaid, outbox: Outbox, debits: int = 20) -> None:
    """An opening balance, ``debits`` debits, a top-up and 5 debits more."""
    await rate(prepaid, outbox, "100.0", T0 + 1000)  # baseline
    for i in range(1, debits + 1):
        await rate(prepaid, outbox, f"{100 + i / 10:.1f}", T0 + 1000 + i * 1000)
    async with outbox.transaction() as db:
        res = await prepaid.apply_topup_in(db, SALE, command_id="sale-1", channel="mqtt", now_ms=T0 + 60_000)
    assert res["status"] == "applied"
    for i in range(debits + 1, debits + 6):
        await rate(prepaid, outbox, f"{100 + i / 10:.1f}", T0 + 100_000 + i * 1000)


async def ack_all(outbox: Outbox) -> int:
    seen: list[int] = []
    n = 0
    while (b := await outbox.next_batch(0, exclude=seen, max_records=10_000)) is not None:
        seen.append(b.seq)
        n += await outbox.ack(b.seq)
    return n


async def kinds(outbox: Outbox) -> dict[str, int]:
    async with outbox.transaction() as db, db.execute(
        "SELECT kind, count(*) FROM billing_entry GROUP BY kind"
    ) as cur:
        return {str(k): int(n) for k, n in await cur.fetchall()}


async def view_and_verify(outbox: Outbox) -> tuple[int, int]:
    async with outbox.transaction() as db:
        v = await ls.verify(db, ACC)
        return v.balance_micro, await ls.base_seq(db, ACC)


async def test_only_acknowledged_old_debits_go_in_bounded_transactions(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    try:
        await story(prepaid, outbox)
        before = await kinds(outbox)
        assert before == {"adjustment": 1, "debit": 25, "credit": 1}
        balance, _ = await view_and_verify(outbox)
        # nothing acknowledged: every charge record still waits in the outbox
        first = await retention.run_pass(outbox.transaction, 7, NOW, batch=4)
        assert first.pruned == 0 and await kinds(outbox) == before
        # acknowledged, but not old enough
        assert await ack_all(outbox) > 0
        young = await retention.run_pass(outbox.transaction, 30, NOW, batch=4)
        assert young.pruned == 0 and young.state.acked_rowid > 0 and await kinds(outbox) == before
        # acknowledged and old: in transactions of at most 4 entries; the newest entry stays
        done = await retention.run_pass(outbox.transaction, 7, NOW, batch=4)
        assert done.pruned == 24 and done.transactions >= 6
        assert await kinds(outbox) == {"adjustment": 1, "debit": 1, "credit": 1}
        assert await view_and_verify(outbox) == (balance, 26)
        assert (await retention.run_pass(outbox.transaction, 7, NOW)).pruned == 0
        # the same sale again is still recognised by its entry id
        async with outbox.transaction() as db:
            again = await prepaid.apply_topup_in(db, SALE, command_id="sale-1", channel="mqtt", now_ms=NOW)
        assert again["status"] == "duplicate"
    finally:
        await outbox.close()
    status = await gather_status(tmp_path / "gw.db", NOW)  # edgegw status --json
    assert status["ledger"]["entries_pruned"] == 24 and status["ledger"]["entries"] == 3
    assert status["ledger"]["bases"] == [
        {"account": ACC, "base_seq": 26, "pruned": 24, "pruned_until_ms": T0 + 124_000,  # the 24th debit
         "base_age_s": (NOW - (T0 + 124_000)) // 1000}
    ]
    prepaid, outbox = await open_shell(tmp_path)  # start_in verifies every ledger
    try:
        assert await view_and_verify(outbox) == (balance, 26)
        await rate(prepaid, outbox, "102.6", NOW)  # billing goes on from the stored view
        assert (await view_and_verify(outbox))[0] == balance - 56_000
    finally:
        await outbox.close()


async def damage(outbox: Outbox, record_id: int) -> None:
    """The record's sealed body no longer opens (a flipped bit on the card)."""
    async with outbox.transaction() as db:
        await db.execute("UPDATE outbox SET body = zeroblob(40) WHERE id = ?", (record_id,))


async def one(outbox: Outbox, sql: str, args: tuple[Any, ...] = ()) -> Any:
    async with outbox.transaction() as db, db.execute(sql, args) as cur:
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def last_charge(outbox: Outbox) -> int:
    return int(await one(outbox, "SELECT max(id) FROM outbox WHERE kind = 'charge'"))


async def top_rowid(outbox: Outbox) -> int:
    return int(await one(outbox, "SELECT max(rowid) FROM billing_entry"))


async def rowids(outbox: Outbox, upto: int) -> list[int]:
    async with outbox.transaction() as db, db.execute(
        "SELECT rowid FROM billing_entry WHERE rowid <= ? ORDER BY rowid", (upto,)
    ) as cur:
        return [int(r[0]) for r in await cur.fetchall()]


async def more_debits(prepaid: Prepaid, outbox: Outbox, first: int, n: int = 3) -> None:
    """``n`` debits more, the register going on from reading ``first`` of the story."""
    for i in range(first, first + n):
        await rate(prepaid, outbox, f"{100 + i / 10:.1f}", T0 + 200_000 + i * 1000)


async def acknowledged_and_pruned(prepaid: Prepaid, outbox: Outbox, first: int) -> retention.PassResult:
    """Three debits more from reading ``first``, a pass that marks them, their charge
    records acknowledged: the pass after that."""
    await more_debits(prepaid, outbox, first)
    await retention.run_pass(outbox.transaction, 7, NOW)
    await ack_all(outbox)
    return await retention.run_pass(outbox.transaction, 7, NOW)


async def story_with_a_damaged_charge(prepaid: Prepaid, outbox: Outbox) -> int:
    """The story with six debits and a pass that marks them; then the newest charge
    record no longer opens, and acknowledging the rest sets it aside as damaged.
    Returns its record id."""
    await story(prepaid, outbox, debits=6)
    await retention.run_pass(outbox.transaction, 7, NOW)  # the mark
    rid = await last_charge(outbox)
    await damage(outbox, rid)
    await ack_all(outbox)
    return rid


async def damaged_seen(outbox: Outbox) -> list[tuple[int, int]]:
    async with outbox.transaction() as db, db.execute(
        "SELECT record_id, hold_rowid FROM billing_damaged_seen ORDER BY record_id"
    ) as cur:
        return [(int(a), int(b)) for a, b in await cur.fetchall()]


async def test_a_record_set_aside_as_damaged_keeps_the_entries_existing_then(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    try:
        rid = await story_with_a_damaged_charge(prepaid, outbox)
        async with outbox.transaction() as db, db.execute("SELECT count(*) FROM damaged WHERE cls = 1") as cur:
            assert (await cur.fetchone()) == (1,)
        before = await kinds(outbox)
        top = await top_rowid(outbox)
        existing = await rowids(outbox, top)
        for _ in range(3):
            p = await retention.run_pass(outbox.transaction, 7, NOW)
            assert p.pruned == 0 and p.state.hold_rowid == top
        assert await kinds(outbox) == before
        assert await damaged_seen(outbox) == [(rid, top)]
        # entries written after that are pruned as usual once acknowledged and old:
        # the damaged record no longer holds up the marks
        later = await acknowledged_and_pruned(prepaid, outbox, 12)
        assert later.pruned == 2 and later.state.hold_rowid == top  # 3 new debits, the newest stays
        assert await rowids(outbox, top) == existing  # every entry of that moment is still there
        assert (await kinds(outbox))["debit"] == before["debit"] + 1
        await view_and_verify(outbox)
    finally:
        await outbox.close()


async def test_a_restart_between_the_damage_and_the_next_pass_keeps_the_accounting(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    try:
        rid = await story_with_a_damaged_charge(prepaid, outbox)  # set aside as damaged; no retention pass before the restart
        top = await top_rowid(outbox)
        existing = await rowids(outbox, top)
    finally:
        await outbox.close()
    prepaid, outbox = await open_shell(tmp_path)
    try:
        p = await retention.run_pass(outbox.transaction, 7, NOW)
        assert p.pruned == 0 and p.state.hold_rowid == top and p.state.marks == 1
        assert await damaged_seen(outbox) == [(rid, top)]
        await more_debits(prepaid, outbox, 12)
    finally:
        await outbox.close()
    # after the restart the damaged record is still accounted for: it neither holds
    # up the marks nor holds the entries written since
    prepaid, outbox = await open_shell(tmp_path)
    try:
        await retention.run_pass(outbox.transaction, 7, NOW)
        await ack_all(outbox)
    finally:
        await outbox.close()
    prepaid, outbox = await open_shell(tmp_path)
    try:
        later = await retention.run_pass(outbox.transaction, 7, NOW)
        assert later.pruned == 2 and later.state.hold_rowid == top
        assert await rowids(outbox, top) == existing
        assert await damaged_seen(outbox) == [(rid, top)]
        await view_and_verify(outbox)
    finally:
        await outbox.close()


async def test_two_damaged_records_at_different_times_each_keep_what_existed_then(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    try:
        first = await story_with_a_damaged_charge(prepaid, outbox)
        top1 = await top_rowid(outbox)
        assert (await retention.run_pass(outbox.transaction, 7, NOW)).state.hold_rowid == top1
        # three debits more, acknowledged: two go (the newest entry stays)
        p = await acknowledged_and_pruned(prepaid, outbox, 12)
        assert p.pruned == 2 and p.state.hold_rowid == top1
        # three more; the charge record of the middle one is damaged before it is sent
        await more_debits(prepaid, outbox, 15)
        await retention.run_pass(outbox.transaction, 7, NOW)
        middle = int(await one(outbox, "SELECT id FROM outbox WHERE kind = 'charge' ORDER BY id LIMIT 1 OFFSET 1"))
        await damage(outbox, middle)
        await ack_all(outbox)
        top2 = await top_rowid(outbox)
        existing = await rowids(outbox, top2)
        p = await retention.run_pass(outbox.transaction, 7, NOW)
        assert p.pruned == 0 and p.state.hold_rowid == top2 > top1
        assert await damaged_seen(outbox) == [(first, top1), (middle, top2)]
        # what came after the second one goes as usual
        p = await acknowledged_and_pruned(prepaid, outbox, 18)
        assert p.pruned == 2 and p.state.hold_rowid == top2
        assert await rowids(outbox, top2) == existing
        await view_and_verify(outbox)
    finally:
        await outbox.close()


async def test_a_record_with_a_lower_id_set_aside_later_holds_what_exists_then(tmp_path: Path) -> None:
    """Records are set aside out of id order: one in a batch numbered earlier (and not
    acknowledged) is opened again when that batch is sent again."""
    prepaid, outbox = await open_shell(tmp_path)
    try:
        await story(prepaid, outbox, debits=6)
        await ack_all(outbox)
        await more_debits(prepaid, outbox, 12)
        await retention.run_pass(outbox.transaction, 7, NOW)
        numbered: list[int] = []
        held_back = None  # a batch with charge records, sent but not acknowledged
        while (b := await outbox.next_batch(0, exclude=numbered, max_records=10_000)) is not None:
            numbered.append(b.seq)
            if held_back is None and any(r.kind == "charge" for r in b.records):
                held_back = b
            else:
                await outbox.ack(b.seq)
        assert held_back is not None
        low = min(r.id for r in held_back.records if r.kind == "charge")
        await more_debits(prepaid, outbox, 15)
        high = await last_charge(outbox)
        await damage(outbox, high)
        while (b := await outbox.next_batch(0, exclude=[held_back.seq], max_records=10_000)) is not None:
            await outbox.ack(b.seq)
        top2 = await top_rowid(outbox)
        assert (await retention.run_pass(outbox.transaction, 7, NOW)).state.hold_rowid == top2
        await more_debits(prepaid, outbox, 18)
        await damage(outbox, low)  # set aside when its batch goes out again
        await ack_all(outbox)
        top3 = await top_rowid(outbox)
        existing = await rowids(outbox, top3)
        assert top3 > top2 and low < high
        p = await retention.run_pass(outbox.transaction, 7, NOW)
        assert p.pruned == 0 and p.state.hold_rowid == top3
        assert await damaged_seen(outbox) == [(low, top3), (high, top2)]
        for _ in range(2):
            await retention.run_pass(outbox.transaction, 7, NOW)
        assert await rowids(outbox, top3) == existing
        await view_and_verify(outbox)
    finally:
        await outbox.close()


async def test_a_database_from_before_the_accounting_keeps_what_exists_at_its_first_pass(tmp_path: Path) -> None:
    """A database of version 6 whose ``damaged`` holds a billing record migrates with
    none accounted for: the first pass keeps every entry there is then."""
    prepaid, outbox = await open_shell(tmp_path)
    try:
        rid = await story_with_a_damaged_charge(prepaid, outbox)
        async with outbox.transaction() as db:  # as the previous release left it
            await db.execute("DROP TABLE billing_damaged_seen")
            await db.execute("PRAGMA user_version = 6")
    finally:
        await outbox.close()
    prepaid, outbox = await open_shell(tmp_path)
    try:
        assert int(await one(outbox, "PRAGMA user_version")) == 7
        top = await top_rowid(outbox)
        p = await retention.run_pass(outbox.transaction, 7, NOW)
        assert p.pruned == 0 and p.state.hold_rowid == top
        assert await damaged_seen(outbox) == [(rid, top)]
        await more_debits(prepaid, outbox, 12)
        await retention.run_pass(outbox.transaction, 7, NOW)
        await ack_all(outbox)
        assert (await retention.run_pass(outbox.transaction, 7, NOW)).pruned == 2
        await view_and_verify(outbox)
    finally:
        await outbox.close()


async def prune_with(tmp: Path, damage_others: bool) -> tuple[int, int, dict[str, int], list[tuple[int, int]]]:
    """The story with a telemetry record and an event beside it, acknowledged and
    pruned; with ``damage_others`` both of them no longer open."""
    prepaid, outbox = await open_shell(tmp)
    try:
        await story(prepaid, outbox, debits=6)
        async with outbox.transaction() as db:
            volts = Reading("m001", T0 + 300_000, {Quantity.VOLTAGE: Measurement(Decimal("229.9"))})
            (tele,) = await outbox.commit_cycle_in(db, T0 + 300_000, [volts])
            ev = await outbox.add_in(db, RecordClass.EVENT, RecordKind.EVENT, T0 + 300_000, {"type": "test"})
        assert int(await one(outbox, "SELECT cls FROM outbox WHERE id = ?", (tele,))) == RecordClass.TELEMETRY
        await retention.run_pass(outbox.transaction, 7, NOW)
        if damage_others:
            await damage(outbox, tele)
            await damage(outbox, ev)
        await ack_all(outbox)
        set_aside = int(await one(outbox, "SELECT count(*) FROM damaged WHERE cls != 1"))
        assert set_aside == (2 if damage_others else 0)
        p = await retention.run_pass(outbox.transaction, 7, NOW)
        await view_and_verify(outbox)
        return p.pruned, p.state.hold_rowid, await kinds(outbox), await damaged_seen(outbox)
    finally:
        await outbox.close()


async def test_a_damaged_telemetry_or_event_record_changes_nothing_for_retention(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    damaged = await prune_with(tmp_path_factory.mktemp("damaged"), True)
    assert damaged == await prune_with(tmp_path_factory.mktemp("intact"), False)
    pruned, hold, left, seen = damaged
    assert pruned == 10 and hold == 0 and seen == []  # every debit but the newest
    assert left == {"adjustment": 1, "debit": 1, "credit": 1}


async def test_entries_whose_records_were_evicted_unsent_are_kept_for_good(tmp_path: Path) -> None:
    prepaid, outbox = await open_shell(tmp_path)
    try:
        await story(prepaid, outbox, debits=6)
        await retention.run_pass(outbox.transaction, 7, NOW)  # the mark
        async with outbox.transaction() as db:  # the disk below its hard floor: billing evicted
            assert await outbox._evict(db, NOW, EvictionPlan(0, 2_000)) > 0
        await ack_all(outbox)
        for _ in range(2):
            assert (await retention.run_pass(outbox.transaction, 7, NOW)).pruned == 0
        n = await kinds(outbox)
        # entries written after that are pruned as usual
        for i in range(12, 15):
            await rate(prepaid, outbox, f"{100 + i / 10:.1f}", T0 + 200_000 + i * 1000)
        await retention.run_pass(outbox.transaction, 7, NOW)
        await ack_all(outbox)
        later = await retention.run_pass(outbox.transaction, 7, NOW)
        assert later.pruned == 2  # 3 new debits, the newest stays
        assert (await kinds(outbox))["debit"] == n["debit"] + 1
        await view_and_verify(outbox)
    finally:
        await outbox.close()


async def pruned_setup(tmp_path: Path) -> tuple[Prepaid, Outbox]:
    prepaid, outbox = await open_shell(tmp_path)
    await story(prepaid, outbox, debits=6)
    await retention.run_pass(outbox.transaction, 7, NOW)
    await ack_all(outbox)
    return prepaid, outbox


async def dump(outbox: Outbox) -> list[Any]:
    async with outbox.transaction() as db:
        out = []
        for table in ("billing_entry", "billing_fold_base", "billing_account"):
            async with db.execute(f"SELECT * FROM {table} ORDER BY 1, 2") as cur:
                out.append(await cur.fetchall())
        return out


async def test_a_prune_rolled_back_midway_changes_nothing(tmp_path: Path) -> None:
    _, outbox = await pruned_setup(tmp_path)
    try:
        state = await retention.run_pass(outbox.transaction, 7, NOW, budget=0)  # marks only
        before = await dump(outbox)
        with pytest.raises(RuntimeError, match="power"):
            async with outbox.transaction() as db:
                p = await retention.prune_account_in(db, ACC, state.state, NOW - 7 * DAY, NOW)
                assert p.entries > 0
                raise RuntimeError("power gone")
        assert await dump(outbox) == before
        await view_and_verify(outbox)
    finally:
        await outbox.close()


async def test_a_snapshot_older_than_the_base_is_refused(tmp_path: Path) -> None:
    prepaid, outbox = await pruned_setup(tmp_path)
    try:
        assert (await retention.run_pass(outbox.transaction, 7, NOW)).pruned > 0
        balance, base = await view_and_verify(outbox)
        before = await dump(outbox)
        body = {"id": "snap-1", "account": ACC, "central_seq": 1, "as_of_seq": base - 1,
                "balance_micro": 5_000_000, "time_ms": NOW}
        with pytest.raises(CommandRefused) as refused:
            async with outbox.transaction() as db:
                await prepaid.apply_snapshot_in(db, body, now_ms=NOW)
        assert refused.value.reason == "snapshot_too_old"
        assert f"fold base at seq {base}" in refused.value.message
        assert await dump(outbox) == before
        # one as of the base or later is applied, and the ledger still verifies
        async with outbox.transaction() as db:
            res = await prepaid.apply_snapshot_in(db, {**body, "as_of_seq": base}, now_ms=NOW)
        assert res["status"] == "applied"
        after, _ = await view_and_verify(outbox)
        assert after == 5_000_000 + sum(
            e.amount_micro for e in await entries_after(outbox, base) if e.kind.value != "snapshot"
        )
        assert balance != after
    finally:
        await outbox.close()


async def entries_after(outbox: Outbox, seq: int) -> list[Any]:
    async with outbox.transaction() as db:
        return await ls.entries(db, ACC, after_seq=seq)


async def test_a_pruned_fixed_charge_is_not_raised_again_when_trusted_time_moves_back(tmp_path: Path) -> None:
    mb = load_book([MINIGRID])
    outbox = await open_database(tmp_path / "gw.db")
    day0 = T0 - T0 % DAY

    async def scan(now: int) -> int:
        """The fixed charges raised up to ``now``, each with its charge record (as the
        daemon writes them)."""
        async with outbox.transaction() as db:
            out = await ls.fixed_in(db, ACC, mb, now)
            for res in out.applied:
                if res.applied:
                    await outbox.add_in(db, RecordClass.BILLING, RecordKind.CHARGE, now, res.entry.to_json())
            return sum(r.applied for r in out.applied)

    try:
        assert await scan(day0 + 3600_000) == 0  # the start point
        assert await scan(day0 + 10 * DAY + 3600_000) == 10  # ten daily charges
        await retention.run_pass(outbox.transaction, 7, day0 + 10 * DAY + 3600_000)
        await ack_all(outbox)
        done = await retention.run_pass(outbox.transaction, 7, day0 + 10 * DAY + 3600_000)
        assert done.pruned == 3  # days 1-3 are older than 7 days
        async with outbox.transaction() as db:
            balance = (await ls.verify(db, ACC)).balance_micro
        # trusted time goes back 9 days (central time), then forward again: the scan
        # moves back with it and finds every charge, the pruned ones included
        assert await scan(day0 + DAY + 3600_000) == 0  # the scan restarts here
        assert await scan(day0 + 10 * DAY + 3600_000) == 0
        async with outbox.transaction() as db:
            assert (await ls.verify(db, ACC)).balance_micro == balance
    finally:
        await outbox.close()


def data_version(conn: sqlite3.Connection) -> int:
    """Changes committed by other connections move it (PRAGMA data_version)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


async def test_a_pass_with_nothing_to_prune_commits_once_and_one_with_nothing_new_commits_nothing(
    tmp_path: Path,
) -> None:
    db = tmp_path / "gw.db"
    prepaid, outbox = await open_shell(tmp_path)
    other = sqlite3.connect(db)
    try:
        await story(prepaid, outbox, debits=6)
        # the first pass takes a mark: one transaction, nothing pruned (nothing acknowledged)
        mark, seen = log_mark(db), data_version(other)
        p = await retention.run_pass(outbox.transaction, 7, NOW)
        assert p.pruned == 0 and p.transactions == 1 and commits_since(db, mark) == 1
        assert data_version(other) != seen
        assert (p.state.last_pass_ms, p.state.last_pass_pruned) == (NOW, 0)
        # nothing new, nothing acknowledged: the next passes write nothing at all
        for later in (NOW + 600_000, NOW + 1_200_000):
            mark, seen = log_mark(db), data_version(other)
            q = await retention.run_pass(outbox.transaction, 7, later)
            assert q.pruned == 0 and q.transactions == 0 and commits_since(db, mark) == 0
            assert data_version(other) == seen
        async with outbox.transaction() as conn:
            assert (await retention.load_state(conn)).last_pass_ms == NOW  # the last pass that wrote
        # acknowledged but young (30 days): the watermark moves, in one transaction
        assert await ack_all(outbox) > 0
        mark = log_mark(db)
        young = await retention.run_pass(outbox.transaction, 30, NOW + 1_800_000)
        assert young.pruned == 0 and young.state.acked_rowid > 0 and young.transactions == 1
        assert commits_since(db, mark) == 1
        # every billing record acknowledged, no mark left: the next passes write nothing
        # (a site whose link keeps up is in this state between its cycles)
        for later in (NOW + 2_400_000, NOW + 3_000_000):
            mark, seen = log_mark(db), data_version(other)
            q = await retention.run_pass(outbox.transaction, 30, later)
            assert q.transactions == 0 and commits_since(db, mark) == 0, q
            assert data_version(other) == seen
    finally:
        other.close()
        await outbox.close()


@pytest.mark.parametrize(("batch", "batches"), [(4, 6), (5, 5), (30, 1)])
async def test_a_pass_that_prunes_commits_no_more_transactions_than_batches(
    tmp_path: Path, batch: int, batches: int
) -> None:
    """24 entries may go: the marks ride in the first batch's transaction, and a batch
    that finds nothing more to let go commits nothing."""
    db = tmp_path / "gw.db"
    prepaid, outbox = await open_shell(tmp_path)
    try:
        await story(prepaid, outbox)
        await retention.run_pass(outbox.transaction, 7, NOW)  # the mark
        await ack_all(outbox)
        before = await kinds(outbox)
        mark = log_mark(db)
        done = await retention.run_pass(outbox.transaction, 7, NOW, batch=batch)
        assert done.pruned == 24 and done.state.acked_rowid > 0
        assert done.transactions == batches == commits_since(db, mark)
        assert await kinds(outbox) == {**before, "debit": before["debit"] - 24}
        await view_and_verify(outbox)
        async with outbox.transaction() as conn:
            st = await retention.load_state(conn)
        assert (st.last_pass_ms, st.last_pass_pruned, st.pruned_total) == (NOW, 24, 24)
    finally:
        await outbox.close()


async def test_a_pass_stopped_by_its_budget_commits_its_batches_and_the_next_one_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    prepaid, outbox = await open_shell(tmp_path)
    try:
        await story(prepaid, outbox)
        await retention.run_pass(outbox.transaction, 7, NOW)
        await ack_all(outbox)
        mark = log_mark(db)
        first = await retention.run_pass(outbox.transaction, 7, NOW, batch=4, budget=10)
        assert (first.pruned, first.transactions, commits_since(db, mark)) == (10, 3, 3)
        mark = log_mark(db)
        rest = await retention.run_pass(outbox.transaction, 7, NOW, batch=4, budget=10)
        assert (rest.pruned, rest.transactions, commits_since(db, mark)) == (10, 3, 3)
        mark = log_mark(db)
        last = await retention.run_pass(outbox.transaction, 7, NOW, batch=4, budget=10)
        assert (last.pruned, last.transactions, commits_since(db, mark)) == (4, 1, 1)
        assert last.state.pruned_total == 24
        await view_and_verify(outbox)
    finally:
        await outbox.close()
