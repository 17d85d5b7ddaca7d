"""The daemon's working copy of the billing state: the single writer's cache.

:mod:`gateway.billing.ledger_store` reads an account's view, a meter's
baseline and the cutoff state from SQLite every time it needs them — about a
dozen statements per rated reading, each a round trip to the database thread.
The daemon has exactly one writer, so it can keep that state in memory and
only *write* to the database:

* reads come from the cache (loaded from the database on first use);
* ledger entries are inserted at once (``INSERT … ON CONFLICT(entry_id) DO
  NOTHING``: an id already there is compared with the new content, exactly as
  :func:`ledger_store.append` does); the account views and baselines they
  change are written back by :meth:`LedgerCache.flush`, in the same
  transaction, before it commits;
* except a debit whose id sorts above every time-ordered debit id the ledger
  holds (:func:`gateway.billing.rating.debit_id`: the debit of a new reading,
  nearly always). It cannot be there already, so nothing needs to be looked
  up: it waits in memory and :meth:`LedgerCache.flush` inserts it with the
  views, in the same trip to the database thread (a plain ``INSERT``: an id
  that were there after all would fail the transaction, never be skipped).
  Entries reach the table in the order they were appended: any other write
  of an entry, and any look-up of one, inserts the waiting ones first.
  Per reading this saves the one round trip to the database thread rating
  still made;
* the time up to which fixed charges were raised is persisted only when a
  charge is raised or held, or the scan moves back (or
  :meth:`LedgerCache.persist_fixed_until` is called,
  before a tariff change): between charges the stored value may lag, and
  re-scanning that span after a restart finds no charge under the same
  tariff. This keeps a once-a-second policy tick from rewriting every account
  row every second (flash wear on the gateway's SD card);
* where no fixed charge can fall due — the account's tariff book has none, or
  the next period start is known to lie ahead (looked up once, up to
  :data:`FIXED_LOOKAHEAD_MS` ahead) — a scan only moves the position, as the
  full scan would have (a CPU saving on every tick and reading; see
  :meth:`LedgerCache.fixed_in`).

The cache is only as good as the transaction it was filled in: when a
transaction rolls back, :meth:`forget` must be called (the daemon registers it
as the outbox's rollback hook), and anything that writes billing tables
without going through the cache must call :meth:`forget_account` afterwards.
The result is the same database content as the uncached functions produce,
which the tests check statement for statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aiosqlite
import orjson

from gateway.billing import ledger_store as ls
from gateway.billing.cutoff import CutoffState
from gateway.billing.held import HELD_SCAN_MS, OFF_BILLED_MS, REWIND_SLACK_MS, Stretch
from gateway.billing.ledger import (
    AppendResult,
    Entry,
    EntryKind,
    LedgerConflict,
    LedgerView,
    advance,
    check_earlier,
    debit_entry,
    earlier_id,
)
from gateway.billing.rating import (
    DEBIT_ID_PREFIX,
    LEGACY_DEBIT_RANGE,
    MeterReplacement,
    MeterTrack,
    RegisterReading,
    fixed_charges_due,
    is_legacy_debit_id,
    track_reading,
    track_replacement,
)
from gateway.billing.tariff import TariffBook
from store_forward import sqlbatch
from store_forward.sqlbatch import Statement

_MISSING = object()
# [low, high): where the time-ordered debit ids sort, and only they
TIMED_DEBIT_RANGE = (DEBIT_ID_PREFIX, DEBIT_ID_PREFIX[:-1] + chr(ord(DEBIT_ID_PREFIX[-1]) + 1))
# How far ahead of the scan position the next fixed charge is looked for (a scan
# that ends before it has nothing to raise).
FIXED_LOOKAHEAD_MS = 3_600_000


def fixed_quiet_until(account: str, book: TariffBook, since_ms: int) -> int | None:
    """The last instant up to which no fixed charge of ``book`` has its period start
    in (``since_ms``, that instant]; None: no version of the book has fixed charges
    (none ever falls due)."""
    if not any(v.fixed for v in book.versions):
        return None
    due = fixed_charges_due(account, book, since_ms, since_ms + FIXED_LOOKAHEAD_MS)
    return due[0].period_start_ms - 1 if due else since_ms + FIXED_LOOKAHEAD_MS


class LedgerCache:
    def __init__(self, *, skip_quiet: bool = True) -> None:
        # False: every fixed-charge scan runs in full (the tests compare both)
        self.skip_quiet = skip_quiet
        self._views: dict[str, LedgerView] = {}
        self._cutoff: dict[str, CutoffState] = {}
        self._baselines: dict[str, RegisterReading | None] = {}
        self._resets: dict[str, str | None] = {}  # meter -> stored reset state (rare; written through)
        self._fixed_until: dict[str, int | None] = {}
        # account -> (book, from, until): no fixed charge of that book starts in (from, until]
        self._fixed_quiet: dict[str, tuple[TariffBook, int, int | None]] = {}
        self._dirty_views: dict[str, None] = {}
        self._dirty_baselines: dict[str, str] = {}  # meter -> account
        # does the ledger hold debit ids of the older form (None: not looked up yet)?
        self._legacy_debits: bool | None = None
        # debits appended and not inserted yet, in order (see the module documentation)
        self._waiting: list[Entry] = []
        # no time-ordered debit id in the ledger sorts above this one ("": none is
        # there; None: not looked up yet)
        self._debit_ceiling: str | None = None

    # -- validity -------------------------------------------------------------

    def forget(self) -> None:
        """Drop everything (after a rollback): the next use reloads from the database."""
        self._views.clear()
        self._cutoff.clear()
        self._baselines.clear()
        self._resets.clear()
        self._fixed_until.clear()
        self._fixed_quiet.clear()
        self._dirty_views.clear()
        self._dirty_baselines.clear()
        self._legacy_debits = None
        self._waiting.clear()
        self._debit_ceiling = None

    def forget_account(self, account: str) -> None:
        """Drop one account's view after the uncached top-up or snapshot path changed
        it (those write the view only: cutoff state and scan position stay valid)."""
        if account in self._dirty_views:
            raise RuntimeError(f"account {account}: unflushed changes would be lost")
        self._views.pop(account, None)

    @property
    def pending(self) -> bool:
        return bool(self._waiting or self._dirty_views or self._dirty_baselines)

    async def flush(self, conn: aiosqlite.Connection) -> None:
        """Insert the debits waiting and write changed views and baselines, in one
        trip to the database thread (call before the transaction commits)."""
        statements = self._take_waiting()
        if self._dirty_views:
            views = [ls.view_params(self._views[a]) for a in self._dirty_views]
            statements.append(Statement(ls.SAVE_VIEW_SQL, views, many=True))
        if self._dirty_baselines:
            rows = []
            for meter, account in self._dirty_baselines.items():
                b = self._baselines[meter]
                assert b is not None
                rows.append(ls.baseline_params(account, b))
            statements.append(Statement(ls.SET_BASELINE_SQL, rows, many=True))
        await sqlbatch.run(conn, statements)
        self._dirty_views.clear()
        self._dirty_baselines.clear()

    def _take_waiting(self) -> list[Statement]:
        if not self._waiting:
            return []
        rows: list[Any] = [ls.entry_params(e) for e in self._waiting]
        self._waiting.clear()
        return [Statement(ls.INSERT_ENTRY_SQL, rows, many=True)]

    async def _insert_waiting(self, conn: aiosqlite.Connection) -> None:
        """Insert the debits waiting now (before any other entry is written or looked up)."""
        await sqlbatch.run(conn, self._take_waiting())

    async def _above_every_debit(self, conn: aiosqlite.Connection, entry_id: str) -> bool:
        """Whether ``entry_id`` is a time-ordered debit id above every one the ledger
        holds (looked up once, in the id index, then kept)."""
        if not entry_id.startswith(DEBIT_ID_PREFIX):
            return False
        if self._debit_ceiling is None:
            async with conn.execute(
                "SELECT max(entry_id) FROM billing_entry WHERE entry_id >= ? AND entry_id < ?", TIMED_DEBIT_RANGE
            ) as cur:
                row = await cur.fetchone()
            self._debit_ceiling = str(row[0]) if row is not None and row[0] is not None else ""
        return entry_id > self._debit_ceiling

    async def warm(self, conn: aiosqlite.Connection, accounts: list[str]) -> None:
        """Load every account's view, cutoff state and scan position, and every
        baseline, in a few statements (at start, so the first tick is not slow)."""
        wanted = set(accounts)
        async with conn.execute(
            f"SELECT account, fixed_until_ms, cutoff_state, {ls.VIEW_COLS} FROM billing_account"
        ) as cur:
            rows = await cur.fetchall()
        for account, until, cutoff, *view_row in rows:
            if account not in wanted:
                continue
            self._views[account] = await ls.view_from_row(conn, account, view_row)
            self._fixed_until[account] = until
            self._cutoff[account] = (
                CutoffState() if cutoff is None else CutoffState.from_json(orjson.loads(cutoff))
            )
        self._baselines.update(await ls.all_baselines(conn))
        resets = await ls.all_resets(conn)
        self._resets.update({m: resets.get(m) for m in self._baselines})

    # -- reads ----------------------------------------------------------------

    async def view(self, conn: aiosqlite.Connection, account: str) -> LedgerView:
        v = self._views.get(account)
        if v is None:
            await ls.open_account(conn, account)
            v = self._views[account] = await ls.load_view(conn, account)
        return v

    async def baseline(self, conn: aiosqlite.Connection, meter: str) -> RegisterReading | None:
        b = self._baselines.get(meter, _MISSING)
        if b is _MISSING:
            b = self._baselines[meter] = await ls.get_baseline(conn, meter)
        assert b is None or isinstance(b, RegisterReading)
        return b

    async def track(self, conn: aiosqlite.Connection, meter: str) -> MeterTrack:
        base = await self.baseline(conn, meter)
        if meter not in self._resets:
            self._resets[meter] = await ls.get_reset(conn, meter)
        sus, held = ls.reset_from_json(self._resets[meter])
        return MeterTrack(base, sus, held)

    async def _store_track(self, conn: aiosqlite.Connection, account: str, meter: str,
                           before: MeterTrack, after: MeterTrack) -> None:
        if after.baseline is not None and after.baseline != before.baseline:
            self._set_baseline(account, after.baseline)
        old, new = ls.reset_json(before), ls.reset_json(after)
        if old != new:
            await ls.save_reset(conn, account, meter, new)
            self._resets[meter] = new

    async def cutoff_state(self, conn: aiosqlite.Connection, account: str) -> CutoffState:
        s = self._cutoff.get(account)
        if s is None:
            s = self._cutoff[account] = await ls.load_cutoff_state(conn, account)
        return s

    # -- writes ---------------------------------------------------------------

    async def save_cutoff_state(self, conn: aiosqlite.Connection, account: str, state: CutoffState) -> None:
        await ls.save_cutoff_state(conn, account, state)
        self._cutoff[account] = state

    def _set_baseline(self, account: str, reading: RegisterReading) -> None:
        self._baselines[reading.meter_id] = reading
        self._dirty_baselines[reading.meter_id] = account

    async def append(self, conn: aiosqlite.Connection, entry: Entry) -> AppendResult:
        """:func:`ledger_store.append` for every kind but snapshots (which rebase the view)."""
        if entry.kind is EntryKind.SNAPSHOT:
            raise ValueError("snapshots go through ledger_store.apply_snapshot")
        earlier = earlier_id(entry)
        if earlier is not None and await self._holds_legacy_debits(conn):
            await self._insert_waiting(conn)  # (a look-up: the waiting debits go in first)
            same = check_earlier(entry, await ls.get_entry(conn, earlier))
            if same is not None:
                return AppendResult(same, False, await self.view(conn, same.account))
        view = await self.view(conn, entry.account)
        e = replace(entry, seq=view.last_seq + 1)
        if await self._above_every_debit(conn, e.entry_id):
            # not in the ledger: it waits for flush (see the module documentation)
            self._waiting.append(e)
            self._debit_ceiling = e.entry_id
            view = self._views[entry.account] = advance(view, e)
            self._dirty_views[entry.account] = None
            return AppendResult(e, True, view)
        await self._insert_waiting(conn)
        cur = await conn.execute(ls.INSERT_ENTRY_SQL + " ON CONFLICT (entry_id) DO NOTHING", ls.entry_params(e))
        if cur.rowcount == 0:
            old = await ls.get_entry(conn, entry.entry_id)
            assert old is not None
            if not old.same_content(entry):
                raise LedgerConflict(f"{entry.entry_id}: already recorded with different content")
            if old.account != entry.account:
                return AppendResult(old, False, await self.view(conn, old.account))
            return AppendResult(old, False, view)
        view = self._views[entry.account] = advance(view, e)
        self._dirty_views[entry.account] = None
        if is_legacy_debit_id(e.entry_id) and self._legacy_debits is False:
            self._legacy_debits = True
        return AppendResult(e, True, view)

    async def _holds_legacy_debits(self, conn: aiosqlite.Connection) -> bool:
        """Whether a debit can be recorded under an id of the older form (a ledger
        written before debit ids were ordered by time): looked up once, in the id
        index (those ids sort apart from the time-ordered ones), then kept. Ledgers
        without them skip the look-up of every debit's older id."""
        if self._legacy_debits is None:
            async with conn.execute(
                "SELECT 1 FROM billing_entry WHERE entry_id >= ? AND entry_id < ? LIMIT 1", LEGACY_DEBIT_RANGE
            ) as cur:
                self._legacy_debits = await cur.fetchone() is not None
        return self._legacy_debits

    async def rate(
        self,
        conn: aiosqlite.Connection,
        account: str,
        reading: RegisterReading,
        book: TariffBook,
        *,
        max_gap_ms: int | None = None,
    ) -> ls.RatedReading:
        """:func:`ledger_store.rate_reading`, from the cache."""
        track = await self.track(conn, reading.meter_id)
        base = track.baseline
        if base is None:
            self._set_baseline(account, reading)
            return ls.RatedReading(None, None, await self.view(conn, account))
        if base.reading_id == reading.reading_id:
            return ls.RatedReading(None, None, await self.view(conn, account))
        view = await self.view(conn, account)
        step = track_reading(track, reading, book, view.tier, max_gap_ms=max_gap_ms)
        appended = None
        for r in step.results:
            if r.charge is not None and r.charge.ckwh > 0:
                appended = await self.append(conn, debit_entry(account, r.charge))
        await self._store_track(conn, account, reading.meter_id, track, step.track)
        result = step.results[-1] if step.results else None
        return ls.RatedReading(result, appended, await self.view(conn, account), step.reset)

    async def replace_meter(
        self,
        conn: aiosqlite.Connection,
        account: str,
        rep: MeterReplacement,
        book: TariffBook,
        *,
        max_gap_ms: int | None = None,
    ) -> ls.ReplacedMeter:
        """:func:`ledger_store.record_meter_replacement`, from the cache (raises
        :class:`gateway.billing.rating.ReplacementError` before writing anything)."""
        track = await self.track(conn, rep.meter_id)
        view = await self.view(conn, account)
        step = track_replacement(track, rep, book, view.tier, max_gap_ms=max_gap_ms)
        appended = []
        for r in step.results:
            if r.charge is not None and r.charge.ckwh > 0:
                appended.append(await self.append(conn, debit_entry(account, r.charge)))
        await self._store_track(conn, account, rep.meter_id, track, step.track)
        return ls.ReplacedMeter(step.results, tuple(appended), await self.view(conn, account))

    async def fixed_in(
        self,
        conn: aiosqlite.Connection,
        account: str,
        book: TariffBook,
        now_ms: int,
        stretches: Sequence[Stretch] = (),
        *,
        off_billed_ms: int = OFF_BILLED_MS,
    ) -> ls.FixedOutcome:
        """:func:`ledger_store.fixed_in`, persisting the scan position only when it found
        charges (debited or held) or moved back."""
        if account in self._fixed_until:
            since = self._fixed_until[account]
        else:
            await self.view(conn, account)  # opens the account row
            since = self._fixed_until[account] = await ls.load_fixed_until(conn, account)
        if since is None or now_ms < since - REWIND_SLACK_MS:
            await ls.save_fixed_until(conn, account, now_ms)
            self._fixed_until[account] = now_ms
            return ls.FixedOutcome(rewound=since is not None)
        if now_ms <= since:
            return ls.FixedOutcome()
        if self.skip_quiet and now_ms - since <= HELD_SCAN_MS and self._nothing_due(account, book, since, now_ms):
            # What the scan would find: no charge starts in (since, now], so none is
            # debited or held (a stretch held without charges is reported only when
            # longer than HELD_SCAN_MS), and the position moves to now.
            self._fixed_until[account] = now_ms
            return ls.FixedOutcome()
        out = await ls.raise_fixed(
            conn, account, book, since, now_ms, stretches, self.append, off_billed_ms=off_billed_ms
        )
        if out.due:
            await ls.save_fixed_until(conn, account, now_ms)
        self._fixed_until[account] = now_ms
        return out

    def fixed_quiet(self, account: str, book: TariffBook, now_ms: int) -> bool:
        """Would :meth:`fixed_in` at ``now_ms`` find nothing and read or write nothing
        (only move the scan position: :meth:`advance_fixed`)?"""
        if not self.skip_quiet or account not in self._fixed_until:
            return False
        since = self._fixed_until[account]
        if since is None or now_ms < since - REWIND_SLACK_MS:
            return False
        if now_ms <= since:
            return True
        return now_ms - since <= HELD_SCAN_MS and self._nothing_due(account, book, since, now_ms)

    def advance_fixed(self, account: str, now_ms: int) -> None:
        """What :meth:`fixed_in` does where :meth:`fixed_quiet` holds."""
        since = self._fixed_until[account]
        if since is not None and now_ms > since:
            self._fixed_until[account] = now_ms

    def cached_cutoff_state(self, account: str) -> CutoffState | None:
        """The account's cutoff state if it is in the cache (None: not loaded)."""
        return self._cutoff.get(account)

    def _nothing_due(self, account: str, book: TariffBook, since_ms: int, now_ms: int) -> bool:
        """No fixed charge of ``book`` starts in (since, now]."""
        q = self._fixed_quiet.get(account)
        if q is None or q[0] is not book or q[1] > since_ms or (q[2] is not None and q[2] < now_ms):
            q = self._fixed_quiet[account] = (book, since_ms, fixed_quiet_until(account, book, since_ms))
        return q[2] is None or now_ms <= q[2]

    async def charge_fixed(
        self, conn: aiosqlite.Connection, account: str, book: TariffBook, now_ms: int
    ) -> list[AppendResult]:
        """:func:`ledger_store.charge_fixed`, persisting the scan position only with a charge."""
        return (await self.fixed_in(conn, account, book, now_ms)).applied

    async def persist_fixed_until(self, conn: aiosqlite.Connection, account: str) -> None:
        """Store the scan position now (before the account's tariff changes)."""
        until = self._fixed_until.get(account)
        if until is not None:
            await ls.save_fixed_until(conn, account, until)
