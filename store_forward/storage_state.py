"""The storage-fault state machine (pure): what the gateway may do when its database failed.

::

    NORMAL ──damage found──► FAULT ──money state recovered──► RECOVERING ──last held
      ▲   (start or running)   │   (from the evidence:          │   account settled by a
      │                        │    verified ledgers, replay     │   central snapshot)
      │                        │    state, batch epoch)          ▼
      └────────────────────────┴──────── nothing held ────────► NORMAL

* **FAULT** — the damaged files are kept as evidence and a new database is in
  use, but no money state has been recovered into it yet. What is safe goes
  on: polling, storing readings and events, the uplink, alarms. Billing
  actions (debits, fixed charges, top-ups, snapshots, tariffs), relay changes
  and commands stop.
* **RECOVERING** — what the evidence proved is back: ledgers that re-fold to
  their stored views, purchase-counter floors, seen command ids, tariffs,
  the batch epoch (a new one above it). Accounts whose balance could not be
  proved are *held*: no debit, fixed charge, top-up or cutoff decision for
  them until a signed central balance snapshot settles them; every other
  account bills as usual. Commands issued before the recovery are refused
  unless their id is known (the replay fence), because the record of which
  ones were applied may be incomplete.
* **NORMAL** — nothing held. A database is never silently replaced: the
  state keeps the last evidence, the fence and a count of recoveries.

Damage found in RECOVERING (or FAULT) goes to FAULT again: held accounts and
the fence carry over and only grow.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any


class StorageMode(enum.StrEnum):
    NORMAL = "normal"
    FAULT = "fault"
    RECOVERING = "recovering"


class Action(enum.StrEnum):
    POLL = "poll"
    STORE = "store"  # readings, statuses, events into the outbox
    UPLINK = "uplink"
    DEBIT = "debit"  # rating a reading into a ledger debit
    FIXED_CHARGE = "fixed_charge"
    TOPUP = "topup"
    SNAPSHOT = "snapshot"  # a signed central balance snapshot
    TARIFF = "tariff"  # a tariff version from central
    CUTOFF = "cutoff"  # a relay operation decided by the prepaid policy
    COMMANDED_RELAY = "commanded_relay"  # a relay operation asked for by a signed command
    COMMANDS = "commands"  # verifying and applying signed commands at all


SAFE = frozenset({Action.POLL, Action.STORE, Action.UPLINK})
PER_ACCOUNT = frozenset({Action.DEBIT, Action.FIXED_CHARGE, Action.TOPUP, Action.CUTOFF})


@dataclass(frozen=True)
class StorageState:
    mode: StorageMode = StorageMode.NORMAL
    since_ms: int | None = None  # when this mode was entered
    kind: str | None = None  # what was found (integrity.FaultKind value)
    reason: str | None = None
    evidence: str | None = None  # directory holding the damaged files
    held: tuple[str, ...] = ()  # accounts whose balance awaits a central snapshot
    fence_ms: int | None = None  # commands issued before this are refused unless known
    recoveries: int = 0  # faults this gateway has gone through

    def __post_init__(self) -> None:
        if self.mode is StorageMode.NORMAL and self.held:
            raise ValueError("a NORMAL storage state holds no account")
        if self.mode is not StorageMode.NORMAL and self.since_ms is None:
            raise ValueError(f"a {self.mode} storage state needs since_ms")
        if tuple(sorted(set(self.held))) != self.held:
            raise ValueError("held accounts must be sorted and unique")

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "since_ms": self.since_ms,
            "kind": self.kind,
            "reason": self.reason,
            "evidence": self.evidence,
            "held": list(self.held),
            "fence_ms": self.fence_ms,
            "recoveries": self.recoveries,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StorageState:
        return cls(
            StorageMode(d.get("mode", "normal")),
            d.get("since_ms"),
            d.get("kind"),
            d.get("reason"),
            d.get("evidence"),
            tuple(sorted(set(d.get("held") or ()))),
            d.get("fence_ms"),
            int(d.get("recoveries") or 0),
        )


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    why: str = ""
    code: str = ""  # a short reason code: storage_fault, account_held


def permits(state: StorageState, action: Action, account: str | None = None) -> Verdict:
    """May ``action`` (for ``account``, where it concerns one) happen in ``state``?"""
    if action in SAFE or state.mode is StorageMode.NORMAL:
        return Verdict(True)
    if state.mode is StorageMode.FAULT:
        return Verdict(
            False,
            f"storage fault since {state.since_ms} ({state.kind}): billing, relay changes and"
            " commands are stopped until the money state is recovered from the evidence",
            "storage_fault",
        )
    # RECOVERING
    if action in PER_ACCOUNT and account is not None and account in state.held:
        return Verdict(
            False,
            f"account {account} is held since the storage recovery at {state.since_ms}: its"
            " balance could not be proved from the damaged database and awaits a signed"
            " central balance snapshot",
            "account_held",
        )
    return Verdict(True)


# --------------------------------------------------------------------------- transitions


def detect(
    state: StorageState, *, kind: str, reason: str, evidence: str | None, now_ms: int
) -> StorageState:
    """Damage found (at start or while running): FAULT, from any mode."""
    return replace(
        state,
        mode=StorageMode.FAULT,
        since_ms=now_ms,
        kind=kind,
        reason=reason,
        evidence=evidence,
        recoveries=state.recoveries + 1,
    )


def recovered(
    state: StorageState, *, held: Iterable[str], fence_ms: int | None, now_ms: int
) -> StorageState:
    """The money state is back as far as the evidence allowed: RECOVERING with
    ``held`` accounts (added to any still held), or NORMAL if none is."""
    if state.mode is not StorageMode.FAULT:
        raise ValueError(f"recovered() in {state.mode}: only a FAULT is recovered")
    all_held = tuple(sorted(set(state.held) | set(held)))
    fence = max(f for f in (state.fence_ms, fence_ms, 0) if f is not None) or None
    if not all_held:
        return replace(state, mode=StorageMode.NORMAL, since_ms=now_ms, held=(), fence_ms=fence)
    return replace(
        state, mode=StorageMode.RECOVERING, since_ms=now_ms, held=all_held, fence_ms=fence
    )


def settled(state: StorageState, account: str, now_ms: int) -> StorageState:
    """A central balance snapshot settled ``account``; NORMAL once none is held."""
    if state.mode is not StorageMode.RECOVERING or account not in state.held:
        return state
    held = tuple(a for a in state.held if a != account)
    if held:
        return replace(state, held=held)
    return replace(state, mode=StorageMode.NORMAL, since_ms=now_ms, held=())


def describe(state: StorageState) -> str:
    """One line for logs, ``systemctl status`` and ``edgegw status``."""
    if state.mode is StorageMode.NORMAL:
        if state.recoveries:
            return (
                f"normal (recovered from {state.recoveries} storage fault(s); last evidence"
                f" {state.evidence})"
            )
        return "normal"
    if state.mode is StorageMode.FAULT:
        return f"FAULT ({state.kind}: {state.reason}); billing and relays stopped; evidence {state.evidence}"
    return (
        f"RECOVERING: {len(state.held)} account(s) await a central balance snapshot"
        f" ({', '.join(state.held[:5])}{', …' if len(state.held) > 5 else ''}); evidence {state.evidence}"
    )
