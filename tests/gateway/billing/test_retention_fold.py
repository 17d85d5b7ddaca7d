"""Retention, pure: a fold continued from a base at an allowed prune point equals the
full fold, and the point chosen never lets a kept snapshot's rebase lose entries."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.billing.ledger import (
    BaseTooLate,
    Entry,
    EntryKind,
    LedgerView,
    PruneCandidate,
    PrunePlan,
    fold,
    fold_from,
    prune_point,
)
from gateway.billing.rating import TierState

ACC = "acc"


@dataclass(frozen=True)
class Step:
    kind: EntryKind
    amount: int
    may_go: bool
    kept: bool
    as_of_back: int  # snapshots: how far back as_of_seq lies (0 = the entry just before)
    central_inc: int  # snapshots: increase of central_seq (0 = a stale/duplicate number)
    included: tuple[int, ...]  # snapshots: seqs of entries listed as already counted
    tier_ckwh: int | None


steps = st.builds(
    Step,
    kind=st.sampled_from(list(EntryKind)),
    amount=st.integers(-5_000_000, 5_000_000),
    may_go=st.booleans(),
    kept=st.booleans(),
    as_of_back=st.integers(0, 12),
    central_inc=st.integers(0, 2),
    included=st.lists(st.integers(1, 40), max_size=3).map(tuple),
    tier_ckwh=st.one_of(st.none(), st.integers(0, 500)),
)


def build(story: list[Step]) -> list[Entry]:
    """A ledger of the story's entries (seq 1..n), every kind, snapshots with as_of_seq
    anywhere before them and included ids of other entries."""
    out: list[Entry] = []
    central = 0
    counter = 0
    for i, s in enumerate(story, start=1):
        period = 1_000 * (i // 7)  # tier periods move on now and then
        if s.kind is EntryKind.SNAPSHOT:
            central += s.central_inc
            as_of = max(0, i - 1 - s.as_of_back)
            body = {
                "snapshot_id": f"s{i}",
                "central_seq": central,
                "as_of_seq": as_of,
                "included_ids": sorted({f"e{j}" for j in s.included if j != i}),
                "purchase_counter": counter,
                "tier_period_start_ms": period if s.tier_ckwh is not None else None,
                "tier_cumulative_ckwh": s.tier_ckwh,
            }
            out.append(Entry(f"snapshot:{ACC}:{i}", ACC, s.kind, s.amount, i, body, i))
            continue
        body: dict[str, object] = {}
        amount = s.amount
        if s.kind is EntryKind.DEBIT:
            amount = -abs(amount)
            body = {"lines": [{"tier_period_start_ms": period, "ckwh": abs(amount) % 97}]}
        elif s.kind is EntryKind.FIXED:
            amount = -abs(amount)
        elif s.kind is EntryKind.CREDIT:
            counter += 1
            body = {"counter": counter}
        out.append(Entry(f"e{i}", ACC, s.kind, amount, i, body, i))
    return out


def candidates(entries: list[Entry], story: list[Step]) -> list[PruneCandidate]:
    return [PruneCandidate(e.seq, e.kind, s.may_go, s.kept) for e, s in zip(entries, story, strict=True)]


def snaps(entries: list[Entry]) -> list[tuple[int, int]]:
    return [(e.seq, int(e.body["as_of_seq"])) for e in entries if e.kind is EntryKind.SNAPSHOT]


OPENING = TierState(0, 17)


@settings(max_examples=400, deadline=None)
@given(st.lists(steps, max_size=40), st.integers(0, 40), st.integers(1, 40))
def test_a_fold_from_the_base_at_the_chosen_point_equals_the_full_fold(
    story: list[Step], base_at: int, limit: int
) -> None:
    entries = build(story)
    full = fold(ACC, entries, OPENING)
    # an earlier base, itself at a point the rule allowed
    first = prune_point(0, candidates(entries, story)[:base_at], snaps(entries), limit=limit)
    base = fold(ACC, [e for e in entries if e.seq <= first.point], OPENING)
    assert fold_from(base, [e for e in entries if e.seq > first.point]) == full
    plan = prune_point(first.point, candidates(entries, story), snaps(entries), limit=limit)
    assert plan.point >= first.point
    gone = set(plan.pruned)
    # only debits and fixed charges that may go are deleted, never more than the limit,
    # all at or below the point; kept ones and the other kinds stay
    for e, s in zip(entries, story, strict=True):
        if e.seq in gone:
            assert e.kind in (EntryKind.DEBIT, EntryKind.FIXED) and s.may_go and not s.kept
            assert first.point < e.seq <= plan.point
    assert len(gone) <= limit
    # no snapshot after the point rebases on entries at or below it
    for seq, as_of in snaps(entries):
        if seq > plan.point:
            assert as_of >= plan.point
    # the new base, computed from the old one over what lies between, continues to the full fold
    between = [e for e in entries if first.point < e.seq <= plan.point]
    new_base = fold_from(base, between)
    assert new_base == fold(ACC, [e for e in entries if e.seq <= plan.point], OPENING)
    rest = [e for e in entries if e.seq > plan.point]
    assert fold_from(new_base, rest) == full
    # deleting the pruned entries changes nothing of the above (they are below the base)
    left = [e for e in entries if e.seq not in gone]
    assert fold_from(new_base, [e for e in left if e.seq > new_base.last_seq]) == full


def test_a_point_past_a_snapshot_s_as_of_seq_is_lowered_to_it() -> None:
    d = PruneCandidate
    cands = [d(1, EntryKind.DEBIT, True), d(2, EntryKind.DEBIT, True), d(3, EntryKind.DEBIT, True),
             d(4, EntryKind.SNAPSHOT, False), d(5, EntryKind.DEBIT, True), d(6, EntryKind.DEBIT, False)]
    # a snapshot inside the new base needs nothing
    assert prune_point(0, cands, [(4, 1)], limit=100) == PrunePlan(5, (1, 2, 3, 5))
    # one after it (seq 7) rebases on entry 2: the point comes down to 2, and then the
    # snapshot at 4 (as of 1) is after it: down to 1
    assert prune_point(0, cands, [(4, 1), (7, 2)], limit=100) == PrunePlan(1, (1,))
    assert prune_point(0, cands, [(4, 3), (7, 2)], limit=100) == PrunePlan(2, (1, 2))
    assert prune_point(0, cands, [(4, 3)], limit=2) == PrunePlan(2, (1, 2))
    assert prune_point(3, cands, [(4, 3)], limit=100) == PrunePlan(5, (5,))


def test_fold_from_refuses_a_snapshot_that_needs_entries_before_the_base() -> None:
    story = [Step(EntryKind.DEBIT, 5, True, False, 0, 0, (), None)] * 3
    entries = build(story)
    snap = Entry("snapshot:acc:1", ACC, EntryKind.SNAPSHOT, 9, 4,
                 {"snapshot_id": "x", "central_seq": 1, "as_of_seq": 1, "included_ids": []}, 4)
    base = fold(ACC, entries, OPENING)
    try:
        fold_from(base, [snap])
    except BaseTooLate:
        pass
    else:
        raise AssertionError("a snapshot as of seq 1 after a base at seq 3 was folded")
    assert fold_from(LedgerView(ACC, tier=OPENING), [*entries, snap]) == fold(ACC, [*entries, snap], OPENING)
