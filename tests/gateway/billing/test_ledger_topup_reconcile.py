"""Ledger fold, top-up rules and reconciliation with central, including awkward orders."""

from __future__ import annotations

import pytest

from gateway.billing.ledger import (
    Entry,
    EntryKind,
    Ledger,
    LedgerConflict,
    adjustment_entry,
    debit_entry,
)
from gateway.billing.rating import TierState, rate_interval
from gateway.billing.reconcile import CentralSnapshot, SnapshotStatus, decide_snapshot
from gateway.billing.topup import (
    Authorization,
    Channel,
    RejectReason,
    Source,
    TopUp,
    TopUpPolicy,
    TopUpStatus,
    decide_topup,
)
from tests.gateway.billing._util import FLAT, FLAT_TIER, book, ms, rr

Y = 1_000_000  # one yuan in micro-yuan


def topup(tid: str, counter: int, yuan: int, account: str = "acc", **kw: object) -> TopUp:
    return TopUp(tid, account, counter, yuan * Y, Channel.MOBILE_APP, Source.MQTT, 0, **kw)  # type: ignore[arg-type]


def apply(ledger: Ledger, t: TopUp, policy: TopUpPolicy | None = None) -> TopUpStatus:
    d = decide_topup(t, ledger.view, ledger.get(t.entry_id), policy or TopUpPolicy(), now_ms=1)
    if d.entry is not None:
        ledger.append(d.entry)
    return d.status


def debit(ledger: Ledger, a: str, b: str, kwh_a: str, kwh_b: str) -> Entry:
    res = rate_interval(rr(a, "2026-03-02T10:00", kwh_a), rr(b, "2026-03-02T11:00", kwh_b), book(FLAT), TierState())
    assert res.charge is not None
    return ledger.append(debit_entry(ledger.account, res.charge)).entry


def snapshot(ledger: Ledger, central_seq: int, as_of: int, yuan: int, included: tuple[str, ...] = (),
             counter: int = 0, account: str = "acc") -> SnapshotStatus:
    snap = CentralSnapshot(f"s{central_seq}", account, central_seq, as_of, yuan * Y, 5,
                           frozenset(included), counter)
    d = decide_snapshot(snap, ledger.view, ledger.get(snap.entry_id))
    if d.entry is not None:
        ledger.append(d.entry)
    return d.status


def check(ledger: Ledger, balance_micro: int) -> None:
    assert ledger.view.balance_micro == balance_micro
    assert ledger.refold() == ledger.view  # incremental view == reference fold


# --------------------------------------------------------------------------- ledger


def test_debit_id_is_stable_and_append_is_idempotent() -> None:
    led = Ledger("acc")
    e1 = debit(led, "r1", "r2", "10.00", "11.00")  # 100 ckwh x 5600 = 560 000
    e2 = debit(led, "r1", "r2", "10.00", "11.00")
    assert e1 == e2 and len(led.entries) == 1
    check(led, -560_000)


def test_same_id_different_content_is_a_conflict() -> None:
    led = Ledger("acc")
    debit(led, "r1", "r2", "10.00", "11.00")
    with pytest.raises(LedgerConflict):
        debit(led, "r1", "r2", "10.00", "12.00")


def test_adjustment_and_wrong_account() -> None:
    led = Ledger("acc")
    led.append(adjustment_entry("a1", "acc", -250_000, 1, "meter test energy", "central"))
    check(led, -250_000)
    with pytest.raises(ValueError):
        led.append(adjustment_entry("a2", "other", 1, 1, "x", "y"))


def test_tier_state_follows_debits_and_periods() -> None:
    led = Ledger("acc")
    b = book(FLAT_TIER)
    r = rate_interval(rr("a", "2026-12-31T23:00", "0"), rr("b", "2027-01-01T01:00", "2"), b, TierState())
    assert r.charge is not None
    led.append(debit_entry("acc", r.charge))
    assert led.view.tier == r.tier_state == TierState(ms("2027-01-01T00:00"), 100)


# --------------------------------------------------------------------------- top-ups


def test_counter_rules() -> None:
    led = Ledger("acc")
    assert apply(led, topup("t1", 1, 50)) is TopUpStatus.APPLIED
    assert apply(led, topup("t1", 1, 50)) is TopUpStatus.DUPLICATE  # same id, same counter
    check(led, 50 * Y)
    d = decide_topup(topup("t1", 2, 50), led.view, led.get("topup:t1"), TopUpPolicy(), 1)
    assert d.reason is RejectReason.ID_REUSED
    d = decide_topup(topup("t9", 1, 50), led.view, None, TopUpPolicy(), 1)
    assert d.reason is RejectReason.COUNTER_REPLAY
    d = decide_topup(topup("t9", 3, 50), led.view, None, TopUpPolicy(), 1)
    assert d.reason is RejectReason.COUNTER_GAP and "expected 2" in d.message
    assert apply(led, topup("t2", 2, 10)) is TopUpStatus.APPLIED
    check(led, 60 * Y)


def test_overdraft_paid_first_and_limits() -> None:
    led = Ledger("acc")
    led.append(adjustment_entry("od", "acc", -30 * Y, 1, "emergency credit used", "gw"))
    d = decide_topup(topup("t1", 1, 50), led.view, None, TopUpPolicy(), 1)
    assert d.status is TopUpStatus.APPLIED
    assert d.overdraft_repaid_micro == 30 * Y and d.balance_after_micro == 20 * Y
    assert d.entry is not None and d.entry.body["overdraft_repaid_micro"] == 30 * Y
    pol = TopUpPolicy(minimum_purchase_micro=10 * Y, hoarding_limit_micro=100 * Y)
    assert decide_topup(topup("t1", 1, 5), led.view, None, pol, 1).reason is RejectReason.BELOW_MINIMUM
    assert decide_topup(topup("t1", 1, 131), led.view, None, pol, 1).reason is RejectReason.HOARDING_LIMIT
    assert decide_topup(topup("t1", 1, 130), led.view, None, pol, 1).status is TopUpStatus.APPLIED
    assert decide_topup(topup("t1", 1, 0), led.view, None, pol, 1).reason is RejectReason.BAD_AMOUNT
    huge = decide_topup(topup("t1", 1, 1_000_001), led.view, None, TopUpPolicy(), 1)
    assert huge.reason is RejectReason.BAD_AMOUNT
    assert (
        decide_topup(topup("t1", 1, 5, account="x"), led.view, None, pol, 1).reason
        is RejectReason.WRONG_ACCOUNT
    )


def test_authorization_requirement_and_record() -> None:
    led = Ledger("acc")
    pol = TopUpPolicy(require_authorization=True)
    assert decide_topup(topup("t1", 1, 5), led.view, None, pol, 1).reason is RejectReason.UNAUTHORIZED
    auth = Authorization("central-1", "k7", 123)
    d = decide_topup(topup("t1", 1, 5, authorization=auth), led.view, None, pol, 1)
    assert d.status is TopUpStatus.APPLIED and d.entry is not None
    assert d.entry.body["authorization"] == {"issuer": "central-1", "key_id": "k7", "verified_at_ms": 123}
    assert d.entry.body["channel"] == "mobile_app" and d.entry.body["source"] == "mqtt"


# --------------------------------------------------------------------------- reconciliation


def test_snapshot_replaces_history_and_reapplies_later_debits() -> None:
    led = Ledger("acc")
    apply(led, topup("t1", 1, 100))  # seq 1
    debit(led, "r1", "r2", "0", "1")  # seq 2: -0.56
    debit(led, "r2", "r3", "1", "2")  # seq 3: -0.56
    # central: as of seq 2 the balance was 99.00 (it also charged something we did not know)
    assert snapshot(led, 1, 2, 99, counter=1) is SnapshotStatus.APPLIED
    check(led, 99 * Y - 560_000)  # seq 3 re-applied on top
    debit(led, "r3", "r4", "2", "3")
    check(led, 99 * Y - 2 * 560_000)


def test_duplicate_and_stale_snapshots_are_noops() -> None:
    led = Ledger("acc")
    apply(led, topup("t1", 1, 100))
    assert snapshot(led, 2, 1, 90) is SnapshotStatus.APPLIED
    n = len(led.entries)
    assert snapshot(led, 2, 1, 90) is SnapshotStatus.DUPLICATE
    assert snapshot(led, 1, 1, 70) is SnapshotStatus.STALE
    assert snapshot(led, 2, 1, 80) is SnapshotStatus.REJECTED  # same central_seq, other content
    assert len(led.entries) == n
    check(led, 90 * Y)


def test_snapshot_beyond_local_ledger_is_rejected() -> None:
    led = Ledger("acc")
    apply(led, topup("t1", 1, 100))
    assert snapshot(led, 1, 5, 90) is SnapshotStatus.REJECTED
    check(led, 100 * Y)


def test_offline_topup_counted_by_snapshot_before_its_command_arrives() -> None:
    led = Ledger("acc")
    apply(led, topup("t1", 1, 100))  # seq 1
    debit(led, "r1", "r2", "0", "1")  # seq 2
    # central sold t2 (counter 2, 50 yuan) while we were offline; its snapshot counts it
    assert snapshot(led, 1, 2, 100 + 50 - 1, included=("topup:t2",), counter=2) is SnapshotStatus.APPLIED
    check(led, 149 * Y)
    assert apply(led, topup("t2", 2, 50)) is TopUpStatus.ALREADY_COUNTED  # late command: no double count
    check(led, 149 * Y)
    assert apply(led, topup("t2", 2, 50)) is TopUpStatus.DUPLICATE
    assert apply(led, topup("t3", 3, 10)) is TopUpStatus.APPLIED  # counter continues after central's
    check(led, 159 * Y)


def test_topup_arrives_first_then_snapshot_that_has_not_seen_our_credit() -> None:
    led = Ledger("acc")
    apply(led, topup("t1", 1, 100))  # seq 1
    apply(led, topup("t2", 2, 50))  # seq 2, not yet reported to central
    # central counted t2 itself (it sold it) but has only seen our seq 1
    assert snapshot(led, 1, 1, 150, included=("topup:t2",), counter=2) is SnapshotStatus.APPLIED
    check(led, 150 * Y)  # t2 once, not twice
    # later central has seen seq 2 and no longer lists it
    assert snapshot(led, 2, 2, 150, counter=2) is SnapshotStatus.APPLIED
    check(led, 150 * Y)


def test_stale_snapshot_after_newer_does_not_resurrect_old_balance() -> None:
    led = Ledger("acc")
    apply(led, topup("t1", 1, 100))
    debit(led, "r1", "r2", "0", "1")
    snapshot(led, 5, 2, 99)
    debit(led, "r2", "r3", "1", "2")
    assert snapshot(led, 4, 1, 500) is SnapshotStatus.STALE
    check(led, 99 * Y - 560_000)


def test_snapshot_with_tier_state_rebuilds_tier_from_later_debits() -> None:
    led = Ledger("acc")
    b = book(FLAT_TIER)
    r = rate_interval(rr("a", "2026-03-02T10:00", "0"), rr("b", "2026-03-02T11:00", "1"), b, TierState())
    assert r.charge is not None
    led.append(debit_entry("acc", r.charge))  # seq 1, 100 ckwh
    r2 = rate_interval(rr("b", "2026-03-02T11:00", "1"), rr("c", "2026-03-02T12:00", "3"), b, r.tier_state)
    assert r2.charge is not None
    led.append(debit_entry("acc", r2.charge))  # seq 2, 200 ckwh
    p = ms("2026-01-01T00:00")
    snap = CentralSnapshot("s1", "acc", 1, 1, 10 * Y, 5, tier_period_start_ms=p, tier_cumulative_ckwh=5000)
    d = decide_snapshot(snap, led.view, None)
    assert d.entry is not None
    led.append(d.entry)
    assert led.view.tier == TierState(p, 5200)  # central's 50.00 kWh + our 2.00 after as_of
    assert led.refold() == led.view


def test_entry_kinds_are_typed() -> None:
    led = Ledger("acc")
    apply(led, topup("t1", 1, 1))
    assert [e.kind for e in led.entries] == [EntryKind.CREDIT]
