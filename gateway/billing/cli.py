"""``edgegw tariff simulate``: what the gateway would bill and decide for a CSV of readings.

    edgegw tariff simulate --tariff T.toml [--tariff T-v2.toml] --readings R.csv
        [--account A.toml] [--timezone TZ] [--max-gap 2h] [--format table|json|csv]

The same engine as the daemon: readings are rated meter by meter with
:func:`gateway.billing.rating.track_reading` (register resets and declared
replacements included), fixed charges are raised for the periods that start
in [first reading, last reading), and with ``--account`` the ledger events go
through the cutoff policy with :func:`gateway.billing.cutoff.follow` — at every
balance change and at every instant in between at which the decision can
change (a no-disconnect window's end, a reconnect delay), exactly as the
daemon's tick does. Output, rules and formats: docs/billing.md
("edgegw tariff simulate").
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from firmware_bridge.errors import EdgeGwError, ErrorKind
from gateway.billing.account import AccountError, AccountSettings, load_account
from gateway.billing.cutoff import (
    Contact,
    CutoffDecision,
    CutoffState,
    PolicyPoint,
    describe,
    evaluate,
    follow,
)
from gateway.billing.ledger import Entry, Ledger, adjustment_entry, debit_entry, fixed_entry
from gateway.billing.money import (
    bill_fen,
    ckwh_to_kwh,
    e4_to_price,
    fen_text,
    micro_to_decimal,
    report_yuan,
    yuan_text,
)
from gateway.billing.rating import (
    AnomalyKind,
    Apportioning,
    FixedChargeDue,
    HeldSpan,
    IntervalCharge,
    MeterReplacement,
    MeterTrack,
    RatingAnomaly,
    RegisterReading,
    ReplacementError,
    ResetNotice,
    TierState,
    duration_text,
    fixed_charges_due,
    iso_local,
    track_reading,
    track_replacement,
)
from gateway.billing.tariff import RATE_NAMES, TariffBook, TariffError
from gateway.billing.tariff_file import load_book
from gateway.billing.topup import decide_topup

ROUNDING_RULE = (
    "each bill line is rounded to the fen (0.01 yuan), half to even; a total is the sum of its "
    "rounded lines; the exact amounts beside them are what the prepaid balance is debited"
)
FIXED_RULE = "fixed charges of the periods that start in [first reading, last reading)"
DEFAULT_MAX_GAP_MS = 2 * 3_600_000
UNNAMED = "account"  # the account of the readings when no --account is given

_RATE_COLS = [f"{n.lower()}_kwh" for n in RATE_NAMES]
COLUMNS = ("meter", "time", "import_kwh", *_RATE_COLS, "event", "new_import_kwh",
           *(f"new_{c}" for c in _RATE_COLS))
EVENTS = ("reading", "replace")


class InputError(EdgeGwError):
    """A file or argument of `edgegw tariff` cannot be used; the message says why."""

    kind = ErrorKind.INVALID


# ---------------------------------------------------------------------------
# Input


@dataclass
class Readings:
    """A readings file: per meter, readings and declared replacements in time order."""

    items: dict[str, list[RegisterReading | MeterReplacement]] = field(default_factory=dict)

    def all_times(self) -> list[int]:
        return [x.time_ms for xs in self.items.values() for x in xs]

    def reading_times(self, meter: str) -> list[int]:
        return [x.time_ms for x in self.items.get(meter, ()) if isinstance(x, RegisterReading)]


def _kwh(where: str, col: str, text: str) -> Decimal:
    try:
        v = Decimal(text.strip())
    except InvalidOperation:
        raise InputError(f"{where}: {col}: not a decimal number: {text!r}") from None
    if not v.is_finite() or v < 0:
        raise InputError(f"{where}: {col}: must be a finite number >= 0, got {text!r}")
    return v


def _registers(where: str, row: dict[str, str], prefix: str) -> tuple[Decimal, dict[str, Decimal]]:
    col = f"{prefix}import_kwh"
    if not row.get(col):
        raise InputError(f"{where}: {col}: missing")
    total = _kwh(where, col, row[col])
    rates = {name: _kwh(where, f"{prefix}{c}", row[f"{prefix}{c}"])
             for name, c in zip(RATE_NAMES, _RATE_COLS, strict=True) if row.get(f"{prefix}{c}")}
    return total, rates


def read_readings_csv(path: Path, tz: ZoneInfo | None = None) -> Readings:
    """Parse a readings file strictly (docs/billing.md): every column must be known,
    every row complete; a ``replace`` row declares a meter exchange."""
    tz = tz or ZoneInfo("UTC")
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    out = Readings()
    seen_ids: set[str] = set()
    with f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise InputError(f"{path}: empty file (expected a header: {','.join(COLUMNS[:3])},...)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"{path}:1: not readable as CSV: {exc}") from None
        unknown = [h for h in header if h not in COLUMNS]
        if unknown:
            raise InputError(f"{path}: unknown columns {unknown} (allowed: {', '.join(COLUMNS)})")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise InputError(f"{path}: columns given twice: {dup}")
        missing = [c for c in ("meter", "time", "import_kwh") if c not in header]
        if missing:
            raise InputError(f"{path}: missing columns {missing} (have {header})")
        try:
            rows = list(enumerate(reader, start=2))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not readable as CSV: {exc}") from None
    for n, cells in rows:
        where = f"{path}:{n}"
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise InputError(f"{where}: {len(cells)} cells, the header has {len(header)} columns")
        row = dict(zip(header, (c.strip() for c in cells), strict=True))
        try:
            t = datetime.fromisoformat(row["time"])
        except ValueError:
            raise InputError(f"{where}: time: not ISO 8601: {row['time']!r}") from None
        if t.tzinfo is None:
            raise InputError(f"{where}: time: needs a UTC offset (e.g. +08:00), got {row['time']!r}")
        t_ms = int(t.timestamp() * 1000)
        meter = row["meter"]
        if not meter:
            raise InputError(f"{where}: meter: empty")
        event = row.get("event") or "reading"
        if event not in EVENTS:
            raise InputError(f"{where}: event: must be one of {', '.join(EVENTS)}, got {event!r}")

        total, rates = _registers(where, row, "")
        iso = iso_local(tz, t_ms)
        if event == "replace":
            new_total, new_rates = _registers(where, row, "new_")
            rid = f"{meter}@{iso}/exchange"
            item: RegisterReading | MeterReplacement = MeterReplacement(
                rid, meter, t_ms, total, new_total, rates, new_rates)
        else:
            stray = [c for c in header if c.startswith("new_") and row.get(c)]
            if stray:
                raise InputError(f"{where}: {stray[0]}: only for event=replace rows")
            rid = f"{meter}@{iso}"
            if rid in seen_ids:
                rid = f"{rid}#{n}"
            item = RegisterReading(rid, meter, t_ms, total, rates)
        seen_ids.add(rid)
        out.items.setdefault(meter, []).append(item)
    for xs in out.items.values():
        # at the same instant a reading of the old meter comes before the exchange
        xs.sort(key=lambda x: (x.time_ms, isinstance(x, MeterReplacement)))
    if not out.items:
        raise InputError(f"{path}: no readings")
    return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)?\s*$")


def parse_duration_ms(text: str) -> int:
    """``90s``, ``45min`` (or ``45m``), ``2h``, ``1d``; a bare number is seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 45min, 2h, 1d)")
    unit = {"ms": 1, "s": 1000, None: 1000, "min": 60_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    v = int(Decimal(m.group(1)) * unit[m.group(2)])
    if v <= 0:
        raise argparse.ArgumentTypeError("a duration must be > 0")
    return v


# ---------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Interval:
    meter: str
    charge: IntervalCharge | None
    anomalies: tuple[RatingAnomaly, ...]
    start_ms: int
    end_ms: int
    replacement: str | None = None  # the exchange this interval belongs to


@dataclass(frozen=True)
class Refusal:
    meter: str
    time_ms: int
    code: str
    message: str


@dataclass
class Run:
    """Everything a simulation found, in integers (rendered by :func:`to_json` & co)."""

    book: TariffBook
    tz: ZoneInfo
    account: AccountSettings | None
    max_gap_ms: int
    intervals: list[Interval] = field(default_factory=list)
    resets: list[ResetNotice] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    held: dict[str, tuple[HeldSpan, ...]] = field(default_factory=dict)
    suspects: dict[str, RegisterReading] = field(default_factory=dict)
    fixed: dict[str, list[FixedChargeDue]] = field(default_factory=dict)  # owner -> charges
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # owner -> [first, last) reading
    owners: dict[str, str] = field(default_factory=dict)  # meter -> its account
    ledger: Ledger | None = None
    path: list[tuple[int, str, str, int]] = field(default_factory=list)  # (time, entry id, what, balance)
    decisions: list[CutoffDecision] = field(default_factory=list)
    contact: Contact = field(default_factory=lambda: Contact(None))
    start_ms: int = 0
    end_ms: int = 0

    def iso(self, t_ms: int) -> str:
        return iso_local(self.tz, t_ms)


def simulate_run(
    book: TariffBook,
    readings: Readings,
    account: AccountSettings | None,
    *,
    max_gap_ms: int = DEFAULT_MAX_GAP_MS,
    start_ms: int | None = None,
    tz: ZoneInfo | None = None,
) -> Run:
    """Rate, charge and decide as the gateway would (see the module documentation).

    ``start_ms``: when the gateway started (its first policy evaluation, its opening
    balance, start-up protection); default the first instant of the story.
    """
    disp = tz or (account.cutoff.tz if account is not None else book.versions[0].tz)
    run = Run(book, disp, account, max_gap_ms)
    meters = sorted(readings.items)
    # the readings are one account's: its meters share the tier state and the fixed charges
    run.owners = dict.fromkeys(meters, account.account if account is not None else UNNAMED)
    tiers: dict[str, TierState] = {o: (account.opening_tier if account else TierState())
                                   for o in set(run.owners.values())}
    tracks: dict[str, MeterTrack] = {m: MeterTrack() for m in meters}
    merged = sorted(((x, m) for m in meters for x in readings.items[m]),
                    key=lambda p: (p[0].time_ms, isinstance(p[0], MeterReplacement), p[1]))
    for item, meter in merged:
        owner = run.owners[meter]
        if isinstance(item, MeterReplacement):
            try:
                step = track_replacement(tracks[meter], item, book, tiers[owner], max_gap_ms=max_gap_ms)
            except ReplacementError as exc:
                run.refusals.append(Refusal(meter, item.time_ms, exc.code, exc.message))
                continue
            tag: str | None = item.event_id
        else:
            step = track_reading(tracks[meter], item, book, tiers[owner], max_gap_ms=max_gap_ms)
            tag = None
        tracks[meter], tiers[owner] = step.track, step.tier_state
        if step.reset is not None:
            run.resets.append(step.reset)
        for r in step.results:
            c = r.charge
            notes = tuple(a for a in r.anomalies if a.kind is not AnomalyKind.GAP
                          or (c is not None and tou_split(c) == "estimated"))
            if c is None:
                run.intervals.append(Interval(meter, None, notes, item.time_ms, item.time_ms, tag))
            else:
                run.intervals.append(Interval(meter, c, notes, c.start_ms, c.end_ms, tag))
    for m, tr in tracks.items():
        if tr.held:
            run.held[m] = tr.held
        if tr.suspect is not None:
            run.suspects[m] = tr.suspect

    # fixed charges: periods that start in [first reading, last reading) of each owner
    for owner in sorted(set(run.owners.values())):
        times = [t for m, o in run.owners.items() if o == owner for t in readings.reading_times(m)]
        if not times:
            continue
        first, last = min(times), max(times)
        run.spans[owner] = (first, last)
        run.fixed[owner] = fixed_charges_due(owner, book, first - 1, last - 1) if last > first else []

    if account is None:
        return run
    _follow_account(run, readings, account, start_ms)
    return run


def _follow_account(run: Run, readings: Readings, account: AccountSettings, start_ms: int | None) -> None:
    acc = account.account
    led = Ledger(acc, account.opening_tier)
    run.ledger = led
    events: list[tuple[int, int, Entry | None, int | None]] = []  # (time, order, entry, top-up index)
    order = 0
    for iv in run.intervals:
        if iv.charge is not None and iv.charge.ckwh > 0:
            order += 1
            events.append((iv.charge.end_ms, order, debit_entry(acc, iv.charge), None))
    for due in run.fixed.get(acc, ()):
        order += 1
        events.append((due.period_start_ms, order, fixed_entry(due), None))
    for i, tu in enumerate(account.topups):
        order += 1
        events.append((tu.issued_ms, order, None, i))
    events.sort(key=lambda e: (e[0], e[1]))
    times = readings.all_times() + [e[0] for e in events]
    start = start_ms if start_ms is not None else min(times)
    end = max([*times, start])
    run.start_ms, run.end_ms = start, end
    # central is in contact all along: its last contact is never before the instant evaluated
    contact = Contact(last_contact_ms=end, started_ms=start)
    run.contact = contact
    led.append(adjustment_entry(f"opening:{acc}", acc, account.opening_balance_micro, start,
                                "opening balance", account.source or "account file"))
    run.path.append((start, f"adjust:opening:{acc}", "opening balance", led.view.balance_micro))
    first = evaluate(CutoffState(), led.view.balance_micro, start, contact, account.cutoff, acc)
    decisions = [first] if first.actions or first.events else []
    changes: list[tuple[int, int]] = []
    for t, _, entry, ti in events:
        before = led.view.balance_micro
        if entry is not None:
            led.append(entry)
            eid, what = entry.entry_id, _entry_text(run, entry)
        else:
            assert ti is not None
            tu = account.topups[ti]
            d = decide_topup(tu, led.view, led.get(tu.entry_id), account.topup_policy, t)
            if d.entry is not None:
                led.append(d.entry)
            eid = tu.entry_id
            what = f"top-up {tu.topup_id} {yuan_text(tu.amount_micro)}: {d.status.value}" + (
                f" ({d.message})" if d.reason else "")
        run.path.append((t, eid, what, led.view.balance_micro))
        if led.view.balance_micro != before or entry is not None:
            changes.append((t, led.view.balance_micro))
    _, _, more = follow(first.state, PolicyPoint(start, account.opening_balance_micro), changes, end,
                        contact, account.cutoff, acc)
    run.decisions = decisions + more


def _entry_text(run: Run, e: Entry) -> str:
    b = e.body
    if e.kind.value == "debit":
        return (f"{b['meter']} {_short(run.iso(int(b['start_ms'])))} to {_short(run.iso(int(b['end_ms'])))}: "
                f"{ckwh_to_kwh(int(b['ckwh']))} kWh, {yuan_text(-e.amount_micro)}")
    if e.kind.value == "fixed":
        return f"fixed {b['name']} ({b['period']} from {_short(run.iso(int(b['period_start_ms'])))}): " \
               f"{yuan_text(-e.amount_micro)}"
    return e.entry_id


def simulate(
    book: TariffBook,
    readings: Readings,
    account: AccountSettings | None,
    *,
    max_gap_ms: int = DEFAULT_MAX_GAP_MS,
    start_ms: int | None = None,
) -> dict[str, Any]:
    """The JSON document of a run."""
    return to_json(simulate_run(book, readings, account, max_gap_ms=max_gap_ms, start_ms=start_ms))


# ---------------------------------------------------------------------------
# Bill: lines, rounding, totals


@dataclass(frozen=True)
class BillLine:
    owner: str
    meter: str  # "" for account-level fixed charges
    kind: str  # "energy" | "fixed"
    what: str  # tariff version and rate/tier, or the fixed charge's name and period
    tariff: str
    rate: str
    tier: int | None
    tier_period_start_ms: int | None
    ckwh: int
    price_e4: int | None
    count: int  # fixed: number of periods
    first_ms: int | None  # fixed: first period start
    exact_micro: int

    @property
    def billed_micro(self) -> int:
        return bill_fen(self.exact_micro)


def bill_lines(run: Run) -> list[BillLine]:
    """Energy aggregated per meter, tariff version, rate, tier and tier period; fixed
    charges per owner, name, tariff version and amount (with the number of periods)."""
    energy: dict[tuple[str, str, str, str, int | None, int | None, int], int] = {}
    for iv in run.intervals:
        if iv.charge is None:
            continue
        for ln in iv.charge.lines:
            key = (run.owners[iv.meter], iv.meter, ln.tariff, ln.rate, ln.tier, ln.tier_period_start_ms, ln.price_e4)
            energy[key] = energy.get(key, 0) + ln.ckwh
    out = []
    for (owner, meter, tariff, rate, tier, ps, price), ck in sorted(
        energy.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][5] or 0, kv[0][3], kv[0][4] or 0)
    ):
        what = f"{tariff} {rate}" + ("" if tier is None else f" tier {tier}")
        out.append(BillLine(owner, meter, "energy", what, tariff, rate, tier, ps, ck, price, 0, None, ck * price))
    for owner, dues in sorted(run.fixed.items()):
        agg: dict[tuple[str, str, str, int], list[FixedChargeDue]] = {}
        for d in dues:
            agg.setdefault((d.name, d.tariff, d.period, d.amount_micro), []).append(d)
        meter = ""
        for (name, tariff, period, amount), ds in sorted(agg.items(), key=lambda kv: kv[1][0].period_start_ms):
            what = f"{name} ({period}, {len(ds)} x {yuan_text(amount)})"
            out.append(BillLine(owner, meter, "fixed", what, tariff, "", None, None, 0, None, len(ds),
                                ds[0].period_start_ms, amount * len(ds)))
    return out


@dataclass(frozen=True)
class Total:
    ckwh: int
    energy_exact: int
    energy_billed: int
    fixed_exact: int
    fixed_billed: int

    @property
    def total_exact(self) -> int:
        return self.energy_exact + self.fixed_exact

    @property
    def total_billed(self) -> int:
        return self.energy_billed + self.fixed_billed


def total_of(lines: Sequence[BillLine]) -> Total:
    """Totals of bill lines: each the sum of its rounded lines, and of the exact ones."""
    e = [ln for ln in lines if ln.kind == "energy"]
    f = [ln for ln in lines if ln.kind == "fixed"]
    return Total(sum(ln.ckwh for ln in e), sum(ln.exact_micro for ln in e), sum(ln.billed_micro for ln in e),
                 sum(ln.exact_micro for ln in f), sum(ln.billed_micro for ln in f))


def _total_json(t: Total) -> dict[str, str]:
    return {
        "kwh": str(ckwh_to_kwh(t.ckwh)),
        "energy": fen_text(t.energy_billed),
        "fixed": fen_text(t.fixed_billed),
        "total": fen_text(t.total_billed),
        "energy_exact": _exact(t.energy_exact),
        "fixed_exact": _exact(t.fixed_exact),
        "total_exact": _exact(t.total_exact),
    }


def _exact(micro: int) -> str:
    return str(micro_to_decimal(micro))


# ---------------------------------------------------------------------------
# JSON


def _kwh_by_tier(run: Run, ch: IntervalCharge) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, int]] = {}
    for ln in ch.lines:
        if ln.tier is None or ln.tier_period_start_ms is None:
            continue
        per = out.setdefault(run.iso(ln.tier_period_start_ms), {})
        per[str(ln.tier)] = per.get(str(ln.tier), 0) + ln.ckwh
    return {p: {k: str(ckwh_to_kwh(v)) for k, v in sorted(d.items())} for p, d in out.items()}


def tou_split(ch: IntervalCharge) -> str:
    """How the energy was split between time-of-use rates: ``single rate``, ``registers``
    (the meter's per-rate registers) or ``estimated`` (in proportion to time)."""
    if len({ln.rate for ln in ch.lines}) <= 1:
        return "single rate"
    return "registers" if ch.apportioning is Apportioning.REGISTERS else "estimated"


def _interval_json(run: Run, iv: Interval) -> dict[str, Any]:
    notes = [f"{a.kind.value}: {a.detail}" for a in iv.anomalies]
    base: dict[str, Any] = {"meter": iv.meter, "start": run.iso(iv.start_ms), "end": run.iso(iv.end_ms)}
    if iv.replacement is not None:
        base["replacement"] = iv.replacement
    ch = iv.charge
    if ch is None:
        return base | {"kwh": None, "amount": None, "anomalies": notes}
    return base | {
        "start_reading": ch.start_reading_id,
        "end_reading": ch.end_reading_id,
        "kwh": str(ckwh_to_kwh(ch.ckwh)),
        "kwh_by_rate": {r: str(ckwh_to_kwh(v)) for r, v in ch.ckwh_by_rate().items()},
        "kwh_by_tier": _kwh_by_tier(run, ch),
        "amount": _exact(ch.amount_micro),
        "apportioning": ch.apportioning.value,
        "tou_split": tou_split(ch),
        "gap": any(a.kind is AnomalyKind.GAP for a in iv.anomalies),
        "lines": [
            {
                "tariff": ln.tariff,
                "rate": ln.rate,
                "tier": ln.tier,
                "tier_period_start": None if ln.tier_period_start_ms is None else run.iso(ln.tier_period_start_ms),
                "kwh": str(ckwh_to_kwh(ln.ckwh)),
                "price": str(e4_to_price(ln.price_e4)),
                "amount": _exact(ln.amount_micro),
            }
            for ln in ch.lines
        ],
        "anomalies": notes,
    }


def _reading_json(run: Run, r: RegisterReading) -> dict[str, Any]:
    return {"reading": r.reading_id, "time": run.iso(r.time_ms), "import_kwh": str(r.import_kwh),
            **{f"{k.lower()}_kwh": str(v) for k, v in sorted(r.rate_kwh.items())}}


def _decision_json(run: Run, d: CutoffDecision) -> dict[str, Any]:
    assert run.account is not None
    cfg = run.account.cutoff
    return {
        "time": run.iso(d.time_ms),
        "balance": str(report_yuan(d.balance_micro)),
        "level": d.state.level.value,
        "state": describe(d.state, d.balance_micro, d.time_ms, run.contact, cfg),
        "pending": None if d.state.pending is None else d.state.pending.value,
        "actions": [{"kind": a.kind.value, "meter": a.meter, "reason": a.reason} for a in d.actions],
        "events": [{"type": e.type, "from": e.from_level.value, "to": e.to_level.value, "reason": e.reason}
                   for e in d.events],
    }


def to_json(run: Run) -> dict[str, Any]:
    lines = bill_lines(run)
    owners = sorted(set(run.owners.values()))
    spans = {o: f"[{run.iso(a)}, {run.iso(b)})" for o, (a, b) in run.spans.items()}
    out: dict[str, Any] = {
        "tariff": run.book.tariff_id,
        "versions": [v.key for v in run.book.versions],
        "timezone": run.tz.key,
        "rules": {
            "fixed_charges": FIXED_RULE,
            "rounding": ROUNDING_RULE,
            "max_gap": (
                f"{duration_text(run.max_gap_ms)}: a longer interval whose time-of-use split is an estimate "
                "(no per-rate registers) is flagged gap"
            ),
            "meter_reset": (
                "a register below the last reading is never charged; confirmed by the next reading it is "
                "a reset: billing continues from the first reading after it and the energy in between "
                "is held until the exchange is declared (event=replace)"
            ),
        },
        "intervals": [_interval_json(run, iv) for iv in run.intervals],
        "fixed": [
            {"owner": o, "name": d.name, "tariff": d.tariff, "period": d.period,
             "period_start": run.iso(d.period_start_ms), "amount": _exact(d.amount_micro),
             "billed": fen_text(bill_fen(d.amount_micro))}
            for o in owners for d in run.fixed.get(o, ())
        ],
        "fixed_span": spans,
        "anomalies": [
            {"meter": iv.meter, "kind": a.kind.value, "from": a.start_reading_id, "to": a.end_reading_id,
             "detail": a.detail}
            for iv in run.intervals for a in iv.anomalies
        ] + [
            {"meter": f.meter, "kind": f"replacement_refused:{f.code}", "from": None, "to": None,
             "detail": f.message, "time": run.iso(f.time_ms)}
            for f in run.refusals
        ],
        "register_resets": [
            {"meter": n.meter_id, "last_good": _reading_json(run, n.last_good),
             "first_after": _reading_json(run, n.first_after), "confirmed_by": _reading_json(run, n.confirmed_by)}
            for n in run.resets
        ],
        "held": {
            m: [{"from": _reading_json(run, h.last_good), "to": _reading_json(run, h.first_after)} for h in hs]
            for m, hs in run.held.items()
        },
        "bill": {
            o: {
                "lines": [
                    {
                        "meter": ln.meter, "kind": ln.kind, "item": ln.what, "tariff": ln.tariff, "rate": ln.rate,
                        "tier": ln.tier,
                        "tier_period_start": None if ln.tier_period_start_ms is None
                        else run.iso(ln.tier_period_start_ms),
                        "kwh": None if ln.kind != "energy" else str(ckwh_to_kwh(ln.ckwh)),
                        "price": None if ln.price_e4 is None else str(e4_to_price(ln.price_e4)),
                        "periods": ln.count or None,
                        "amount_exact": _exact(ln.exact_micro),
                        "amount": fen_text(ln.billed_micro),
                    }
                    for ln in lines if ln.owner == o
                ],
                "total": _total_json(total_of([ln for ln in lines if ln.owner == o])),
            }
            for o in owners
        },
        "totals": {
            "meters": {m: _total_json(total_of([ln for ln in lines if ln.meter == m])) for m in sorted(run.owners)},
            "account": _total_json(total_of(lines)),
        },
    }
    if run.account is None or run.ledger is None:
        return out
    led = run.ledger
    view = led.view
    out["account"] = {
        "account": run.account.account,
        "start": run.iso(run.start_ms),
        "opening_balance": _exact(run.account.opening_balance_micro),
        "closing_balance": _exact(view.balance_micro),
        "closing_reported": str(report_yuan(view.balance_micro)),
        "tier": {"period_start": None if view.tier.period_start_ms is None else run.iso(view.tier.period_start_ms),
                 "cumulative_kwh": str(ckwh_to_kwh(view.tier.cumulative_ckwh))},
    }
    out["balance_path"] = [
        {"time": run.iso(t), "entry": eid, "what": what, "balance": _exact(b), "reported": str(report_yuan(b))}
        for t, eid, what, b in run.path
    ]
    out["cutoff"] = [_decision_json(run, d) for d in run.decisions]
    return out


# ---------------------------------------------------------------------------
# Table and CSV


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _short(iso: str) -> str:
    """``2026-03-02T06:00:00+08:00`` -> ``2026-03-02 06:00`` (the zone is in the heading)."""
    s = iso[:19].replace("T", " ")
    return s[:16] if s.endswith(":00") else s


def to_table(run: Run) -> str:
    d = to_json(run)
    w: list[str] = []
    w.append(f"Tariff {d['tariff']} ({', '.join(d['versions'])}), times in {d['timezone']}")
    w.append(f"Rounding: {ROUNDING_RULE}.")
    w.append(f"Fixed charges: {FIXED_RULE}. Flag 'gap': readings more than {duration_text(run.max_gap_ms)} apart"
             " and their time-of-use split estimated.")
    w.append("")
    rows = [["meter", "from", "to", "kWh", "by rate", "by tier (period start: tier kWh)", "split", "amount",
             "flags"]]
    for iv in d["intervals"]:
        if iv["kwh"] is None:
            rows.append([iv["meter"], _short(iv["start"]), _short(iv["end"]), "-", "", "", "", "-",
                         "; ".join(iv["anomalies"])])
            continue
        by_rate = " ".join(f"{r} {k}" for r, k in iv["kwh_by_rate"].items())
        by_tier = "; ".join(f"{_short(p)[:10]}: " + " ".join(f"t{t} {k}" for t, k in ts.items())
                            for p, ts in iv["kwh_by_tier"].items())
        flags = [f for f, on in (("gap", iv["gap"]), ("exchange", "replacement" in iv)) if on]
        flags += [a.split(":")[0] for a in iv["anomalies"] if not a.startswith("gap")]
        rows.append([iv["meter"], _short(iv["start"]), _short(iv["end"]), iv["kwh"], by_rate, by_tier,
                     iv["tou_split"], yuan_text(_micro(iv["amount"])), ", ".join(flags)])
    w.append("Intervals (amounts exact, as debited)")
    w += _table(rows, right=(3, 7))
    for owner, b in d["bill"].items():
        w.append("")
        w.append(f"Bill {owner}")
        rows = [["meter", "item", "tier period", "kWh", "price", "exact", "billed"]]
        for ln in b["lines"]:
            rows.append([ln["meter"] or "(account)", ln["item"],
                         "" if ln["tier_period_start"] is None else _short(ln["tier_period_start"])[:10],
                         ln["kwh"] or "", ln["price"] or "", yuan_text(_micro(ln["amount_exact"])), ln["amount"]])
        w += _table(rows, right=(3, 4, 5, 6))
        t = b["total"]
        w.append(f"energy {t['energy']} + fixed {t['fixed']} = total {t['total']}"
                 f"   (exact {yuan_text(_micro(t['total_exact']))})")
    if d["anomalies"] or d["register_resets"] or d["held"]:
        w.append("")
        w.append("Anomalies")
        for a in d["anomalies"]:
            w.append(f"  {a['meter']} {a['kind']}: {a['detail']}")
        for r in d["register_resets"]:
            w.append(f"  {r['meter']} register reset: last good {r['last_good']['import_kwh']} kWh at "
                     f"{_short(r['last_good']['time'])}, then {r['first_after']['import_kwh']} kWh at "
                     f"{_short(r['first_after']['time'])} (confirmed {r['confirmed_by']['import_kwh']} kWh)")
        for m, hs in d["held"].items():
            for h in hs:
                w.append(f"  {m} held (not billed until the exchange is declared): from "
                         f"{h['from']['import_kwh']} kWh at {_short(h['from']['time'])} to the new register's "
                         f"{h['to']['import_kwh']} kWh at {_short(h['to']['time'])}")
    if "account" in d:
        a = d["account"]
        w.append("")
        w.append(f"Account {a['account']}: opening {yuan_text(_micro(a['opening_balance']))}, closing "
                 f"{yuan_text(_micro(a['closing_balance']))} (shown to the customer: {a['closing_reported']}),"
                 f" tier {a['tier']['cumulative_kwh']} kWh since "
                 f"{'-' if a['tier']['period_start'] is None else _short(a['tier']['period_start'])}")
        rows = [["time", "entry", "balance"]]
        rows += [[_short(p["time"]), p["what"], p["reported"]] for p in d["balance_path"]]
        w += _table(rows, right=(2,))
        w.append("")
        w.append("Cutoff decisions")
        rows = [["time", "balance", "state", "actions", "why"]]
        for c in d["cutoff"]:
            acts = ", ".join(f"{x['kind']} {x['meter']}".strip() for x in c["actions"])
            why = (c["events"] or c["actions"] or [{"reason": ""}])[0]["reason"]
            rows.append([_short(c["time"]), c["balance"], c["state"], acts, why])
        w += _table(rows, right=(1,))
    return "\n".join(w) + "\n"


def _micro(text: str) -> int:
    return int(Decimal(text).scaleb(6))


CSV_COLUMNS = ("owner", "meter", "kind", "item", "tariff", "rate", "tier", "tier_period_start", "periods",
               "first_period_start", "kwh", "price", "amount_exact", "amount")


def to_csv(run: Run) -> str:
    """The bill as CSV: one row per bill line, then the totals (kind ``total``) per
    meter and for the account, each the sum of rounded lines."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(CSV_COLUMNS)
    lines = bill_lines(run)
    for ln in lines:
        wr.writerow([ln.owner, ln.meter, ln.kind, ln.what, ln.tariff, ln.rate, "" if ln.tier is None else ln.tier,
                     "" if ln.tier_period_start_ms is None else run.iso(ln.tier_period_start_ms),
                     ln.count or "", "" if ln.first_ms is None else run.iso(ln.first_ms),
                     "" if ln.kind != "energy" else ckwh_to_kwh(ln.ckwh),
                     "" if ln.price_e4 is None else e4_to_price(ln.price_e4),
                     _exact(ln.exact_micro), fen_text(ln.billed_micro)])
    groups: list[tuple[str, str, list[BillLine]]] = [
        (run.owners[m], m, [ln for ln in lines if ln.meter == m]) for m in sorted(run.owners)
    ]
    groups.append((run.account.account if run.account is not None else UNNAMED, "", lines))
    for owner, meter, ls_ in groups:
        t = total_of(ls_)
        for what, exact, billed in (("energy", t.energy_exact, t.energy_billed),
                                    ("fixed", t.fixed_exact, t.fixed_billed),
                                    ("total", t.total_exact, t.total_billed)):
            wr.writerow([owner, meter, "total", what, "", "", "", "", "", "",
                         ckwh_to_kwh(t.ckwh) if what != "fixed" else "", "", _exact(exact), fen_text(billed)])
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Command


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        book = load_book([Path(p) for p in args.tariff], default_timezone=args.timezone)
        account = load_account(args.account, default_timezone=args.timezone or book.versions[0].tz.key) \
            if args.account else None
        tz = account.cutoff.tz if account is not None else book.versions[0].tz
        readings = read_readings_csv(Path(args.readings), tz)
    except (TariffError, AccountError) as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except InputError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    run = simulate_run(book, readings, account, max_gap_ms=args.max_gap)
    fmt = args.format or ("table" if sys.stdout.isatty() else "json")
    render: dict[str, Callable[[Run], bytes]] = {
        "json": lambda r: orjson.dumps(to_json(r), option=orjson.OPT_INDENT_2) + b"\n",
        "table": lambda r: to_table(r).encode(),
        "csv": lambda r: to_csv(r).encode(),
    }
    sys.stdout.buffer.write(render[fmt](run))
    sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tariff simulate`` to the ``edgegw`` command line."""
    tariff = subparsers.add_parser("tariff", help="tariff tools")
    sub = tariff.add_subparsers(dest="tariff_command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="bill a CSV of register readings and show the gateway's decisions",
        description="Rate register readings as the gateway does, bill them (fixed charges of the periods "
                    "that start in [first reading, last reading), lines rounded to the fen half to even), and "
                    "with --account follow the cutoff policy at every instant its decision can change.",
    )
    sim.add_argument("--tariff", action="append", required=True, metavar="FILE",
                     help="tariff version file (repeat for several versions of one tariff)")
    sim.add_argument("--readings", required=True, metavar="FILE.csv",
                     help=f"CSV with columns {', '.join(COLUMNS[:3])} and optionally {', '.join(COLUMNS[3:])}")
    sim.add_argument("--account", metavar="FILE", help="account TOML: opening balance, limits, windows, top-ups")
    sim.add_argument("--timezone", help="site timezone for files that do not name one")
    sim.add_argument("--max-gap", type=parse_duration_ms, default=DEFAULT_MAX_GAP_MS, metavar="DURATION",
                     help="flag intervals longer than this as 'gap' (default 2h; e.g. 90min, 6h, 1d)")
    sim.add_argument("--format", choices=("table", "json", "csv"),
                     help="output: a table (default on a terminal), JSON (default otherwise) or the bill as CSV")
    sim.set_defaults(func=cmd_simulate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgegw")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
