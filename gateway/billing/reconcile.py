"""Reconciliation with central (authoritative), pure.

A :class:`CentralSnapshot` says: "the balance of account A was B as of your
local ledger entry ``as_of_seq``; in B I also counted the entries listed in
``included_ids`` that you may not have yet (top-ups sold or adjustments made
at central); my sequence number for this snapshot is ``central_seq``".

Applied, it replaces the local view up to ``as_of_seq``; local entries after
it are re-applied on top (except the listed ones). Snapshots with a lower
``central_seq`` than the one in force are stale no-ops; the same snapshot
twice is a duplicate no-op; a snapshot that refers to local entries that do
not exist, or reuses a ``central_seq`` with other content, is rejected.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway.billing.ledger import Entry, EntryKind, LedgerView
from gateway.billing.topup import Authorization


@dataclass(frozen=True)
class CentralSnapshot:
    snapshot_id: str
    account: str
    central_seq: int  # strictly increasing per account at central
    as_of_seq: int  # local ledger seq the balance reflects (0: none)
    balance_micro: int
    time_ms: int
    included_ids: frozenset[str] = field(default_factory=frozenset)  # ledger entry ids, e.g. "topup:X"
    purchase_counter: int = 0  # last purchase counter central has sold
    tier_period_start_ms: int | None = None
    tier_cumulative_ckwh: int | None = None  # tier consumption as of as_of_seq (optional)
    authorization: Authorization | None = None

    @property
    def entry_id(self) -> str:
        return f"snapshot:{self.account}:{self.central_seq}"


def snapshot_entry(snap: CentralSnapshot) -> Entry:
    auth = snap.authorization
    body = {
        "snapshot_id": snap.snapshot_id,
        "central_seq": snap.central_seq,
        "as_of_seq": snap.as_of_seq,
        "included_ids": sorted(snap.included_ids),
        "purchase_counter": snap.purchase_counter,
        "tier_period_start_ms": snap.tier_period_start_ms,
        "tier_cumulative_ckwh": snap.tier_cumulative_ckwh,
        "authorization": None
        if auth is None
        else {"issuer": auth.issuer, "key_id": auth.key_id, "verified_at_ms": auth.verified_at_ms},
    }
    return Entry(snap.entry_id, snap.account, EntryKind.SNAPSHOT, snap.balance_micro, snap.time_ms, body)


class SnapshotStatus(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"


@dataclass(frozen=True)
class SnapshotDecision:
    status: SnapshotStatus
    message: str
    entry: Entry | None = None  # append this when APPLIED


def decide_snapshot(snap: CentralSnapshot, view: LedgerView, existing: Entry | None) -> SnapshotDecision:
    if snap.account != view.account:
        return SnapshotDecision(
            SnapshotStatus.REJECTED, f"snapshot for {snap.account!r} on account {view.account!r}"
        )
    entry = snapshot_entry(snap)
    if existing is not None:
        if existing.same_content(entry):
            return SnapshotDecision(SnapshotStatus.DUPLICATE, f"snapshot {snap.snapshot_id} already applied")
        return SnapshotDecision(
            SnapshotStatus.REJECTED,
            f"central_seq {snap.central_seq} already used by a different snapshot",
        )
    current = view.snapshot
    if current is not None and snap.central_seq < current.central_seq:
        return SnapshotDecision(
            SnapshotStatus.STALE,
            f"snapshot central_seq {snap.central_seq} is older than {current.central_seq} in force",
        )
    if snap.as_of_seq < 0 or snap.as_of_seq > view.last_seq:
        return SnapshotDecision(
            SnapshotStatus.REJECTED,
            f"snapshot as_of_seq {snap.as_of_seq} is beyond the local ledger (last seq {view.last_seq})",
        )
    return SnapshotDecision(SnapshotStatus.APPLIED, f"snapshot {snap.snapshot_id} applied", entry)
