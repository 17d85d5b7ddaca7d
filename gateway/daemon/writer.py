"""The daemon's one SQLite writer: the work queue, group commits, a full disk.

Pollers and timers hand work to the writer through one queue: :class:`Cycle`
(a poll cycle's readings, a slice of them, or relay events) and :class:`Tick`
(time passed). The writer commits queued work in order, a group per
transaction: the readings, the debits they cause, the charge records that
report them, cutoff state and events. Relay operations decided by a commit are
handed to the buses only after it.

Work that need not commit at once *rides* (:meth:`Writer.ride`): the periodic
``gateway.health`` record waits in memory for the next transaction the writer
makes anyway and joins it; whoever handed it over commits it alone once its
bound passed (:meth:`Writer.unride`).

While the disk is full the writer keeps taking work (bounded, in memory),
rates it in transactions that are rolled back so trips still happen, and
commits everything in order once space returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from firmware_bridge.events import event
from firmware_bridge.reading import Quantity, Reading
from firmware_bridge.relay_ops import RelayIntent, RelayOp
from gateway import meter_health
from gateway.billing.ledger_store import LedgerCorrupt
from gateway.security import trusted_time
from gateway.storage_guard import Backlog, held_accounts
from store_forward.integrity import FaultKind
from store_forward.outbox import MeterStatus, Outbox, OutboxFullError, StorageCorruptError
from store_forward.storage_state import StorageMode
from store_forward.uplink import Uplink

if TYPE_CHECKING:
    from gateway.daemon.supervisor import Daemon

log = logging.getLogger(__name__)

BILLING_TICK_S = 1.0
# The time floor rides on a poll cycle's transaction once it moved this much.
FLOOR_WITH_CYCLE_MS = trusted_time.PERSIST_GRANULARITY_MS // 2
# Queued work items the writer commits together in one transaction, at most.
GROUP_COMMIT_MAX = 32
# While the disk is full: how often the writer looks for space again, and how many
# readings it holds in memory meanwhile (see storage_guard.Backlog).
SPACE_RETRY_S = 2.0
BACKLOG_MAX_READINGS = 20_000
# While the disk is full, the held work is rated in a transaction that is rolled
# back, and the trips it decides are carried out: every DRY_RUN_S, or less often
# when that takes long (it may spend at most a fifth of the time doing it).
DRY_RUN_S = 2.0
# A tick with nothing due is done without a transaction only while another commit
# went through this recently (commits feed the watchdog's database condition).
QUIET_TICK_MAX_S = 10.0


@dataclass
class Cycle:
    """Work for the writer from one bus: readings (a slice of a poll cycle, or its
    end with the meters' statuses) or relay events."""

    bus: str
    time_ms: int
    readings: list[Reading]
    statuses: list[MeterStatus]
    events: list[dict[str, Any]] = field(default_factory=list)
    final: bool = True  # False: a slice handed over while the poll cycle goes on
    health: list[meter_health.Change] = field(default_factory=list)  # meters that changed state
    handed_mono: float = field(default_factory=time.monotonic)  # when it was queued
    relay_states: list[tuple[str, bool]] = field(default_factory=list)  # (meter, open) read back


@dataclass
class Tick:
    """Time passed: fixed charges and time-dependent cutoff decisions."""

    time_ms: int


Work = asyncio.Queue[Cycle | Tick]


class Writer:
    """Commits the daemon's work; owns what waits for the database (:attr:`backlog`)
    and the state of waiting for space on a full disk."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.backlog = Backlog(BACKLOG_MAX_READINGS)
        self.waiting_for_space = False
        self.tick_queued = False  # a tick waits for the writer (at most one does)
        self.dry_tripped: set[str] = set()  # meters tripped by a rating in memory
        # Meters whose readings carry their relay state: the readings re-assert those.
        self.relay_in_readings: set[str] = set()
        self.last_commit_mono = -float("inf")  # when the last transaction committed
        self.quiet_ticks = 0  # ticks done without a transaction (nothing was due)
        # Work waiting for the next transaction the writer makes anyway, in order.
        self.riders: list[Cycle] = []

    # -- riders ------------------------------------------------------------------

    def ride(self, item: Cycle) -> None:
        """Let ``item`` join the next transaction the writer makes anyway (after the
        work taken for it), instead of costing a commit of its own."""
        self.riders.append(item)

    def unride(self, item: Cycle) -> bool:
        """Take ``item`` back if no transaction took it yet (its owner then queues it
        to be committed alone); False once it is the writer's."""
        for i, rider in enumerate(self.riders):
            if rider is item:
                del self.riders[i]
                return True
        return False

    def take_riders(self) -> list[Cycle]:
        """Every rider, taken back (at stop: they are queued like any work)."""
        riders, self.riders = self.riders, []
        return riders

    # -- ticks -------------------------------------------------------------------

    async def billing_timer(self, out: Work) -> None:
        """Queue a tick every second (and at once after a top-up)."""
        prepaid = self.daemon.prepaid
        assert prepaid is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BILLING_TICK_S):
                    await prepaid.dirty.wait()
            prepaid.dirty.clear()
            # At most one tick waits for the writer: a busy writer must not find a
            # second of ticks queued in front of the next poll cycle. The waiting
            # tick takes the time when the writer gets to it.
            if not self.tick_queued:
                self.tick_queued = True
                await out.put(Tick(self.daemon.time_ms()))

    def quiet_tick(self, outbox: Outbox) -> bool:
        """Do a tick alone in the queue without a transaction when it would decide,
        record and write nothing (:meth:`gateway.prepaid.Prepaid.tick_quiet`, which
        also moves what it would move in memory). Only in normal operation: no
        storage fault or held account, no clock event waiting to be written, the
        reserve in place, and a commit within :data:`QUIET_TICK_MAX_S`."""
        d = self.daemon
        items = self.backlog.items
        if len(items) != 1 or not isinstance(items[0], Tick) or d.prepaid is None:
            return False
        if (
            not d.storage_started
            or self.waiting_for_space
            or outbox.unchecked is not None
            or outbox.reserve_released
            or outbox.storage.mode is not StorageMode.NORMAL
            or d.hold.held
            or held_accounts(outbox.storage, d.hold.all_accounts())
            or time.monotonic() - self.last_commit_mono > QUIET_TICK_MAX_S
        ):
            return False
        if d.clock is not None:
            waiting = d.clock.drain_events()  # (a transaction would write them)
            if waiting:
                d.clock.requeue(waiting)
                return False
        if not d.prepaid.tick_quiet(d.time_ms(), d.contact()):
            return False
        self.tick_queued = False
        self.backlog.done(1)
        self.quiet_ticks += 1
        return True

    # -- commits -----------------------------------------------------------------

    async def commit(self, outbox: Outbox, items: list[Cycle | Tick]) -> list[RelayIntent]:
        """Commit queued work in one transaction (a group commit: under load, several
        slices share one fsync instead of queueing behind each other's)."""
        async with self.daemon.transaction(outbox) as db:
            intents = await self.commit_in(db, outbox, items)
            # The same transaction: acks that arrived, the batches that go out next, and
            # the time floor when it moved half a minute (the maintenance pass writes it
            # on its own only when no poll cycle did for a minute and a half).
            await outbox.fold_in(db, self.daemon.time_ms())
            if self.daemon.clock is not None and outbox.tx_writes():
                await trusted_time.save_clock(
                    db, self.daemon.clock, granularity_ms=FLOOR_WITH_CYCLE_MS
                )
            return intents

    async def commit_in(
        self, db: Any, outbox: Outbox, items: list[Cycle | Tick], *, dry: bool = False
    ) -> list[RelayIntent]:
        d = self.daemon
        contact = d.contact()
        intents: list[RelayIntent] = []
        # The accounts billed follow the committed storage state (a snapshot that
        # settled an account, or its rollback).
        d.hold.sync(await outbox.storage_state_in(db))
        for item in items:
            if isinstance(item, Tick):
                assert d.prepaid is not None
                if not dry:
                    self.tick_queued = False
                intents += await d.prepaid.tick_in(db, outbox, d.time_ms(), contact, d.unseen())
                continue
            events = item.events + [c.event(d.account_of.get(c.meter)) for c in item.health]
            ids = await outbox.commit_cycle_in(db, item.time_ms, item.readings, item.statuses, events)
            if item.health:
                await meter_health.save_in(db, item.health)
            self.relay_in_readings.update(
                r.meter_id for r in item.readings if r.get(Quantity.RELAY_OPEN) is not None
            )
            if d.prepaid is not None and item.readings:
                intents += await d.prepaid.on_readings_in(
                    db, outbox, list(zip(ids, item.readings, strict=True)), item.time_ms, contact,
                    d.unseen(),
                )
            if d.prepaid is not None and item.relay_states:
                intents += await d.prepaid.on_relay_states_in(
                    db, outbox, item.relay_states, item.time_ms, contact
                )
        return intents

    # -- a full disk -------------------------------------------------------------

    def enter_space_wait(self, outbox: Outbox, reason: str) -> None:
        if not self.waiting_for_space:
            self.waiting_for_space = True
            log.critical(
                "disk full (%s): polling goes on; readings, events and billing wait in memory"
                " (at most %d readings) until space returns",
                reason,
                self.backlog.max_readings,
            )
        self.daemon.announce_storage(outbox)

    def leave_space_wait(self, outbox: Outbox) -> None:
        self.waiting_for_space = False
        log.warning(
            "space is back: what was held in memory is stored%s",
            f" ({self.backlog.dropped} intermediate reading(s) were given up)" if self.backlog.dropped else "",
        )
        if self.backlog.dropped:
            outbox.note_event(
                event(
                    "storage_full_readings_dropped",
                    readings=self.backlog.dropped,
                    detail="intermediate register readings given up while the disk was full;"
                    " each meter's later reading carries their energy",
                )
            )
            self.backlog.dropped = 0
        self.daemon.announce_storage(outbox)

    async def commit_retrying(self, outbox: Outbox, items: list[Cycle | Tick]) -> list[RelayIntent]:
        """The commit that tries whether space is back: the writer stops waiting as it
        starts, and waits again if it fails. Its rows become visible to other
        connections before this coroutine resumes, so whoever sees them (``edgegw
        status``, a test) never sees the writer still waiting for space."""
        self.waiting_for_space = False
        try:
            return await self.commit(outbox, items)
        except BaseException:
            self.waiting_for_space = True
            raise

    async def dry_run_trips(self, outbox: Outbox) -> None:
        """Rate the work held in memory in a transaction that is rolled back, and
        carry out the trips it decides (money protection goes on while the disk is
        full). Nothing else acts on it: closes need the top-up or state that could
        not be written, and a relay already tripped this way is not driven again.
        When space returns, the same work is committed and decides the same."""
        items = self.backlog.take(len(self.backlog))
        if not items or self.daemon.prepaid is None:
            return
        try:
            async with outbox.dry_run() as db:
                intents = await self.commit_in(db, outbox, items, dry=True)
        except Exception as exc:  # e.g. the page cache spilling to a full disk
            log.warning("rating in memory while the disk is full failed: %s", exc)
            return
        for intent in intents:
            if intent.op is RelayOp.TRIP and not intent.commanded:
                if intent.meter in self.dry_tripped:
                    continue
                self.dry_tripped.add(intent.meter)
                log.warning("disk full: trip of %s (account %s) decided in memory", intent.meter, intent.account)
                self.daemon.request_relay(intent)

    async def space_is_back(self, outbox: Outbox) -> bool:
        if outbox.starved is not None:
            return await outbox.resume_if_space()
        try:
            free = await outbox.free_bytes()
        except OSError:
            return False
        return free >= outbox.policy.ballast_bytes + 256 * 1024

    async def note_alive_waiting(self, outbox: Outbox) -> None:
        """Waiting for space is the daemon doing its job: the watchdog's database
        condition is fed as long as the database still answers."""
        if await outbox.ping():
            self.daemon.watchdog.note_db_write_ok()

    # -- the loop ----------------------------------------------------------------

    async def run(self, outbox: Outbox, work: Work, uplink: Uplink) -> None:
        """Commit queued work, in order, a group per transaction.

        Work is taken off the queue into :attr:`backlog` at once, so pollers never
        wait for the database. Then:

        * a commit that fails for lack of space releases the reserve and sheds
          telemetry, and is tried again; if the disk is still full the writer
          *waits for space*: it keeps taking work (bounded in memory), feeds the
          watchdog while the database still answers, and commits everything in
          order as soon as space returns (the reserve is then re-created);
        * damage reported by SQLite (or by the integrity check) is a storage
          fault: the database is kept as evidence, a new one takes over, the
          money state is recovered, and the work waiting is committed there;
        * any other failure is retried without feeding the watchdog, so systemd
          restarts a gateway whose database stays broken.
        """
        d = self.daemon
        backlog = self.backlog
        next_space_try = 0.0
        next_dry_run = 0.0
        next_reserve_check = 0.0
        relieved = False
        attempt = 0
        while True:
            if not backlog.items:
                backlog.add(await work.get())
                work.task_done()
            elif self.waiting_for_space:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SPACE_RETRY_S / 2):
                        backlog.add(await work.get())
                        work.task_done()
            while not work.empty():
                backlog.add(work.get_nowait())
                work.task_done()
            fault = d.take_fault_request()
            if fault is not None:
                kind, reason = fault
                await d.storage_fault(outbox, kind, reason)
                continue
            if self.waiting_for_space:
                await self.note_alive_waiting(outbox)
                d.announce_storage(outbox)
                if d.storage_started and time.monotonic() >= next_dry_run:
                    t0 = time.monotonic()
                    await self.dry_run_trips(outbox)
                    next_dry_run = time.monotonic() + max(DRY_RUN_S, 4 * (time.monotonic() - t0))
                if time.monotonic() < next_space_try:
                    continue
                next_space_try = time.monotonic() + SPACE_RETRY_S
                if not await self.space_is_back(outbox):
                    continue
            if self.quiet_tick(outbox):
                continue
            # A transaction follows: what rides joins it (behind the work taken, so
            # nothing queued before is reordered; a failed commit keeps it in the backlog).
            for item in self.take_riders():
                backlog.add(item)
            retrying = self.waiting_for_space  # space looked back: this commit is the try
            try:
                if not d.storage_started:
                    await d.start_storage(outbox, uplink)
                items = backlog.take(GROUP_COMMIT_MAX)
                intents = await self.commit_retrying(outbox, items) if retrying else await self.commit(outbox, items)
            except (StorageCorruptError, LedgerCorrupt) as exc:
                kind = FaultKind.LEDGER if isinstance(exc, LedgerCorrupt) else FaultKind.RUNTIME
                await d.storage_fault(outbox, kind, str(exc))
                continue
            except OutboxFullError as exc:
                if not relieved and not self.waiting_for_space:
                    # Release the reserve and shed telemetry, so that money records and
                    # events still commit; then try once more.
                    relieved = True
                    await outbox.relieve_full()
                    continue
                self.enter_space_wait(outbox, str(exc))
                next_space_try = time.monotonic() + SPACE_RETRY_S
                continue
            except Exception as exc:
                # Never drop what was read: retry until the database takes it. Meanwhile
                # the watchdog's database condition is not fed, so systemd restarts a
                # gateway whose storage stays broken.
                d.stats.commit_failures += 1
                attempt += 1
                log.error("commit failed (attempt %d), retrying: %s", attempt, exc)
                await asyncio.sleep(min(5.0, 0.2 * attempt))
                continue
            backlog.done(len(items))
            self.last_commit_mono = time.monotonic()
            self.dry_tripped.clear()
            relieved = False
            attempt = 0
            d.note_commit_ok()
            if retrying:
                self.leave_space_wait(outbox)
                next_reserve_check = 0.0  # space is back: the reserve first
            if outbox.unchecked is not None:  # the start-up check a full disk prevented
                outbox.unchecked = None
                await d.check_storage_now()
            d.watchdog.note_db_write_ok()
            for intent in intents:
                d.request_relay(intent)
            for item in items:
                if isinstance(item, Cycle):
                    # a poll cycle's end (statuses), not a relay operation's events
                    d.stats.cycles += item.final and (bool(item.statuses) or not item.events)
                    d.stats.readings += len(item.readings)
                    d.metrics.cycle_committed(item)
                    if d.on_cycle is not None:
                        with contextlib.suppress(Exception):
                            d.on_cycle(item)
            uplink.notify()
            if outbox.reserve_released and time.monotonic() >= next_reserve_check:
                next_reserve_check = time.monotonic() + 10.0
                await outbox.ensure_reserve()
