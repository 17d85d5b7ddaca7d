"""Ledger retention: old debits and fixed charges central acknowledged leave the
local ledger (docs/billing.md, "Retention").

A debit is written every time a meter's register moves 0.01 kWh, and every
entry also goes to central as a ``charge`` record in the outbox, written in the
same transaction as the entry (:mod:`gateway.prepaid`). Once central has
acknowledged an entry's record and the entry is older than the retention
period, the gateway no longer needs it: this module deletes such entries in
small transactions and records, per account, the *fold base* the remaining
entries fold from (:func:`gateway.billing.ledger_store.verify`).

**Acknowledged, exactly.** No clock is compared with another. Each pass records
a *mark* (``billing_ack_mark``): the highest ``billing_entry`` rowid E and the
highest outbox record id R ever assigned, read in one transaction. Every entry
with rowid <= E was committed with its charge record, whose id is <= R. Records
leave the outbox when central acknowledges their batch (deleted), when they
cannot be opened (moved to ``damaged``, where they stay), and under a full
disk: telemetry is shed first, and past the hard floor unsent *billing*
records are evicted (counted in the outbox's ``billing_evicted``). An evicted
or damaged billing record never reaches central, so when the eviction count
changes, or a BILLING-class record is in ``damaged`` that retention has not
accounted for yet (``billing_damaged_seen``, by record id), every pending mark
is dropped and every entry existing then is *held* (``hold_rowid``: kept for
good, since central may lack the record of any of them); the damaged records
are then accounted for, and hold up no mark again. So a mark is acknowledged
once no BILLING-class record with id <= R is in ``outbox`` (nor in ``damaged``
unaccounted for), provided none was evicted since it was taken. Entries with
rowid <= E of the newest acknowledged mark are acknowledged (``acked_rowid``).
The newest entry of the table is never deleted, so a rowid is never used twice
(nothing VACUUMs the database: that may renumber the rowids of a table without
an INTEGER PRIMARY KEY, and would need the marks and watermarks dropped). A
gateway without a working uplink never prunes.

**Which entries go** (:func:`gateway.billing.ledger.prune_point`): debits and
fixed charges only (credits, adjustments and snapshots are few, and top-ups are
de-duplicated by their entry id), older than the retention by their
``time_ms`` against trusted time, acknowledged, not held; from the account's
fold base upwards, up to the first entry that may not go yet, lowered so that
no snapshot after the new base rebases on an ``as_of_seq`` below it. A central
snapshot as of a seq below the base is refused (``snapshot_too_old``). The id
of every fixed charge that goes is kept (``billing_pruned_fixed``, a few dozen
bytes a charge), so a fixed-charge scan that trusted time moved back never
raises it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace

import aiosqlite

from gateway.billing import ledger_store as ls
from gateway.billing.ledger import EntryKind, PruneCandidate, fold_from, prune_point
from store_forward.outbox import K_EVICTED_BILLING
from store_forward.records import RecordClass

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 90
MIN_RETENTION_DAYS = 7  # below this an outage over a long weekend would still hold the data
DAY_MS = 86_400_000
PRUNE_BATCH = 2_000  # entries deleted per transaction at most
PASS_BUDGET = 20_000  # entries deleted per maintenance pass at most
MAX_MARKS = 64  # pending marks kept; past it the newest one is moved up instead
_PAGE = 512  # entries read at a time while looking for the new base


@dataclass(frozen=True)
class RetentionState:
    acked_rowid: int = 0  # entries with rowid <= this were acknowledged by central
    hold_rowid: int = 0  # entries with rowid <= this are kept whatever their age
    evicted_seen: int = 0  # the outbox's billing_evicted count when last looked at
    pruned_total: int = 0
    last_pass_ms: int | None = None
    last_pass_pruned: int = 0
    marks: int = 0  # pending marks


async def _one(conn: aiosqlite.Connection, sql: str, args: tuple[object, ...] = ()) -> int | None:
    async with conn.execute(sql, args) as cur:
        row = await cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def load_state(conn: aiosqlite.Connection) -> RetentionState:
    async with conn.execute(
        "SELECT acked_rowid, hold_rowid, evicted_seen, pruned_total, last_pass_ms, last_pass_pruned"
        " FROM billing_retention WHERE id = 1"
    ) as cur:
        row = await cur.fetchone()
    marks = await _one(conn, "SELECT count(*) FROM billing_ack_mark") or 0
    if row is None:
        return RetentionState(marks=marks)
    acked, hold, evicted, total, last_ms, last_n = row
    return RetentionState(
        int(acked), int(hold), int(evicted), int(total), None if last_ms is None else int(last_ms), int(last_n), marks
    )


async def _save_state(conn: aiosqlite.Connection, s: RetentionState) -> None:
    await conn.execute(
        "INSERT INTO billing_retention (id, acked_rowid, hold_rowid, evicted_seen, pruned_total,"
        " last_pass_ms, last_pass_pruned) VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
        " acked_rowid = excluded.acked_rowid, hold_rowid = excluded.hold_rowid,"
        " evicted_seen = excluded.evicted_seen, pruned_total = excluded.pruned_total,"
        " last_pass_ms = excluded.last_pass_ms, last_pass_pruned = excluded.last_pass_pruned",
        (s.acked_rowid, s.hold_rowid, s.evicted_seen, s.pruned_total, s.last_pass_ms, s.last_pass_pruned),
    )


async def hold_existing_in(conn: aiosqlite.Connection) -> None:
    """Keep every entry there is now for good (their charge records may never reach
    central: a database rebuilt from evidence after a storage fault)."""
    s = await load_state(conn)
    top = await _one(conn, "SELECT max(rowid) FROM billing_entry") or 0
    await conn.execute("DELETE FROM billing_ack_mark")
    await _save_state(conn, replace(s, hold_rowid=max(s.hold_rowid, top)))


# BILLING-class records set aside as damaged that retention has not accounted for
_UNSEEN_DAMAGED = "FROM damaged WHERE cls = ? AND id NOT IN (SELECT record_id FROM billing_damaged_seen)"


async def _account_damaged_in(conn: aiosqlite.Connection, hold: int, now_ms: int) -> int:
    """Note every BILLING-class record set aside as damaged and not accounted for yet
    as accounted for by the hold up to rowid ``hold``; returns how many there were."""
    cur = await conn.execute(
        f"INSERT INTO billing_damaged_seen (record_id, hold_rowid, seen_ms) SELECT id, ?, ? {_UNSEEN_DAMAGED}",
        (hold, now_ms, int(RecordClass.BILLING)),
    )
    return max(cur.rowcount, 0)


async def _lowest_billing_record(conn: aiosqlite.Connection) -> int | None:
    """The lowest id of a BILLING-class record still waiting in the outbox or set aside
    as damaged and not accounted for (None: none)."""
    cls = int(RecordClass.BILLING)
    a = await _one(conn, "SELECT id FROM outbox WHERE cls = ? ORDER BY id LIMIT 1", (cls,))
    b = await _one(conn, f"SELECT min(id) {_UNSEEN_DAMAGED}", (cls,))
    return min((x for x in (a, b) if x is not None), default=None)


async def advance_marks_in(conn: aiosqlite.Connection, now_ms: int) -> RetentionState:
    """Move the acknowledgement watermark up to the newest acknowledged mark and take
    a new mark, inside the caller's transaction. Writes only what changes: with no
    new entry, no acknowledgement and nothing lost since the last pass it writes
    nothing."""
    s = await load_state(conn)
    top = await _one(conn, "SELECT max(rowid) FROM billing_entry") or 0
    evicted = await _one(conn, "SELECT value FROM kv WHERE key = ?", (K_EVICTED_BILLING,)) or 0
    acked, hold = s.acked_rowid, s.hold_rowid
    if evicted != s.evicted_seen:
        # Unsent billing records were evicted (disk below its hard floor): some entries
        # up to now may never reach central. Keep them all; pending marks are void.
        hold = max(hold, top)
        await conn.execute("DELETE FROM billing_ack_mark")
        log.warning(
            "ledger retention: %d billing record(s) were evicted unsent; every ledger entry"
            " up to rowid %d is kept for good", evicted - s.evicted_seen, hold,
        )
    damaged = await _account_damaged_in(conn, max(hold, top), now_ms)
    if damaged:
        # Billing records that no longer open were set aside (the outbox sent central a
        # records_damaged event): the same, and from now on they hold up no mark.
        hold = max(hold, top)
        await conn.execute("DELETE FROM billing_ack_mark")
        log.warning(
            "ledger retention: %d billing record(s) were set aside as damaged; every ledger"
            " entry up to rowid %d is kept for good", damaged, hold,
        )
    low = await _lowest_billing_record(conn)
    if low is None:
        got = await _one(conn, "SELECT max(entry_rowid) FROM billing_ack_mark")
        if got is not None:  # (a DELETE of every row rewrites the table's page even when empty)
            await conn.execute("DELETE FROM billing_ack_mark")
    else:
        got = await _one(conn, "SELECT max(entry_rowid) FROM billing_ack_mark WHERE outbox_id < ?", (low,))
        await conn.execute("DELETE FROM billing_ack_mark WHERE outbox_id < ?", (low,))
    if got is not None:
        acked = max(acked, got)
    newest = await _one(conn, "SELECT max(entry_rowid) FROM billing_ack_mark")
    if top > max(acked, newest or 0):
        record = max(
            await _one(conn, "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'") or 0,
            await _one(conn, "SELECT max(id) FROM outbox") or 0,
        )
        pending = await _one(conn, "SELECT count(*) FROM billing_ack_mark") or 0
        if pending >= MAX_MARKS:  # the link is down for long: move the newest mark up
            await conn.execute(
                "UPDATE billing_ack_mark SET taken_ms = ?, entry_rowid = ?, outbox_id = ?"
                " WHERE id = (SELECT max(id) FROM billing_ack_mark)",
                (now_ms, top, record),
            )
        else:
            await conn.execute(
                "INSERT INTO billing_ack_mark (taken_ms, entry_rowid, outbox_id) VALUES (?, ?, ?)",
                (now_ms, top, record),
            )
    new = replace(s, acked_rowid=acked, hold_rowid=hold, evicted_seen=evicted)
    if new != s:
        await _save_state(conn, new)
    return new


@dataclass(frozen=True)
class Pruned:
    account: str
    entries: int  # deleted in this transaction
    base_seq: int  # the account's fold base after it


async def prune_account_in(
    conn: aiosqlite.Connection,
    account: str,
    state: RetentionState,
    cutoff_ms: int,
    now_ms: int,
    *,
    limit: int = PRUNE_BATCH,
) -> Pruned:
    """Delete up to ``limit`` of the account's debits and fixed charges that may go
    (acknowledged, older than ``cutoff_ms``, not held) from its fold base upwards, and
    move the base, inside the caller's transaction."""
    old = await ls.load_base(conn, account)
    base = old if old is not None else await ls.opening_view(conn, account)
    top = await _one(conn, "SELECT max(rowid) FROM billing_entry") or 0
    candidates: list[PruneCandidate] = []
    after = base.last_seq
    taken = 0
    done = False
    while not done:
        async with conn.execute(
            "SELECT seq, kind, time_ms, rowid FROM billing_entry WHERE account = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (account, after, _PAGE),
        ) as cur:
            rows = await cur.fetchall()
        if not rows:
            break
        for seq, kind, time_ms, rowid in rows:
            k = EntryKind(kind)
            kept = rowid <= state.hold_rowid
            may_go = time_ms < cutoff_ms and rowid <= state.acked_rowid and rowid < top
            candidates.append(PruneCandidate(int(seq), k, may_go, kept))
            if k in (EntryKind.DEBIT, EntryKind.FIXED) and not kept:
                if not may_go or taken >= limit:
                    done = True
                    break
                taken += 1
            after = int(seq)
    async with conn.execute(
        "SELECT seq, entry_id, body FROM billing_entry WHERE account = ? AND kind = 'snapshot' AND seq > ?",
        (account, base.last_seq),
    ) as cur:
        snaps = [
            (int(seq), int(ls.body_from_column(body, entry_id)["as_of_seq"]))
            for seq, entry_id, body in await cur.fetchall()
        ]
    plan = prune_point(base.last_seq, candidates, snaps, limit=limit)
    if plan.point <= base.last_seq or not plan.pruned:  # the base moves only to let entries go
        return Pruned(account, 0, base.last_seq)
    span = await ls.entries_between(conn, account, base.last_seq, plan.point)
    view = fold_from(base, span)
    going = set(plan.pruned)
    gone = [e for e in span if e.seq in going]
    await ls.save_base(
        conn, view, pruned=len(gone), pruned_until_ms=max((e.time_ms for e in gone), default=None), now_ms=now_ms
    )
    deleted = 0
    for i in range(0, len(plan.pruned), 500):
        chunk = plan.pruned[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        # a fixed charge's id stays known: a scan moved back never raises it again
        await conn.execute(
            "INSERT OR IGNORE INTO billing_pruned_fixed (entry_id, account) SELECT entry_id, account"
            f" FROM billing_entry WHERE account = ? AND kind = 'fixed' AND seq IN ({marks})",
            (account, *chunk),
        )
        cur = await conn.execute(
            f"DELETE FROM billing_entry WHERE account = ? AND kind IN ('debit', 'fixed') AND seq IN ({marks})",
            (account, *chunk),
        )
        deleted += cur.rowcount
    if deleted != len(plan.pruned):
        raise ls.LedgerCorrupt(f"account {account}: pruning deleted {deleted} entries, planned {len(plan.pruned)}")
    return Pruned(account, deleted, view.last_seq)


@dataclass(frozen=True)
class PassResult:
    pruned: int
    transactions: int  # transactions that wrote (a transaction that changed nothing commits no page)
    accounts: int  # accounts whose base moved
    state: RetentionState


async def accounts_in(conn: aiosqlite.Connection) -> list[str]:
    async with conn.execute("SELECT account FROM billing_account ORDER BY account") as cur:
        return [str(r[0]) for r in await cur.fetchall()]


Transaction = Callable[[], AbstractAsyncContextManager[aiosqlite.Connection]]


async def run_pass(
    transaction: Transaction,
    retention_days: int,
    now_ms: int,
    *,
    batch: int = PRUNE_BATCH,
    budget: int = PASS_BUDGET,
) -> PassResult:
    """One retention pass: the acknowledgement marks and the first pruning batch in
    one transaction, then further batches while entries may go, at most ``batch``
    entries per transaction and ``budget`` per pass (``transaction`` opens one write
    transaction, e.g. :meth:`store_forward.outbox.Outbox.transaction`). Nothing with
    ``retention_days`` 0 (keep everything).

    Only what changes is written, and the pass is noted (``last_pass_ms``) in a
    transaction that writes anyway: a pass that takes no mark, moves no watermark
    and lets no entry go commits nothing, and one that prunes commits no more
    transactions than it fills batches (``PassResult.transactions`` counts those
    that wrote)."""
    if retention_days <= 0:
        return PassResult(0, 0, 0, RetentionState())
    cutoff = now_ms - retention_days * DAY_MS
    total = txs = 0
    moved: set[str] = set()
    queue: list[str] | None = None  # accounts that may still have entries to let go
    state = RetentionState()
    while True:
        async with transaction() as db:
            changes = db.total_changes
            if queue is None:
                state = await advance_marks_in(db, now_ms)
                queue = await accounts_in(db)
            room = min(batch, budget - total)
            n = 0
            while queue and n < room:
                p = await prune_account_in(db, queue[0], state, cutoff, now_ms, limit=room - n)
                n += p.entries
                if p.entries:
                    moved.add(queue[0])
                if n < room:  # this account has nothing more that may go now
                    queue.pop(0)
            total += n
            if db.total_changes != changes:  # this transaction writes: the pass is noted in it
                txs += 1
                state = replace(
                    state, pruned_total=state.pruned_total + n, last_pass_ms=now_ms, last_pass_pruned=total
                )
                await _save_state(db, state)
        if not queue or total >= budget:  # (a batch filled: more may go)
            break
    # one line a pass that let entries go; a pass with nothing to do says so at debug
    log.log(
        logging.INFO if total else logging.DEBUG,
        "ledger retention: pruned %d entries of %d account(s) in %d transaction(s); acknowledged up to"
        " entry rowid %d, kept for good up to %d; retention %d days",
        total, len(moved), txs, state.acked_rowid, state.hold_rowid, retention_days,
    )  # fmt: skip
    return PassResult(total, txs, len(moved), state)


@dataclass(frozen=True)
class AccountRetention:
    account: str
    base_seq: int
    pruned: int
    pruned_until_ms: int | None
    updated_ms: int | None


async def bases(conn: aiosqlite.Connection) -> list[AccountRetention]:
    """Every account's fold base (for ``edgegw status``)."""
    async with conn.execute(
        "SELECT account, base_seq, pruned, pruned_until_ms, updated_ms FROM billing_fold_base ORDER BY account"
    ) as cur:
        return [AccountRetention(str(a), int(b), int(p), u, t) for a, b, p, u, t in await cur.fetchall()]
