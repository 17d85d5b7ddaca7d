"""Prepaid enforcement in the daemon: the thin shell around :mod:`gateway.billing`.

Everything here runs inside a transaction owned by the outbox's single writer,
so a reading, the debit it causes, the outbox record that reports the debit,
the cutoff state change and its event commit together or not at all:

* :meth:`Prepaid.on_readings_in` — per poll cycle: rate each new register
  reading of a meter that bills to an account, append the debit, upload it as a
  ``charge`` record, and re-evaluate the cutoff policy of the accounts touched;
* :meth:`Prepaid.tick_in` — on a timer: fixed charges (held, and reported
  instead of debited, where their period starts in a stretch of time the
  gateway did not live through: :mod:`gateway.billing.held`), and cutoff
  decisions that depend on time alone (a no-disconnect window ending, contact
  lost);
* the *billing port* used by signed commands (top-ups, tariffs, snapshots).

Every time here is trusted time (:mod:`gateway.security.trusted_time`), never
the raw system clock.

The policy follows time exactly as ``edgegw tariff simulate`` does
(:func:`gateway.billing.cutoff.follow`): every balance change is noted with
its instant (a debit at its reading's time, a fixed charge at its period
start, a top-up when it is applied), and the next evaluation of the account
takes them in order, evaluating at each one and at every instant in between
at which the decision may change (a window's end, a reconnect delay). So a
cut deferred by a no-disconnect window ending at 08:00 is decided at 08:00,
whenever the tick runs, and its events carry that instant.

Relay operations are never executed inside a transaction. Decisions return
:class:`RelayIntent`s; the daemon hands them to the meter's bus after the
commit. A relay command lost between the commit and the bus (crash, bus
error) is re-driven by :func:`gateway.billing.cutoff.reassert` when the next
reading shows the relay in the wrong state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from firmware_bridge.events import event
from firmware_bridge.reading import Quantity, Reading
from firmware_bridge.relay_ops import RelayIntent
from gateway.billing import ledger_store as ls
from gateway.billing.account import AccountSettings, load_account
from gateway.billing.cutoff import (
    Action,
    Contact,
    CutoffConfig,
    CutoffDecision,
    CutoffEvent,
    CutoffState,
    PolicyPoint,
    describe,
    follow,
    next_change_ms,
    reassert,
)
from gateway.billing.held import OFF_BILLED_MS, HeldGroup, Stretch
from gateway.billing.ledger import Entry, adjustment_entry
from gateway.billing.ledger_cache import LedgerCache
from gateway.billing.money import ckwh_to_kwh, report_yuan, yuan_text
from gateway.billing.rating import RegisterReading, ReplacementError, ResetNotice
from gateway.billing.reconcile import SnapshotStatus
from gateway.billing.tariff import TariffBook, TariffError
from gateway.billing.tariff_file import load_book, parse_tariff
from gateway.billing.topup import Source, TopUp, TopUpStatus
from gateway.commands.bodies import (
    CommandRefused,
    parse_balance_snapshot,
    parse_meter_replace,
    parse_tariff_publish,
    parse_topup,
)
from gateway.config import Config
from store_forward.outbox import Outbox
from store_forward.records import RecordClass, RecordKind

log = logging.getLogger(__name__)

# A change noted, or a tick, this far before the last evaluated instant means the
# clock went back (not just a reading stamped a little late): the account's policy
# then starts afresh at the new time instead of waiting for the old one.
CLOCK_BACK_TOLERANCE_MS = 60_000


@dataclass(frozen=True, slots=True)
class _Quiet:
    """After an evaluation of an account's policy: with this state, balance, contact
    and configuration nothing changes the decision before ``until_ms`` (None: until
    one of them does) — :func:`gateway.billing.cutoff.next_change_ms`."""

    state: CutoffState
    balance_micro: int
    contact: tuple[int | None, int | None]  # what of the contact the policy reads
    cfg: CutoffConfig
    until_ms: int | None


def _contact_key(contact: Contact, cfg: CutoffConfig) -> tuple[int | None, int | None]:
    """What of ``contact`` the policy of ``cfg`` depends on: the last contact with
    central only with contact protection, the start only with start-up protection
    (:func:`gateway.billing.cutoff.protection`; every other use of the contact is in
    the text of a pending state that only these protections cause)."""
    return (
        contact.last_contact_ms if cfg.contact_protect_after_ms is not None else None,
        contact.started_ms if cfg.startup_protect_ms else None,
    )


@dataclass
class PrepaidAccount:
    settings: AccountSettings
    book: TariffBook


def _cutoff_event(e: CutoffEvent, state: str) -> dict[str, Any]:
    return event(
        f"cutoff.{e.type}",
        {
            "account": e.account,
            "time_ms": e.time_ms,
            "from": e.from_level.value,
            "to": e.to_level.value,
            "state": state,
            "balance_micro": e.balance_micro,
            "balance": str(report_yuan(e.balance_micro)),
            "reason": e.reason,
        },
    )


def _held_event(account: str, g: HeldGroup) -> dict[str, Any]:
    """Central's notice of fixed charges held (never debited here): what to settle."""
    return event(
        "billing.fixed_held",
        account=account,
        cause="off_time" if g.stretch.off_time else "clock_jump",
        from_ms=g.stretch.from_ms,
        to_ms=g.stretch.to_ms,
        count=len(g.charges),
        amount_micro=g.amount_micro,
        amount=str(report_yuan(g.amount_micro)),
        charges=[c.charge_id for c in g.charges],
        truncated=g.truncated,
    )


def _register_json(r: RegisterReading) -> dict[str, Any]:
    return {
        "reading": r.reading_id,
        "time_ms": r.time_ms,
        "import_kwh": str(r.import_kwh),
        **{f"{k.lower()}_kwh": str(v) for k, v in sorted(r.rate_kwh.items())},
    }


def _reset_event(account: str, n: ResetNotice) -> dict[str, Any]:
    """An undeclared register reset, confirmed: the evidence, and what is billed meanwhile."""
    return event(
        "meter.register_reset",
        account=account,
        meter=n.meter_id,
        last_good=_register_json(n.last_good),
        first_after=_register_json(n.first_after),
        confirmed_by=_register_json(n.confirmed_by),
        billing=(
            "billed up to last_good on the old register and from first_after on the new one; "
            "the energy in between is held until the exchange is declared with meter.replace "
            "(the old meter's final and the new meter's initial registers), then billed"
        ),
    )


def _charge_record(entry: Entry, now_ms: int) -> tuple[RecordClass, str, int, dict[str, Any]]:
    """The outbox record of a ledger entry: every local entry goes to central, so
    central can re-rate and reconcile."""
    return RecordClass.BILLING, RecordKind.CHARGE, now_ms, entry.to_json()


class _Records:
    """Outbox records decided in one transaction, added together at its end."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.items: list[tuple[RecordClass, str, int, dict[str, Any]]] = []

    def charge(self, entry: Entry) -> None:
        self.items.append(_charge_record(entry, self.now_ms))

    def event(self, body: dict[str, Any], time_ms: int | None = None) -> None:
        t = self.now_ms if time_ms is None else time_ms
        self.items.append((RecordClass.EVENT, RecordKind.EVENT, t, body))


class Prepaid:
    def __init__(
        self,
        accounts: Mapping[str, PrepaidAccount],
        meter_account: Mapping[str, str],
        *,
        max_gap_ms: int | None = None,
        off_billed_ms: int = OFF_BILLED_MS,
        skip_quiet: bool = True,
    ) -> None:
        self.accounts = dict(accounts)
        self.meter_account = dict(meter_account)
        self.max_gap_ms = max_gap_ms
        self.off_billed_ms = off_billed_ms  # off-time billed as usual (gateway.billing.held)
        # Set when something changed a balance outside a poll cycle (a top-up):
        # the daemon's billing timer evaluates at once instead of at its next tick.
        self.dirty = asyncio.Event()
        self.outbox: Outbox | None = None  # where ledger entries from commands are uploaded
        # The single writer's working copy of balances, baselines and cutoff states;
        # dropped whenever a transaction rolls back (see attach()).
        self.ledger = LedgerCache(skip_quiet=skip_quiet)
        # Per account: where the policy was last evaluated, and the balance changes
        # since (instant, balance after), in the order they were made.
        self._points: dict[str, PolicyPoint] = {}
        self._changes: dict[str, list[tuple[int, int]]] = {}
        # Per account, after its last evaluation: until when nothing is due (an
        # evaluation before then only moves the point: see _evaluate_in). False:
        # every account is evaluated, and scanned for fixed charges, in full every
        # time (the tests compare both).
        self.skip_quiet = skip_quiet
        self._quiet: dict[str, _Quiet] = {}
        # Tariff books installed in the open transaction, with the books they replace:
        # a rollback puts the old ones back (see install_tariff_in).
        self._replaced_books: list[tuple[PrepaidAccount, TariffBook]] = []

    def attach(self, outbox: Outbox) -> None:
        """Use ``outbox`` for uploads and drop the cached state on every rollback."""
        self.outbox = outbox
        outbox.on_rollback(self.ledger.forget)
        outbox.on_rollback(self.forget_policy_points)
        outbox.on_rollback(self._restore_books)
        outbox.on_commit(self._replaced_books.clear)

    def _restore_books(self) -> None:
        """After a rollback: the tariff versions installed in it are gone from the
        database, so the accounts rate with the books they had before."""
        for account, book in reversed(self._replaced_books):
            account.book = book
        self._replaced_books.clear()

    def forget_policy_points(self) -> None:
        """After a rollback: the next evaluation of each account starts afresh, at its
        time, from the stored cutoff state and balance (nothing in between is replayed)."""
        self._points.clear()
        self._changes.clear()
        self._quiet.clear()

    def note_balance(self, account: str, time_ms: int, balance_micro: int) -> None:
        """A ledger entry changed ``account``'s balance at ``time_ms`` (the next policy
        evaluation takes it in order)."""
        self._changes.setdefault(account, []).append((time_ms, balance_micro))

    @classmethod
    def from_config(cls, cfg: Config) -> Prepaid | None:
        """None when the configuration defines no prepaid accounts."""
        if not cfg.accounts:
            return None
        tz = cfg.gateway.timezone
        accounts = {
            a.id: PrepaidAccount(load_account(a.settings, tz), load_book(a.tariffs, tz))
            for a in cfg.accounts
        }
        meters = {m.id: m.account for m in cfg.meters if m.account in accounts}
        return cls(accounts, {k: v for k, v in meters.items() if v is not None})

    # -- start-up ---------------------------------------------------------

    async def start_in(self, db: aiosqlite.Connection, now_ms: int, outbox: Outbox | None = None) -> None:
        """Open accounts (with their opening balance), verify every ledger.

        An opening balance is a ledger entry like any other: with ``outbox`` (the
        daemon's) its charge record goes to central in the same transaction, so
        central's copy of the ledger starts where the gateway's does."""
        for name, acct in self.accounts.items():
            s = acct.settings
            created = await ls.open_account(db, name, s.opening_tier)
            if created and s.opening_balance_micro:
                res = await ls.append(
                    db,
                    adjustment_entry(
                        f"opening:{name}",
                        name,
                        s.opening_balance_micro,
                        now_ms,
                        "opening balance from the account file",
                        "provisioning",
                    ),
                )
                if outbox is not None and res.applied:
                    await outbox.add_in(db, *_charge_record(res.entry, now_ms))
            await ls.verify(db, name)  # raises LedgerCorrupt: never run on a bad ledger
        # Tariff versions installed by central since the configuration was written.
        for doc in await ls.load_tariff_docs(db):
            try:
                tariff = parse_tariff(doc, "stored central tariff")
            except TariffError as exc:  # stored after validation: only a newer parser refuses
                log.error("stored central tariff refused: %s", exc)
                continue
            for acct in self.accounts.values():
                if acct.book.tariff_id == tariff.tariff_id:
                    acct.book = acct.book.with_version(tariff)
        self.ledger.forget()
        await self.ledger.warm(db, list(self.accounts))

    # -- per cycle and per tick ---------------------------------------------

    async def on_readings_in(
        self,
        db: aiosqlite.Connection,
        outbox: Outbox,
        readings: Sequence[tuple[int, Reading]],
        now_ms: int,
        contact: Contact,
        unseen: Sequence[Stretch] = (),
    ) -> list[RelayIntent]:
        """``unseen``: as for :meth:`tick_in` (fixed charges due by a reading's time are
        raised before its debit)."""
        out = _Records(now_ms)
        touched: dict[str, None] = {}
        intents: list[RelayIntent] = []
        for record_id, reading in readings:
            account = self.meter_account.get(reading.meter_id)
            if account is None:
                continue
            acct = self.accounts[account]
            rr = RegisterReading.from_reading(reading, str(record_id))
            if rr is not None:
                # periods that started before this reading are charged before its debit,
                # so the ledger (and the policy following it) is in time order
                await self._charge_fixed_in(db, out, account, acct, rr.time_ms, unseen)
                rated = await self.ledger.rate(db, account, rr, acct.book, max_gap_ms=self.max_gap_ms)
                if rated.appended is not None and rated.appended.applied:
                    out.charge(rated.appended.entry)
                    self.note_balance(account, rated.appended.entry.time_ms, rated.appended.view.balance_micro)
                if rated.reset is not None:
                    out.event(_reset_event(account, rated.reset))
                for a in rated.result.anomalies if rated.result else ():
                    out.event(
                        event(
                            f"rating.{a.kind.value}",
                            account=account,
                            meter=a.meter_id,
                            from_reading=a.start_reading_id,
                            to_reading=a.end_reading_id,
                            detail=a.detail,
                        )
                    )
            touched[account] = None
            relay_open = reading.good(Quantity.RELAY_OPEN)
            if relay_open is not None:
                intents += await self._reassert_in(
                    db, out, account, reading.meter_id, bool(relay_open), now_ms, contact
                )
        for account in touched:
            intents += await self._evaluate_in(db, out, account, now_ms, contact)
        await self._finish(db, outbox, out)
        return intents

    async def on_relay_states_in(
        self,
        db: aiosqlite.Connection,
        outbox: Outbox,
        states: Sequence[tuple[str, bool]],
        now_ms: int,
        contact: Contact,
    ) -> list[RelayIntent]:
        """Relay positions read back from the meters (``(meter, open)``): a relay that
        differs from the committed decision is re-driven, as when a reading reports it
        (:func:`gateway.billing.cutoff.reassert`)."""
        out = _Records(now_ms)
        intents: list[RelayIntent] = []
        for meter, is_open in states:
            account = self.meter_account.get(meter)
            if account is not None:
                intents += await self._reassert_in(db, out, account, meter, is_open, now_ms, contact)
        await self._finish(db, outbox, out)
        return intents

    async def tick_in(
        self,
        db: aiosqlite.Connection,
        outbox: Outbox,
        now_ms: int,
        contact: Contact,
        unseen: Sequence[Stretch] = (),
    ) -> list[RelayIntent]:
        """Fixed charges and time-driven policy steps for every account.

        ``unseen`` are the recent stretches of trusted time the gateway did not
        live through: fixed charges in them are held and reported, not debited.
        From the cache this costs microseconds per account and writes nothing
        unless something changed (a charge, a state change, an event).
        """
        out = _Records(now_ms)
        intents: list[RelayIntent] = []
        for account, acct in self.accounts.items():
            await self._charge_fixed_in(db, out, account, acct, now_ms, unseen)
            intents += await self._evaluate_in(db, out, account, now_ms, contact)
        await self._finish(db, outbox, out)
        return intents

    async def _charge_fixed_in(
        self,
        db: aiosqlite.Connection,
        out: _Records,
        account: str,
        acct: PrepaidAccount,
        until_ms: int,
        unseen: Sequence[Stretch] = (),
    ) -> None:
        """Raise the fixed charges whose period started by ``until_ms`` (holding those
        in ``unseen`` stretches: :mod:`gateway.billing.held`)."""
        fixed = await self.ledger.fixed_in(
            db, account, acct.book, until_ms, unseen, off_billed_ms=self.off_billed_ms
        )
        for res in fixed.applied:
            if res.applied:
                out.charge(res.entry)
                self.note_balance(account, res.entry.time_ms, res.view.balance_micro)
        for group in fixed.held:
            log.warning(
                "account %s: %d fixed charge(s) (%s) held: trusted time stepped from %d to %d",
                account, len(group.charges), report_yuan(group.amount_micro),
                group.stretch.from_ms, group.stretch.to_ms,
            )  # fmt: skip
            out.event(_held_event(account, group))

    async def _finish(self, db: aiosqlite.Connection, outbox: Outbox, out: _Records) -> None:
        await self.ledger.flush(db)
        await outbox.add_many_in(db, out.items)

    async def _evaluate_in(
        self, db: aiosqlite.Connection, out: _Records, account: str, now_ms: int, contact: Contact
    ) -> list[RelayIntent]:
        """Follow the account's policy up to ``now_ms`` (see the module documentation)."""
        acct = self.accounts[account]
        cfg = acct.settings.cutoff
        state = await self.ledger.cutoff_state(db, account)
        view = await self.ledger.view(db, account)
        changes = self._changes.pop(account, [])
        last = self._points.get(account)
        if last is not None and now_ms < last.time_ms - CLOCK_BACK_TOLERANCE_MS:
            # the clock went back: never hold the policy at an instant that is now in
            # the future; start afresh from the stored state at this instant
            log.warning("account %s: clock went back %d ms; policy evaluated afresh",
                        account, last.time_ms - now_ms)
            last = None
        if not changes and last is not None and self._policy_quiet(account, state, last, now_ms, contact, cfg):
            # Nothing changed since the last evaluation and no instant at which the
            # decision may change has come: following the policy up to now would
            # evaluate once more, at now (or at the last instant, if now lies before
            # it), decide the same and move the point there.
            self._points[account] = PolicyPoint(max(now_ms, last.time_ms), last.balance_micro)
            return []
        new, point, decisions = follow(
            state, last, changes, now_ms, contact, cfg, account, balance_micro=view.balance_micro
        )
        self._points[account] = point
        if new != state:
            await self.ledger.save_cutoff_state(db, account, new)
        else:
            new = state  # (the cached object: the next evaluation compares by identity)
        if self.skip_quiet:
            self._quiet[account] = _Quiet(
                new, point.balance_micro, _contact_key(contact, cfg), cfg,
                next_change_ms(new, point.balance_micro, point.time_ms, contact, cfg),
            )  # fmt: skip
        intents: list[RelayIntent] = []
        for d in decisions:
            intents += self._decided(out, d, describe(d.state, d.balance_micro, d.time_ms, contact, cfg))
        return intents

    def _policy_quiet(
        self, account: str, state: CutoffState, last: PolicyPoint, now_ms: int, contact: Contact,
        cfg: CutoffConfig,
    ) -> bool:
        """Would following the policy from ``last`` (no balance change since) up to
        ``now_ms`` decide nothing and keep ``state``? (``now_ms`` may lie a little
        before ``last``: the policy is then evaluated at ``last`` once more.)"""
        if not self.skip_quiet:
            return False
        q = self._quiet.get(account)
        return (
            q is not None
            and (q.until_ms is None or max(now_ms, last.time_ms) < q.until_ms)
            and q.state is state
            and q.balance_micro == last.balance_micro
            and q.cfg is cfg
            and q.contact == _contact_key(contact, cfg)
        )

    def tick_quiet(self, now_ms: int, contact: Contact) -> bool:
        """Would :meth:`tick_in` at ``now_ms`` decide, record and write nothing for any
        account? Then what it would change in memory — every account's policy point
        and fixed-charge scan position move to ``now_ms`` — is done here, and the tick
        needs no transaction. (Whatever the stretches of time not lived through: with
        no charge starting in the span, none is held either.)"""
        if self._changes or not self.skip_quiet:
            return False
        ledger = self.ledger
        for account, acct in self.accounts.items():
            if not ledger.fixed_quiet(account, acct.book, now_ms):
                return False
            state = ledger.cached_cutoff_state(account)
            last = self._points.get(account)
            if state is None or last is None or now_ms < last.time_ms - CLOCK_BACK_TOLERANCE_MS:
                return False  # (not loaded, or evaluated afresh: see _evaluate_in)
            if not self._policy_quiet(account, state, last, now_ms, contact, acct.settings.cutoff):
                return False
        for account in self.accounts:
            ledger.advance_fixed(account, now_ms)
            point = self._points[account]
            self._points[account] = PolicyPoint(max(now_ms, point.time_ms), point.balance_micro)
        return True

    def _decided(self, out: _Records, d: CutoffDecision, state: str) -> list[RelayIntent]:
        for e in d.events:
            out.event(_cutoff_event(e, state), e.time_ms)
        return self._intents(out, d.actions, d.time_ms)

    async def _reassert_in(
        self,
        db: aiosqlite.Connection,
        out: _Records,
        account: str,
        meter: str,
        reported_open: bool,
        now_ms: int,
        contact: Contact,
    ) -> list[RelayIntent]:
        acct = self.accounts[account]
        state = await self.ledger.cutoff_state(db, account)
        new, actions = reassert(
            state, meter, reported_open, now_ms, contact, acct.settings.cutoff, account
        )
        if new != state:
            await self.ledger.save_cutoff_state(db, account, new)
        return self._intents(out, actions)

    def _intents(
        self, out: _Records, actions: Sequence[Action], time_ms: int | None = None
    ) -> list[RelayIntent]:
        intents = []
        t = out.now_ms if time_ms is None else time_ms
        for a in actions:
            out.event(
                event(f"cutoff.action.{a.kind.value}", account=a.account, meter=a.meter, time_ms=t, reason=a.reason),
                t,
            )
            if a.meter:  # alarms go to the meter's own alarm, where it has one (DL/T 645 2AH/2BH)
                intents.append(RelayIntent(a.meter, a.kind, a.reason, a.account))
        return intents

    # -- billing port (signed commands and the technician CLI) -----------------

    async def apply_topup_in(
        self,
        db: aiosqlite.Connection,
        body: Mapping[str, Any],
        *,
        command_id: str,
        channel: str,
        now_ms: int,
        outbox: Outbox | None = None,
    ) -> dict[str, Any]:
        """One path for every channel: MQTT from central, USB bundle, technician CLI.

        ``body`` is the signed top-up body (:func:`gateway.commands.bodies.parse_topup`);
        the top-up id is the command id. A top-up the ledger does not take raises
        :class:`CommandRefused` with the ledger's reason (``counter_replay``,
        ``counter_gap``, ``hoarding_limit``, ...); the caller rolls back, so nothing
        is credited.
        """
        sale = parse_topup(body, command_id)
        if channel not in {c.value for c in Source}:
            raise CommandRefused("malformed", f"unknown command channel {channel!r}")
        topup = TopUp(
            command_id,
            sale.account,
            sale.purchase_counter,
            sale.amount_micro,
            sale.payment_channel,
            Source(channel),
            now_ms if sale.issued_ms is None else sale.issued_ms,
        )
        acct = self.accounts.get(topup.account)
        if acct is None:
            raise CommandRefused(
                "unknown_account", f"no prepaid account {topup.account!r} on this gateway"
            )
        await self.ledger.flush(db)
        decision = await ls.apply_topup(db, topup, acct.settings.topup_policy, now_ms)
        self.ledger.forget_account(topup.account)
        if decision.status is TopUpStatus.REJECTED:
            code = decision.reason.value if decision.reason is not None else "rejected"
            raise CommandRefused(code, decision.message)
        outbox = outbox or self.outbox
        if (
            decision.status is TopUpStatus.APPLIED
            and decision.entry is not None
            and outbox is not None
        ):
            await outbox.add_in(db, *_charge_record(decision.entry, now_ms))
        if decision.status is TopUpStatus.APPLIED:
            self.note_balance(topup.account, now_ms, decision.balance_after_micro)
            self.dirty.set()
        return {
            "status": decision.status.value,
            "message": decision.message,
            "account": topup.account,
            "balance_after_micro": decision.balance_after_micro,
            "overdraft_repaid_micro": decision.overdraft_repaid_micro,
        }

    async def apply_snapshot_in(
        self, db: aiosqlite.Connection, body: Mapping[str, Any], *, now_ms: int
    ) -> dict[str, Any]:
        """A balance snapshot from central; one the ledger does not take raises
        :class:`CommandRefused` (``stale_snapshot`` for one older than the snapshot
        in force; ``snapshot_too_old`` for one as of a local seq below the account's
        fold base, whose entries left the local ledger: nothing is written)."""
        snap = parse_balance_snapshot(body, "")
        if snap.account not in self.accounts:
            raise CommandRefused(
                "unknown_account", f"no prepaid account {snap.account!r} on this gateway"
            )
        await self.ledger.flush(db)
        try:
            decision = await ls.apply_snapshot(db, snap)
        except ls.SnapshotTooOld as exc:
            raise CommandRefused(exc.code, str(exc)) from None
        self.ledger.forget_account(snap.account)
        if decision.status is SnapshotStatus.REJECTED:
            raise CommandRefused("snapshot_rejected", decision.message)
        if decision.status is SnapshotStatus.STALE:
            raise CommandRefused("stale_snapshot", decision.message)
        if decision.status is SnapshotStatus.APPLIED:
            view = await self.ledger.view(db, snap.account)
            self.note_balance(snap.account, now_ms, view.balance_micro)
        self.dirty.set()
        out: dict[str, Any] = {"status": decision.status.value, "message": decision.message}
        if decision.status is SnapshotStatus.APPLIED:
            # Held fixed charges central counted in this balance are settled: never debited.
            out["held_settled"] = await ls.settle_held(db, snap.account, snap.included_ids, now_ms)
        return out

    async def replace_meter_in(
        self, db: aiosqlite.Connection, body: Mapping[str, Any], *, command_id: str, now_ms: int
    ) -> dict[str, Any]:
        """A meter exchange declared by central (signed ``meter.replace``, by MQTT or on a
        technician's USB bundle): the old meter is billed up to its final registers, the
        new one from its initial registers; declared after an undeclared reset, the
        held energy is billed now (docs/billing.md, "Meter replacement").

        Registers that contradict what was billed raise :class:`CommandRefused` with the
        rating library's code (``old_final_below_billed``, ``replacement_before_billed``,
        ``new_initial_above_read``, ...), before anything is written.
        """
        rep = parse_meter_replace(body, command_id)
        account = self.meter_account.get(rep.meter_id)
        if account is None:
            raise CommandRefused(
                "unknown_meter", f"no prepaid meter {rep.meter_id!r} on this gateway"
            )
        if rep.time_ms > now_ms:
            raise CommandRefused(
                "replacement_in_future",
                f"the exchange time of {rep.meter_id} is after the gateway's time: declare it once done",
            )
        acct = self.accounts[account]
        try:
            done = await self.ledger.replace_meter(db, account, rep, acct.book, max_gap_ms=self.max_gap_ms)
        except ReplacementError as exc:
            raise CommandRefused(exc.code, exc.message) from None
        await self.ledger.flush(db)  # no writer cycle ends this transaction
        outbox = self.outbox
        ckwh = amount = 0
        for res in done.appended:
            if outbox is not None:
                await outbox.add_in(db, *_charge_record(res.entry, now_ms))
            self.note_balance(account, res.entry.time_ms, res.view.balance_micro)
            ckwh += int(res.entry.body["ckwh"])
            amount += -res.entry.amount_micro
        if done.appended:
            self.dirty.set()
        return {
            "status": "applied",
            "account": account,
            "meter": rep.meter_id,
            "debits": [res.entry.entry_id for res in done.appended],
            "kwh": str(ckwh_to_kwh(ckwh)),
            "amount": yuan_text(amount),
        }

    async def install_tariff_in(
        self, db: aiosqlite.Connection, doc: Mapping[str, Any], *, now_ms: int
    ) -> dict[str, Any]:
        """Add a tariff version published by central (applies exactly from its effective_from).

        A tariff that does not parse, that no account here uses, or that does
        not fit the book raises :class:`CommandRefused`."""
        tariff = parse_tariff_publish(doc, "")
        hit = [a for a in self.accounts.values() if a.book.tariff_id == tariff.tariff_id]
        if not hit:
            raise CommandRefused(
                "unknown_tariff",
                f"no account on this gateway uses tariff {tariff.tariff_id!r}",
            )
        try:
            books = [a.book.with_version(tariff) for a in hit]
        except TariffError as exc:
            raise CommandRefused("invalid_tariff", str(exc)) from None
        # Fixed charges raised so far stay under the old version; then the new
        # version is stored, so it survives a restart of the gateway.
        for name, a in self.accounts.items():
            if a.book.tariff_id == tariff.tariff_id:
                await self.ledger.persist_fixed_until(db, name)
        await ls.save_tariff_doc(db, tariff.tariff_id, tariff.version, dict(doc), now_ms)
        for a, book in zip(hit, books, strict=True):
            self._replaced_books.append((a, a.book))
            a.book = book
        return {"status": "applied", "tariff": tariff.tariff_id, "version": tariff.version}
