"""Rating engine: two consecutive register readings -> an exact interval charge.

Pure and deterministic. Money is integer micro-yuan, energy integer centi-kWh
(see :mod:`gateway.billing.money` and docs/billing.md for the rules):

1. Registers are truncated to 0.01 kWh, then differenced: ``E = floor(R1) - floor(R0)``.
2. The interval (t0, t1] is cut at every instant where something that prices
   energy changes: a tariff version's ``effective_from``, a tier settlement
   (period reset), and a time-of-use period boundary (site local time).
3. ``E`` is spread over those segments:
   * with per-rate registers T1..T4 (both readings, consistent with the
     schedule), each rate gets exactly its own register difference; within a
     rate, energy is spread over that rate's segments in proportion to time;
   * otherwise ``E`` is spread over all segments in proportion to time.
   Spreading uses the largest-remainder method in 0.01 kWh units, ties to the
   earlier segment, so the parts always add up to ``E`` exactly.
4. Segments are walked in time order against the account's cumulative tier
   consumption; a segment crossing a threshold is split exactly at it (usage
   that lands exactly on a threshold stays in the lower tier).
5. Each part costs ``ckwh * price_e4`` micro-yuan exactly.

A register going backwards, a non-increasing time or a reading of another
meter never produce a charge: the result carries a typed :class:`RatingAnomaly`
and ``advance=False`` (keep the old baseline). Energy before the first tariff
version is reported, not charged. A long gap is charged (registers are
cumulative, so the energy is right) but reported.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.reading import RATE_QUANTITIES, Quantity, Reading
from gateway.billing.money import amount_micro, ckwh_to_kwh, register_ckwh
from gateway.billing.tariff import FLAT_RATE, RATE_NAMES, NoTariffInForce, Tariff, TariffBook

_RATE_OF_QUANTITY: Mapping[Quantity, str] = dict(zip(RATE_QUANTITIES, RATE_NAMES, strict=True))


@dataclass(frozen=True)
class RegisterReading:
    """One meter's cumulative registers at one time (what rating needs of a Reading)."""

    reading_id: str
    meter_id: str
    time_ms: int
    import_kwh: Decimal
    rate_kwh: Mapping[str, Decimal] = field(default_factory=dict)  # "T1".."T4"

    @classmethod
    def from_reading(cls, reading: Reading, reading_id: str) -> RegisterReading | None:
        """None when the reading has no good import-total register."""
        total = reading.good(Quantity.ENERGY_IMPORT)
        if total is None:
            return None
        rates: dict[str, Decimal] = {}
        for q, name in _RATE_OF_QUANTITY.items():
            v = reading.good(q)
            if v is not None:
                rates[name] = v
        return cls(reading_id, reading.meter_id, reading.time_ms, total, rates)


EXCHANGE_NEW = "/new"  # reading id suffix of a new meter's initial registers


@dataclass(frozen=True)
class MeterReplacement:
    """An explicit meter exchange: final registers of the old meter, initial of the new.

    Rate ``(baseline, old_final)`` then continue from ``new_initial``; the pair
    (old_final, new_initial) is never rated.
    """

    event_id: str
    meter_id: str
    time_ms: int
    old_final_kwh: Decimal
    new_initial_kwh: Decimal
    old_final_rates: Mapping[str, Decimal] = field(default_factory=dict)
    new_initial_rates: Mapping[str, Decimal] = field(default_factory=dict)

    @property
    def old_final(self) -> RegisterReading:
        return RegisterReading(
            f"{self.event_id}/old", self.meter_id, self.time_ms, self.old_final_kwh, self.old_final_rates
        )

    @property
    def new_initial(self) -> RegisterReading:
        return RegisterReading(
            f"{self.event_id}{EXCHANGE_NEW}", self.meter_id, self.time_ms, self.new_initial_kwh,
            self.new_initial_rates,
        )


@dataclass(frozen=True)
class TierState:
    """Cumulative consumption of an account in its current tier period.

    ``period_start_ms`` None means "the period current at the next interval"
    (an account whose opening cumulative came without a period).
    """

    period_start_ms: int | None = None
    cumulative_ckwh: int = 0


@dataclass(frozen=True)
class ChargeLine:
    tariff: str  # "id@version"
    rate: str  # T1..T4 or "flat"
    tier: int | None  # 1-based tier number, None without tiers
    tier_period_start_ms: int | None
    ckwh: int
    price_e4: int
    amount_micro: int


class Apportioning(enum.StrEnum):
    NONE = "none"  # one segment: nothing to apportion
    REGISTERS = "registers"  # per-rate registers decided the split between rates
    TIME = "time"  # proportional to time in each segment


DEBIT_ID_PREFIX = "debit:t"  # every debit id; ids of the older form are "debit:" + 32 hex digits
DEBIT_TIME_DIGITS = 11  # hex digits of the end time (ms since the epoch): up to the year 2527
DEBIT_HASH_DIGITS = 20  # hex digits of the hash: 80 bits among the debits ending in the same millisecond
_DEBIT_TIME_MAX = 16**DEBIT_TIME_DIGITS - 1
LEGACY_DEBIT_RANGE = ("debit:0", "debit:g")  # [low, high): where ids of the older form sort, and only they


def _pair_digest(meter_id: str, start_reading_id: str, end_reading_id: str) -> str:
    return hashlib.sha256(f"{meter_id}\x1f{start_reading_id}\x1f{end_reading_id}".encode()).hexdigest()


def debit_id(meter_id: str, start_reading_id: str, end_reading_id: str, end_ms: int) -> str:
    """Stable id of the charge for one reading pair of one meter, in time order.

    ``debit:t`` + the end time in 11 hex digits (ms since the epoch, clamped to
    0..16^11-1) + the first 20 hex digits of sha256(meter, start reading id, end
    reading id): 38 characters, as long as the older form. Ids compare as their
    end times do, so the debits of a poll cycle go to neighbouring places in the
    ledger's id index instead of random ones (docs/billing.md, "Ledger").
    """
    t = min(max(end_ms, 0), _DEBIT_TIME_MAX)
    h = _pair_digest(meter_id, start_reading_id, end_reading_id)
    return f"{DEBIT_ID_PREFIX}{t:0{DEBIT_TIME_DIGITS}x}{h[:DEBIT_HASH_DIGITS]}"


def legacy_debit_id(meter_id: str, start_reading_id: str, end_reading_id: str) -> str:
    """The id the releases before time-ordered ids gave the same charge
    (``debit:`` + sha256(meter, start reading id, end reading id)[:32]); ledgers
    they wrote keep those ids, and a charge rated again must still be found by it."""
    return f"debit:{_pair_digest(meter_id, start_reading_id, end_reading_id)[:32]}"


def is_legacy_debit_id(entry_id: str) -> bool:
    """An id of the older form (it sorts in :data:`LEGACY_DEBIT_RANGE`)."""
    return LEGACY_DEBIT_RANGE[0] <= entry_id < LEGACY_DEBIT_RANGE[1]


@dataclass(frozen=True)
class IntervalCharge:
    meter_id: str
    start_reading_id: str
    end_reading_id: str
    start_ms: int
    end_ms: int
    ckwh: int
    lines: tuple[ChargeLine, ...]
    apportioning: Apportioning
    tier_before: TierState
    tier_after: TierState

    @property
    def amount_micro(self) -> int:
        return sum(line.amount_micro for line in self.lines)

    @property
    def charge_id(self) -> str:
        return debit_id(self.meter_id, self.start_reading_id, self.end_reading_id, self.end_ms)

    def ckwh_by_rate(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines:
            out[line.rate] = out.get(line.rate, 0) + line.ckwh
        return out

    def ckwh_by_tier(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for line in self.lines:
            if line.tier is not None:
                out[line.tier] = out.get(line.tier, 0) + line.ckwh
        return out


class AnomalyKind(enum.StrEnum):
    REGISTER_BACKWARDS = "register_backwards"
    TIME_NOT_INCREASING = "time_not_increasing"
    METER_MISMATCH = "meter_mismatch"
    NO_TARIFF = "no_tariff"
    GAP = "gap"  # informational: charged, but the readings are far apart
    RATE_REGISTERS_INCONSISTENT = "rate_registers_inconsistent"  # informational: time used


@dataclass(frozen=True)
class RatingAnomaly:
    kind: AnomalyKind
    meter_id: str
    start_reading_id: str
    end_reading_id: str
    detail: str


@dataclass(frozen=True)
class RatingResult:
    charge: IntervalCharge | None
    anomalies: tuple[RatingAnomaly, ...]
    tier_state: TierState  # carry this into the next interval
    advance: bool  # True: ``cur`` becomes the next baseline; False: keep ``prev``


@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    tariff: Tariff
    rate: str


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` units in proportion to ``weights``; exact sum, ties to earlier."""
    w_sum = sum(weights)
    if total == 0 or w_sum == 0:
        return [0] * len(weights)
    shares = [total * w // w_sum for w in weights]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % w_sum), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


def _segments(book: TariffBook, t0: int, t1: int) -> list[_Segment]:
    if t0 < t1:
        tariff = book.at(t0)
        if tariff.tou is None and tariff.tier is None and not book.version_boundaries(t0, t1):
            # one flat price all through (what the loop below finds, quicker: every reading asks)
            return [_Segment(t0, t1, tariff, FLAT_RATE)]
    cuts = {t0, t1, *book.version_boundaries(t0, t1)}
    for a, b in itertools.pairwise(sorted(cuts)):
        tariff = book.at(a)
        cuts.update(tariff.rate_boundaries(a, b))
        cuts.update(tariff.settlement_boundaries(a, b))
    points = sorted(cuts)
    out: list[_Segment] = []
    for a, b in itertools.pairwise(points):
        tariff = book.at(a)
        out.append(_Segment(a, b, tariff, tariff.rate_at(a)))
    return out


def _by_registers(
    prev: RegisterReading, cur: RegisterReading, segs: list[_Segment], total: int
) -> tuple[list[int] | None, str]:
    """Per-segment energy from per-rate registers, or (None, why not)."""
    used = {s.rate for s in segs}
    if not used <= set(RATE_NAMES):
        return None, ""
    names = sorted(set(prev.rate_kwh) & set(cur.rate_kwh))
    if not names or set(prev.rate_kwh) != set(cur.rate_kwh) or not used <= set(names):
        return None, ""
    delta = {r: register_ckwh(cur.rate_kwh[r]) - register_ckwh(prev.rate_kwh[r]) for r in names}
    if any(d < 0 for d in delta.values()):
        return None, f"a rate register went backwards: {_kwh_map(delta)}"
    stray = {r: d for r, d in delta.items() if d > 0 and r not in used}
    if stray:
        return None, f"energy registered in {', '.join(sorted(stray))}, a rate the tariff does not use here"
    residual = total - sum(delta.values())
    if abs(residual) > len(names):
        return None, (f"rate registers sum to {ckwh_to_kwh(sum(delta.values()))} kWh, "
                      f"the total register says {ckwh_to_kwh(total)} kWh")
    # truncation residue (at most 1 ckwh per register) goes to / comes from the largest rates
    order = sorted(names, key=lambda r: (-delta[r], r))
    if residual > 0:
        delta[order[0]] += residual
    else:
        need = -residual
        for r in order:
            take = min(need, delta[r])
            delta[r] -= take
            need -= take
    out = [0] * len(segs)
    for r in names:
        idx = [i for i, s in enumerate(segs) if s.rate == r]
        for i, e in zip(idx, _largest_remainder(delta[r], [segs[i].end - segs[i].start for i in idx]), strict=True):
            out[i] = e
    return out, ""


def rate_interval(
    prev: RegisterReading,
    cur: RegisterReading,
    book: TariffBook,
    tier: TierState,
    *,
    max_gap_ms: int | None = None,
) -> RatingResult:
    """Rate the energy between two consecutive readings of one meter."""

    def anomaly(kind: AnomalyKind, detail: str) -> RatingAnomaly:
        return RatingAnomaly(kind, cur.meter_id, prev.reading_id, cur.reading_id, detail)

    def refuse(kind: AnomalyKind, detail: str) -> RatingResult:
        return RatingResult(None, (anomaly(kind, detail),), tier, advance=False)

    if prev.meter_id != cur.meter_id:
        return refuse(AnomalyKind.METER_MISMATCH, f"readings of {prev.meter_id} and {cur.meter_id}")
    if cur.time_ms <= prev.time_ms:
        return refuse(
            AnomalyKind.TIME_NOT_INCREASING,
            f"reading at {_when(book, cur.time_ms)} is not after {_when(book, prev.time_ms)}",
        )
    total = register_ckwh(cur.import_kwh) - register_ckwh(prev.import_kwh)
    if total < 0:
        return refuse(
            AnomalyKind.REGISTER_BACKWARDS,
            f"import register went from {prev.import_kwh} to {cur.import_kwh} kWh",
        )
    notes: list[RatingAnomaly] = []
    first = book.versions[0].effective_from_ms
    if prev.time_ms < first:
        # Energy before the first version is not this tariff's to charge. It is
        # reported (kWh in the detail) and the baseline moves on, so that a
        # meter read before its tariff starts is not stuck forever.
        if cur.time_ms <= first:
            return RatingResult(
                None,
                (anomaly(AnomalyKind.NO_TARIFF, f"{ckwh_to_kwh(total)} kWh before the first tariff version "
                                                f"({_when(book, first)}); not charged"),),
                tier,
                advance=True,
            )
        before, _ = _largest_remainder(total, [first - prev.time_ms, cur.time_ms - first])
        notes.append(
            anomaly(AnomalyKind.NO_TARIFF, f"{ckwh_to_kwh(before)} kWh before the first tariff version "
                                           f"({_when(book, first)}); not charged")
        )
        start_reg = register_ckwh(prev.import_kwh) + before
        prev = RegisterReading(prev.reading_id, prev.meter_id, first, Decimal(start_reg) / 100)
        cur = RegisterReading(cur.reading_id, cur.meter_id, cur.time_ms, cur.import_kwh)
        total -= before
    try:
        segs = _segments(book, prev.time_ms, cur.time_ms)
    except NoTariffInForce as exc:  # pragma: no cover - guarded above
        return refuse(AnomalyKind.NO_TARIFF, str(exc))

    energies: list[int] | None
    if len(segs) == 1:
        energies, how = [total], Apportioning.NONE
    elif len({s.rate for s in segs}) == 1:
        energies, how = None, Apportioning.TIME
    else:
        energies, why = _by_registers(prev, cur, segs, total)
        how = Apportioning.REGISTERS
        if why:
            notes.append(anomaly(AnomalyKind.RATE_REGISTERS_INCONSISTENT, why + "; split by time"))
    if energies is None:
        energies = _largest_remainder(total, [s.end - s.start for s in segs])
        how = Apportioning.TIME if len(segs) > 1 else Apportioning.NONE

    if max_gap_ms is not None and cur.time_ms - prev.time_ms > max_gap_ms:
        split = (
            "; its split between time-of-use periods is an estimate (constant load assumed)"
            if how is Apportioning.TIME and len({s.rate for s in segs}) > 1
            else ""
        )
        notes.append(
            anomaly(
                AnomalyKind.GAP,
                f"readings {duration_text(cur.time_ms - prev.time_ms)} apart (limit "
                f"{duration_text(max_gap_ms)}); charged from the registers{split}",
            )
        )
    state = tier
    _Key = tuple[str, str, int | None, int | None, int]
    merged: dict[_Key, int] = {}
    key: _Key
    for seg, e in zip(segs, energies, strict=True):
        t = seg.tariff
        if t.tier is None:
            key = (t.key, seg.rate, None, None, t.unit_price_e4(seg.rate, None))
            merged[key] = merged.get(key, 0) + e
            continue
        ps = t.tier_period_start(seg.start)
        assert ps is not None
        if state.period_start_ms is None:
            state = TierState(ps, state.cumulative_ckwh)
        elif ps > state.period_start_ms:
            state = TierState(ps, 0)
        cum = state.cumulative_ckwh
        while e > 0:
            k, room = t.tier.tier_of_next_unit(cum)
            take = e if room is None else min(e, room)
            if take <= 0:  # tier_of_next_unit always leaves room >= 1; never loop without progress
                raise RuntimeError(f"tier walk made no progress at cumulative {cum} ckwh")
            key = (t.key, seg.rate, k + 1, state.period_start_ms, t.unit_price_e4(seg.rate, k))
            merged[key] = merged.get(key, 0) + take
            cum += take
            e -= take
        state = TierState(state.period_start_ms, cum)
    lines = tuple(
        ChargeLine(tk, rate, tn, ps_, ckwh, price, amount_micro(ckwh, price))
        for (tk, rate, tn, ps_, price), ckwh in merged.items()
        if ckwh > 0
    )
    charge = IntervalCharge(
        cur.meter_id,
        prev.reading_id,
        cur.reading_id,
        prev.time_ms,
        cur.time_ms,
        total,
        lines,
        how,
        tier,
        state,
    )
    return RatingResult(charge, tuple(notes), state, advance=True)


@dataclass(frozen=True)
class FixedChargeDue:
    charge_id: str
    account: str
    name: str
    tariff: str
    period: str
    period_start_ms: int
    amount_micro: int


def fixed_charges_due(account: str, book: TariffBook, since_ms: int, until_ms: int) -> list[FixedChargeDue]:
    """Fixed charges whose period starts in (since, until], charged at the period start
    by the tariff version in force then. Ids are stable, so overlapping calls are harmless."""
    out: list[FixedChargeDue] = []
    vs = book.versions
    for i, v in enumerate(vs):
        lo = max(since_ms, v.effective_from_ms - 1)
        hi = until_ms if i + 1 == len(vs) else min(until_ms, vs[i + 1].effective_from_ms - 1)
        if hi <= lo:
            continue
        for fc in v.fixed:
            for s in v.fixed_period_starts(fc.period, lo, hi):
                cid = f"fixed:{account}:{v.tariff_id}:{fc.name}:{s}"
                out.append(FixedChargeDue(cid, account, fc.name, v.key, fc.period, s, fc.amount_micro))
    out.sort(key=lambda f: (f.period_start_ms, f.name))
    return out


def rate_chain(
    items: Sequence[RegisterReading | MeterReplacement],
    book: TariffBook,
    tier: TierState,
    *,
    max_gap_ms: int | None = None,
) -> tuple[list[RatingResult], TierState]:
    """Rate a time-ordered sequence of one meter's readings and replacement events
    (:func:`track_reading`, :func:`track_replacement`)."""
    results: list[RatingResult] = []
    track = MeterTrack()
    for item in items:
        if isinstance(item, MeterReplacement):
            step = track_replacement(track, item, book, tier, max_gap_ms=max_gap_ms)
        else:
            step = track_reading(track, item, book, tier, max_gap_ms=max_gap_ms)
        results += step.results
        track, tier = step.track, step.tier_state
    return results, tier


# ---------------------------------------------------------------------------
# One meter over time: baseline, declared replacements, undeclared register resets


class ReplacementError(EdgeGwError, ValueError):
    """A declared meter replacement that does not fit what was billed (``code`` says how)."""

    kind = ErrorKind.INVALID

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class HeldSpan:
    """Energy that could not be measured after an undeclared register reset: from the
    old register's last good reading to the new register's first reading. It is billed
    when the replacement is declared (the registers read at the exchange)."""

    last_good: RegisterReading  # the old register, last reading billed up to
    first_after: RegisterReading  # the new register, first reading (billing continued from it)


@dataclass(frozen=True)
class MeterTrack:
    """What rating of one meter continues from.

    ``baseline``: the reading the next interval starts at. ``suspect``: a reading
    whose import register is below the baseline, not yet explained (a bad reading,
    or a register reset); nothing was charged for it. ``held``: spans left by
    confirmed undeclared resets, waiting for the replacement to be declared.
    """

    baseline: RegisterReading | None = None
    suspect: RegisterReading | None = None
    held: tuple[HeldSpan, ...] = ()


@dataclass(frozen=True)
class ResetNotice:
    """An undeclared register reset, confirmed: the evidence for central."""

    meter_id: str
    last_good: RegisterReading
    first_after: RegisterReading
    confirmed_by: RegisterReading


@dataclass(frozen=True)
class TrackStep:
    track: MeterTrack
    results: tuple[RatingResult, ...]  # rated intervals and refusals, in time order
    tier_state: TierState
    reset: ResetNotice | None = None


def _reg(r: RegisterReading) -> int:
    return register_ckwh(r.import_kwh)


def track_reading(
    track: MeterTrack,
    cur: RegisterReading,
    book: TariffBook,
    tier: TierState,
    *,
    max_gap_ms: int | None = None,
) -> TrackStep:
    """Rate a new reading of a meter against its track (docs/billing.md, "Meter
    replacement and register resets").

    A reading whose import register is below the baseline is never charged (no
    negative charge) and becomes the *suspect*. The next reading decides: at or
    above the baseline, the suspect was a bad reading and rating continues from the
    baseline; below the baseline but not below the suspect (and later), the
    register was reset — billing continues from the suspect, the span from the
    baseline to the suspect is *held* (:class:`HeldSpan`) until the replacement is
    declared, and a :class:`ResetNotice` says so.
    """
    base = track.baseline
    if base is None:
        return TrackStep(replace(track, baseline=cur), (), tier)
    if cur.reading_id == base.reading_id:
        return TrackStep(track, (), tier)
    sus = track.suspect
    if (
        sus is not None
        and cur.meter_id == sus.meter_id
        and cur.time_ms > sus.time_ms
        and _reg(sus) <= _reg(cur) < _reg(base)
    ):
        r = rate_interval(sus, cur, book, tier, max_gap_ms=max_gap_ms)
        held = (*track.held, HeldSpan(base, sus))
        new = MeterTrack(cur if r.advance else sus, None, held)
        return TrackStep(new, (r,), r.tier_state, ResetNotice(cur.meter_id, base, sus, cur))
    r = rate_interval(base, cur, book, tier, max_gap_ms=max_gap_ms)
    if any(a.kind is AnomalyKind.REGISTER_BACKWARDS for a in r.anomalies):
        return TrackStep(replace(track, suspect=cur), (r,), r.tier_state)
    if r.advance:
        return TrackStep(MeterTrack(cur, None, track.held), (r,), r.tier_state)
    return TrackStep(track, (r,), r.tier_state)


def track_replacement(
    track: MeterTrack,
    rep: MeterReplacement,
    book: TariffBook,
    tier: TierState,
    *,
    max_gap_ms: int | None = None,
) -> TrackStep:
    """Apply a declared meter replacement: the old register is billed up to its final
    reading, the new one from its initial reading. Declared late, after an
    undeclared reset held a span (or left a suspect), the held energy is billed now,
    exactly. Raises :class:`ReplacementError` when the registers contradict what was
    billed (an old final below the last billed reading, a new initial above the new
    register's first reading, a replacement before intervals already billed across it).
    """
    results: list[RatingResult] = []
    old, new = rep.old_final, rep.new_initial

    def rate(a: RegisterReading, b: RegisterReading) -> None:
        nonlocal tier
        if b.time_ms == a.time_ms and _reg(b) == _reg(a):
            return  # nothing between them
        r = rate_interval(a, b, book, tier, max_gap_ms=max_gap_ms)
        if r.charge is None and any(
            x.kind in (AnomalyKind.REGISTER_BACKWARDS, AnomalyKind.TIME_NOT_INCREASING) for x in r.anomalies
        ):
            raise ReplacementError("replacement_inconsistent", "; ".join(x.detail for x in r.anomalies))
        results.append(r)
        tier = r.tier_state

    def check_old(last: RegisterReading) -> None:
        if last.reading_id.endswith(EXCHANGE_NEW) and rep.time_ms <= last.time_ms:
            raise ReplacementError(
                "already_replaced",
                f"meter {rep.meter_id}: an exchange at {_when(book, last.time_ms)} is already recorded "
                f"({last.reading_id.removesuffix(EXCHANGE_NEW)}); a later one needs a later time",
            )
        if rep.time_ms < last.time_ms:
            raise ReplacementError(
                "replacement_before_billed",
                f"meter {rep.meter_id}: replacement at {_when(book, rep.time_ms)} is before the reading "
                f"{last.reading_id} ({_when(book, last.time_ms)}) already billed on the old register",
            )
        if _reg(old) < _reg(last):
            raise ReplacementError(
                "old_final_below_billed",
                f"meter {rep.meter_id}: the old meter's final register {old.import_kwh} kWh is below "
                f"{last.import_kwh} kWh, already billed",
            )

    def check_new(first: RegisterReading) -> None:
        if first.time_ms < rep.time_ms or _reg(new) > _reg(first):
            raise ReplacementError(
                "new_initial_above_read",
                f"meter {rep.meter_id}: the new meter's initial register {new.import_kwh} kWh at "
                f"{_when(book, rep.time_ms)} does not precede its reading {first.import_kwh} kWh at "
                f"{_when(book, first.time_ms)}",
            )

    for i, span in enumerate(track.held):
        if span.last_good.time_ms <= rep.time_ms <= span.first_after.time_ms:
            check_old(span.last_good)
            check_new(span.first_after)
            rate(span.last_good, old)
            rate(new, span.first_after)
            held = track.held[:i] + track.held[i + 1 :]
            return TrackStep(replace(track, held=held), tuple(results), tier)
    base = track.baseline
    if base is None:
        return TrackStep(MeterTrack(new, None, track.held), (), tier)
    check_old(base)
    sus = track.suspect
    if sus is not None and sus.time_ms >= rep.time_ms:
        check_new(sus)
        rate(base, old)
        rate(new, sus)
        return TrackStep(MeterTrack(sus, None, track.held), tuple(results), tier)
    rate(base, old)
    return TrackStep(MeterTrack(new, None, track.held), tuple(results), tier)


def _when(book: TariffBook, t_ms: int) -> str:
    return iso_local(book.versions[0].tz, t_ms)


def iso_local(tz: ZoneInfo, t_ms: int) -> str:
    """ISO 8601 local time with its offset, to the second (milliseconds when not zero)."""
    lt = datetime.fromtimestamp(t_ms / 1000, tz=tz)
    return lt.isoformat(timespec="milliseconds" if t_ms % 1000 else "seconds")


def duration_text(ms_: int) -> str:
    """``90 s``, ``14 h``, ``3 h 30 min``, ``2 d 1 h`` (rounded down to the second)."""
    sec = ms_ // 1000
    d, rest = divmod(sec, 86_400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{v} {u}" for v, u in ((d, "d"), (h, "h"), (m, "min"), (s, "s")) if v]
    return " ".join(parts[:2]) if parts else f"{ms_} ms"


def _kwh_map(ckwh: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {ckwh_to_kwh(v)} kWh" for k, v in sorted(ckwh.items()))
