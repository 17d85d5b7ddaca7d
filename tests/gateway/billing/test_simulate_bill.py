"""``tariff simulate`` as a bill: fixed charges, rounding, meter exchanges, formats.

Hand-computed cases next to the rules they check (docs/billing.md, "edgegw
tariff simulate"), and the rounding rule as a property.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.billing import cli
from gateway.billing.money import bill_fen

ROOT = Path(__file__).resolve().parents[3]
TARIFFS = ROOT / "examples" / "tariffs"
ACCOUNTS = ROOT / "examples" / "accounts"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="edgegw")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def sim(tmp: Path, capsys: pytest.CaptureFixture[str], tariff: str, rows: str, *extra: str) -> dict:  # type: ignore[type-arg]
    f = tmp / "r.csv"
    f.write_text(rows, encoding="utf-8")
    code, out, err = run(["tariff", "simulate", "--tariff", str(TARIFFS / tariff), "--readings", str(f),
                          "--format", "json", *extra], capsys)
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def test_a_three_day_run_bills_three_daily_charges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nairobi midnights: readings at 00:00 on the 2nd and at 00:00 on the 5th -> days 2, 3, 4
    d = sim(tmp_path, capsys, "minigrid-daily.toml",
            "meter,time,import_kwh\n"
            "g1,2026-03-02T00:00:00+03:00,100.00\n"
            "g1,2026-03-03T12:00:00+03:00,104.00\n"
            "g1,2026-03-05T00:00:00+03:00,110.00\n")
    assert [f["period_start"] for f in d["fixed"]] == [
        "2026-03-02T00:00:00+03:00", "2026-03-03T00:00:00+03:00", "2026-03-04T00:00:00+03:00"]
    assert d["fixed_span"] == {"account": "[2026-03-02T00:00:00+03:00, 2026-03-05T00:00:00+03:00)"}
    (energy, fixed) = d["bill"]["account"]["lines"]
    assert energy["kwh"] == "10.00" and energy["amount"] == "9.50"  # 10 x 0.95
    assert fixed["kind"] == "fixed" and fixed["periods"] == 3 and fixed["amount"] == "0.60"
    assert fixed["item"] == "standing (daily, 3 x 0.20)"
    assert d["totals"]["account"] == {
        "kwh": "10.00", "energy": "9.50", "fixed": "0.60", "total": "10.10",
        "energy_exact": "9.500000", "fixed_exact": "0.600000", "total_exact": "10.100000"}
    # per meter: its energy; the account's fixed charges are the account's
    assert d["totals"]["meters"]["g1"]["total"] == "9.50"


def test_a_one_month_run_bills_one_monthly_charge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = sim(tmp_path, capsys, "tiered-monthly.toml",
            "meter,time,import_kwh\n"
            "m1,2026-03-01T00:00:00+08:00,0\n"
            "m1,2026-04-01T00:00:00+08:00,200\n")
    assert [(f["name"], f["period_start"]) for f in d["fixed"]] == [("service", "2026-03-01T00:00:00+08:00")]
    # 200 kWh across the 25th settlement: split by time (24 days | 7 days of 31), each period from 0
    iv = d["intervals"][0]
    assert set(iv["kwh_by_tier"]) == {"2026-02-25T00:00:00+08:00", "2026-03-25T00:00:00+08:00"}
    assert iv["kwh_by_tier"]["2026-02-25T00:00:00+08:00"] == {"1": "154.84"}
    assert iv["kwh_by_tier"]["2026-03-25T00:00:00+08:00"] == {"1": "45.16"}
    assert d["totals"]["account"]["fixed"] == "2.50"


def test_fixed_charges_with_an_account_go_through_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = sim(tmp_path, capsys, "minigrid-daily.toml",
            "meter,time,import_kwh\n"
            "m1,2026-03-02T06:00:00+08:00,100.00\n"
            "m1,2026-03-03T06:00:00+08:00,101.00\n",
            "--account", str(ACCOUNTS / "household.toml"))
    (fixed,) = d["fixed"]  # Nairobi midnight of the 3rd = 05:00 in Shanghai
    assert fixed["owner"] == "acc-0001" and fixed["period_start"] == "2026-03-03T05:00:00+08:00"
    entries = [p["what"] for p in d["balance_path"]]
    assert "fixed standing (daily from 2026-03-03 05:00): 0.20" in entries
    assert d["account"]["closing_balance"] == "60.850000"  # 12.00 - 0.95 - 0.20 + the 50.00 top-up
    assert d["totals"]["account"]["total"] == "1.15"


def test_a_declared_exchange_in_the_readings_bills_both_registers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = sim(tmp_path, capsys, "flat.toml",
            "meter,time,import_kwh,event,new_import_kwh\n"
            "m1,2026-03-02T10:00:00+08:00,100.00,,\n"
            "m1,2026-03-02T11:00:00+08:00,101.00,,\n"
            "m1,2026-03-02T11:30:00+08:00,101.25,replace,0.50\n"
            "m1,2026-03-02T12:00:00+08:00,0.90,,\n")
    assert [iv["kwh"] for iv in d["intervals"]] == ["1.00", "0.25", "0.40"]
    assert d["intervals"][1]["replacement"] == "m1@2026-03-02T11:30:00+08:00/exchange"
    assert d["totals"]["meters"]["m1"]["kwh"] == "1.65" and not d["anomalies"] and not d["register_resets"]


def test_an_undeclared_reset_is_shown_with_what_is_held(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = sim(tmp_path, capsys, "flat.toml",
            "meter,time,import_kwh\n"
            "m1,2026-03-02T10:00:00+08:00,100.00\n"
            "m1,2026-03-02T12:00:00+08:00,0.50\n"
            "m1,2026-03-02T13:00:00+08:00,1.50\n")
    assert [a["kind"] for a in d["anomalies"]] == ["register_backwards"]
    (reset,) = d["register_resets"]
    assert reset["last_good"]["import_kwh"] == "100.00" and reset["first_after"]["import_kwh"] == "0.50"
    assert d["held"]["m1"][0]["to"]["time"] == "2026-03-02T12:00:00+08:00"
    assert d["totals"]["meters"]["m1"]["kwh"] == "1.00"  # from the first reading after the reset


def test_a_replace_row_that_contradicts_the_readings_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = sim(tmp_path, capsys, "flat.toml",
            "meter,time,import_kwh,event,new_import_kwh\n"
            "m1,2026-03-02T10:00:00+08:00,100.00,,\n"
            "m1,2026-03-02T11:00:00+08:00,99.00,replace,0\n")
    (a,) = d["anomalies"]
    assert a["kind"] == "replacement_refused:old_final_below_billed"
    assert "99.00 kWh is below 100.00 kWh, already billed" in a["detail"]


def test_gap_flags_only_estimated_time_of_use_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ("meter,time,import_kwh\n"
            "m1,2026-03-02T06:00:00+08:00,100.00\n"
            "m1,2026-03-02T10:00:00+08:00,104.00\n")
    default = sim(tmp_path, capsys, "cn-residential-tou-v1.toml", rows)
    (iv,) = default["intervals"]
    assert iv["tou_split"] == "estimated" and iv["gap"] is True  # 4 h > 2 h, no rate registers
    assert "its split between time-of-use periods is an estimate" in iv["anomalies"][0]
    relaxed = sim(tmp_path, capsys, "cn-residential-tou-v1.toml", rows, "--max-gap", "6h")
    assert relaxed["intervals"][0]["gap"] is False and not relaxed["anomalies"]
    flat = sim(tmp_path, capsys, "flat.toml", rows, "--max-gap", "1h")
    assert flat["intervals"][0]["gap"] is False  # one rate: nothing to estimate


def test_table_is_readable_and_csv_is_the_bill(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["tariff", "simulate", "--tariff", str(TARIFFS / "cn-residential-tou-v1.toml"),
            "--readings", str(TARIFFS / "readings.csv"), "--account", str(ACCOUNTS / "household.toml")]
    code, table, err = run([*base, "--format", "table"], capsys)
    assert code == 0, err
    assert "times in Asia/Shanghai" in table
    assert "2026-03-03 08:00    -2.66  supply cut" in table
    assert "cut pending: no-disconnect window until 08:00" in table
    assert "energy 18.47 + fixed 0.00 = total 18.47" in table
    assert "grace" not in table and "micro" not in table
    code, text, err = run([*base, "--format", "csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(text)))
    lines = [r for r in rows if r["kind"] == "energy"]
    total = next(r for r in rows if r["kind"] == "total" and r["meter"] == "" and r["item"] == "total")
    assert sum(Decimal(r["amount"]) for r in lines) == Decimal(total["amount"]) == Decimal("18.47")
    assert all(r["tier_period_start"] == "2026-01-01T00:00:00+08:00" for r in lines)
    # not a terminal: JSON unless asked otherwise
    code, out, _ = run(base, capsys)
    assert json.loads(out)["tariff"] == "cn-residential"


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=40))
def test_bill_lines_round_half_even_and_totals_add_up(amounts: list[int]) -> None:
    """Every line is the exact amount rounded half to even to the fen; a total is the
    sum of rounded lines, within half a fen per line of the exact total."""
    fen = Decimal("0.01")
    rounded = [bill_fen(a) for a in amounts]
    for a, r in zip(amounts, rounded, strict=True):
        exact = Decimal(a).scaleb(-6)
        assert Decimal(r).scaleb(-6) == exact.quantize(fen, rounding=ROUND_HALF_EVEN)
        assert r % 10_000 == 0 and abs(r - a) <= 5_000
    lines = [cli.BillLine("acc", "m1", "energy", "x", "t@1", "flat", None, None, 0, 1, 0, None, a)
             for a in amounts]
    t = cli.total_of(lines)
    assert t.energy_billed == sum(rounded) and t.energy_exact == sum(amounts)
    assert abs(t.total_billed - t.total_exact) <= 5_000 * len(amounts)


def test_half_fen_ties_go_to_even() -> None:
    assert [bill_fen(x) for x in (5_000, 15_000, 25_000, 35_000, 5_001, 14_999)] == [
        0, 20_000, 20_000, 40_000, 10_000, 10_000]
