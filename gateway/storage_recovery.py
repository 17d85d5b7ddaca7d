"""Recovering the money state after a storage fault, from the evidence only.

The outbox has kept the damaged database as evidence and put a new one in
its place, in storage state FAULT (:mod:`store_forward.outbox`). This module
brings back what the evidence *proves* and nothing else — never the opening
balances of the account files:

* **ledgers**: an account's entries are taken when they are complete
  (sequence 1..n without a gap, n = the stored ``last_seq``; after its fold
  base b — old entries pruned, :mod:`gateway.billing.retention` — b+1..n, the
  fold starting from the base) and folding them gives exactly the stored view
  (balance, purchase counter, tier state, snapshot in force) — a damaged entry
  or view does not fold to the other. Every entry imported is kept for good
  (its charge record may not have reached central).
  Its baselines, cutoff state and fixed-charge position come with it. Any
  other account is *held* (:mod:`store_forward.storage_state`): no billing,
  no cutoff decision until a signed central balance snapshot settles it;
* **replay protection**: purchase-counter floors (the highest salvaged per
  issuer), seen command ids (every one salvaged), central keys added and
  revoked by command; and a *replay fence* at the recovery time: a command
  issued before it whose id is not among the salvaged ones is refused
  (:func:`gateway.security.envelope.set_replay_fence`), because the record
  of which commands were applied may be incomplete;
* tariff versions installed by central, the ids of pruned fixed charges, the
  trusted-time floor, purpose-key rotation targets, and the audit log up to
  the last entry whose hash chain verifies (the rest stays in the evidence).

Everything is imported in one transaction that also moves the storage state
from FAULT to RECOVERING (or NORMAL when nothing is held), writes an audit
entry and a ``storage_recovered`` event listing every account's outcome. If
it fails, the state stays FAULT and the daemon tries again.

The decisions are pure (:func:`verify_ledger`, :func:`plan_recovery`) and
tested with property tests; :func:`recover_money` is the shell.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from firmware_bridge.events import event
from gateway.billing import retention
from gateway.billing.ledger import (
    BaseTooLate,
    Entry,
    EntryKind,
    LedgerView,
    fold,
    fold_from,
    snapshot_info,
)
from gateway.billing.ledger_store import LedgerCorrupt, body_from_column
from gateway.billing.rating import TierState
from gateway.security import audit, envelope
from store_forward.outbox import Outbox
from store_forward.records import RecordClass, RecordKind
from store_forward.salvage import WHOLE_LOG, Salvage, SalvagedTable, remove_images, salvage
from store_forward.storage_state import StorageMode, recovered

log = logging.getLogger(__name__)

# Tables the recovery reads from the evidence.
MONEY_TABLES = frozenset(
    {
        "billing_entry",
        "billing_account",
        "billing_fold_base",
        "billing_pruned_fixed",
        "billing_baseline",
        "billing_tariff",
        "sec_counter_floor",
        "sec_seen_command",
        "sec_central_key",
        "sec_revoked_key",
        "sec_time_floor",
        "sec_time_seen",
        "sec_replay_fence",
        "cmd_purpose_rotation",
        "audit_log",
        "audit_checkpoint",
    }
)


# --------------------------------------------------------------------------- pure


@dataclass(frozen=True)
class LedgerCheck:
    ok: bool
    reason: str
    view: LedgerView | None = None


def _entry(row: Mapping[str, Any]) -> Entry:
    body = body_from_column(row["body"], str(row["entry_id"]))  # deflated, or plain JSON as before
    return Entry(
        str(row["entry_id"]),
        str(row["account"]),
        EntryKind(str(row["kind"])),
        int(row["amount_micro"]),
        int(row["time_ms"]),
        body,
        int(row["seq"]),
    )


def verify_ledger(
    account: str,
    entry_rows: Sequence[Mapping[str, Any]],
    account_row: Mapping[str, Any] | None,
    base_row: Mapping[str, Any] | None = None,
) -> LedgerCheck:
    """Do the salvaged entries of ``account`` (from its fold base ``base_row`` on, if
    old entries were pruned) prove its salvaged stored view? (pure)"""
    if account_row is None:
        return LedgerCheck(False, "its account row could not be read")
    try:
        everything = sorted((_entry(r) for r in entry_rows), key=lambda e: e.seq)
        base_seq = 0 if base_row is None else int(base_row["base_seq"])
        entries = [e for e in everything if e.seq > base_seq]
        last_seq = int(account_row["last_seq"])
        opening = TierState(
            account_row.get("opening_tier_start_ms"), int(account_row.get("opening_tier_ckwh") or 0)
        )
        stored_tier = TierState(
            account_row["tier_period_start_ms"], int(account_row["tier_cumulative_ckwh"])
        )
        stored = (
            int(account_row["balance_micro"]),
            last_seq,
            int(account_row["purchase_counter"]),
            stored_tier,
            account_row["snapshot_seq"],
        )
    except (LedgerCorrupt, ValueError, TypeError, KeyError, orjson.JSONDecodeError) as exc:
        return LedgerCheck(False, f"an entry or the account row does not parse ({exc})")
    seqs = [e.seq for e in entries]
    missing = sorted(set(range(base_seq + 1, last_seq + 1)) - set(seqs))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + ("…" if len(missing) > 5 else "")
        return LedgerCheck(False, f"entries are missing (seq {shown} of {last_seq})")
    if seqs != list(range(base_seq + 1, last_seq + 1)):
        return LedgerCheck(False, f"entry sequence numbers are not {base_seq + 1}..{last_seq}")
    if len({e.entry_id for e in everything}) != len(everything):
        return LedgerCheck(False, "an entry id appears twice")
    try:
        if base_row is None:
            view = fold(account, entries, opening)
        else:
            snap_seq = base_row["snapshot_seq"]
            snap = next((e for e in everything if e.seq == snap_seq), None) if snap_seq is not None else None
            if snap_seq is not None and (snap is None or snap.kind is not EntryKind.SNAPSHOT):
                return LedgerCheck(False, f"the snapshot of its fold base (seq {snap_seq}) is missing")
            base = LedgerView(
                account,
                int(base_row["balance_micro"]),
                base_seq,
                int(base_row["purchase_counter"]),
                TierState(base_row["tier_period_start_ms"], int(base_row["tier_cumulative_ckwh"])),
                None if snap is None else snapshot_info(snap),
            )
            view = fold_from(base, entries)
    except (BaseTooLate, ValueError, TypeError, KeyError) as exc:
        return LedgerCheck(False, f"the entries do not fold ({exc})")
    got = (
        view.balance_micro,
        view.last_seq,
        view.purchase_counter,
        view.tier,
        None if view.snapshot is None else view.snapshot.seq,
    )
    if got != stored:
        return LedgerCheck(
            False,
            f"the entries fold to balance {view.balance_micro}, counter {view.purchase_counter},"
            f" but the stored view says balance {stored[0]}, counter {stored[2]}",
        )
    return LedgerCheck(True, f"{len(entries)} entries fold to the stored balance", view)


@dataclass(frozen=True)
class AccountOutcome:
    account: str
    restored: bool
    detail: str
    image: str | None = None  # which salvage image proved it
    balance_micro: int | None = None
    entries: int = 0
    purchase_counter: int | None = None


@dataclass
class RecoveryPlan:
    """What to import into the new database (rows by table), and every account's outcome."""

    accounts: list[AccountOutcome] = field(default_factory=list)
    rows: dict[str, tuple[tuple[str, ...], list[tuple[Any, ...]]]] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)
    audit_entries: int = 0
    audit_note: str = ""
    time_floor_ms: int = 0
    time_seen_ms: int = 0  # the last trusted time used (where the clock resumes)
    fence_ms: int | None = None  # a fence already in the evidence
    incomplete: list[str] = field(default_factory=list)  # tables read with damage

    def add(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        cols, have = self.rows.setdefault(table, (tuple(columns), []))
        idx = [list(columns).index(c) for c in cols]
        have.extend(tuple(r[i] for i in idx) for r in rows)


def _tables(images: Sequence[Salvage], name: str) -> list[tuple[str, SalvagedTable]]:
    return [(s.label, t) for s in images if s.readable and (t := s.table(name)) is not None]


def plan_recovery(images: Sequence[Salvage], accounts: Iterable[str]) -> RecoveryPlan:
    """Decide what the evidence proves (pure). ``images`` best first; ``accounts``
    the gateway's configured prepaid accounts."""
    plan = RecoveryPlan()
    for name in sorted(MONEY_TABLES):
        if any(not t.complete for _, t in _tables(images, name)) or not _tables(images, name):
            plan.incomplete.append(name)
    configured = sorted(set(accounts))
    # -- ledgers, account by account. Only an image of every committed transaction
    # counts, the first readable one: with a damaged log, the image SQLite itself
    # would read is self-consistent but misses the committed transactions after the
    # damage, so a ledger "proved" there could be one that silently lost a top-up or
    # a debit. (An image that left damaged frames out proves only what re-folds.)
    whole = [s for s in images if s.label in WHOLE_LOG] or images[:1]
    newest = next((s for s in whole if s.readable), None)
    latest = [] if newest is None else [newest]
    account_tables = _tables(latest, "billing_account")
    entry_tables = dict(_tables(latest, "billing_entry"))
    base_tables = dict(_tables(latest, "billing_fold_base"))
    known_complete = any(t.complete for _, t in account_tables)
    seen_accounts: set[str] = set()
    candidates: list[str] = []
    for _, t in account_tables:
        for r in t.dicts():
            if str(r["account"]) not in seen_accounts:
                seen_accounts.add(str(r["account"]))
                candidates.append(str(r["account"]))
    restored: dict[str, str] = {}  # account -> image label
    for acct in sorted(set(candidates) | set(configured)):
        reasons = []
        for label, t in account_tables:
            row = next((r for r in t.dicts() if r["account"] == acct), None)
            et = entry_tables.get(label)
            if et is None:
                reasons.append(f"{label}: ledger table unreadable")
                continue
            rows = [r for r in et.dicts() if r["account"] == acct]
            bt = base_tables.get(label)
            base_row = None if bt is None else next((r for r in bt.dicts() if r["account"] == acct), None)
            check = verify_ledger(acct, rows, row, base_row)
            if check.ok and row is not None:
                assert check.view is not None
                restored[acct] = label
                # The fold proves the money columns, not the cutoff state beside them:
                # the account starts from the initial cutoff state, which the policy
                # moves to the right level from the proved balance at the next tick.
                row = {**row, "cutoff_state": None}
                plan.add("billing_account", t.columns, [tuple(row[c] for c in t.columns)])
                plan.add(
                    "billing_entry", et.columns, [tuple(r[c] for c in et.columns) for r in rows]
                )
                if base_row is not None and bt is not None:
                    plan.add("billing_fold_base", bt.columns, [tuple(base_row[c] for c in bt.columns)])
                plan.accounts.append(
                    AccountOutcome(
                        acct,
                        True,
                        check.reason,
                        label,
                        check.view.balance_micro,
                        len(rows),
                        check.view.purchase_counter,
                    )
                )
                break
            reasons.append(f"{label}: {check.reason}")
        else:
            if acct not in configured:
                continue  # an account no longer configured: nothing to hold
            if acct not in seen_accounts and known_complete:
                # the newest account table was read whole and never had this account:
                # it is new, and opens as the account file says
                plan.accounts.append(
                    AccountOutcome(acct, True, "not in the damaged database: a new account")
                )
                continue
            plan.held.append(acct)
            plan.accounts.append(
                AccountOutcome(
                    acct,
                    False,
                    "; ".join(reasons)
                    or (
                        "the newest state of the database could not be read"
                        if images
                        else "no database to read (it is missing)"
                    ),
                )
            )
    # -- baselines of restored accounts only, from the image that proved them (an
    # older baseline would rate an interval already debited). A held account's
    # meters start from their next reading once central has settled it.
    for label, t in _tables(latest, "billing_baseline"):
        plan.add(
            "billing_baseline",
            t.columns,
            [
                tuple(r[c] for c in t.columns)
                for r in t.dicts()
                if restored.get(str(r["account"])) == label
            ],
        )
    # -- union tables (first image wins a key)
    for table, key in (
        ("billing_tariff", ("tariff_id", "version")),
        ("billing_pruned_fixed", ("entry_id",)),
        ("sec_seen_command", ("command_id",)),
        ("sec_central_key", ("key_id",)),
        ("sec_revoked_key", ("key_id",)),
    ):
        keys: set[tuple[Any, ...]] = set()
        for _, t in _tables(images, table):
            fresh = []
            for r in t.dicts():
                k = tuple(r[c] for c in key)
                if k not in keys:
                    keys.add(k)
                    fresh.append(tuple(r[c] for c in t.columns))
            plan.add(table, t.columns, fresh)
    # -- maxima
    floors: dict[str, tuple[Any, ...]] = {}
    floor_cols: tuple[str, ...] = ()
    for _, t in _tables(images, "sec_counter_floor"):
        floor_cols = t.columns
        for r in t.dicts():
            have = floors.get(str(r["issuer"]))
            if have is None or int(r["floor"]) > int(
                dict(zip(floor_cols, have, strict=True))["floor"]
            ):
                floors[str(r["issuer"])] = tuple(r[c] for c in t.columns)
    if floors:
        plan.add("sec_counter_floor", floor_cols, floors.values())
    rotations: dict[str, tuple[Any, ...]] = {}
    rot_cols: tuple[str, ...] = ()
    for _, t in _tables(images, "cmd_purpose_rotation"):
        rot_cols = t.columns
        for r in t.dicts():
            cur = rotations.get(str(r["purpose"]))
            target = int(r["target_version"])
            if cur is None or target > int(dict(zip(rot_cols, cur, strict=True))["target_version"]):
                rotations[str(r["purpose"])] = tuple(r[c] for c in t.columns)
    if rotations:
        plan.add("cmd_purpose_rotation", rot_cols, rotations.values())
    # The last trusted time used: in the floor's row (version 6 on), else in
    # sec_time_seen (an image of an earlier release; a later one keeps that table's
    # last value from before version 6, which the floor's row supersedes).
    seen_in_floor: set[str] = set()
    for label, t in _tables(images, "sec_time_floor"):
        for r in t.dicts():
            plan.time_floor_ms = max(plan.time_floor_ms, int(r.get("floor_ms") or 0))
            if "seen_ms" in r:
                seen_in_floor.add(label)
                plan.time_seen_ms = max(plan.time_seen_ms, int(r.get("seen_ms") or 0))
    for label, t in _tables(images, "sec_time_seen"):
        if label in seen_in_floor:
            continue
        for r in t.dicts():
            plan.time_seen_ms = max(plan.time_seen_ms, int(r.get("seen_ms") or 0))
    for _, t in _tables(images, "sec_replay_fence"):
        for r in t.dicts():
            f = int(r.get("issued_before_ms") or 0)
            plan.fence_ms = max(plan.fence_ms or 0, f) or None
    # -- audit log: the longest prefix whose chain verifies
    best: tuple[int, str, list[tuple[Any, ...]], tuple[str, ...]] = (0, "", [], ())
    for label, t in _tables(images, "audit_log"):
        rows = sorted(t.dicts(), key=lambda r: int(r["seq"]))
        good = _verified_prefix(rows)
        if good > best[0]:
            best = (good, label, [tuple(r[c] for c in t.columns) for r in rows[:good]], t.columns)
    plan.audit_entries = best[0]
    if best[0]:
        plan.add("audit_log", best[3], best[2])
        plan.audit_note = f"{best[0]} entries with a verified hash chain (image {best[1]})"
        hashes = {int(r[best[3].index("seq")]): bytes(r[best[3].index("hash")]) for r in best[2]}
        done: set[int] = set()
        for _, t in _tables(images, "audit_checkpoint"):
            for r in t.dicts():
                seq = int(r["seq"])
                if seq not in done and hashes.get(seq) == bytes(r["hash"]):
                    done.add(seq)
                    plan.add("audit_checkpoint", t.columns, [tuple(r[c] for c in t.columns)])
    else:
        plan.audit_note = "no audit entry could be verified; the log stays in the evidence"
    return plan


def _verified_prefix(rows: Sequence[Mapping[str, Any]]) -> int:
    """How many entries from seq 1 on chain correctly (pure)."""
    entries = []
    for r in rows:
        try:
            entries.append(
                audit.AuditEntry(
                    int(r["seq"]),
                    int(r["time_ms"]),
                    str(r["time_source"]),
                    str(r["actor"]),
                    str(r["action"]),
                    str(r["details"]),
                    bytes(r["prev_hash"]),
                    bytes(r["hash"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            break
    res = audit.verify_entries(entries)
    return len(entries) if res.ok else res.entries


# --------------------------------------------------------------------------- shell


@dataclass(frozen=True)
class RecoveryReport:
    evidence: str
    mode: StorageMode
    accounts: tuple[AccountOutcome, ...]
    held: tuple[str, ...]
    fence_ms: int | None
    imported: dict[str, int]
    incomplete: tuple[str, ...]
    audit: str

    def event(self) -> dict[str, Any]:
        return event(
            "storage_recovered",
            severity="critical" if self.held else "warning",
            evidence=self.evidence,
            mode=self.mode.value,
            held_accounts=list(self.held),
            accounts=[
                {
                    "account": a.account,
                    "restored": a.restored,
                    "detail": a.detail,
                    "balance_micro": a.balance_micro,
                    "entries": a.entries,
                    "purchase_counter": a.purchase_counter,
                }
                for a in self.accounts
            ],
            replay_fence_ms=self.fence_ms,
            imported=self.imported,
            tables_damaged=list(self.incomplete),
            audit=self.audit,
        )


async def _columns(db: aiosqlite.Connection, table: str) -> list[str]:
    async with db.execute(f'PRAGMA table_info("{table}")') as cur:
        return [str(r[1]) async for r in cur]


async def _insert(
    db: aiosqlite.Connection, table: str, cols: Sequence[str], rows: Sequence[Sequence[Any]]
) -> int:
    """INSERT OR IGNORE the rows, on the columns this database's table has."""
    have = await _columns(db, table)
    keep = [i for i, c in enumerate(cols) if c in have]
    if not rows or not keep:
        return 0
    names = ", ".join(f'"{cols[i]}"' for i in keep)
    marks = ", ".join("?" * len(keep))
    before = db.total_changes
    await db.executemany(
        f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({marks})',
        [tuple(r[i] for i in keep) for r in rows],
    )
    return db.total_changes - before


async def recover_money(
    outbox: Outbox,
    accounts: Iterable[str],
    now_ms: int,
    *,
    opening_tiers: Mapping[str, TierState] | None = None,
) -> RecoveryReport:
    """Recover the money state of a FAULT database from its evidence (see the module
    docstring); returns what was done. The caller holds no transaction."""
    state = outbox.storage
    if state.mode is not StorageMode.FAULT or state.evidence is None:
        raise ValueError(f"nothing to recover: storage is {state.mode}")
    evidence = Path(state.evidence)
    images = await asyncio.to_thread(salvage, evidence, set(MONEY_TABLES))
    plan = plan_recovery(images, accounts)
    tiers = dict(opening_tiers or {})
    imported: dict[str, int] = {}
    async with outbox.transaction() as db:
        current = await outbox.storage_state_in(db)
        if current.mode is not StorageMode.FAULT:
            raise ValueError(f"storage is already {current.mode}")
        for table, (cols, rows) in plan.rows.items():
            imported[table] = await _insert(db, table, cols, rows)
        # the charge records of the entries taken over may not have reached central
        await retention.hold_existing_in(db)
        # a fixed-charge position in the future can only be damage (charges would be
        # skipped); from the past, a re-scan finds the charges already in the ledger
        await db.execute(
            "UPDATE billing_account SET fixed_until_ms = ? WHERE fixed_until_ms > ?",
            (now_ms, now_ms),
        )
        for acct in plan.held:
            # the account exists (so no opening balance is ever applied) with nothing
            # proved: zero, no entries, no baseline, the initial cutoff state
            t = tiers.get(acct, TierState())
            await db.execute(
                "INSERT OR IGNORE INTO billing_account (account, balance_micro, last_seq,"
                " purchase_counter, tier_period_start_ms, tier_cumulative_ckwh,"
                " opening_tier_start_ms, opening_tier_ckwh, fixed_until_ms)"
                " VALUES (?, 0, 0, 0, ?, ?, ?, ?, ?)",
                (
                    acct,
                    t.period_start_ms,
                    t.cumulative_ckwh,
                    t.period_start_ms,
                    t.cumulative_ckwh,
                    now_ms,
                ),
            )
        if plan.time_floor_ms:
            await db.execute(
                "INSERT INTO sec_time_floor (id, floor_ms, updated_mono_ms) VALUES (1, ?, 0)"
                " ON CONFLICT(id) DO UPDATE SET floor_ms = max(floor_ms, excluded.floor_ms)",
                (plan.time_floor_ms,),
            )
        if plan.time_seen_ms:
            await db.execute(
                "INSERT INTO sec_time_floor (id, floor_ms, updated_mono_ms, seen_ms) VALUES (1, 0, 0, ?)"
                " ON CONFLICT(id) DO UPDATE SET seen_ms = max(seen_ms, excluded.seen_ms)",
                (plan.time_seen_ms,),
            )
        fence = max(now_ms, plan.time_floor_ms, plan.fence_ms or 0)
        await envelope.set_replay_fence(db, fence, now_ms, f"storage recovery from {evidence}")
        new = recovered(current, held=plan.held, fence_ms=fence, now_ms=now_ms)
        report = RecoveryReport(
            str(evidence),
            new.mode,
            tuple(plan.accounts),
            new.held,
            fence,
            imported,
            tuple(plan.incomplete),
            plan.audit_note,
        )
        body = report.event()
        await audit.append(
            db,
            actor="gateway",
            action="storage.recovered",
            details={k: v for k, v in body.items() if k != "type"},
            time_ms=now_ms,
            time_source="system",
        )
        await outbox.add_in(db, RecordClass.EVENT, RecordKind.EVENT, now_ms, body)
        await outbox.set_storage_state_in(db, new)
    await asyncio.to_thread(remove_images, evidence)
    log.critical(
        "storage recovered from %s: %s; %d account(s) restored from verified ledgers, held"
        " awaiting a central balance snapshot: %s; commands issued before %d refused unless known",
        evidence,
        new.mode.value,
        sum(a.restored for a in plan.accounts),
        ", ".join(new.held) or "none",
        fence,
    )
    return report
