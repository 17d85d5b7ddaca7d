"""Top-ups: one decision path for every channel (MQTT from central, USB bundle, CLI).

:func:`decide_topup` is pure: given the top-up, the account's ledger view, the
credit entry already recorded under the same id (if any) and the policy, it
says what to do and builds the credit entry. Rules (docs/billing.md):

* the purchase counter must be exactly ``last + 1``; the same id with the same
  counter and amount is a harmless duplicate; anything else is rejected with a
  reason (replayed counter, gap, id reused with different content);
* a top-up that central already counted in the latest snapshot
  (``included_ids``) is recorded for audit but moves no money twice;
* overdraft is paid off first (the wallet is one signed balance; the amount
  repaid is recorded with the credit);
* optional minimum purchase and hoarding limit (balance after must not exceed
  it);
* the sales channel (counter, bank, mobile app, agent) and the path it
  reached the gateway (mqtt, usb, cli) are kept with the credit;
* :class:`Authorization` is attached by the layer that verifies signatures;
  a policy can require it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.billing.ledger import Entry, EntryKind, LedgerView
from gateway.billing.money import yuan_text

MAX_TOPUP_MICRO = 10**12  # one million yuan: anything larger is a malformed command


class Channel(enum.StrEnum):
    COUNTER = "counter"
    BANK = "bank"
    MOBILE_APP = "mobile_app"
    AGENT = "agent"


class Source(enum.StrEnum):
    """How the top-up reached the gateway (the command channel)."""

    MQTT = "mqtt"  # from central over the uplink
    USB = "usb"  # in a provisioning bundle on a technician's stick
    TECHNICIAN = "technician"  # handed over on site: ``edgegw topup apply FILE``
    CLI = "cli"  # a local tool or test calling the billing port directly


@dataclass(frozen=True)
class Authorization:
    """Who vouched for a command, filled in by the signature-verifying layer."""

    issuer: str
    key_id: str
    verified_at_ms: int


@dataclass(frozen=True)
class TopUp:
    topup_id: str
    account: str
    counter: int  # per-account purchase counter, 1, 2, ...
    amount_micro: int
    channel: Channel
    source: Source
    issued_ms: int  # when central (or the technician) issued it
    authorization: Authorization | None = None

    @property
    def entry_id(self) -> str:
        return credit_id(self.topup_id)


def credit_id(topup_id: str) -> str:
    return f"topup:{topup_id}"


@dataclass(frozen=True)
class TopUpPolicy:
    minimum_purchase_micro: int = 0
    hoarding_limit_micro: int | None = None  # reject if the balance after would exceed it
    require_authorization: bool = False


class TopUpStatus(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # identical top-up already recorded: no effect
    ALREADY_COUNTED = "already_counted"  # central counted it in a snapshot: recorded, no money moved
    REJECTED = "rejected"


class RejectReason(enum.StrEnum):
    WRONG_ACCOUNT = "wrong_account"
    BAD_AMOUNT = "bad_amount"
    UNAUTHORIZED = "unauthorized"
    ID_REUSED = "id_reused"
    COUNTER_REPLAY = "counter_replay"
    COUNTER_GAP = "counter_gap"
    BELOW_MINIMUM = "below_minimum"
    HOARDING_LIMIT = "hoarding_limit"


@dataclass(frozen=True)
class TopUpDecision:
    status: TopUpStatus
    message: str
    entry: Entry | None = None  # append this (APPLIED, ALREADY_COUNTED)
    reason: RejectReason | None = None
    balance_before_micro: int = 0
    balance_after_micro: int = 0
    overdraft_repaid_micro: int = 0


def credit_entry(topup: TopUp, now_ms: int, overdraft_repaid_micro: int, counted_centrally: bool) -> Entry:
    auth = topup.authorization
    body = {
        "topup_id": topup.topup_id,
        "counter": topup.counter,
        "channel": topup.channel.value,
        "source": topup.source.value,
        "issued_ms": topup.issued_ms,
        "authorization": None
        if auth is None
        else {"issuer": auth.issuer, "key_id": auth.key_id, "verified_at_ms": auth.verified_at_ms},
        "overdraft_repaid_micro": overdraft_repaid_micro,
        "counted_centrally": counted_centrally,
    }
    return Entry(topup.entry_id, topup.account, EntryKind.CREDIT, topup.amount_micro, now_ms, body)


def decide_topup(
    topup: TopUp, view: LedgerView, existing: Entry | None, policy: TopUpPolicy, now_ms: int
) -> TopUpDecision:
    bal = view.balance_micro

    def reject(reason: RejectReason, msg: str) -> TopUpDecision:
        return TopUpDecision(TopUpStatus.REJECTED, msg, None, reason, bal, bal)

    if topup.account != view.account:
        return reject(RejectReason.WRONG_ACCOUNT, f"top-up for {topup.account!r} on account {view.account!r}")
    if existing is not None and existing.account != topup.account:
        return reject(
            RejectReason.ID_REUSED,
            f"top-up id {topup.topup_id} is already recorded for account {existing.account!r}",
        )
    if existing is not None:
        same = (
            existing.kind is EntryKind.CREDIT
            and existing.amount_micro == topup.amount_micro
            and existing.body.get("counter") == topup.counter
        )
        if same:
            return TopUpDecision(TopUpStatus.DUPLICATE, f"top-up {topup.topup_id} already recorded", None, None, bal, bal)
        return reject(
            RejectReason.ID_REUSED,
            f"top-up id {topup.topup_id} already recorded with counter {existing.body.get('counter')} "
            f"and amount {yuan_text(existing.amount_micro)}",
        )
    if not 0 < topup.amount_micro <= MAX_TOPUP_MICRO:
        return reject(
            RejectReason.BAD_AMOUNT,
            f"amount must be > 0 and at most {yuan_text(MAX_TOPUP_MICRO)}, got {yuan_text(topup.amount_micro)}",
        )
    if policy.require_authorization and topup.authorization is None:
        return reject(RejectReason.UNAUTHORIZED, "no verified authorization attached")
    snap = view.snapshot
    if snap is not None and topup.entry_id in snap.included_ids:
        entry = credit_entry(topup, now_ms, 0, counted_centrally=True)
        return TopUpDecision(
            TopUpStatus.ALREADY_COUNTED,
            f"top-up {topup.topup_id} already counted by central snapshot {snap.snapshot_id}",
            entry,
            None,
            bal,
            bal,
        )
    last = view.purchase_counter
    if topup.counter <= last:
        return reject(
            RejectReason.COUNTER_REPLAY,
            f"purchase counter {topup.counter} already used (last applied {last})",
        )
    if topup.counter != last + 1:
        return reject(
            RejectReason.COUNTER_GAP,
            f"purchase counter {topup.counter} skips ahead (expected {last + 1})",
        )
    if topup.amount_micro < policy.minimum_purchase_micro:
        return reject(
            RejectReason.BELOW_MINIMUM,
            f"amount {yuan_text(topup.amount_micro)} below the minimum purchase "
            f"{yuan_text(policy.minimum_purchase_micro)}",
        )
    after = bal + topup.amount_micro
    if policy.hoarding_limit_micro is not None and after > policy.hoarding_limit_micro:
        return reject(
            RejectReason.HOARDING_LIMIT,
            f"balance after top-up {yuan_text(after)} would exceed hoarding limit "
            f"{yuan_text(policy.hoarding_limit_micro)}",
        )
    repaid = min(topup.amount_micro, max(0, -bal))
    entry = credit_entry(topup, now_ms, repaid, counted_centrally=False)
    return TopUpDecision(
        TopUpStatus.APPLIED,
        f"top-up {topup.topup_id} applied",
        entry,
        None,
        bal,
        after,
        repaid,
    )
