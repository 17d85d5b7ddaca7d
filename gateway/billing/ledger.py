"""Append-only prepaid ledger per account (pure).

Entries: interval debits (one per rated reading pair), fixed charges,
credits (top-ups), adjustments and central balance snapshots. Every entry has
a stable id derived from its cause; appending an entry whose id is already
present changes nothing (and an entry with a known id but different content
is a :class:`LedgerConflict`, never silently merged).

Balance = fold over entries (docs/billing.md, "Ledger and reconciliation"):

* without a snapshot: the sum of ``amount_micro`` of all non-snapshot entries;
* with snapshots: the latest one (highest ``central_seq``) gives the balance
  as of local entry ``as_of_seq``; every non-snapshot entry with a higher
  ``seq`` is applied on top, except those whose id the snapshot lists in
  ``included_ids`` (central already counted them, e.g. a top-up sold at
  central while the gateway was offline).

:func:`fold` is the reference. :func:`advance` and :func:`rebase` compute the
same view incrementally (the store keeps the view next to the entries); tests
check that they agree. :func:`fold_from` continues a fold from a stored *fold
base* (the view as of a seq P), after old debits and fixed charges at or below
P left the local ledger (:func:`prune_point` chooses P; docs/billing.md,
"Retention").
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from firmware_bridge.errors import EdgeGwError, ErrorKind
from gateway.billing.rating import (
    FixedChargeDue,
    IntervalCharge,
    TierState,
    is_legacy_debit_id,
    legacy_debit_id,
)


class LedgerConflict(EdgeGwError):
    """An entry id is already in the ledger with different content."""

    kind = ErrorKind.CONFLICT


class EntryKind(enum.StrEnum):
    DEBIT = "debit"  # energy of one reading pair (negative amount)
    FIXED = "fixed"  # fixed daily/monthly charge (negative amount)
    CREDIT = "credit"  # top-up (positive amount)
    ADJUSTMENT = "adjustment"  # signed correction issued by central or a technician
    SNAPSHOT = "snapshot"  # central balance as of a local sequence; amount = that balance


@dataclass(frozen=True)
class Entry:
    entry_id: str
    account: str
    kind: EntryKind
    amount_micro: int
    time_ms: int
    body: Mapping[str, Any] = field(default_factory=dict)  # JSON-able details
    seq: int = 0  # per-account position, assigned on append (1, 2, ...)

    def body_json(self) -> bytes:
        return orjson.dumps(dict(self.body), option=orjson.OPT_SORT_KEYS)

    def to_json(self) -> dict[str, Any]:
        """JSON-able record (for the uplink); money stays integer micro-yuan."""
        return {
            "id": self.entry_id,
            "account": self.account,
            "seq": self.seq,
            "kind": self.kind.value,
            "amount_micro": self.amount_micro,
            "time_ms": self.time_ms,
            "body": dict(self.body),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Entry:
        return cls(
            str(d["id"]),
            str(d["account"]),
            EntryKind(d["kind"]),
            int(d["amount_micro"]),
            int(d["time_ms"]),
            dict(d.get("body", {})),
            int(d.get("seq", 0)),
        )

    def same_content(self, other: Entry) -> bool:
        return self.entry_id == other.entry_id and self.same_but_id(other)

    def same_but_id(self, other: Entry) -> bool:
        return (
            self.account == other.account
            and self.kind == other.kind
            and self.amount_micro == other.amount_micro
            and self.time_ms == other.time_ms
            and self.body_json() == other.body_json()
        )


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    central_seq: int
    as_of_seq: int
    balance_micro: int
    included_ids: frozenset[str]
    purchase_counter: int
    tier: TierState | None
    seq: int  # where the snapshot entry itself sits


@dataclass(frozen=True)
class LedgerView:
    account: str
    balance_micro: int = 0
    last_seq: int = 0
    purchase_counter: int = 0  # highest applied purchase counter (local credits or central)
    tier: TierState = field(default_factory=TierState)
    snapshot: SnapshotInfo | None = None


# ---------------------------------------------------------------------------
# Entry constructors


def debit_entry(account: str, charge: IntervalCharge) -> Entry:
    """The ledger entry for one rated interval (id = end time + hash of meter and
    reading ids, :func:`gateway.billing.rating.debit_id`)."""
    lines = [
        {
            "tariff": ln.tariff,
            "rate": ln.rate,
            "tier": ln.tier,
            "tier_period_start_ms": ln.tier_period_start_ms,
            "ckwh": ln.ckwh,
            "price_e4": ln.price_e4,
            "amount_micro": ln.amount_micro,
        }
        for ln in charge.lines
    ]
    body = {
        "meter": charge.meter_id,
        "start_reading_id": charge.start_reading_id,
        "end_reading_id": charge.end_reading_id,
        "start_ms": charge.start_ms,
        "end_ms": charge.end_ms,
        "ckwh": charge.ckwh,
        "apportioning": charge.apportioning.value,
        "lines": lines,
    }
    return Entry(charge.charge_id, account, EntryKind.DEBIT, -charge.amount_micro, charge.end_ms, body)


def earlier_id(entry: Entry) -> str | None:
    """The id a ledger written before debit ids were ordered by time holds the same
    debit under (:func:`gateway.billing.rating.legacy_debit_id`), or None (not a
    debit, or a debit whose id already has the older form)."""
    if entry.kind is not EntryKind.DEBIT or is_legacy_debit_id(entry.entry_id):
        return None
    b = entry.body
    try:
        return legacy_debit_id(str(b["meter"]), str(b["start_reading_id"]), str(b["end_reading_id"]))
    except KeyError:
        return None


def check_earlier(entry: Entry, old: Entry | None) -> Entry | None:
    """``old`` (the entry found under ``earlier_id(entry)``) if it is the same debit,
    None if there is none; :class:`LedgerConflict` if it records the same reading
    pair with different content."""
    if old is None:
        return None
    if not old.same_but_id(entry):
        raise LedgerConflict(
            f"{entry.entry_id}: its reading pair is already recorded as {old.entry_id} with different content"
        )
    return old


def fixed_entry(due: FixedChargeDue) -> Entry:
    body = {"name": due.name, "tariff": due.tariff, "period": due.period, "period_start_ms": due.period_start_ms}
    return Entry(due.charge_id, due.account, EntryKind.FIXED, -due.amount_micro, due.period_start_ms, body)


def adjustment_entry(
    adjustment_id: str, account: str, amount_micro: int, time_ms: int, reason: str, issuer: str
) -> Entry:
    body = {"reason": reason, "issuer": issuer}
    return Entry(f"adjust:{adjustment_id}", account, EntryKind.ADJUSTMENT, amount_micro, time_ms, body)


# ---------------------------------------------------------------------------
# Folding


def _tier_add(tier: TierState, period_start_ms: int | None, ckwh: int) -> TierState:
    if period_start_ms is None:
        return tier
    if tier.period_start_ms is None:
        return TierState(period_start_ms, tier.cumulative_ckwh + ckwh)
    if period_start_ms > tier.period_start_ms:
        return TierState(period_start_ms, ckwh)
    if period_start_ms == tier.period_start_ms:
        return TierState(period_start_ms, tier.cumulative_ckwh + ckwh)
    return tier  # energy of an older period does not count in the current one


def _tier_after(tier: TierState, entry: Entry) -> TierState:
    if entry.kind is not EntryKind.DEBIT:
        return tier
    for ln in entry.body.get("lines", ()):
        tier = _tier_add(tier, ln.get("tier_period_start_ms"), int(ln["ckwh"]))
    return tier


def snapshot_info(entry: Entry) -> SnapshotInfo:
    b = entry.body
    tier = None
    if b.get("tier_cumulative_ckwh") is not None:
        tier = TierState(b.get("tier_period_start_ms"), int(b["tier_cumulative_ckwh"]))
    return SnapshotInfo(
        snapshot_id=str(b["snapshot_id"]),
        central_seq=int(b["central_seq"]),
        as_of_seq=int(b["as_of_seq"]),
        balance_micro=entry.amount_micro,
        included_ids=frozenset(b.get("included_ids", ())),
        purchase_counter=int(b.get("purchase_counter", 0)),
        tier=tier,
        seq=entry.seq,
    )


def _counter(entry: Entry) -> int:
    if entry.kind is EntryKind.CREDIT:
        return int(entry.body.get("counter", 0))
    return 0


def advance(view: LedgerView, entry: Entry) -> LedgerView:
    """The view after appending a non-snapshot ``entry`` (whose seq is view.last_seq + 1)."""
    if entry.kind is EntryKind.SNAPSHOT:
        raise ValueError("snapshots need rebase(), not advance()")
    counted = view.snapshot is None or entry.entry_id not in view.snapshot.included_ids
    return replace(
        view,
        balance_micro=view.balance_micro + (entry.amount_micro if counted else 0),
        last_seq=entry.seq,
        purchase_counter=max(view.purchase_counter, _counter(entry)),
        tier=_tier_after(view.tier, entry),
    )


def rebase(view: LedgerView, snapshot: Entry, tail: Iterable[Entry]) -> LedgerView:
    """The view after appending ``snapshot``; ``tail`` = the entries with seq > its as_of_seq.

    A snapshot older than (or equal to) the one in force is recorded but does
    not move the view (the decision layer normally refuses it before).
    """
    info = snapshot_info(snapshot)
    if view.snapshot is not None and info.central_seq <= view.snapshot.central_seq:
        return replace(view, last_seq=snapshot.seq)
    balance = info.balance_micro
    tier = info.tier if info.tier is not None else view.tier
    counter = max(view.purchase_counter, info.purchase_counter)
    for e in tail:
        if e.seq <= info.as_of_seq or e.kind is EntryKind.SNAPSHOT:
            continue
        if e.entry_id not in info.included_ids:
            balance += e.amount_micro
        if info.tier is not None:
            tier = _tier_after(tier, e)
    return replace(
        view,
        balance_micro=balance,
        last_seq=snapshot.seq,
        purchase_counter=counter,
        tier=tier,
        snapshot=info,
    )


def fold(account: str, entries: Iterable[Entry], opening_tier: TierState | None = None) -> LedgerView:
    """Reference fold over all entries of one account, in seq order."""
    ordered = sorted(entries, key=lambda e: e.seq)
    view = LedgerView(account, tier=opening_tier or TierState())
    for i, e in enumerate(ordered):
        if e.kind is EntryKind.SNAPSHOT:
            info = snapshot_info(e)
            view = rebase(view, e, [x for x in ordered[:i] if x.seq > info.as_of_seq])
        else:
            view = advance(view, e)
    return view


class BaseTooLate(EdgeGwError, ValueError):
    """A snapshot after a fold base needs entries from before the base (its
    ``as_of_seq`` is below the base): they were pruned, the fold cannot go on."""

    kind = ErrorKind.STORAGE


def fold_from(base: LedgerView, entries: Iterable[Entry]) -> LedgerView:
    """The fold continued from ``base`` (the view as of seq ``base.last_seq``) over the
    entries after it, in seq order; entries at or below the base are ignored.

    ``fold_from(fold(a, entries[:P]), entries[P:]) == fold(a, entries)`` whenever
    every snapshot after P that moves the view has ``as_of_seq >= P``
    (:func:`prune_point` chooses such a P); otherwise :class:`BaseTooLate`.
    """
    ordered = sorted((e for e in entries if e.seq > base.last_seq), key=lambda e: e.seq)
    view = base
    for i, e in enumerate(ordered):
        if e.kind is EntryKind.SNAPSHOT:
            info = snapshot_info(e)
            stale = view.snapshot is not None and info.central_seq <= view.snapshot.central_seq
            if not stale and info.as_of_seq < base.last_seq:
                raise BaseTooLate(
                    f"snapshot {e.entry_id} (seq {e.seq}) rebases on as_of_seq {info.as_of_seq},"
                    f" before the fold base at seq {base.last_seq}"
                )
            view = rebase(view, e, [x for x in ordered[:i] if x.seq > info.as_of_seq])
        else:
            view = advance(view, e)
    return view


# ---------------------------------------------------------------------------
# Retention: which entries may leave the local ledger

PRUNABLE_KINDS = frozenset({EntryKind.DEBIT, EntryKind.FIXED})


@dataclass(frozen=True)
class PruneCandidate:
    """An entry after the fold base, as the retention pass sees it."""

    seq: int
    kind: EntryKind
    may_go: bool  # old enough and acknowledged by central (only for debits and fixed charges)
    kept: bool = False  # to be kept whatever its age (its charge record may never have reached central)


@dataclass(frozen=True)
class PrunePlan:
    point: int  # the new fold base seq (== base_seq: nothing to do)
    pruned: tuple[int, ...]  # the seqs of the entries to delete (all <= point)


def prune_point(
    base_seq: int,
    candidates: Sequence[PruneCandidate],
    snapshots: Iterable[tuple[int, int]],
    *,
    limit: int,
) -> PrunePlan:
    """The new fold base P and the entries to delete, from the entries after the
    current base (in seq order, possibly only the first of them) and every
    snapshot after it as (seq, as_of_seq).

    Walking up from the base, P advances over credits, adjustments, snapshots
    and debits/fixed charges that are ``kept``, and over at most ``limit``
    debits/fixed charges that ``may_go`` (those are deleted); it stops at the
    first debit or fixed charge that may not go yet. Then P is lowered until no
    snapshot after it rebases on an ``as_of_seq`` below it (its rebase would
    need the deleted entries), and only deletions at or below P remain.
    """
    point = base_seq
    pruned: list[int] = []
    for c in sorted(candidates, key=lambda c: c.seq):
        if c.seq <= base_seq:
            continue
        if c.kind in PRUNABLE_KINDS and not c.kept:
            if not c.may_go or len(pruned) >= limit:
                break
            pruned.append(c.seq)
        point = c.seq
    snaps = [(s, a) for s, a in snapshots if s > base_seq]
    while point > base_seq:
        need = [a for s, a in snaps if s > point and a < point]
        if not need:
            break
        point = max(base_seq, min(need))
    return PrunePlan(point, tuple(s for s in pruned if s <= point))


# ---------------------------------------------------------------------------
# In-memory ledger (the same rules the SQLite store applies)


@dataclass(frozen=True)
class AppendResult:
    entry: Entry  # with its seq (the existing one for a duplicate)
    applied: bool  # False: an identical entry was already there
    view: LedgerView


class Ledger:
    """An in-memory append-only ledger of one account."""

    def __init__(self, account: str, opening_tier: TierState | None = None) -> None:
        self.account = account
        self._entries: list[Entry] = []
        self._by_id: dict[str, Entry] = {}
        self._opening_tier = opening_tier or TierState()
        self.view = LedgerView(account, tier=self._opening_tier)

    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries)

    def get(self, entry_id: str) -> Entry | None:
        return self._by_id.get(entry_id)

    def append(self, entry: Entry) -> AppendResult:
        if entry.account != self.account:
            raise ValueError(f"entry for account {entry.account!r} in ledger {self.account!r}")
        old = self._by_id.get(entry.entry_id)
        if old is not None:
            if not old.same_content(entry):
                raise LedgerConflict(f"{entry.entry_id}: already recorded with different content")
            return AppendResult(old, False, self.view)
        earlier = earlier_id(entry)
        if earlier is not None and check_earlier(entry, self._by_id.get(earlier)) is not None:
            return AppendResult(self._by_id[earlier], False, self.view)
        e = replace(entry, seq=len(self._entries) + 1)
        self._entries.append(e)
        self._by_id[e.entry_id] = e
        if e.kind is EntryKind.SNAPSHOT:
            as_of = int(e.body["as_of_seq"])
            self.view = rebase(self.view, e, self._entries[as_of:-1])
        else:
            self.view = advance(self.view, e)
        return AppendResult(e, True, self.view)

    def refold(self) -> LedgerView:
        return fold(self.account, self._entries, self._opening_tier)
