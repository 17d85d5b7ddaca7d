"""Fixed charges over time the gateway did not live through: held, never debited blindly (pure).

Trusted time (:mod:`gateway.security.trusted_time`) sometimes moves forward
by more than the monotonic clock explains: a jumped system clock that held and
was then followed, a central time sync ahead of the gateway, or the time the
gateway was off, seen at the first time source after a start. Every fixed
charge whose period starts in such a stretch falls due at once; a clock a
year ahead would raise 365 daily charges on every account and trip them all.

The rule (docs/billing.md, "Held fixed charges"):

* a stretch the gateway was **off** for, at most :data:`OFF_BILLED_MS` long
  (24 h), is billed as usual: power cuts and restarts are normal, and at most
  one day's charges fall in them;
* in every other stretch — a longer off-time, or any **jump** while running —
  the fixed charges are **held**: recorded (``billing_fixed_held``), reported
  to central with their count and amount, never debited by the gateway and
  so never the cause of a trip. Central settles them (a balance snapshot that
  lists the ids it billed);
* at most :data:`HELD_SCAN_MS` of a held stretch is enumerated (a clock set
  a century ahead must not enumerate a century of days); the report says
  when it was cut short. Charges past it are neither debited nor listed.

Energy is not affected: it is billed from register differences, whatever the
interval's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.billing.rating import FixedChargeDue, fixed_charges_due
from gateway.billing.tariff import TariffBook

DAY_MS = 86_400_000
OFF_BILLED_MS = DAY_MS
HELD_SCAN_MS = 400 * DAY_MS
# Trusted time moving back by more than this (only central time or a synchronised clock
# that held can move it back) moves the fixed-charge scan back with it; less is the lag
# of the persisted "last time used" after a restart and is waited out.
REWIND_SLACK_MS = 10 * 60_000


@dataclass(frozen=True, slots=True)
class Stretch:
    """(from, to] of trusted time the gateway's monotonic clock did not live through."""

    from_ms: int
    to_ms: int
    off_time: bool  # the gateway was off (else: a clock jump while running)

    @property
    def length_ms(self) -> int:
        return self.to_ms - self.from_ms


def holds(stretch: Stretch, off_billed_ms: int = OFF_BILLED_MS) -> bool:
    """Are the fixed charges in ``stretch`` held?"""
    return not stretch.off_time or stretch.length_ms > off_billed_ms


@dataclass(frozen=True, slots=True)
class HeldGroup:
    """The fixed charges of one account held for one stretch."""

    stretch: Stretch
    charges: tuple[FixedChargeDue, ...]
    truncated: bool = False  # the stretch is longer than HELD_SCAN_MS: not all are listed

    @property
    def amount_micro(self) -> int:
        return sum(c.amount_micro for c in self.charges)


@dataclass(frozen=True, slots=True)
class FixedPlan:
    apply: tuple[FixedChargeDue, ...]
    held: tuple[HeldGroup, ...]

    @property
    def due(self) -> int:
        return len(self.apply) + sum(len(g.charges) for g in self.held)


def plan_fixed(
    account: str,
    book: TariffBook,
    since_ms: int,
    until_ms: int,
    stretches: Sequence[Stretch] = (),
    *,
    off_billed_ms: int = OFF_BILLED_MS,
    scan_ms: int = HELD_SCAN_MS,
) -> FixedPlan:
    """Split the fixed charges due in (since, until] into those to debit and those held."""
    apply: list[FixedChargeDue] = []
    held: list[HeldGroup] = []
    cursor = since_ms
    for s in sorted((s for s in stretches if holds(s, off_billed_ms)), key=lambda s: s.from_ms):
        lo, hi = max(s.from_ms, cursor), min(s.to_ms, until_ms)
        if hi <= lo:
            continue
        apply += fixed_charges_due(account, book, cursor, lo)
        scan_hi = min(hi, lo + scan_ms)
        charges = tuple(fixed_charges_due(account, book, lo, scan_hi))
        if charges or scan_hi < hi:
            held.append(HeldGroup(s, charges, truncated=scan_hi < hi))
        cursor = hi
    apply += fixed_charges_due(account, book, cursor, until_ms)
    return FixedPlan(tuple(apply), tuple(held))
