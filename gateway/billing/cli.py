"""``edgegw tariff simulate``: rate a CSV of register readings, print JSON.

    edgegw tariff simulate --tariff T.toml [--tariff T-v2.toml] --readings R.csv [--account A.toml]

CSV columns: ``meter,time,import_kwh`` and optionally ``t1_kwh,t2_kwh,t3_kwh,t4_kwh``;
``time`` is ISO 8601 with an offset. Output: one object per interval (meter,
start, end, kWh per rate and tier, amount), totals per meter, anomalies, and
with ``--account`` the balance path and the cutoff decisions.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from gateway.billing.account import AccountError, AccountSettings, load_account
from gateway.billing.cutoff import Contact, CutoffState, evaluate
from gateway.billing.ledger import Entry, Ledger, adjustment_entry, debit_entry, fixed_entry
from gateway.billing.money import ckwh_to_kwh, e4_to_price, micro_to_decimal, report_yuan
from gateway.billing.rating import (
    IntervalCharge,
    RatingResult,
    RegisterReading,
    TierState,
    fixed_charges_due,
    rate_interval,
)
from gateway.billing.tariff import RATE_NAMES, TariffBook, TariffError, load_book
from gateway.billing.topup import decide_topup


class InputError(Exception):
    pass


def read_readings_csv(path: Path) -> dict[str, list[RegisterReading]]:
    """Readings per meter, time-ordered. Reading ids: ``<meter>@<unix ms>``."""
    out: dict[str, list[RegisterReading]] = {}
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    with f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        missing = {"meter", "time", "import_kwh"} - cols
        if missing:
            raise InputError(f"{path}: missing columns {sorted(missing)} (have {sorted(cols)})")
        for n, row in enumerate(reader, start=2):
            where = f"{path}:{n}"
            try:
                t = datetime.fromisoformat(row["time"].strip())
            except ValueError as exc:
                raise InputError(f"{where}: time: not ISO 8601: {row['time']!r}") from exc
            if t.tzinfo is None:
                raise InputError(f"{where}: time: needs a UTC offset, got {row['time']!r}")
            t_ms = int(t.timestamp() * 1000)
            try:
                total = Decimal(row["import_kwh"].strip())
                rates = {
                    name: Decimal(v.strip())
                    for name in RATE_NAMES
                    if (v := row.get(f"{name.lower()}_kwh")) not in (None, "")
                }
            except (InvalidOperation, AttributeError) as exc:
                raise InputError(f"{where}: a kWh value is not a decimal number") from exc
            if not total.is_finite() or total < 0:
                raise InputError(f"{where}: import_kwh: must be a finite number >= 0")
            meter = row["meter"].strip()
            if not meter:
                raise InputError(f"{where}: meter: empty")
            out.setdefault(meter, []).append(RegisterReading(f"{meter}@{t_ms}", meter, t_ms, total, rates))
    for rs in out.values():
        rs.sort(key=lambda r: r.time_ms)
    return out


def _iso(t_ms: int, book: TariffBook) -> str:
    tz = book.versions[0].tz
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(tz).isoformat()


def _yuan(micro: int) -> str:
    return str(micro_to_decimal(micro))


def _interval_json(ch: IntervalCharge, book: TariffBook, anomalies: list[str]) -> dict[str, Any]:
    return {
        "meter": ch.meter_id,
        "start": _iso(ch.start_ms, book),
        "end": _iso(ch.end_ms, book),
        "start_reading": ch.start_reading_id,
        "end_reading": ch.end_reading_id,
        "kwh": str(ckwh_to_kwh(ch.ckwh)),
        "kwh_by_rate": {r: str(ckwh_to_kwh(v)) for r, v in ch.ckwh_by_rate().items()},
        "kwh_by_tier": {str(k): str(ckwh_to_kwh(v)) for k, v in sorted(ch.ckwh_by_tier().items())},
        "amount": _yuan(ch.amount_micro),
        "apportioning": ch.apportioning.value,
        "lines": [
            {
                "tariff": ln.tariff,
                "rate": ln.rate,
                "tier": ln.tier,
                "kwh": str(ckwh_to_kwh(ln.ckwh)),
                "price": str(e4_to_price(ln.price_e4)),
                "amount": _yuan(ln.amount_micro),
            }
            for ln in ch.lines
        ],
        "anomalies": anomalies,
    }


@dataclass
class _Event:
    time_ms: int
    order: int
    entry: Entry | None = None
    topup_index: int | None = None


def simulate(book: TariffBook, readings: dict[str, list[RegisterReading]], account: AccountSettings | None) -> dict[str, Any]:
    tier = account.opening_tier if account else TierState()
    results: list[RatingResult] = []
    by_meter: dict[str, list[RatingResult]] = {m: [] for m in sorted(readings)}
    # one account: its meters share the tier state, so all readings are rated in time order
    base: dict[str, RegisterReading] = {}
    merged = sorted((x for rs in readings.values() for x in rs), key=lambda x: (x.time_ms, x.meter_id))
    for rd in merged:
        prev = base.get(rd.meter_id)
        if prev is None:
            base[rd.meter_id] = rd
            continue
        res = rate_interval(prev, rd, book, tier)
        tier = res.tier_state
        results.append(res)
        by_meter[rd.meter_id].append(res)
        if res.advance:
            base[rd.meter_id] = rd
    per_meter = list(by_meter.items())
    intervals: list[dict[str, Any]] = []
    anomalies: list[dict[str, str]] = []
    totals: dict[str, dict[str, Any]] = {}
    for meter, rs in per_meter:
        ck = amt = 0
        for r in rs:
            notes = [f"{a.kind.value}: {a.detail}" for a in r.anomalies]
            for a in r.anomalies:
                anomalies.append({"meter": meter, "kind": a.kind.value, "from": a.start_reading_id,
                                  "to": a.end_reading_id, "detail": a.detail})
            if r.charge is not None:
                intervals.append(_interval_json(r.charge, book, notes))
                ck += r.charge.ckwh
                amt += r.charge.amount_micro
        totals[meter] = {"kwh": str(ckwh_to_kwh(ck)), "amount": _yuan(amt)}
    out: dict[str, Any] = {"tariff": book.tariff_id, "intervals": intervals, "totals": totals,
                           "anomalies": anomalies}
    if account is None:
        return out

    acc = account.account
    led = Ledger(acc, account.opening_tier)
    all_times = [r.time_ms for rs in readings.values() for r in rs]
    events: list[_Event] = []
    order = 0
    for r in results:
        if r.charge is not None:
            events.append(_Event(r.charge.end_ms, order := order + 1, debit_entry(acc, r.charge)))
    if all_times:
        for due in fixed_charges_due(acc, book, min(all_times) - 1, max(all_times)):
            events.append(_Event(due.period_start_ms, order := order + 1, fixed_entry(due)))
    for i, tu in enumerate(account.topups):
        events.append(_Event(tu.issued_ms, order := order + 1, None, i))
    events.sort(key=lambda e: (e.time_ms, e.order))
    start = min([e.time_ms for e in events] + all_times, default=0)
    led.append(adjustment_entry(f"opening:{acc}", acc, account.opening_balance_micro, start,
                                "opening balance", account.source or "account file"))
    path: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    state = CutoffState()

    def step(t_ms: int, what: str) -> None:
        nonlocal state
        bal = led.view.balance_micro
        path.append({"time": _iso(t_ms, book), "entry": what, "balance": _yuan(bal),
                     "reported": str(report_yuan(bal))})
        d = evaluate(state, bal, t_ms, Contact(t_ms), account.cutoff, acc)
        if d.actions or d.events:
            decisions.append({
                "time": _iso(t_ms, book),
                "balance": str(report_yuan(bal)),
                "level": d.state.level.value,
                "pending": None if d.state.pending is None else d.state.pending.value,
                "actions": [{"kind": a.kind.value, "meter": a.meter, "reason": a.reason} for a in d.actions],
                "events": [{"type": e.type, "from": e.from_level.value, "to": e.to_level.value,
                            "reason": e.reason} for e in d.events],
            })
        state = d.state

    step(start, f"opening:{acc}")
    for ev in events:
        if ev.entry is not None:
            led.append(ev.entry)
            step(ev.time_ms, ev.entry.entry_id)
        elif ev.topup_index is not None:
            tu = account.topups[ev.topup_index]
            d = decide_topup(tu, led.view, led.get(tu.entry_id), account.topup_policy, ev.time_ms)
            if d.entry is not None:
                led.append(d.entry)
            step(ev.time_ms, f"topup:{tu.topup_id} {d.status.value}" + (f" ({d.message})" if d.reason else ""))
    out["account"] = {
        "account": acc,
        "opening_balance": _yuan(account.opening_balance_micro),
        "closing_balance": _yuan(led.view.balance_micro),
        "closing_reported": str(report_yuan(led.view.balance_micro)),
        "tier": {"period_start": None if led.view.tier.period_start_ms is None
                 else _iso(led.view.tier.period_start_ms, book),
                 "cumulative_kwh": str(ckwh_to_kwh(led.view.tier.cumulative_ckwh))},
    }
    out["balance_path"] = path
    out["cutoff"] = decisions
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        book = load_book([Path(p) for p in args.tariff], default_timezone=args.timezone)
        readings = read_readings_csv(Path(args.readings))
        account = load_account(args.account, default_timezone=args.timezone or book.versions[0].tz.key) \
            if args.account else None
    except (TariffError, AccountError) as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except InputError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    result = simulate(book, readings, account)
    sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tariff simulate`` to the ``edgegw`` command line."""
    tariff = subparsers.add_parser("tariff", help="tariff tools")
    sub = tariff.add_subparsers(dest="tariff_command", required=True)
    sim = sub.add_parser("simulate", help="rate a CSV of register readings and print JSON")
    sim.add_argument("--tariff", action="append", required=True, metavar="FILE",
                     help="tariff version file (repeat for several versions of one tariff)")
    sim.add_argument("--readings", required=True, metavar="FILE.csv",
                     help="CSV: meter,time,import_kwh[,t1_kwh,t2_kwh,t3_kwh,t4_kwh]")
    sim.add_argument("--account", metavar="FILE", help="account TOML: opening balance, limits, windows")
    sim.add_argument("--timezone", help="site timezone for files that do not name one")
    sim.set_defaults(func=cmd_simulate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgegw")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
