"""Ledger persistence in SQLite, inside a transaction owned by the caller.

Every function takes an open :class:`aiosqlite.Connection` and **never
commits or rolls back**: the daemon's single writer wraps one poll cycle (the
reading, its debit, the outbox record) in one transaction and commits it once,
so after a crash either all of them are there or none is. With Python's
default ``isolation_level`` the first write opens the transaction implicitly;
an explicit ``BEGIN IMMEDIATE`` by the caller is better (no lock upgrade).

Tables (``TABLES``; declared to the gateway database's schema registry as
``SCHEMA``, :mod:`gateway.database`):

* ``billing_entry`` — the append-only ledger, ``entry_id`` unique: appending
  an entry again is a no-op, with different content a :class:`LedgerConflict`.
  Its ``body`` is :meth:`Entry.body_json` deflated against a fixed dictionary
  (:func:`body_column`, :mod:`store_forward.compact`), a BLOB; rows written
  before hold the plain JSON as TEXT. Every reader goes through
  :func:`body_from_column`, which reads both;
* ``billing_account`` — the folded view per account (balance, last seq,
  purchase counter, tier state, snapshot in force), kept in step by
  :func:`append` and checked against a full fold by :func:`verify`; plus the
  persisted cutoff state and the time up to which fixed charges were raised;
* ``billing_baseline`` — per meter, the last reading rating used as baseline;
* ``billing_meter_reset`` — per meter with a suspected or confirmed undeclared
  register reset: the suspect reading and the held spans (rows exist only while
  there is one);
* ``billing_tariff`` — tariff versions installed by central (the source
  document), re-applied over the configured tariffs at every start;
* ``billing_fold_base`` — per account whose old debits and fixed charges left the
  local ledger (retention, :mod:`gateway.billing.retention`): the view as of
  ``base_seq``, from which :func:`verify` folds the entries after it (no row:
  the fold starts from zero, as before retention existed);
* ``billing_ack_mark``, ``billing_retention`` — the retention pass's watermarks
  of what central acknowledged (:mod:`gateway.billing.retention`);
* ``billing_damaged_seen`` — the outbox records of class BILLING set aside as
  damaged that retention has accounted for (version 7): each held every entry
  existing when it was seen, and no longer holds up the acknowledgement marks;
* ``billing_pruned_fixed`` — the ids of fixed charges that left the ledger, so
  that a fixed-charge scan moved back by trusted time never raises one again;
* ``billing_fixed_held`` — fixed charges held because their period started in
  a stretch of time the gateway did not live through (:mod:`gateway.billing.held`):
  ``held`` until central settles them (``settled``), or until the period comes
  round again in normal time after trusted time was moved back (``released``:
  then debited).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import aiosqlite
import orjson

from firmware_bridge.errors import EdgeGwError, ErrorKind
from gateway.billing.cutoff import CutoffState
from gateway.billing.held import OFF_BILLED_MS, REWIND_SLACK_MS, HeldGroup, Stretch, plan_fixed
from gateway.billing.ledger import (
    AppendResult,
    BaseTooLate,
    Entry,
    EntryKind,
    LedgerConflict,
    LedgerView,
    advance,
    check_earlier,
    debit_entry,
    earlier_id,
    fixed_entry,
    fold,
    fold_from,
    rebase,
    snapshot_info,
)
from gateway.billing.rating import (
    HeldSpan,
    MeterReplacement,
    MeterTrack,
    RatingResult,
    RegisterReading,
    ResetNotice,
    TierState,
    track_reading,
    track_replacement,
)
from gateway.billing.reconcile import (
    CentralSnapshot,
    SnapshotDecision,
    SnapshotStatus,
    decide_snapshot,
)
from gateway.billing.tariff import TariffBook
from gateway.billing.topup import TopUp, TopUpDecision, TopUpPolicy, TopUpStatus, decide_topup
from store_forward.compact import CompactError, pack, unpack
from store_forward.schema import Schema, Step, statements

TABLES = """
CREATE TABLE IF NOT EXISTS billing_entry (
    account      TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    entry_id     TEXT    NOT NULL UNIQUE,
    kind         TEXT    NOT NULL CHECK (kind IN ('debit','fixed','credit','adjustment','snapshot')),
    amount_micro INTEGER NOT NULL,
    time_ms      INTEGER NOT NULL,
    body         TEXT    NOT NULL,
    PRIMARY KEY (account, seq)
);
CREATE TABLE IF NOT EXISTS billing_account (
    account               TEXT    PRIMARY KEY,
    balance_micro         INTEGER NOT NULL,
    last_seq              INTEGER NOT NULL,
    purchase_counter      INTEGER NOT NULL,
    tier_period_start_ms  INTEGER,
    tier_cumulative_ckwh  INTEGER NOT NULL,
    opening_tier_start_ms INTEGER,
    opening_tier_ckwh     INTEGER NOT NULL DEFAULT 0,
    snapshot_seq          INTEGER,
    fixed_until_ms        INTEGER,
    cutoff_state          TEXT
);
CREATE TABLE IF NOT EXISTS billing_tariff (
    tariff_id    TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    installed_ms INTEGER NOT NULL,
    doc          TEXT    NOT NULL,
    PRIMARY KEY (tariff_id, version)
);
CREATE TABLE IF NOT EXISTS billing_fixed_held (
    charge_id        TEXT    PRIMARY KEY,
    account          TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    tariff           TEXT    NOT NULL,
    period           TEXT    NOT NULL,
    period_start_ms  INTEGER NOT NULL,
    amount_micro     INTEGER NOT NULL,
    held_ms          INTEGER NOT NULL,
    stretch_from_ms  INTEGER NOT NULL,
    stretch_to_ms    INTEGER NOT NULL,
    cause            TEXT    NOT NULL CHECK (cause IN ('off_time','clock_jump')),
    state            TEXT    NOT NULL CHECK (state IN ('held','released','settled')),
    resolved_ms      INTEGER
);
CREATE INDEX IF NOT EXISTS billing_fixed_held_account ON billing_fixed_held (account, state);
CREATE TABLE IF NOT EXISTS billing_baseline (
    meter        TEXT    PRIMARY KEY,
    account      TEXT    NOT NULL,
    reading_id   TEXT    NOT NULL,
    time_ms      INTEGER NOT NULL,
    import_kwh   TEXT    NOT NULL,
    rates        TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS billing_meter_reset (
    meter        TEXT    PRIMARY KEY,
    account      TEXT    NOT NULL,
    state        TEXT    NOT NULL
);
"""


# Version 5: ledger retention. The fold base per account, the acknowledgement
# watermarks, and the snapshots of each account found without reading its debits.
RETENTION_TABLES = """
CREATE TABLE IF NOT EXISTS billing_fold_base (
    account               TEXT    PRIMARY KEY,
    base_seq              INTEGER NOT NULL,
    balance_micro         INTEGER NOT NULL,
    purchase_counter      INTEGER NOT NULL,
    tier_period_start_ms  INTEGER,
    tier_cumulative_ckwh  INTEGER NOT NULL,
    snapshot_seq          INTEGER,
    pruned                INTEGER NOT NULL,
    pruned_until_ms       INTEGER,
    updated_ms            INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS billing_ack_mark (
    id           INTEGER PRIMARY KEY,
    taken_ms     INTEGER NOT NULL,
    entry_rowid  INTEGER NOT NULL,
    outbox_id    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS billing_retention (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    acked_rowid       INTEGER NOT NULL DEFAULT 0,
    hold_rowid        INTEGER NOT NULL DEFAULT 0,
    evicted_seen      INTEGER NOT NULL DEFAULT 0,
    pruned_total      INTEGER NOT NULL DEFAULT 0,
    last_pass_ms      INTEGER,
    last_pass_pruned  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS billing_pruned_fixed (
    entry_id  TEXT PRIMARY KEY,
    account   TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS billing_entry_snapshot ON billing_entry (account, seq) WHERE kind = 'snapshot'
"""


# Version 7: the damaged billing records retention has accounted for, by record id
# (docs/billing.md, "Retention"). A set rather than a count or the highest id: it is
# exact whatever else happens to ``damaged`` (a count misses one row removed and one
# added between two passes) and needs no argument about the order ids are assigned
# and records set aside in (out of id order: a numbered batch is opened again when
# it is sent again; records salvaged from a damaged database keep their ids).
DAMAGED_SEEN_TABLES = """
CREATE TABLE IF NOT EXISTS billing_damaged_seen (
    record_id   INTEGER PRIMARY KEY,  -- the id of the record in table damaged
    hold_rowid  INTEGER NOT NULL,     -- entries with rowid <= this were kept for good then
    seen_ms     INTEGER NOT NULL
)
"""


class LedgerCorrupt(EdgeGwError):
    """The stored view does not match a full fold of the stored entries."""

    kind = ErrorKind.STORAGE


class SnapshotTooOld(EdgeGwError):
    """A central snapshot rebases on local entries the gateway no longer keeps
    (its ``as_of_seq`` is below the account's fold base)."""

    kind = ErrorKind.REFUSED
    code = "snapshot_too_old"


SCHEMA = Schema(
    "billing",
    Step(4, "ledger, accounts, tariffs, held fixed charges, baselines, meter resets", statements(TABLES)),
    Step(5, "ledger retention: fold bases, acknowledgement marks", statements(RETENTION_TABLES)),
    Step(7, "ledger retention: damaged billing records accounted for", statements(DAMAGED_SEEN_TABLES)),
)


async def init_schema(conn: aiosqlite.Connection) -> None:
    """The tables on a connection of their own (the ledger's tests and tools); the
    gateway's database gets them from its schema registry (:mod:`gateway.database`)."""
    await SCHEMA.create(conn)


def body_column(e: Entry) -> bytes:
    """``e``'s body as stored in ``billing_entry.body``: :meth:`Entry.body_json`
    deflated against :data:`store_forward.compact.DICTIONARY` (plain JSON when that
    is not shorter; a BLOB in the TEXT column)."""
    return pack(e.body_json())


def body_from_column(value: str | bytes, entry_id: str = "?") -> dict[str, Any]:
    """An entry's body from its ``billing_entry.body`` column: deflated bytes
    (:func:`body_column`), or plain JSON (as bytes, or the TEXT the ledger stored
    before bodies were deflated). One that does not decode raises
    :class:`LedgerCorrupt` naming ``entry_id``."""
    raw = value.encode() if isinstance(value, str) else value
    try:
        if not isinstance(raw, bytes):
            raise CompactError(f"a {type(raw).__name__} where a body was expected")
        body: dict[str, Any] = orjson.loads(unpack(raw))  # unpack gives only a JSON object's bytes
    except (CompactError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise LedgerCorrupt(f"ledger entry {entry_id}: its stored body does not decode ({exc})") from exc
    return body


def _row_entry(row: Sequence[Any]) -> Entry:
    account, seq, entry_id, kind, amount, time_ms, body = row
    return Entry(entry_id, account, EntryKind(kind), amount, time_ms, body_from_column(body, entry_id), seq)


_ENTRY_COLS = "account, seq, entry_id, kind, amount_micro, time_ms, body"


async def get_entry(conn: aiosqlite.Connection, entry_id: str) -> Entry | None:
    async with conn.execute(f"SELECT {_ENTRY_COLS} FROM billing_entry WHERE entry_id = ?", (entry_id,)) as cur:
        row = await cur.fetchone()
    return None if row is None else _row_entry(row)


async def entries(
    conn: aiosqlite.Connection, account: str, after_seq: int = 0, limit: int | None = None
) -> list[Entry]:
    """The account's entries after ``after_seq``, in seq order.

    History is complete only after the account's fold base (:func:`load_base`):
    debits and fixed charges at or below it were acknowledged by central and
    left the local ledger after the retention period (``billing.ledger_retention_days``);
    central keeps them. Credits, adjustments and snapshots are always kept."""
    sql = f"SELECT {_ENTRY_COLS} FROM billing_entry WHERE account = ? AND seq > ? ORDER BY seq"
    args: tuple[Any, ...] = (account, after_seq)
    if limit is not None:
        sql += " LIMIT ?"
        args = (*args, limit)
    async with conn.execute(sql, args) as cur:
        rows = await cur.fetchall()
    return [_row_entry(r) for r in rows]


async def entries_between(conn: aiosqlite.Connection, account: str, after_seq: int, upto_seq: int) -> list[Entry]:
    """The account's entries with ``after_seq < seq <= upto_seq``, in seq order."""
    async with conn.execute(
        f"SELECT {_ENTRY_COLS} FROM billing_entry WHERE account = ? AND seq > ? AND seq <= ? ORDER BY seq",
        (account, after_seq, upto_seq),
    ) as cur:
        rows = await cur.fetchall()
    return [_row_entry(r) for r in rows]


async def open_account(conn: aiosqlite.Connection, account: str, opening_tier: TierState | None = None) -> bool:
    """Create the account's row if missing; True if created."""
    t = opening_tier or TierState()
    cur = await conn.execute(
        "INSERT OR IGNORE INTO billing_account (account, balance_micro, last_seq, purchase_counter,"
        " tier_period_start_ms, tier_cumulative_ckwh, opening_tier_start_ms, opening_tier_ckwh)"
        " VALUES (?, 0, 0, 0, ?, ?, ?, ?)",
        (account, t.period_start_ms, t.cumulative_ckwh, t.period_start_ms, t.cumulative_ckwh),
    )
    return cur.rowcount == 1


VIEW_COLS = "balance_micro, last_seq, purchase_counter, tier_period_start_ms, tier_cumulative_ckwh, snapshot_seq"


async def load_view(conn: aiosqlite.Connection, account: str) -> LedgerView:
    """The account's folded view (an empty one for an unknown account)."""
    async with conn.execute(f"SELECT {VIEW_COLS} FROM billing_account WHERE account = ?", (account,)) as cur:
        row = await cur.fetchone()
    return LedgerView(account) if row is None else await view_from_row(conn, account, row)


async def view_from_row(conn: aiosqlite.Connection, account: str, row: Sequence[Any]) -> LedgerView:
    """The view from a ``billing_account`` row's :data:`VIEW_COLS` (the snapshot in
    force, if any, is read from its entry)."""
    balance, last_seq, counter, tier_ps, tier_ckwh, snap_seq = row
    snap = None
    if snap_seq is not None:
        async with conn.execute(
            f"SELECT {_ENTRY_COLS} FROM billing_entry WHERE account = ? AND seq = ?", (account, snap_seq)
        ) as cur:
            srow = await cur.fetchone()
        if srow is None:
            raise LedgerCorrupt(f"account {account}: snapshot entry seq {snap_seq} is missing")
        snap = snapshot_info(_row_entry(srow))
    return LedgerView(account, balance, last_seq, counter, TierState(tier_ps, tier_ckwh), snap)


SAVE_VIEW_SQL = (
    "UPDATE billing_account SET balance_micro = ?, last_seq = ?, purchase_counter = ?,"
    " tier_period_start_ms = ?, tier_cumulative_ckwh = ?, snapshot_seq = ? WHERE account = ?"
)


def view_params(view: LedgerView) -> tuple[Any, ...]:
    return (
        view.balance_micro,
        view.last_seq,
        view.purchase_counter,
        view.tier.period_start_ms,
        view.tier.cumulative_ckwh,
        None if view.snapshot is None else view.snapshot.seq,
        view.account,
    )


async def _save_view(conn: aiosqlite.Connection, view: LedgerView) -> None:
    await conn.execute(SAVE_VIEW_SQL, view_params(view))


INSERT_ENTRY_SQL = f"INSERT INTO billing_entry ({_ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"


def entry_params(e: Entry) -> tuple[Any, ...]:
    return (e.account, e.seq, e.entry_id, e.kind.value, e.amount_micro, e.time_ms, body_column(e))


async def append(conn: aiosqlite.Connection, entry: Entry) -> AppendResult:
    """Append ``entry`` to its account's ledger (idempotent by ``entry_id``)."""
    old = await get_entry(conn, entry.entry_id)
    if old is not None:
        if not old.same_content(entry):
            raise LedgerConflict(f"{entry.entry_id}: already recorded with different content")
        return AppendResult(old, False, await load_view(conn, old.account))
    earlier = earlier_id(entry)
    if earlier is not None:
        same = check_earlier(entry, await get_entry(conn, earlier))
        if same is not None:
            return AppendResult(same, False, await load_view(conn, same.account))
    await open_account(conn, entry.account)
    view = await load_view(conn, entry.account)
    if entry.kind is EntryKind.SNAPSHOT:
        await check_snapshot_base(conn, entry.account, int(entry.body["as_of_seq"]))
    e = replace(entry, seq=view.last_seq + 1)
    await conn.execute(INSERT_ENTRY_SQL, entry_params(e))
    if e.kind is EntryKind.SNAPSHOT:
        tail = await entries(conn, e.account, after_seq=int(e.body["as_of_seq"]))
        view = rebase(view, e, [x for x in tail if x.seq < e.seq])
    else:
        view = advance(view, e)
    await _save_view(conn, view)
    return AppendResult(e, True, view)


async def opening_view(conn: aiosqlite.Connection, account: str) -> LedgerView:
    """The view before the account's first entry (its opening tier state)."""
    async with conn.execute(
        "SELECT opening_tier_start_ms, opening_tier_ckwh FROM billing_account WHERE account = ?", (account,)
    ) as cur:
        row = await cur.fetchone()
    return LedgerView(account, tier=TierState() if row is None else TierState(row[0], row[1]))


# in the order of VIEW_COLS (view_from_row reads both)
BASE_COLS = "balance_micro, base_seq, purchase_counter, tier_period_start_ms, tier_cumulative_ckwh, snapshot_seq"


async def load_base(conn: aiosqlite.Connection, account: str) -> LedgerView | None:
    """The account's fold base: its view as of ``base_seq`` (None: no entry was ever
    pruned, the fold starts from the opening view)."""
    async with conn.execute(f"SELECT {BASE_COLS} FROM billing_fold_base WHERE account = ?", (account,)) as cur:
        row = await cur.fetchone()
    return None if row is None else await view_from_row(conn, account, row)


async def base_seq(conn: aiosqlite.Connection, account: str) -> int:
    """The seq of the account's fold base (0: none)."""
    async with conn.execute("SELECT base_seq FROM billing_fold_base WHERE account = ?", (account,)) as cur:
        row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def save_base(
    conn: aiosqlite.Connection, view: LedgerView, *, pruned: int, pruned_until_ms: int | None, now_ms: int
) -> None:
    """Record ``view`` as the account's fold base (``pruned`` entries more deleted)."""
    await conn.execute(
        f"INSERT INTO billing_fold_base (account, {BASE_COLS}, pruned, pruned_until_ms, updated_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET"
        " base_seq = excluded.base_seq, balance_micro = excluded.balance_micro,"
        " purchase_counter = excluded.purchase_counter,"
        " tier_period_start_ms = excluded.tier_period_start_ms,"
        " tier_cumulative_ckwh = excluded.tier_cumulative_ckwh, snapshot_seq = excluded.snapshot_seq,"
        " pruned = pruned + excluded.pruned,"
        " pruned_until_ms = max(coalesce(pruned_until_ms, excluded.pruned_until_ms), excluded.pruned_until_ms),"
        " updated_ms = excluded.updated_ms",
        (
            view.account, view.balance_micro, view.last_seq, view.purchase_counter,
            view.tier.period_start_ms, view.tier.cumulative_ckwh,
            None if view.snapshot is None else view.snapshot.seq,
            pruned, pruned_until_ms, now_ms,
        ),
    )  # fmt: skip


async def check_snapshot_base(conn: aiosqlite.Connection, account: str, as_of_seq: int) -> None:
    """Raise :class:`SnapshotTooOld` if a snapshot as of ``as_of_seq`` would rebase on
    entries that left the local ledger."""
    base = await base_seq(conn, account)
    if as_of_seq < base:
        raise SnapshotTooOld(
            f"account {account}: snapshot as of local seq {as_of_seq} is older than the local"
            f" ledger's fold base at seq {base} (older entries are kept at central only):"
            f" send a snapshot as of seq {base} or later"
        )


async def verify(conn: aiosqlite.Connection, account: str) -> LedgerView:
    """Re-fold the entries of ``account`` and compare with the stored view: from
    the opening view over every entry, or from its fold base over the entries
    after it."""
    base = await load_base(conn, account)
    if base is None:
        opening = await opening_view(conn, account)
        full = fold(account, await entries(conn, account), opening.tier)
    else:
        try:
            full = fold_from(base, await entries(conn, account, after_seq=base.last_seq))
        except BaseTooLate as exc:
            raise LedgerCorrupt(f"account {account}: {exc}") from exc
    stored = await load_view(conn, account)
    if full != stored:
        raise LedgerCorrupt(f"account {account}: stored view {stored} != fold {full}")
    return full


# ---------------------------------------------------------------------------
# Baselines and rating


def _baseline(meter: str, reading_id: str, time_ms: int, kwh: str, rates: str) -> RegisterReading:
    return RegisterReading(
        reading_id, meter, time_ms, Decimal(kwh), {k: Decimal(v) for k, v in orjson.loads(rates).items()}
    )


async def get_baseline(conn: aiosqlite.Connection, meter: str) -> RegisterReading | None:
    async with conn.execute(
        "SELECT reading_id, time_ms, import_kwh, rates FROM billing_baseline WHERE meter = ?", (meter,)
    ) as cur:
        row = await cur.fetchone()
    return None if row is None else _baseline(meter, *row)


async def all_baselines(conn: aiosqlite.Connection) -> dict[str, RegisterReading]:
    async with conn.execute("SELECT meter, reading_id, time_ms, import_kwh, rates FROM billing_baseline") as cur:
        rows = await cur.fetchall()
    return {r[0]: _baseline(*r) for r in rows}


SET_BASELINE_SQL = (
    "INSERT INTO billing_baseline (meter, account, reading_id, time_ms, import_kwh, rates)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (meter) DO UPDATE SET account = excluded.account,"
    " reading_id = excluded.reading_id, time_ms = excluded.time_ms,"
    " import_kwh = excluded.import_kwh, rates = excluded.rates"
)


def baseline_params(account: str, reading: RegisterReading) -> tuple[Any, ...]:
    rates = orjson.dumps({k: str(v) for k, v in sorted(reading.rate_kwh.items())}).decode()
    return (reading.meter_id, account, reading.reading_id, reading.time_ms, str(reading.import_kwh), rates)


async def set_baseline(conn: aiosqlite.Connection, account: str, reading: RegisterReading) -> None:
    await conn.execute(SET_BASELINE_SQL, baseline_params(account, reading))


def reading_json(r: RegisterReading) -> dict[str, Any]:
    return {"id": r.reading_id, "meter": r.meter_id, "time_ms": r.time_ms, "import_kwh": str(r.import_kwh),
            "rates": {k: str(v) for k, v in sorted(r.rate_kwh.items())}}


def reading_from_json(d: Any) -> RegisterReading:
    return RegisterReading(str(d["id"]), str(d["meter"]), int(d["time_ms"]), Decimal(d["import_kwh"]),
                           {str(k): Decimal(v) for k, v in d.get("rates", {}).items()})


def reset_json(track: MeterTrack) -> str | None:
    """The reset part of a track as stored (None: nothing suspected or held)."""
    if track.suspect is None and not track.held:
        return None
    d = {
        "suspect": None if track.suspect is None else reading_json(track.suspect),
        "held": [[reading_json(h.last_good), reading_json(h.first_after)] for h in track.held],
    }
    return orjson.dumps(d, option=orjson.OPT_SORT_KEYS).decode()


def reset_from_json(text: str | None) -> tuple[RegisterReading | None, tuple[HeldSpan, ...]]:
    if text is None:
        return None, ()
    d = orjson.loads(text)
    sus = None if d.get("suspect") is None else reading_from_json(d["suspect"])
    return sus, tuple(HeldSpan(reading_from_json(a), reading_from_json(b)) for a, b in d.get("held", ()))


async def get_reset(conn: aiosqlite.Connection, meter: str) -> str | None:
    async with conn.execute("SELECT state FROM billing_meter_reset WHERE meter = ?", (meter,)) as cur:
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def all_resets(conn: aiosqlite.Connection) -> dict[str, str]:
    async with conn.execute("SELECT meter, state FROM billing_meter_reset") as cur:
        return {str(m): str(st) for m, st in await cur.fetchall()}


async def save_reset(conn: aiosqlite.Connection, account: str, meter: str, state: str | None) -> None:
    if state is None:
        await conn.execute("DELETE FROM billing_meter_reset WHERE meter = ?", (meter,))
    else:
        await conn.execute(
            "INSERT INTO billing_meter_reset (meter, account, state) VALUES (?, ?, ?)"
            " ON CONFLICT (meter) DO UPDATE SET account = excluded.account, state = excluded.state",
            (meter, account, state),
        )


async def get_track(conn: aiosqlite.Connection, meter: str) -> MeterTrack:
    sus, held = reset_from_json(await get_reset(conn, meter))
    return MeterTrack(await get_baseline(conn, meter), sus, held)


@dataclass(frozen=True)
class RatedReading:
    """What :func:`rate_reading` did with one new reading."""

    result: RatingResult | None  # None: first reading of the meter (baseline only)
    appended: AppendResult | None  # the debit entry (None if no charge)
    view: LedgerView  # the account after it
    reset: ResetNotice | None = None  # an undeclared register reset was confirmed


async def _store_track(
    conn: aiosqlite.Connection, account: str, meter: str, before: MeterTrack, after: MeterTrack
) -> None:
    if after.baseline is not None and after.baseline != before.baseline:
        await set_baseline(conn, account, after.baseline)
    old, new = reset_json(before), reset_json(after)
    if old != new:
        await save_reset(conn, account, meter, new)


async def rate_reading(
    conn: aiosqlite.Connection,
    account: str,
    reading: RegisterReading,
    book: TariffBook,
    *,
    max_gap_ms: int | None = None,
) -> RatedReading:
    """Rate a new reading of a meter against its stored track and append the debit.

    The first reading of a meter only becomes its baseline. An interval with no
    energy writes no ledger row (the baseline still advances). A reading that
    refuses rating (time not increasing, no tariff) leaves the baseline; one whose
    register went backwards is kept as the suspect of a register reset
    (:func:`gateway.billing.rating.track_reading`).
    """
    await open_account(conn, account)
    track = await get_track(conn, reading.meter_id)
    if track.baseline is None or track.baseline.reading_id == reading.reading_id:
        await _store_track(conn, account, reading.meter_id, track, MeterTrack(track.baseline or reading,
                                                                                track.suspect, track.held))
        return RatedReading(None, None, await load_view(conn, account))
    view = await load_view(conn, account)
    step = track_reading(track, reading, book, view.tier, max_gap_ms=max_gap_ms)
    appended = None
    for r in step.results:
        if r.charge is not None and r.charge.ckwh > 0:  # no rows for zero energy
            appended = await append(conn, debit_entry(account, r.charge))
    await _store_track(conn, account, reading.meter_id, track, step.track)
    result = step.results[-1] if step.results else None
    return RatedReading(result, appended, await load_view(conn, account), step.reset)


@dataclass(frozen=True)
class ReplacedMeter:
    """What :func:`record_meter_replacement` did: the intervals rated (old register up to
    its final reading, and a held span of the new one if declared late) and their debits."""

    results: tuple[RatingResult, ...]
    appended: tuple[AppendResult, ...]
    view: LedgerView


async def record_meter_replacement(
    conn: aiosqlite.Connection,
    account: str,
    rep: MeterReplacement,
    book: TariffBook,
    *,
    max_gap_ms: int | None = None,
) -> ReplacedMeter:
    """Bill the old meter up to its final registers and continue from the new meter's
    initial ones (raises :class:`gateway.billing.rating.ReplacementError`, writing
    nothing, when the registers contradict what was billed)."""
    await open_account(conn, account)
    track = await get_track(conn, rep.meter_id)
    view = await load_view(conn, account)
    step = track_replacement(track, rep, book, view.tier, max_gap_ms=max_gap_ms)
    appended = []
    for r in step.results:
        if r.charge is not None and r.charge.ckwh > 0:
            appended.append(await append(conn, debit_entry(account, r.charge)))
    await _store_track(conn, account, rep.meter_id, track, step.track)
    return ReplacedMeter(step.results, tuple(appended), await load_view(conn, account))


# ---------------------------------------------------------------------------
# Fixed charges, top-ups, snapshots, cutoff state


@dataclass
class FixedOutcome:
    """What one fixed-charge scan of an account did."""

    applied: list[AppendResult] = field(default_factory=list)  # debited (or already there)
    held: list[HeldGroup] = field(default_factory=list)  # recorded as held, to report
    due: int = 0  # charges found in the scanned span (debited, skipped or held)
    rewound: bool = False  # trusted time went back: the scan restarts from now


Append = Callable[[aiosqlite.Connection, Entry], Awaitable[AppendResult]]


async def raise_fixed(
    conn: aiosqlite.Connection,
    account: str,
    book: TariffBook,
    since_ms: int,
    now_ms: int,
    stretches: Sequence[Stretch],
    append_entry: Append,
    *,
    off_billed_ms: int = OFF_BILLED_MS,
) -> FixedOutcome:
    """Debit the fixed charges due in (since, now], holding those in unseen stretches.

    A charge central settled (listed in a snapshot) is never debited; a held one
    that comes round again in normal time (trusted time was moved back) is
    debited and marked released.
    """
    plan = plan_fixed(account, book, since_ms, now_ms, stretches, off_billed_ms=off_billed_ms)
    applied: list[AppendResult] = []
    if plan.apply:
        states = await held_states(conn, [d.charge_id for d in plan.apply])
        pruned = await pruned_fixed(conn, [d.charge_id for d in plan.apply])
        for d in plan.apply:
            state = states.get(d.charge_id)
            if state == "settled" or d.charge_id in pruned:  # pruned: debited long ago
                continue
            applied.append(await append_entry(conn, fixed_entry(d)))
            if state == "held":
                await conn.execute(
                    "UPDATE billing_fixed_held SET state = 'released', resolved_ms = ? "
                    "WHERE charge_id = ?",
                    (now_ms, d.charge_id),
                )
    for g in plan.held:
        await record_held(conn, account, g, now_ms)
    return FixedOutcome(applied, list(plan.held), plan.due)


async def fixed_in(
    conn: aiosqlite.Connection,
    account: str,
    book: TariffBook,
    now_ms: int,
    stretches: Sequence[Stretch] = (),
    *,
    off_billed_ms: int = OFF_BILLED_MS,
) -> FixedOutcome:
    """Raise every fixed charge whose period started since the last call (up to ``now``),
    holding those that fall in ``stretches`` (:mod:`gateway.billing.held`).

    The first call only records ``now`` as the starting point; so does a call
    with ``now`` more than ``REWIND_SLACK_MS`` before it (trusted time moved back).
    """
    await open_account(conn, account)
    since = await load_fixed_until(conn, account)
    if since is None or now_ms < since - REWIND_SLACK_MS:
        await save_fixed_until(conn, account, now_ms)
        return FixedOutcome(rewound=since is not None)
    if now_ms <= since:
        return FixedOutcome()
    out = await raise_fixed(
        conn, account, book, since, now_ms, stretches, append, off_billed_ms=off_billed_ms
    )
    await save_fixed_until(conn, account, now_ms)
    return out


async def charge_fixed(
    conn: aiosqlite.Connection, account: str, book: TariffBook, now_ms: int
) -> list[AppendResult]:
    """Raise every fixed charge whose period started since the last call (up to ``now``).

    The first call only records ``now`` as the starting point.
    """
    return (await fixed_in(conn, account, book, now_ms)).applied


async def record_held(conn: aiosqlite.Connection, account: str, group: HeldGroup, now_ms: int) -> None:
    s = group.stretch
    await conn.executemany(
        "INSERT INTO billing_fixed_held (charge_id, account, name, tariff, period, period_start_ms,"
        " amount_micro, held_ms, stretch_from_ms, stretch_to_ms, cause, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'held') ON CONFLICT (charge_id) DO NOTHING",
        [
            (
                c.charge_id, account, c.name, c.tariff, c.period, c.period_start_ms, c.amount_micro,
                now_ms, s.from_ms, s.to_ms, "off_time" if s.off_time else "clock_jump",
            )
            for c in group.charges
        ],
    )  # fmt: skip


async def held_states(conn: aiosqlite.Connection, charge_ids: Sequence[str]) -> dict[str, str]:
    """State (held / released / settled) of those of ``charge_ids`` ever held."""
    rows = await _select_in(conn, "SELECT charge_id, state FROM billing_fixed_held WHERE charge_id IN ({})", charge_ids)
    return {str(a): str(b) for a, b in rows}


async def pruned_fixed(conn: aiosqlite.Connection, charge_ids: Sequence[str]) -> set[str]:
    """Those of ``charge_ids`` that were debited and have left the ledger (retention)."""
    rows = await _select_in(conn, "SELECT entry_id FROM billing_pruned_fixed WHERE entry_id IN ({})", charge_ids)
    return {str(r[0]) for r in rows}


async def _select_in(conn: aiosqlite.Connection, sql: str, keys: Sequence[str]) -> list[Any]:
    """The rows of ``sql`` (one ``IN ({})``) for every key, 500 keys a statement (well
    under SQLite's limit on bound parameters)."""
    rows: list[Any] = []
    for i in range(0, len(keys), 500):
        chunk = list(keys[i : i + 500])
        async with conn.execute(sql.format(", ".join("?" * len(chunk))), chunk) as cur:
            rows += await cur.fetchall()
    return rows


async def settle_held(
    conn: aiosqlite.Connection, account: str, charge_ids: Iterable[str], now_ms: int
) -> int:
    """Mark held charges of ``account`` central counted in a snapshot as settled."""
    ids = sorted(set(charge_ids))
    n = 0
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        cur = await conn.execute(
            f"UPDATE billing_fixed_held SET state = 'settled', resolved_ms = ? "
            f"WHERE account = ? AND state = 'held' AND charge_id IN ({marks})",
            (now_ms, account, *chunk),
        )
        n += cur.rowcount
    return n


@dataclass(frozen=True)
class HeldCharge:
    charge_id: str
    account: str
    period_start_ms: int
    amount_micro: int
    cause: str
    state: str


async def held_charges(
    conn: aiosqlite.Connection, account: str | None = None, state: str | None = "held"
) -> list[HeldCharge]:
    """Held fixed charges (of ``account``; in ``state``, None: any), oldest period first."""
    sql = (
        "SELECT charge_id, account, period_start_ms, amount_micro, cause, state"
        " FROM billing_fixed_held WHERE 1 = 1"
    )
    args: list[Any] = []
    if account is not None:
        sql += " AND account = ?"
        args.append(account)
    if state is not None:
        sql += " AND state = ?"
        args.append(state)
    async with conn.execute(sql + " ORDER BY period_start_ms, charge_id", args) as cur:
        rows = await cur.fetchall()
    return [HeldCharge(str(a), str(b), int(c), int(d), str(e), str(f)) for a, b, c, d, e, f in rows]


async def load_fixed_until(conn: aiosqlite.Connection, account: str) -> int | None:
    """Up to when fixed charges of ``account`` were raised (None: never scanned)."""
    async with conn.execute("SELECT fixed_until_ms FROM billing_account WHERE account = ?", (account,)) as cur:
        row = await cur.fetchone()
    return None if row is None else row[0]


async def save_fixed_until(conn: aiosqlite.Connection, account: str, until_ms: int) -> None:
    await conn.execute("UPDATE billing_account SET fixed_until_ms = ? WHERE account = ?", (until_ms, account))


async def apply_topup(
    conn: aiosqlite.Connection, topup: TopUp, policy: TopUpPolicy, now_ms: int
) -> TopUpDecision:
    """Decide and (if accepted) record a top-up, whatever channel it came by."""
    await open_account(conn, topup.account)
    view = await load_view(conn, topup.account)
    existing = await get_entry(conn, topup.entry_id)
    decision = decide_topup(topup, view, existing, policy, now_ms)
    if decision.entry is not None and decision.status in (TopUpStatus.APPLIED, TopUpStatus.ALREADY_COUNTED):
        res = await append(conn, decision.entry)
        decision = replace(decision, entry=res.entry, balance_after_micro=res.view.balance_micro)
    return decision


async def apply_snapshot(conn: aiosqlite.Connection, snap: CentralSnapshot) -> SnapshotDecision:
    """Decide and (if applied) record a central snapshot; one that would rebase on
    entries below the account's fold base raises :class:`SnapshotTooOld`."""
    await open_account(conn, snap.account)
    view = await load_view(conn, snap.account)
    existing = await get_entry(conn, snap.entry_id)
    decision = decide_snapshot(snap, view, existing)
    if decision.status is SnapshotStatus.APPLIED and decision.entry is not None:
        await check_snapshot_base(conn, snap.account, snap.as_of_seq)  # before anything is written
        res = await append(conn, decision.entry)
        decision = replace(decision, entry=res.entry)
    return decision


async def load_cutoff_json(conn: aiosqlite.Connection, account: str) -> dict[str, Any] | None:
    async with conn.execute("SELECT cutoff_state FROM billing_account WHERE account = ?", (account,)) as cur:
        row = await cur.fetchone()
    if row is None or row[0] is None:
        return None
    data = orjson.loads(row[0])
    assert isinstance(data, dict)
    return data


async def save_cutoff_json(conn: aiosqlite.Connection, account: str, state: dict[str, Any]) -> None:
    await open_account(conn, account)
    await conn.execute(
        "UPDATE billing_account SET cutoff_state = ? WHERE account = ?",
        (orjson.dumps(state, option=orjson.OPT_SORT_KEYS).decode(), account),
    )


async def load_cutoff_state(conn: aiosqlite.Connection, account: str) -> CutoffState:
    """The persisted cutoff state of ``account`` (the initial state if none)."""
    data = await load_cutoff_json(conn, account)
    return CutoffState() if data is None else CutoffState.from_json(data)


async def save_cutoff_state(conn: aiosqlite.Connection, account: str, state: CutoffState) -> None:
    await save_cutoff_json(conn, account, state.to_json())


# ---------------------------------------------------------------------------
# Tariff versions from central


async def save_tariff_doc(
    conn: aiosqlite.Connection, tariff_id: str, version: int, doc: dict[str, Any], installed_ms: int
) -> None:
    """Keep a tariff version installed by central (the same version again replaces it)."""
    await conn.execute(
        "INSERT INTO billing_tariff (tariff_id, version, installed_ms, doc) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (tariff_id, version) DO UPDATE SET installed_ms = excluded.installed_ms,"
        " doc = excluded.doc",
        (tariff_id, version, installed_ms, orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()),
    )


async def load_tariff_docs(conn: aiosqlite.Connection) -> list[dict[str, Any]]:
    """Installed tariff documents, oldest installation first."""
    async with conn.execute("SELECT doc FROM billing_tariff ORDER BY installed_ms, tariff_id, version") as cur:
        rows = await cur.fetchall()
    return [orjson.loads(r[0]) for r in rows]
