"""``tariff simulate`` run through its command function (argparse included)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.billing import cli
from gateway.billing.account import AccountError, load_account

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


def test_simulate_with_account(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        ["tariff", "simulate", "--tariff", str(TARIFFS / "cn-residential-tou-v1.toml"),
         "--readings", str(TARIFFS / "readings.csv"), "--account", str(ACCOUNTS / "household.toml")],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out)
    first = d["intervals"][0]
    # 06-09 on Monday: registers say T4 +0.40, T3 +1.00, T2 +0.60 -> 0.14 + 0.56 + 0.45
    assert first["kwh_by_rate"] == {"T4": "0.40", "T3": "1.00", "T2": "0.60"}
    assert first["amount"] == "1.150000"
    # 09-13: cumulative 2877.00 -> 2880.50 crosses 2880: T2 2.00 + T3 1.00 in tier 1, T3 0.50 in tier 2
    second = d["intervals"][1]
    assert second["kwh_by_tier"] == {"1": "3.00", "2": "0.50"}
    assert second["amount"] == "2.365000"  # 1.50 + 0.56 + 0.50 x 0.61
    assert d["totals"]["m1"] == {"kwh": "30.00", "amount": "18.470000"}
    assert d["account"]["closing_balance"] == "43.530000"  # 12.00 - 18.47 + 50.00
    assert d["account"]["tier"]["cumulative_kwh"] == "2905.00"
    kinds = [a["kind"] for c in d["cutoff"] for a in c["actions"]]
    assert kinds == ["alarm_on", "trip", "close_allowed", "alarm_off"]
    deferred = d["cutoff"][1]
    assert deferred["pending"] == "no_disconnect_window"  # 07:00 is inside 18:00-08:00
    reported = [p["reported"] for p in d["balance_path"]]
    assert reported[2] == "8.48"  # 8.485 truncated


def test_simulate_versions_without_account(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text(
        "meter,time,import_kwh\n"
        "m2,2026-06-30T23:00:00+08:00,10.00\n"
        "m2,2026-07-01T01:00:00+08:00,12.00\n"
        "m2,2026-07-01T02:00:00+08:00,11.00\n",
        encoding="utf-8",
    )
    code, out, err = run(
        ["tariff", "simulate", "--tariff", str(TARIFFS / "cn-residential-tou-v1.toml"),
         "--tariff", str(TARIFFS / "cn-residential-tou-v2.toml"), "--readings", str(csv)],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out)
    (iv,) = d["intervals"]
    assert {ln["tariff"] for ln in iv["lines"]} == {"cn-residential@1", "cn-residential@2"}
    assert [a["kind"] for a in d["anomalies"]] == ["register_backwards"]
    assert "account" not in d


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("meter,time\nm1,2026-01-01T00:00:00+08:00\n", "missing columns ['import_kwh']"),
        ("meter,time,import_kwh\nm1,2026-01-01T00:00:00,1\n", "r.csv:2: time: needs a UTC offset"),
        ("meter,time,import_kwh\nm1,2026-01-01T00:00:00+08:00,abc\n", "r.csv:2: a kWh value"),
    ],
)
def test_bad_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str], csv_text: str, message: str) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text(csv_text, encoding="utf-8")
    code, _, err = run(["tariff", "simulate", "--tariff", str(TARIFFS / "flat.toml"), "--readings", str(csv)], capsys)
    assert code == 2 and message in err


def test_bad_tariff_reports_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path / "t.toml"
    t.write_text('id = "x"\nversion = 1\neffective_from = "2026-01-01"\nprice = "0.123456"\n', encoding="utf-8")
    code, _, err = run(["tariff", "simulate", "--tariff", str(t), "--readings", str(TARIFFS / "readings.csv"),
                        "--timezone", "Asia/Shanghai"], capsys)
    assert code == 2 and f"{t}: price: price '0.123456' has more than 4 decimal places" in err


def test_account_file_errors(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text('account = "x"\n[limits]\nalarm1 = "1.00"\nalarm2 = "5.00"\nbogus = 1\n'
                 '[[no_disconnect]]\nstart = "25:00"\nend = "08:00"\n', encoding="utf-8")
    with pytest.raises(AccountError) as ei:
        load_account(a)
    text = "\n".join(ei.value.problems)
    assert f"{a}: limits.bogus: unknown key" in text
    assert f"{a}: no_disconnect[0].start: must be 'HH:MM'" in text
    assert f"{a}: limits: limits must satisfy alarm1 > alarm2 > 0" in text


def test_example_account_loads() -> None:
    acc = load_account(ACCOUNTS / "household.toml")
    assert acc.cutoff.overdraft_micro == 2_000_000 and len(acc.cutoff.windows) == 2
    assert acc.topups[0].counter == 1 and acc.topup_policy.hoarding_limit_micro == 2_000_000_000


def test_two_meters_of_one_account_share_the_tier_in_time_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = tmp_path / "t.toml"
    t.write_text('id = "x"\nversion = 1\neffective_from = "2026-01-01"\ntimezone = "Asia/Shanghai"\n'
                 'price = "0.5000"\n[tier]\nperiod = "annual"\nthresholds_kwh = [10]\n'
                 'surcharges = ["0", "0.1000"]\n', encoding="utf-8")
    csv = tmp_path / "r.csv"
    # b uses 8 kWh early, a uses 4 kWh later: b all tier 1, a 2 kWh tier 1 + 2 kWh tier 2
    csv.write_text("meter,time,import_kwh\n"
                   "a,2026-03-02T10:00:00+08:00,0\n"
                   "b,2026-03-02T10:00:00+08:00,0\n"
                   "b,2026-03-02T11:00:00+08:00,8\n"
                   "a,2026-03-02T12:00:00+08:00,4\n", encoding="utf-8")
    code, out, err = run(["tariff", "simulate", "--tariff", str(t), "--readings", str(csv)], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["totals"]["b"]["amount"] == "4.000000"  # 8 x 0.50
    assert d["totals"]["a"]["amount"] == "2.200000"  # 2 x 0.50 + 2 x 0.60
