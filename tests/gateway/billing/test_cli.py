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
         "--readings", str(TARIFFS / "readings.csv"), "--account", str(ACCOUNTS / "household.toml"),
         "--format", "json"],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out)
    first = d["intervals"][0]
    # 06-09 on Monday: registers say T4 +0.40, T3 +1.00, T2 +0.60 -> 0.14 + 0.56 + 0.45
    assert first["kwh_by_rate"] == {"T4": "0.40", "T3": "1.00", "T2": "0.60"}
    assert first["amount"] == "1.150000"
    assert first["start"] == "2026-03-02T06:00:00+08:00" and first["tou_split"] == "registers"
    # 09-13: cumulative 2877.00 -> 2880.50 crosses 2880: T2 2.00 + T3 1.00 in tier 1, T3 0.50 in tier 2,
    # all in the tier period that started 2026-01-01 (named on every line)
    second = d["intervals"][1]
    assert second["kwh_by_tier"] == {"2026-01-01T00:00:00+08:00": {"1": "3.00", "2": "0.50"}}
    assert {ln["tier_period_start"] for ln in second["lines"]} == {"2026-01-01T00:00:00+08:00"}
    assert second["amount"] == "2.365000"  # 1.50 + 0.56 + 0.50 x 0.61
    assert d["totals"]["meters"]["m1"] == {
        "kwh": "30.00", "energy": "18.47", "fixed": "0.00", "total": "18.47",
        "energy_exact": "18.470000", "fixed_exact": "0.000000", "total_exact": "18.470000"}
    assert d["account"]["closing_balance"] == "43.530000"  # 12.00 - 18.47 + 50.00
    assert d["account"]["tier"]["cumulative_kwh"] == "2905.00"
    steps = [(c["time"], [a["kind"] for a in c["actions"]], c["state"]) for c in d["cutoff"]]
    assert steps == [
        ("2026-03-02T13:00:00+08:00", ["alarm_on"], "supply on: low balance (alarm 1 at 10.00)"),
        # the debit at 07:00 asks for a cut, inside the 18:00-08:00 no-disconnect window ...
        ("2026-03-03T07:00:00+08:00", [], "cut pending: no-disconnect window until 08:00"),
        # ... which happens when the window ends, not at the next reading (09:00)
        ("2026-03-03T08:00:00+08:00", ["trip"], "supply cut (balance -2.66, cut level -2.00); restore above 1.00"),
        ("2026-03-03T10:30:00+08:00", [], "restore pending: reconnect delay until 10:31"),
        ("2026-03-03T10:31:00+08:00", ["close_allowed", "alarm_off"], "supply on"),
    ]
    assert d["cutoff"][1]["pending"] == "no_disconnect_window"
    reported = [p["reported"] for p in d["balance_path"]]
    assert reported[2] == "8.48"  # 8.485 truncated
    assert d["balance_path"][1]["what"] == "m1 2026-03-02 06:00 to 2026-03-02 09:00: 2.00 kWh, 1.15"
    texts = json.dumps(d["cutoff"]) + json.dumps(d["anomalies"])
    assert "-0.00" not in texts and "micro" not in texts and "ckwh" not in texts


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
    iv, refused = d["intervals"]
    assert refused["kwh"] is None and refused["anomalies"][0].startswith("register_backwards")
    assert {ln["tariff"] for ln in iv["lines"]} == {"cn-residential@1", "cn-residential@2"}
    assert [a["kind"] for a in d["anomalies"]] == ["register_backwards"]
    assert d["anomalies"][0]["to"] == "m2@2026-07-01T02:00:00+08:00"  # readings named by local time
    assert "cutoff" not in d


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("meter,time\nm1,2026-01-01T00:00:00+08:00\n", "missing columns ['import_kwh']"),
        ("meter,time,import_kwh\nm1,2026-01-01T00:00:00,1\n", "r.csv:2: time: needs a UTC offset"),
        ("meter,time,import_kwh\nm1,2026-01-01T00:00:00+08:00,abc\n",
         "r.csv:2: import_kwh: not a decimal number: 'abc'"),
        ("meter,time,import_kwh,kwh_t5\nm1,2026-01-01T00:00:00+08:00,1,2\n",
         "r.csv: unknown columns ['kwh_t5'] (allowed: meter, time, import_kwh, t1_kwh, t2_kwh, t3_kwh, t4_kwh,"
         " event, new_import_kwh, new_t1_kwh, new_t2_kwh, new_t3_kwh, new_t4_kwh)"),
        ("meter,time,import_kwh,import_kwh\nm1,2026-01-01T00:00:00+08:00,1,1\n",
         "columns given twice: ['import_kwh']"),
        ("meter,time,import_kwh\nm1,2026-01-01T00:00:00+08:00,1,7\n", "r.csv:2: 4 cells, the header has 3"),
        ("meter,time,import_kwh,event\nm1,2026-01-01T00:00:00+08:00,1,swap\n",
         "r.csv:2: event: must be one of reading, replace, got 'swap'"),
        ("meter,time,import_kwh,event,new_import_kwh\nm1,2026-01-01T00:00:00+08:00,1,replace,\n",
         "r.csv:2: new_import_kwh: missing"),
        ("meter,time,import_kwh,new_import_kwh\nm1,2026-01-01T00:00:00+08:00,1,0\n",
         "r.csv:2: new_import_kwh: only for event=replace rows"),
        ("meter,time,import_kwh\nm1,2026-01-01T00:00:00+08:00,-1\n", "r.csv:2: import_kwh: must be a finite"),
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
    assert code == 2 and f"{t}:4: price: price '0.123456' has more than 4 decimal places" in err


def test_account_file_errors(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text('account = "x"\n[limits]\nalarm1 = "1.00"\nalarm2 = "5.00"\nbogus = 1\n'
                 '[[no_disconnect]]\nstart = "25:00"\nend = "08:00"\n', encoding="utf-8")
    with pytest.raises(AccountError) as ei:
        load_account(a)
    text = "\n".join(ei.value.problems)
    # each problem names the line of its key (or of its table's header)
    assert f"{a}:5: limits.bogus: unknown key" in text
    assert f"{a}:7: no_disconnect[0].start: must be 'HH:MM'" in text
    assert f"{a}:2: limits: limits must satisfy alarm1 > alarm2 > 0" in text


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
    assert d["totals"]["meters"]["b"]["energy_exact"] == "4.000000"  # 8 x 0.50
    assert d["totals"]["meters"]["a"]["energy_exact"] == "2.200000"  # 2 x 0.50 + 2 x 0.60
    assert d["totals"]["account"]["total"] == "6.20"
