"""What the daemon does while its storage is faulted, recovering or full.

* :class:`BillingHold` keeps the accounts the storage state holds (all of them
  in FAULT, the unproved ones in RECOVERING) out of the prepaid shell, so no
  debit, fixed charge or cutoff decision is made for them; they come back
  when a central balance snapshot settles them.
* :class:`GuardedBilling` is the command path's billing port in front of the
  prepaid shell: it refuses what the storage state does not permit with the
  reason (the command id is not burned), and applies a central balance
  snapshot to a held account, which settles it in the same transaction.
* :class:`Backlog` holds work the database cannot take yet (a full disk) in
  memory, in order, bounded: past its limit the intermediate readings of a
  meter are dropped first (register readings are cumulative, so the energy is
  still billed from the later one), never a meter's latest reading, a status
  or an event.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiosqlite

from gateway.commands.bodies import CommandRefused
from store_forward.outbox import Outbox
from store_forward.storage_state import (
    Action,
    StorageMode,
    StorageState,
    describe,
    permits,
    settled,
)

log = logging.getLogger(__name__)


def held_accounts(state: StorageState, accounts: Iterable[str]) -> set[str]:
    """The accounts whose billing the storage state stops (pure)."""
    if state.mode is StorageMode.FAULT:
        return set(accounts)
    return set(state.held) & set(accounts)


class _PrepaidLike(Protocol):
    accounts: dict[str, Any]
    meter_account: dict[str, str]


class BillingHold:
    """Moves held accounts (and their meters) out of the prepaid shell and back."""

    def __init__(self, prepaid: _PrepaidLike | None) -> None:
        self.prepaid = prepaid
        self._accounts: dict[str, Any] = {}  # held: name -> PrepaidAccount
        self._meters: dict[str, str] = {}  # held: meter -> account

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._accounts)

    def all_accounts(self) -> list[str]:
        if self.prepaid is None:
            return []
        return sorted({*self.prepaid.accounts, *self._accounts})

    def account(self, name: str) -> Any | None:
        if self.prepaid is None:
            return None
        return self.prepaid.accounts.get(name) or self._accounts.get(name)

    def held_meter_account(self, meter: str) -> str | None:
        """The held account a meter bills to (None: not held)."""
        return self._meters.get(meter)

    def sync(self, state: StorageState) -> None:
        """Make the prepaid shell bill exactly the accounts ``state`` permits."""
        if self.prepaid is None:
            return
        want = held_accounts(state, self.all_accounts())
        for name in want - set(self._accounts):
            self._hold(name)
        for name in set(self._accounts) - want:
            self.release(name)

    def _hold(self, name: str) -> None:
        assert self.prepaid is not None
        acct = self.prepaid.accounts.pop(name, None)
        if acct is None:
            return
        self._accounts[name] = acct
        for m, a in list(self.prepaid.meter_account.items()):
            if a == name:
                self._meters[m] = a
                del self.prepaid.meter_account[m]
        log.warning("billing of account %s held: storage fault", name)

    def release(self, name: str) -> None:
        assert self.prepaid is not None
        acct = self._accounts.pop(name, None)
        if acct is None:
            return
        self.prepaid.accounts[name] = acct
        for m, a in list(self._meters.items()):
            if a == name:
                self.prepaid.meter_account[m] = a
                del self._meters[m]
        log.warning("billing of account %s resumes", name)


class GuardedBilling:
    """The command path's billing port, in front of the prepaid shell (or of a port
    that refuses everything, on a gateway without prepaid accounts)."""

    def __init__(self, inner: Any, outbox: Outbox, hold: BillingHold) -> None:
        self.inner = inner
        self.outbox = outbox
        self.hold = hold

    async def _check(self, db: aiosqlite.Connection, action: Action, account: Any) -> StorageState:
        state = await self.outbox.storage_state_in(db)
        v = permits(state, action, account if isinstance(account, str) else None)
        if not v.allowed:
            raise CommandRefused(v.code, v.why)
        return state

    async def apply_topup_in(
        self,
        db: aiosqlite.Connection,
        body: Mapping[str, Any],
        *,
        command_id: str,
        channel: str,
        now_ms: int,
    ) -> dict[str, Any]:
        await self._check(db, Action.TOPUP, body.get("account"))
        res: dict[str, Any] = await self.inner.apply_topup_in(
            db, body, command_id=command_id, channel=channel, now_ms=now_ms
        )
        return res

    async def replace_meter_in(
        self, db: aiosqlite.Connection, body: Mapping[str, Any], *, command_id: str, now_ms: int
    ) -> dict[str, Any]:
        meter = body.get("meter")
        account = self.hold.held_meter_account(meter) if isinstance(meter, str) else None
        await self._check(db, Action.DEBIT, account)  # a meter exchange bills energy
        res: dict[str, Any] = await self.inner.replace_meter_in(
            db, body, command_id=command_id, now_ms=now_ms
        )
        return res

    async def install_tariff_in(
        self, db: aiosqlite.Connection, doc: Mapping[str, Any], *, now_ms: int
    ) -> dict[str, Any]:
        await self._check(db, Action.TARIFF, None)
        res: dict[str, Any] = await self.inner.install_tariff_in(db, doc, now_ms=now_ms)
        return res

    async def apply_snapshot_in(
        self, db: aiosqlite.Connection, body: Mapping[str, Any], *, now_ms: int
    ) -> dict[str, Any]:
        state = await self._check(db, Action.SNAPSHOT, None)
        account = body.get("account")
        if not (isinstance(account, str) and account in state.held and account in self.hold.held):
            res: dict[str, Any] = await self.inner.apply_snapshot_in(db, body, now_ms=now_ms)
            return res
        # A held account: the snapshot is what settles it. Billing resumes with it
        # (the writer re-reads the state in every transaction, so a rollback of
        # this one holds the account again).
        self.hold.release(account)
        try:
            res = await self.inner.apply_snapshot_in(db, body, now_ms=now_ms)
        except BaseException:
            self.hold.sync(state)
            raise
        if res.get("status") != "applied":
            self.hold.sync(state)
            return res
        # Central's balance covers the account up to now (it has every reading and
        # charge the gateway sent): local fixed charges resume from here.
        await db.execute(
            "UPDATE billing_account SET fixed_until_ms = max(coalesce(fixed_until_ms, 0), ?)"
            " WHERE account = ?",
            (now_ms, account),
        )
        ledger = getattr(self.inner, "ledger", None)
        if ledger is not None:
            await ledger.flush(db)  # nothing of other accounts is lost by the forget below
            ledger.forget()
        new = settled(state, account, now_ms)
        await self.outbox.set_storage_state_in(db, new)
        log.warning(
            "account %s settled by a central balance snapshot after the storage recovery; storage %s",
            account,
            describe(new),
        )
        return {**res, "storage": new.mode.value, "settled_account": account}


# --------------------------------------------------------------------------- backlog


@dataclass
class Backlog:
    """Work the database cannot take yet, in order, with at most ``max_readings``
    readings. ``items`` hold objects with ``readings`` (list), ``statuses`` and
    ``events`` (Cycle) or neither (Tick: only the newest one is kept)."""

    max_readings: int = 20_000
    items: list[Any] = field(default_factory=list)
    dropped: int = 0  # intermediate readings given up to stay within the limit

    def __len__(self) -> int:
        return len(self.items)

    def readings(self) -> int:
        return sum(len(getattr(i, "readings", ())) for i in self.items)

    def add(self, item: Any) -> None:
        if not hasattr(item, "readings"):  # a tick: the newest one stands for all
            self.items = [i for i in self.items if hasattr(i, "readings")]
        self.items.append(item)
        if self.readings() > self.max_readings:
            self._thin()

    def take(self, n: int) -> list[Any]:
        return self.items[:n]

    def done(self, n: int) -> None:
        del self.items[:n]

    def _thin(self) -> None:
        """Drop readings of a meter that has a later reading held, oldest first, until
        within the limit (or nothing more can go)."""
        latest: dict[str, tuple[int, int]] = {}
        for i, item in enumerate(self.items):
            for j, r in enumerate(getattr(item, "readings", ())):
                latest[r.meter_id] = (i, j)
        excess = self.readings() - self.max_readings
        for i, item in enumerate(self.items):
            if excess <= 0:
                break
            rs = getattr(item, "readings", None)
            if not rs:
                continue
            keep = []
            for j, r in enumerate(rs):
                if excess > 0 and latest.get(r.meter_id) != (i, j):
                    excess -= 1
                    self.dropped += 1
                    continue
                keep.append(r)
            item.readings = keep
