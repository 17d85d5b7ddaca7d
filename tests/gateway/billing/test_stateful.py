"""Stateful test: ledger + top-ups + central snapshots + cutoff, against a simple model.

The model is the truth: every sale central made and the gateway has learnt of
(by command or through a snapshot) counts once, every rated interval counts
once. Central is modelled too: it sees the gateway's entries up to some seq
and sends snapshots that list the sales the gateway may not have recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from firmware_bridge.relay_ops import RelayOp
from gateway.billing.cutoff import Contact, CutoffConfig, CutoffState, evaluate
from gateway.billing.ledger import EntryKind, Ledger, debit_entry
from gateway.billing.rating import RegisterReading, TierState, rate_interval
from gateway.billing.reconcile import CentralSnapshot, SnapshotStatus, decide_snapshot
from gateway.billing.topup import Channel, Source, TopUp, TopUpPolicy, TopUpStatus, decide_topup
from tests.gateway.billing._util import FLAT, book, ms

Y = 1_000_000
BOOK = book(FLAT)
ACC = "acc"


@dataclass
class Sale:
    topup: TopUp
    known_via_snapshot: bool = False
    recorded: bool = False  # a local credit entry exists


class BillingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(ACC)
        self.sales: list[Sale] = []
        self.debited: dict[str, int] = {}  # debit id -> amount
        self.t = ms("2026-03-02T00:00")
        self.reg = 0
        self.base = RegisterReading("r0", "m1", self.t, Decimal(0))
        self.n_readings = 0
        self.central_seq = 0
        self.snapshots: list[CentralSnapshot] = []
        self.cut = CutoffState()
        self.protected = False
        self.cfg = CutoffConfig(alarm1_micro=20 * Y, alarm2_micro=10 * Y, overdraft_micro=3 * Y,
                                close_permit_micro=1 * Y, relay_min_interval_ms=0)

    # -- model --------------------------------------------------------------
    def known_money(self) -> int:
        credited = sum(s.topup.amount_micro for s in self.sales if s.known_via_snapshot or s.recorded)
        return credited - sum(self.debited.values())

    # -- rules ---------------------------------------------------------------
    @rule(amount=st.integers(1, 80))
    def central_sells(self, amount: int) -> None:
        k = len(self.sales) + 1
        self.sales.append(Sale(TopUp(f"t{k}", ACC, k, amount * Y, Channel.MOBILE_APP, Source.MQTT, self.t)))

    @precondition(lambda self: bool(self.sales))
    @rule(data=st.data())
    def command_arrives(self, data: st.DataObject) -> None:
        sale = data.draw(st.sampled_from(self.sales))
        before = self.ledger.view
        d = decide_topup(sale.topup, before, self.ledger.get(sale.topup.entry_id), TopUpPolicy(), self.t)
        if d.status is TopUpStatus.APPLIED:
            assert sale.topup.counter == before.purchase_counter + 1
            assert not sale.recorded and not sale.known_via_snapshot
        if d.status is TopUpStatus.ALREADY_COUNTED:
            assert sale.known_via_snapshot and not sale.recorded
        if d.status is TopUpStatus.DUPLICATE:
            assert sale.recorded
        if d.entry is not None:
            self.ledger.append(d.entry)
            sale.recorded = True

    @rule(kwh=st.integers(0, 500), minutes=st.integers(1, 600), redeliver=st.booleans())
    def consume(self, kwh: int, minutes: int, redeliver: bool) -> None:
        self.t += minutes * 60_000
        self.reg += kwh
        self.n_readings += 1
        cur = RegisterReading(f"r{self.n_readings}", "m1", self.t, Decimal(self.reg) / 100)
        res = rate_interval(self.base, cur, BOOK, TierState())
        assert res.charge is not None
        e = debit_entry(ACC, res.charge)
        for _ in range(2 if redeliver else 1):
            self.ledger.append(e)
        self.debited[e.entry_id] = res.charge.amount_micro
        self.base = cur

    @precondition(lambda self: self.ledger.view.last_seq > 0)
    @rule(data=st.data())
    def central_snapshot(self, data: st.DataObject) -> None:
        view = self.ledger.view
        lo = view.snapshot.as_of_seq if view.snapshot else 0
        as_of = data.draw(st.integers(lo, view.last_seq))
        seen = [e for e in self.ledger.entries if e.seq <= as_of and e.kind is not EntryKind.SNAPSHOT]
        seen_ids = {e.entry_id for e in seen}
        central_balance = sum(s.topup.amount_micro for s in self.sales) - sum(
            e.amount_micro * -1 for e in seen if e.kind is EntryKind.DEBIT
        )
        included = frozenset(s.topup.entry_id for s in self.sales if s.topup.entry_id not in seen_ids)
        self.central_seq += 1
        snap = CentralSnapshot(f"s{self.central_seq}", ACC, self.central_seq, as_of, central_balance, self.t,
                               included, len(self.sales))
        d = decide_snapshot(snap, view, None)
        assert d.status is SnapshotStatus.APPLIED, d.message
        assert d.entry is not None
        self.ledger.append(d.entry)
        self.snapshots.append(snap)
        for s in self.sales:
            s.known_via_snapshot = True

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def old_snapshot_redelivered(self, data: st.DataObject) -> None:
        snap = data.draw(st.sampled_from(self.snapshots))
        before = (self.ledger.entries, self.ledger.view)
        d = decide_snapshot(snap, self.ledger.view, self.ledger.get(snap.entry_id))
        assert d.status in (SnapshotStatus.DUPLICATE, SnapshotStatus.STALE)
        assert (self.ledger.entries, self.ledger.view) == before

    @rule(protected=st.booleans(), minutes=st.integers(0, 120))
    def evaluate_cutoff(self, protected: bool, minutes: int) -> None:
        self.t += minutes * 60_000
        cfg = CutoffConfig(**{**self.cfg.__dict__, "protected": protected})
        d = evaluate(self.cut, self.ledger.view.balance_micro, self.t, Contact(self.t), cfg, ACC)
        kinds = [a.kind for a in d.actions]
        if protected:
            assert RelayOp.TRIP not in kinds
            assert not d.state.relay_open
        if RelayOp.TRIP in kinds:
            assert self.ledger.view.balance_micro <= -self.cfg.overdraft_micro
        if RelayOp.CLOSE in kinds and not protected:
            assert self.ledger.view.balance_micro > self.cfg.close_permit_micro
        self.cut = d.state

    # -- invariants -------------------------------------------------------------
    @invariant()
    def balance_matches_model(self) -> None:
        assert self.ledger.view.balance_micro == self.known_money()

    @invariant()
    def incremental_view_equals_fold(self) -> None:
        assert self.ledger.refold() == self.ledger.view

    @invariant()
    def relay_open_only_when_cut(self) -> None:
        assert self.cut.relay_open == (self.cut.level.value == "cutoff")


BillingMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBilling = BillingMachine.TestCase


class LongBillingMachine(BillingMachine):
    pass


LongBillingMachine.TestCase.settings = settings(max_examples=2000, stateful_step_count=100, deadline=None)
TestBillingLong = pytest.mark.long(LongBillingMachine.TestCase)
