"""The daemon's supervisor: what runs under its TaskGroup, starting and stopping.

::

    bus pollers (one task per bus) ──► work queue ──► writer (one SQLite writer)
        ▲  relay requests                 ▲  ticks       │ rating, ledger, cutoff
        └──────────────── intents ────────┴──────────────┤ notify
                                                         ▼
                                                      uplink ──► MQTT broker

* A bus poller (:mod:`gateway.daemon.poller`) owns its bus: it polls, and beside
  the polling a relay worker (:mod:`gateway.daemon.relay_worker`) executes the
  relay operations decided for meters on that bus as soon as they arrive
  (verified by read-back). Their bus transactions take turns with the polls,
  meter by meter, through the bus scheduler; settle times hold neither the bus
  nor other relays. Buses start spread over the poll interval, so their
  readings reach the writer evenly. If the bus cannot be opened or fails, the
  poller logs it, waits a back-off and opens it again; other buses are not
  affected.
* The writer (:mod:`gateway.daemon.writer`) commits each poll cycle as one
  transaction: the readings, the debits they cause, the charge records that
  report them, cutoff state and events. Relay operations are handed to the bus
  only after the commit.
* A billing timer queues a tick every second (and at once after a top-up), so
  decisions that depend on time alone (a no-disconnect window ending) happen
  without waiting for a reading. At most one tick waits for the writer.
* The uplink reconnects on its own; nothing upstream waits for it.
* The supervisor (this module) opens the database, puts billing, the trusted
  clock and the command path on it (again after a storage fault or once a full
  disk has space), runs the timers (maintenance, command spool, integrity
  check, watchdog) and stops everything in order.
* Time: readings, billing, cutoff, commands and the uplink all take trusted
  time (:class:`gateway.security.trusted_time.TrustedClock`: the monotonic
  clock carried between trusted anchors), never the raw system clock. Clock
  events (jumps, a clock behind the floor, ...) are written to the audit log
  and sent to central in the writer's next transaction.
* Stopping (SIGTERM): pollers stop first, the writer then commits every cycle
  already polled, then the uplink stops (unacknowledged batches stay in the
  outbox and are sent again after the restart), and the database is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from firmware_bridge import event_loop
from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.events import event
from firmware_bridge.faults import FaultEvents
from firmware_bridge.relay_ops import RelayIntent
from firmware_bridge.scheduler import BackoffPolicy
from gateway import (
    __version__,
    health_report,
    heartbeat,
    meter_health,
    sdnotify,
    storage_setup,
    technician,
)
from gateway.billing import retention
from gateway.billing.cutoff import Contact
from gateway.billing.held import Stretch
from gateway.billing.ledger_store import LedgerCorrupt
from gateway.billing.money import report_yuan
from gateway.commands.bodies import CommandRefused
from gateway.commands.handler import CommandHandler, NoResend, audit_and_report
from gateway.commands.inbox import CommandInbox
from gateway.config import Config
from gateway.daemon.poller import BusPoller
from gateway.daemon.profiling import profiled
from gateway.daemon.relay_worker import CommandRelays, Relays
from gateway.daemon.writer import Cycle, Tick, Work, Writer
from gateway.database import open_database
from gateway.metrics import GatewayMetrics, TextfileExporter
from gateway.prepaid import Prepaid
from gateway.remote_config import DEFAULT_CONFIRM_MS, RemoteConfig
from gateway.risk_monitor import RiskMonitor
from gateway.security import audit, trusted_time
from gateway.security.envelope import CommandResult, Outcome
from gateway.security.roles import CommandType, TrustStore
from gateway.security.trusted_time import (
    ClockEvent,
    ClockPolicy,
    SyncProbe,
    TrustedClock,
    UnseenKind,
)
from gateway.storage_guard import Backlog, BillingHold, GuardedBilling
from gateway.storage_recovery import recover_money
from gateway.update_transfer import SoftwareDownloads, update_spool
from provisioning.keys import Keystore
from provisioning.usb import AUDIT_SPOOL, drain_audit_spool
from store_forward import presence
from store_forward.integrity import FaultKind
from store_forward.outbox import (
    Outbox,
    OutboxError,
    OutboxFullError,
    StorageCorruptError,
)
from store_forward.records import RecordClass, RecordKind
from store_forward.storage_state import StorageMode, describe
from store_forward.uplink import Uplink

log = logging.getLogger(__name__)

# How often the command spool (top-ups handed over by a technician) is looked at.
COMMAND_SPOOL_S = 1.0
# While starting or stopping takes long: EXTEND_TIMEOUT by this much, renewed every
# third of it, for at most EXTEND_LIMIT_S in total.
EXTEND_STEP_S = 30.0
EXTEND_LIMIT_S = 1800.0
# Maintenance: a pass every MAINTENANCE_S; a signed audit checkpoint at most every
# CHECKPOINT_S (and at stop); the replay table pruned every PRUNE_S.
MAINTENANCE_S = 60.0
# The maintenance pass persists the time floor when it moved this much (a poll
# cycle's transaction takes it along after half a minute: gateway/daemon/writer.py).
FLOOR_ALONE_MS = trusted_time.PERSIST_GRANULARITY_MS * 3 // 2
CHECKPOINT_S = 900.0
PRUNE_S = 3600.0
# The ledger's retention pass (days of retention: a pass every ten minutes keeps up,
# 20,000 entries a pass, and writes its marks six times an hour, not sixty).
RETENTION_S = 600.0
# How often the database is checked while running (PRAGMA quick_check on its own
# read-only connection); damage found becomes a storage fault.
INTEGRITY_CHECK_S = 6 * 3600.0
# Recoveries from a damaged database tried in a row before the daemon gives up
# (and systemd starts it again).
MAX_RECOVERIES = 3


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


HEALTH_CHECK_S = 0.5  # how often the heartbeat loop looks for a new health milestone
# A gateway.health record rides the next transaction the writer makes anyway (a poll
# cycle's) and is committed alone only when none came within health_ride_s of its
# sampling: one poll interval plus HEALTH_RIDE_SLACK_S (the next cycle's first commit
# comes an interval after the last one's, later by what its first meters' timeouts and
# retries cost), at most HEALTH_RIDE_MAX_S (central's view of a gateway that polls
# rarely stays fresh), and never past the next record (at most one waits).
HEALTH_RIDE_SLACK_S = 30.0
HEALTH_RIDE_MAX_S = 120.0


def health_ride_s(poll_interval_s: float, health_interval_s: float) -> float:
    """How long a ``gateway.health`` record waits for a transaction to ride on."""
    return min(poll_interval_s + HEALTH_RIDE_SLACK_S, HEALTH_RIDE_MAX_S, health_interval_s)


@dataclass
class DaemonStats:
    cycles: int = 0
    readings: int = 0
    commit_failures: int = 0
    relay_operations: int = 0
    relay_alarms: int = 0
    relays_refused: int = 0  # relay operations the storage state did not permit
    commands_dropped: int = 0  # commands not taken while the storage was faulted
    storage_faults: int = 0
    bus_failures: dict[str, int] = field(default_factory=dict)


class StartupError(EdgeGwError):
    """The daemon cannot start; the message names the file or directory and the cause."""

    kind = ErrorKind.STORAGE


def prepare_storage_dir(db_path: Path) -> None:
    """Create the database's directory (0700, parents too) if it is missing.
    Raises :class:`StartupError` naming the directory and the cause."""
    directory = db_path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"storage.path {db_path}: cannot create the directory {directory}: {exc.strerror or exc}"
        ) from exc
    if not directory.is_dir():
        raise StartupError(f"storage.path {db_path}: {directory} is not a directory")


class NoBilling:
    """Billing port of a gateway without prepaid accounts: refuses money commands."""

    async def apply_topup_in(
        self, db: Any, body: Any, *, command_id: str, channel: str, now_ms: int
    ) -> dict[str, Any]:
        raise CommandRefused("no_prepaid", "this gateway has no prepaid accounts")

    async def install_tariff_in(self, db: Any, doc: Any, *, now_ms: int) -> dict[str, Any]:
        raise CommandRefused("no_prepaid", "this gateway has no prepaid accounts")

    async def apply_snapshot_in(self, db: Any, body: Any, *, now_ms: int) -> dict[str, Any]:
        raise CommandRefused("no_prepaid", "this gateway has no prepaid accounts")

    async def replace_meter_in(self, db: Any, body: Any, *, command_id: str, now_ms: int) -> dict[str, Any]:
        raise CommandRefused("no_prepaid", "this gateway has no prepaid accounts")


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock_ms: Callable[[], int] = wall_ms,
        mono_ms: Callable[[], int] | None = None,
        clock_synced: Callable[[], bool] | None = None,
        clock_policy: ClockPolicy | None = None,
        on_cycle: Callable[[Cycle], None] | None = None,
        env: Mapping[str, str] | None = None,
        watchdog_deadlines_s: tuple[float, float] | None = None,
        backoff: BackoffPolicy | None = None,
        integrity_check_s: float = INTEGRITY_CHECK_S,
    ) -> None:
        """``clock_ms`` is the system clock, ``mono_ms`` the monotonic clock (default:
        ``CLOCK_BOOTTIME``; when only ``clock_ms`` is given, e.g. a simulated site clock
        running faster than real time, that clock serves as both), ``clock_synced`` says
        whether the system clock is NTP-synchronised (default: :class:`SyncProbe`);
        together they drive the trusted clock. ``env`` is where systemd's NOTIFY_SOCKET /
        WATCHDOG_USEC are read (default: the process environment);
        ``watchdog_deadlines_s`` = (poll, database) stall limits before pings to
        systemd's watchdog stop; ``backoff`` the buses' back-off and quarantine policy
        (default: the scheduler's); ``integrity_check_s`` how often the database is
        checked while running."""
        self.backoff = backoff
        # software.offer from central: the bundle's chunks over MQTT into the update spool
        self.software = SoftwareDownloads(
            update_spool(config.storage.path), prefix=config.broker.topic_prefix
        )
        self.config = config
        self.clock_ms = clock_ms
        if mono_ms is None:
            mono_ms = trusted_time.boot_ms if clock_ms is wall_ms else clock_ms
        self.mono_ms = mono_ms
        self.clock_synced = clock_synced if clock_synced is not None else SyncProbe(wall_ms=clock_ms)
        self.clock_policy = clock_policy or trusted_time.POLICY
        self.on_cycle = on_cycle
        self.env = env
        self.notifier = sdnotify.Notifier(env)
        self.watchdog_interval_s = sdnotify.watchdog_interval_s(env)
        poll_s, db_s = watchdog_deadlines_s or (max(180.0, 3 * config.gateway.poll_interval_s), 300.0)
        # One poll condition per bus: a stuck bus must not hide behind a healthy one.
        self.watchdog = sdnotify.WatchdogGate(
            self.notifier,
            poll_deadline_s=poll_s,
            db_deadline_s=db_s,
            extra={f"poll:{b.name}": poll_s for b in config.buses},
        )
        self.stats = DaemonStats()
        self.metrics = GatewayMetrics()  # counted as things happen; written by TextfileExporter
        self.outbox: Outbox | None = None
        self.uplink: Uplink | None = None
        self.prepaid: Prepaid | None = None
        self.risk = RiskMonitor(config.gateway.timezone)
        self.ready = asyncio.Event()
        self.started_ms = 0
        self._pollers: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()  # set: pollers and relay workers finish what they hold
        self._work: Work | None = None
        self._extending: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self.restart_reason: str | None = None  # set when a change needs a fresh start
        self.bus_of = {m.id: m.bus for m in config.meters}
        self.relays = Relays(self, [b.name for b in config.buses])
        self.writer = Writer(self)
        self.meter_faults = FaultEvents()  # meter.clock_fault etc., once per change of cause
        self.account_of = {m.id: m.account for m in config.meters}
        # each meter's state as central last heard it (meter_health); pollers update it
        self.meter_states: dict[str, meter_health.Known] = {}
        self.commands: CommandHandler | None = None
        self.inbox: CommandInbox | None = None
        self.clock: TrustedClock | None = None
        self.keys: Keystore | None = None
        self.remote_config: RemoteConfig | None = None
        self.maintenance_interval_s = MAINTENANCE_S
        self.checkpoint_interval_s = CHECKPOINT_S
        self.prune_interval_s = PRUNE_S
        self.retention_interval_s = RETENTION_S
        self.health_interval_s = config.gateway.health_interval_s  # 0: no health records
        self.health_ride_s = health_ride_s(config.gateway.poll_interval_s, config.gateway.health_interval_s)
        self.config_confirm_ms = DEFAULT_CONFIRM_MS  # default window of a remote change
        # Storage faults and a full disk (see gateway.storage_guard).
        self.integrity_check_s = integrity_check_s
        self.hold = BillingHold(None)
        self.storage_started = False  # billing, commands and the clock are up on the database
        self._fault_request: tuple[FaultKind, str] | None = None
        self._recoveries_in_a_row = 0
        self._tg: asyncio.TaskGroup | None = None
        self._storage_text = "normal"
        self._storage_key = "False:normal"
        self._status_sent = 0.0
        self._timers: list[asyncio.Task[None]] = []
        self._inbox_task: asyncio.Task[None] | None = None
        self._started_event = False
        # False: the remote configuration's start-up step is still to run (a full disk
        # kept it from running, or a new database took over)
        self._remote_config_started = True
        self._bundle_commands_done = False
        self.heartbeat: heartbeat.Writer | None = None

    @property
    def backlog(self) -> Backlog:
        """The work taken from the queue and not yet committed (see :class:`Writer`)."""
        return self.writer.backlog

    @property
    def waiting_for_space(self) -> bool:
        """The disk is full: the writer holds work in memory until space returns."""
        return self.writer.waiting_for_space

    # -- life cycle ------------------------------------------------------------

    def _extend_timeout_while(self, phase: str) -> asyncio.Task[None]:
        """Keep systemd's start or stop timeout from running out while ``phase`` lasts.

        Opening the database after a power cut (WAL recovery, the check of every
        account's ledger) or committing a long queue on stop can outlast
        ``TimeoutStartSec``/``TimeoutStopSec``. Until the returned task is
        cancelled, EXTEND_TIMEOUT is sent every few seconds; a genuine hang is
        still bounded, by ``EXTEND_LIMIT_S`` in total.
        """

        async def keep_extending() -> None:
            deadline = time.monotonic() + EXTEND_LIMIT_S
            while time.monotonic() < deadline:
                self.notifier.extend_timeout(EXTEND_STEP_S)
                await asyncio.sleep(EXTEND_STEP_S / 3)
            log.error("%s for more than %.0f s: no further timeout extension", phase, EXTEND_LIMIT_S)

        return asyncio.create_task(keep_extending(), name=f"extend-timeout:{phase}")

    async def run(self, stop: asyncio.Event) -> None:
        self._extending = self._extend_timeout_while("starting")
        try:
            # EDGEGW_PROFILE=FILE: a CPU profile of this thread (gateway.daemon.profiling)
            with profiled(os.environ if self.env is None else self.env):
                await self._run(stop)
        finally:
            self._stop_extending()

    def _stop_extending(self) -> None:
        if self._extending is not None:
            self._extending.cancel()
            self._extending = None

    async def _software_event(self, action: str, detail: dict[str, Any]) -> None:
        """A software transfer's progress: an audit entry and an event for central."""
        outbox = self.outbox
        if outbox is None:
            return
        log.info("%s: %s", action, " ".join(f"{k}={v}" for k, v in detail.items()))
        async with outbox.transaction() as db:
            await audit_and_report(
                db,
                outbox,
                actor="gateway:software",
                action=action,
                details=detail,
                event=event(action, detail),
                time_ms=self.time_ms(),
            )
        if self.uplink is not None:
            self.uplink.notify()

    def health_snapshot(self) -> dict[str, int]:
        """The milestones the heartbeat carries for the updater's health gate
        (gateway.update): poll cycles and readings committed, batches acknowledged."""
        return {
            "buses": len(self.config.buses),
            "poll_cycles": self.stats.cycles,
            "readings": self.stats.readings,
            "acks": self.uplink.stats.acked if self.uplink is not None else 0,
        }

    def request_restart(self, reason: str) -> None:
        """Stop cleanly so the service manager starts the daemon again (the CLI exits
        with :data:`gateway.remote_config.RESTART_EXIT_CODE`)."""
        log.warning("restarting: %s", reason)
        self.restart_reason = reason
        if self._stop is not None:
            self._stop.set()

    async def _run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        cfg = self.config
        prepare_storage_dir(cfg.storage.path)
        outbox = await open_database(
            cfg.storage.path,
            keys=storage_setup.storage_keys(cfg),
            policy=storage_setup.storage_policy(cfg),
            check_wait_s=Outbox.CHECK_WAIT_S,
        )
        self.outbox = outbox
        self.started_ms = self.clock_ms()
        self.heartbeat = heartbeat.Writer(
            heartbeat.path_for(cfg.gateway.heartbeat_file, cfg.storage.path, self.env),
            version=__version__,
            started_ms=self.started_ms,
        )
        self.beat(heartbeat.Phase.STARTING, "opening the database and keys")
        if cfg.security.trust_file is not None:
            # First, before anything a bad configuration could make fail: a remote
            # change the daemon keeps restarting on is rolled back here.
            self.remote_config = RemoteConfig(
                cfg.source,
                outbox,
                self.time_ms,
                self.request_restart,
                contact=self.contact,
                confirm_window_ms=self.config_confirm_ms,
            )
            try:
                await self.remote_config.start()
            except OutboxFullError as exc:  # done once the database can be written
                log.error("remote configuration check at start waits for space: %s", exc)
                self._remote_config_started = False
        self.prepaid = Prepaid.from_config(cfg)
        self.hold = BillingHold(self.prepaid)
        if self.prepaid is not None:
            self.prepaid.attach(outbox)
        uplink = Uplink(
            outbox,
            gateway_id=cfg.gateway.id,
            broker=cfg.broker,
            settings=cfg.uplink,
            clock_ms=self.time_ms,
            on_command=self._on_command,
            codec=storage_setup.uplink_codec(cfg),
            max_bytes_per_s=storage_setup.max_bytes_per_s(cfg),
            unauthenticated_acks=cfg.uplink.allow_unauthenticated_acks,
            identity=presence.Identity(cfg.gateway.id, __version__, heartbeat.boot_id(), self.started_ms),
            # acks ride on the next poll cycle's transaction; alone only when none came
            ack_fold_s=max(2.0, 2 * cfg.gateway.poll_interval_s),
        )
        self.uplink = uplink
        self.software.link = uplink  # the gateway's one MQTT connection carries the chunks too
        work: Work = asyncio.Queue(maxsize=256)
        self._work = work
        exporter: TextfileExporter | None = None
        try:
            self.keys = self._open_keystore()
            # A damaged database was replaced (its money state is recovered here), a
            # full disk leaves billing waiting for space: either way the daemon starts
            # and polls; only a fault that keeps coming back ends it.
            await self._start_storage_or_wait(outbox, uplink)
            self.watchdog.note_db_write_ok()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._pollers = [
                    tg.create_task(
                        BusPoller(self, bus, work).run(phase_s=i * cfg.gateway.poll_interval_s / len(cfg.buses)),
                        name=f"bus:{bus.name}",
                    )
                    for i, bus in enumerate(cfg.buses)
                ]
                writer = tg.create_task(self.writer.run(outbox, work, uplink), name="writer")
                up = tg.create_task(uplink.run(), name="uplink")
                timers = []
                if self.watchdog_interval_s is not None:
                    timers.append(
                        tg.create_task(self.watchdog.run(self.watchdog_interval_s / 2), name="watchdog")
                    )
                if self.prepaid is not None:
                    timers.append(tg.create_task(self.writer.billing_timer(work), name="billing"))
                timers.append(tg.create_task(self._maintenance(outbox), name="maintenance"))
                if self.health_interval_s > 0:
                    timers.append(tg.create_task(self._health_records(work), name="health"))
                timers.append(tg.create_task(self._command_spool(), name="command-spool"))
                if self.integrity_check_s > 0:
                    timers.append(tg.create_task(self._integrity_loop(outbox), name="integrity"))
                timers.append(tg.create_task(self._heartbeat_loop(), name="heartbeat"))
                if cfg.metrics.textfile is not None:
                    exporter = TextfileExporter(self, self.metrics, cfg.metrics.textfile, cfg.metrics.interval_s)
                    timers.append(tg.create_task(exporter.run(), name="metrics"))
                if self.inbox is not None:
                    self._inbox_task = tg.create_task(self.inbox.run(), name="commands")
                    timers.append(self._inbox_task)
                self.ready.set()
                if self.commands is not None:
                    timers.append(
                        tg.create_task(self.software.run(self._software_event), name="software")
                    )
                self._timers = timers
                self._stop_extending()
                self.notifier.ready(f"gateway {cfg.gateway.id}: {len(cfg.meters)} meters")
                self.beat(heartbeat.Phase.RUNNING, "")
                self.announce_storage(outbox)
                log.info(
                    "gateway %s running: %d buses, %d meters, %d prepaid accounts",
                    cfg.gateway.id,
                    len(cfg.buses),
                    len(cfg.meters),
                    len(cfg.accounts),
                    extra={"event_loop": event_loop.running_loop_name()},
                )
                await stop.wait()
                self.notifier.stopping()
                self.beat(heartbeat.Phase.STOPPING, "finishing polls and committing what was read")
                self._extending = self._extend_timeout_while("stopping")
                log.info("stopping: finishing polls and committing what was read")
                for t in self._timers:
                    t.cancel()
                await self.stop_polling()
                writer.cancel()
                up.cancel()
            try:
                if self.commands is not None:
                    await self.commands.flush_all_rejections()
                await self._save_time_floor(outbox, force=True)
            except OutboxError as exc:  # a full or damaged disk: nothing more to save
                log.error("stopping: last writes not made: %s", exc)
            try:  # the last entries of this run get their signature too
                await self.audit_checkpoint(outbox)
            except Exception as exc:
                log.error("audit checkpoint at stop failed: %s", exc)
            if exporter is not None:  # the last file says the daemon stopped
                await exporter.write(up=False)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.beat(heartbeat.Phase.STOPPED, f"failed: {exc}")
            raise
        finally:
            await outbox.close()
            if self.heartbeat is not None and self.heartbeat.phase is not heartbeat.Phase.STOPPED:
                why = "clean stop" if self.restart_reason is None else f"restarting: {self.restart_reason}"
                self.beat(heartbeat.Phase.STOPPED, why)
            log.info("stopped")

    def beat(self, phase: heartbeat.Phase | None = None, detail: str | None = None) -> None:
        """Write the heartbeat ``edgegw status`` reads (with the link's state and the
        last authenticated contact with central)."""
        hb = self.heartbeat
        if hb is None:
            return
        up = self.uplink
        err = hb.beat(
            self.clock_ms(),
            phase=phase,
            detail=detail,
            link=None if up is None else up.stats.state.value,
            last_contact_ms=None if up is None else up.last_contact_ms,
            health=self.health_snapshot(),
        )
        if err is not None:
            log.warning("%s (edgegw status cannot tell whether the daemon runs)", err)

    async def _heartbeat_loop(self) -> None:
        """A beat every interval, and one as soon as a health milestone moves from
        nothing (the first poll cycle, the first ack), so an update's health gate
        sees it at once."""
        assert self.heartbeat is not None
        last = time.monotonic()
        seen = {k: v > 0 for k, v in self.health_snapshot().items()}
        while True:
            await asyncio.sleep(HEALTH_CHECK_S)
            now = {k: v > 0 for k, v in self.health_snapshot().items()}
            if now != seen or time.monotonic() - last >= self.heartbeat.interval_s:
                self.beat()
                seen, last = now, time.monotonic()

    async def stop_polling(self, grace_s: float = 10.0) -> None:
        """Stop every bus poller and wait until all cycles already read are committed.

        Pollers stop at their next safe point (after the cycle or relay operation in
        hand, so a relay that moved always has its event); after ``grace_s`` they are
        cancelled. The uplink keeps running, so the backlog can still drain.
        """
        self.stopping.set()
        if self._pollers:
            _, late = await asyncio.wait(self._pollers, timeout=grace_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*self._pollers, return_exceptions=True)
        if self._work is not None:
            for item in self.writer.take_riders():  # (a health record waiting for a cycle)
                await self._work.put(item)
            await self._work.join()
        # Everything taken is committed; while the disk is full that gets a grace period.
        deadline = time.monotonic() + grace_s
        while self.backlog.items and (not self.waiting_for_space or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        if self.backlog.items:
            log.critical(
                "stopping with %d reading(s) not stored (the disk is still full);"
                " the meters' registers carry their energy into the next reading",
                self.backlog.readings(),
            )

    def time_ms(self) -> int:
        """Trusted time (the system clock only until the trusted clock is restored)."""
        return self.clock.now().time_ms if self.clock is not None else self.clock_ms()

    def unseen(self) -> list[Stretch]:
        """Recent stretches trusted time stepped over, for holding fixed charges."""
        if self.clock is None:
            return []
        return [Stretch(u.from_ms, u.to_ms, u.kind is UnseenKind.OFF) for u in self.clock.unseen]

    async def _clock_events_in(self, db: Any, outbox: Outbox, events: list[ClockEvent]) -> None:
        """Audit each clock event and report it to central, in ``db``'s transaction."""
        source = self.clock.state.quality.value if self.clock is not None else "system"
        for e in events:
            log.warning("clock: %s (%+d ms): %s", e.kind.value, e.delta_ms, e.detail)
            details = {"delta_ms": e.delta_ms, "detail": e.detail, "at_ms": e.at_ms}
            await audit_and_report(
                db,
                outbox,
                actor="gateway:clock",
                action=f"time.{e.kind.value}",
                details=details,
                event=event(f"time.{e.kind.value}", details),
                time_ms=e.at_ms,
                time_source=source,
            )

    def contact(self) -> Contact:
        """The gateway's contact with central as the cutoff policy (and anything else
        that asks "have we heard from central lately?") sees it: only authenticated
        messages count — a verified ack or a command whose signature verified
        (:attr:`store_forward.uplink.Uplink.last_contact_ms`)."""
        last = self.uplink.last_contact_ms if self.uplink is not None else None
        return Contact(last_contact_ms=last, started_ms=self.started_ms)

    # -- storage: start, faults, a full disk -------------------------------------

    async def _start_storage_or_wait(self, outbox: Outbox, uplink: Uplink) -> None:
        """Start what lives in the database; a full disk leaves it to the writer
        (polling goes on, readings wait in memory), damage is recovered from."""
        while True:
            try:
                await self.start_storage(outbox, uplink)
                return
            except OutboxFullError as exc:
                self.writer.enter_space_wait(outbox, str(exc))
                return
            except (StorageCorruptError, LedgerCorrupt) as exc:
                kind = FaultKind.LEDGER if isinstance(exc, LedgerCorrupt) else FaultKind.RUNTIME
                await self.storage_fault(outbox, kind, str(exc))

    async def start_storage(self, outbox: Outbox, uplink: Uplink) -> None:
        """Put billing, the trusted clock and the command path on the database: at
        start, once a full disk has space again, and after a storage fault.

        A database in FAULT first gets its money state back from the evidence
        (:func:`gateway.storage_recovery.recover_money`); if that fails it stays in
        FAULT (billing, relays and commands stopped) and is tried again every minute.
        Raises :class:`OutboxFullError` while the disk is full.
        """
        cfg = self.config
        if outbox.starved is not None:
            await outbox.resume_if_space()
        if outbox.storage.mode is StorageMode.FAULT:
            await self._recover_money(outbox)
        if not self._remote_config_started and self.remote_config is not None:
            await self.remote_config.start()
            self._remote_config_started = True
        events: list[ClockEvent] = []
        try:
            async with outbox.transaction() as db:
                self.hold.sync(await outbox.storage_state_in(db))
                if self.clock is None:
                    self.clock = TrustedClock.restored(
                        await trusted_time.load_floor(db),
                        seen_ms=await trusted_time.load_seen(db),
                        wall=self.clock_ms,
                        mono=self.mono_ms,
                        synced=self.clock_synced,
                        policy=self.clock_policy,
                    )
                    self.started_ms = self.time_ms()
                if not self._started_event:
                    started = event("gateway_started", gateway=cfg.gateway.id)
                    if outbox.starved is None:
                        await outbox.add_in(db, RecordClass.EVENT, RecordKind.EVENT, self.started_ms, started)
                    else:  # written with the first records once there is space
                        outbox.note_event(started)
                if self.prepaid is not None:
                    await self.prepaid.start_in(
                        db, self.started_ms, outbox if outbox.starved is None else None
                    )
                self.meter_states = await meter_health.start_in(db)
                if outbox.starved is None:  # else they wait in the clock for a later transaction
                    events = self.clock.drain_events()
                    await self._clock_events_in(db, outbox, events)
        except BaseException:
            if self.clock is not None:
                self.clock.requeue(events)  # written by a later transaction
            raise
        self._started_event = True
        if cfg.security.trust_file is not None:
            if self.commands is None:
                await self._start_commands(outbox, uplink)
                if self._tg is not None and self.inbox is not None and self._inbox_task is None:
                    self._inbox_task = self._tg.create_task(self.inbox.run(), name="commands")
                    self._timers.append(self._inbox_task)
            else:
                self.commands.invalidate_trust()
                await self.commands.start()
            if not self._bundle_commands_done and outbox.storage.mode is not StorageMode.FAULT:
                self._bundle_commands_done = True  # once, with the replay state in place
                await self.import_bundle_commands()
        await self.drain_provisioning_audit(outbox)
        self.storage_started = True
        self.announce_storage(outbox)

    async def _recover_money(self, outbox: Outbox) -> None:
        accounts = self.hold.all_accounts()
        tiers = {}
        for name in accounts:
            acct = self.hold.account(name)
            if acct is not None:
                tiers[name] = acct.settings.opening_tier
        try:
            await recover_money(outbox, accounts, self.time_ms(), opening_tiers=tiers)
        except (OutboxFullError, StorageCorruptError):
            raise
        except Exception as exc:
            log.exception("storage recovery from %s failed; billing stays stopped: %s", outbox.storage.evidence, exc)

    async def storage_fault(self, outbox: Outbox, kind: FaultKind, reason: str) -> None:
        """The database is damaged: stop billing and relays at once, keep the files as
        evidence, continue on a new database (the writer then recovers the money state)."""
        self.stats.storage_faults += 1
        self._recoveries_in_a_row += 1
        self.storage_started = False
        self._remote_config_started = False  # its tables, in the new database
        self.hold.sync(replace(outbox.storage, mode=StorageMode.FAULT, since_ms=self.time_ms()))
        log.critical("storage fault (%s): %s; billing and relay changes stop", kind.value, reason)
        if self._recoveries_in_a_row > MAX_RECOVERIES:
            raise OutboxError(
                f"storage fault {self._recoveries_in_a_row} times in a row ({reason}); giving up"
            )
        await outbox.recover_in_place(kind, reason)
        self.announce_storage(outbox)

    def announce_storage(self, outbox: Outbox) -> None:
        """Tell systemd (STATUS=) and the log when the storage state changes (the
        count of readings held while the disk is full: in STATUS= every few seconds)."""
        state = describe(outbox.storage)
        text = state
        if self.waiting_for_space:
            text = (
                f"disk full: waiting for space, {self.backlog.readings()} reading(s) held in"
                f" memory; storage {state}"
            )
        key = f"{self.waiting_for_space}:{state}"
        now = time.monotonic()
        if key == self._storage_key and (text == self._storage_text or now - self._status_sent < 5.0):
            return
        changed = key != self._storage_key
        self._storage_key, self._storage_text, self._status_sent = key, text, now
        if text == "normal":
            self.notifier.status("running")
        else:
            self.notifier.status(text)
        if changed and text != "normal":
            normal = outbox.storage.mode is StorageMode.NORMAL and not self.waiting_for_space
            log.log(logging.WARNING if normal else logging.CRITICAL, "storage: %s", text)

    async def check_storage_now(self) -> str | None:
        """Run the database integrity check now; damage found becomes a storage fault
        (handled by the writer). Returns what was found."""
        if self.outbox is None:
            return None
        reason = await self.outbox.integrity_check()
        if reason is not None:
            log.critical("integrity check: %s", reason)
            self._fault_request = (FaultKind.CHECK, reason)
            if self._work is not None and not self.writer.tick_queued and self.prepaid is not None:
                self.writer.tick_queued = True
                await self._work.put(Tick(self.time_ms()))  # wake the writer
        return reason

    async def _integrity_loop(self, outbox: Outbox) -> None:
        while True:
            await asyncio.sleep(self.integrity_check_s)
            try:
                await self.check_storage_now()
            except Exception as exc:
                log.error("integrity check failed to run: %s", exc)

    async def _start_commands(self, outbox: Outbox, uplink: Uplink) -> None:
        cfg = self.config
        assert cfg.security.trust_file is not None and self.clock is not None
        assert self.remote_config is not None
        trust = TrustStore.load(cfg.security.trust_file)
        keys = self.keys if cfg.security.keystore else None
        inner: Any = self.prepaid if self.prepaid is not None else NoBilling()
        self.commands = CommandHandler(
            outbox,
            trust=trust,
            gateway_id=cfg.gateway.id,
            clock=self.clock,
            billing=GuardedBilling(inner, outbox, self.hold),
            relay=CommandRelays(self),
            config=self.remote_config,
            resend=NoResend(),
            keys=keys,
            known_meter=lambda m: m in self.bus_of,
            software=self.software,
        )
        await self.commands.start()
        self.inbox = CommandInbox(self.commands, uplink.topics, on_result=self._on_command_result)

    def _on_command_result(self, result: CommandResult) -> None:
        """After each command: send its result; a verified command (applied or duplicate:
        its signature verified, so central sent it) is contact with central, and its
        issue time is a lower bound on true time that can confirm a jumped system clock."""
        env = result.envelope
        self.metrics.command_result(result)
        fields = {"command": env.command_id if env is not None else None, "outcome": result.outcome.value}
        if result.ok:
            log.info("command %s: %s", env.type.value if env is not None else "?", result.outcome.value, extra=fields)
        else:  # without the id in the text: a flood of bad commands folds into one line
            why = result.code or (result.reason.value if result.reason is not None else "")
            log.warning("command rejected: %s: %s", why, result.message, extra=fields)
        if self.uplink is not None:
            if result.ok:
                self.uplink.note_contact("command")
            self.uplink.notify()
        if self.clock is not None and env is not None and result.outcome is not Outcome.REJECTED:
            self.clock.corroborate(env.issued_at_ms)

    # -- signed commands a technician brings (gateway.technician) ---------------

    @property
    def command_spool(self) -> Path:
        return technician.spool_dir(Path(self.config.storage.path))

    async def _handle_local(self, raw: bytes, channel: str) -> CommandResult:
        assert self.commands is not None
        result = await self.commands.handle(raw, channel=channel)
        self._on_command_result(result)  # as for a command from MQTT
        return result

    async def _answer_details(self, result: CommandResult) -> dict[str, Any]:
        """For a technician's top-up: the account's balance after it (as reported)."""
        env = result.envelope
        if self.prepaid is None or env is None or not result.ok or env.type is not CommandType.TOPUP:
            return {}
        account = str(env.body.get("account"))
        if account not in self.prepaid.accounts or self.outbox is None:
            return {}
        async with self.outbox.transaction() as db:
            view = await self.prepaid.ledger.view(db, account)
            await self.prepaid.ledger.flush(db)
        return {"account": account, "balance": str(report_yuan(view.balance_micro))}

    async def drain_command_spool(self) -> int:
        """Apply the envelopes ``edgegw topup apply`` left in the command spool."""
        handle = self._handle_local if self.commands is not None else None
        return await technician.drain_spool(self.command_spool, handle, describe=self._answer_details)

    async def _command_spool(self) -> None:
        await asyncio.to_thread(technician.ensure_spool, self.command_spool)
        while True:
            try:
                if self.outbox is None or self.outbox.storage.mode is not StorageMode.FAULT:
                    await self.drain_command_spool()  # (while faulted they wait in the spool)
            except Exception as exc:  # the files stay; the next pass tries again
                log.error("command spool %s: %s", self.command_spool, exc)
            await asyncio.sleep(COMMAND_SPOOL_S)

    async def import_bundle_commands(self) -> list[tuple[str, str]]:
        """Apply the signed envelopes the provisioning bundle in force carried."""
        if self.commands is None or self.outbox is None:
            return []
        outbox = self.outbox
        try:
            return await technician.import_bundle_commands(
                Path(self.config.source).parent, self._handle_local, outbox.transaction, self.time_ms()
            )
        except Exception as exc:  # a bad file must not keep the gateway from starting
            log.error("bundle commands: %s", exc)
            return []

    async def _on_command(self, raw: bytes) -> None:
        if self.outbox is not None and self.outbox.storage.mode is StorageMode.FAULT:
            # Nothing is accepted (nor its id recorded) until the replay state is back
            # from the evidence; central sends it again.
            self.stats.commands_dropped += 1
            log.warning("command not taken (%d bytes): storage fault, replay state not yet recovered", len(raw))
            return
        if self.inbox is not None:
            self.inbox.offer(raw)  # never blocks the uplink's ack processing
        else:
            log.warning("command received but no trust file is configured (%d bytes)", len(raw))

    @contextlib.asynccontextmanager
    async def transaction(self, outbox: Outbox) -> AsyncIterator[Any]:
        """An outbox transaction that also writes the clock events waiting (audit log and
        an event for central); a rollback gives them back to the clock for the next one."""
        events: list[ClockEvent] = []
        try:
            async with outbox.transaction() as db:
                if self.clock is not None:
                    events = self.clock.drain_events()
                    await self._clock_events_in(db, outbox, events)
                yield db
        except BaseException:
            if self.clock is not None:
                self.clock.requeue(events)
            raise

    async def _save_time_floor(
        self,
        outbox: Outbox,
        *,
        force: bool = False,
        granularity_ms: int = trusted_time.PERSIST_GRANULARITY_MS,
    ) -> None:
        """Persist the time floor and the last time used (when moved a minute; ``force``:
        now), with any clock events still waiting."""
        if self.clock is None:
            return
        async with self.transaction(outbox) as db:
            await trusted_time.save_clock(
                db, self.clock, force=force, granularity_ms=granularity_ms
            )

    async def drain_provisioning_audit(self, outbox: Outbox) -> int:
        """Move what the USB provisioning unit recorded into the audit log.

        ``edgegw-usb@`` runs as another user and never opens this database: it
        appends every attempt, accepted or refused, to ``audit-spool.jsonl`` in
        the provisioning directory. Each record becomes an audit entry and an
        event for central, in one transaction. Returns how many were moved.
        """
        root = self.config.security.provisioning_root(self.config.source)
        if root is None:
            return 0

        async def record(action: str, detail: dict[str, Any]) -> None:
            now = self.time_ms()
            async with outbox.transaction() as db:
                await audit_and_report(
                    db,
                    outbox,
                    actor="provisioning:usb",
                    action=action,
                    details=detail,
                    event=event("provisioning.audit", action=action, detail=detail),
                    time_ms=now,
                )

        try:
            n = await drain_audit_spool(root / AUDIT_SPOOL, record)
        except Exception as exc:  # the rest stays in the spool for the next pass
            log.error("provisioning audit spool %s: %s", root / AUDIT_SPOOL, exc)
            return 0
        if n:
            log.info("provisioning: %d audit record(s) imported from %s", n, root / AUDIT_SPOOL)
            if self.uplink is not None:
                self.uplink.notify()
        return n

    def _open_keystore(self) -> Keystore | None:
        """The gateway's keystore (the configured one, else the default directory if
        it holds one): its identity key signs the audit checkpoints."""
        d = storage_setup.keystore_dir(self.config)
        if self.config.security.keystore is None and not (d / "manifest.json").exists():
            log.warning("no keystore at %s: the audit log gets no signed checkpoints", d)
            return None
        return Keystore.open(d)

    async def audit_checkpoint(self, outbox: Outbox) -> audit.Checkpoint | None:
        """Sign the audit log's head with the gateway identity key and send it to central.

        Nothing is written when the head already has a checkpoint. Once a
        checkpoint is stored (and central holds its copy), deleting or rewriting
        any entry up to it is caught by ``edgegw audit verify``.
        """
        if self.keys is None:
            return None
        keys = self.keys
        now = self.time_ms()
        async with outbox.transaction() as db:
            cp = await audit.checkpoint(
                db, sign=keys.sign, public_key=keys.identity_public_bytes(), time_ms=now
            )
            if cp is not None:
                await outbox.add_in(
                    db,
                    RecordClass.EVENT,
                    RecordKind.EVENT,
                    now,
                    audit.checkpoint_event(cp, self.config.gateway.id),
                )
        if cp is not None:
            log.info("audit checkpoint at entry %d", cp.seq)
        return cp

    async def _health_records(self, work: Work) -> None:
        """A ``gateway.health`` record every ``gateway.health_interval_s``
        (gateway.health_report), stamped with the time it was sampled. It rides the
        next transaction the writer makes anyway (a poll cycle's, :meth:`Writer.ride`)
        and is queued to be committed alone only when none came within
        :attr:`health_ride_s`: a gateway whose buses are silent still reports."""
        interval = self.health_interval_s
        # the first soon after start (committed with the next poll cycle: a boot is seen
        # within a poll interval; the retained presence says so at once)
        await asyncio.sleep(min(interval, 5.0))
        while True:
            body = await health_report.sample(self)
            record = Cycle("", body["time_ms"], [], [], [body], final=False)
            bound = min(self.health_ride_s, interval)
            self.writer.ride(record)
            await asyncio.sleep(bound)
            if self.writer.unride(record):  # no transaction came for it: alone
                await work.put(record)
            await asyncio.sleep(interval - bound)

    async def _maintenance(self, outbox: Outbox) -> None:
        """The daemon's housekeeping timer; see :meth:`maintain`. The first pass also
        checkpoints and prunes (a gateway restarted often still does both)."""
        last_checkpoint = last_prune = last_retention = -float("inf")
        while True:
            await asyncio.sleep(self.maintenance_interval_s)
            now = time.monotonic()
            checkpoint = now - last_checkpoint >= self.checkpoint_interval_s
            prune = now - last_prune >= self.prune_interval_s
            retain = now - last_retention >= self.retention_interval_s
            await self.maintain(outbox, checkpoint=checkpoint, prune=prune, retention=retain)
            if checkpoint:
                last_checkpoint = now
            if prune:
                last_prune = now
            if retain:
                last_retention = now

    async def maintain(
        self, outbox: Outbox, *, checkpoint: bool = False, prune: bool = False, retention: bool = False
    ) -> None:
        """One maintenance pass: import the provisioning audit spool, persist the time
        floor, summarise rejected commands, re-hand relay operations of commands
        that a crash left pending, confirm or roll back a remote configuration
        change; with ``checkpoint`` a signed audit checkpoint, with ``prune`` the
        seen command ids no command can use any more are forgotten, with
        ``retention`` old acknowledged ledger entries go (``billing.ledger_retention_days``).
        One job failing does not stop the others."""
        if outbox.storage.mode is StorageMode.FAULT and self.storage_started:
            self.storage_started = False  # the writer tries the money recovery again
        jobs: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("provisioning audit", lambda: self.drain_provisioning_audit(outbox)),
            # on its own only when no poll cycle's transaction took it (writer.py)
            ("time floor", lambda: self._save_time_floor(outbox, granularity_ms=FLOOR_ALONE_MS)),
            ("command spool answers", lambda: technician.prune_results(self.command_spool)),
        ]
        if self.commands is not None:
            jobs += [
                ("rejection summaries", self.commands.flush_rejections),
                ("relay intents", self.commands.hand_pending_relays),
            ]
            if prune:
                jobs.append(("replay table", self.commands.prune_replay_table))
        if self.remote_config is not None:
            jobs.append(("configuration confirmation", self.remote_config.check))
        if retention:
            jobs.append(("ledger retention", lambda: self.ledger_retention(outbox)))
        if checkpoint:
            jobs.append(("audit checkpoint", lambda: self.audit_checkpoint(outbox)))
        for name, job in jobs:
            try:
                await job()
            except Exception as exc:
                log.error("maintenance: %s failed: %s", name, exc)

    async def ledger_retention(self, outbox: Outbox) -> retention.PassResult | None:
        """Old debits and fixed charges central acknowledged leave the local ledger
        (:mod:`gateway.billing.retention`), in small transactions of their own, never
        in a poll cycle's; only while billing runs normally on trusted time."""
        days = self.config.billing.ledger_retention_days
        if (
            days <= 0
            or self.prepaid is None
            or self.clock is None
            or not self.storage_started
            or outbox.storage.mode is not StorageMode.NORMAL
            or self.waiting_for_space
        ):
            return None
        return await retention.run_pass(outbox.transaction, days, self.time_ms())

    # -- what the writer and the buses ask of the supervisor ----------------------

    def take_fault_request(self) -> tuple[FaultKind, str] | None:
        """Damage the integrity check found, for the writer to handle (once)."""
        request, self._fault_request = self._fault_request, None
        return request

    def note_commit_ok(self) -> None:
        """A commit went through: the storage recoveries in a row start again from 0."""
        self._recoveries_in_a_row = 0

    def relays_idle(self) -> bool:
        """No relay operation is waiting for its bus."""
        return self.relays.idle()

    def request_relay(self, intent: RelayIntent) -> None:
        """Queue a relay operation for the bus of ``intent.meter`` (after a commit)."""
        self.relays.request(intent)
