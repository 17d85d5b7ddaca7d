"""Golden balances: ledger + fixed charges + the reporting rule, derived by hand.

Reported balance = micro-yuan balance truncated toward zero to 0.01 yuan.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from gateway.billing.ledger import Ledger, adjustment_entry, debit_entry, fixed_entry
from gateway.billing.money import report_yuan
from gateway.billing.rating import TierState, fixed_charges_due, rate_interval
from gateway.billing.tariff_file import load_book
from tests.gateway.billing._util import FLAT, book, ms, rr

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "tariffs"


@pytest.mark.parametrize(
    ("micro", "reported", "derivation"),
    [
        (9_311_200, "9.31", "10.00 - 0.6888 = 9.3112 -> 9.31"),
        (19_999, "0.01", "0.019999 -> 0.01 (truncated, not rounded to 0.02)"),
        (9_999, "0.00", "0.009999 -> 0.00"),
        (-4_400, "0.00", "-0.0044 -> 0.00, never '-0.00'"),
        (-1_239_999, "-1.23", "-1.239999 -> -1.23 (toward zero)"),
        (-10_000, "-0.01", "-0.01 exactly"),
        (123_456_789_012, "123456.78", "large balances keep every digit before truncation"),
    ],
)
def test_reporting_rule(micro: int, reported: str, derivation: str) -> None:
    assert str(report_yuan(micro)) == reported, derivation


def test_ledger_with_energy_and_fixed_charges() -> None:
    """Opening 10.00; 1.23 kWh at 0.5600 (0.6888); monthly service 2.50 on 1 Feb and 1 Mar
    (tiered-monthly example): 10.00 - 0.6888 - 5.00 = 4.3112 -> reported 4.31."""
    led = Ledger("acc")
    led.append(adjustment_entry("open", "acc", 10_000_000, 0, "opening", "central"))
    r = rate_interval(rr("a", "2026-03-02T10:00", "100.00"), rr("b", "2026-03-02T11:00", "101.23"), book(FLAT),
                      TierState())
    assert r.charge is not None
    led.append(debit_entry("acc", r.charge))
    b = load_book([EXAMPLES / "tiered-monthly.toml"])
    for due in fixed_charges_due("acc", b, ms("2026-01-15T00:00"), ms("2026-03-10T00:00")):
        led.append(fixed_entry(due))
        led.append(fixed_entry(due))  # raised twice: same id, no effect
    assert led.view.balance_micro == 10_000_000 - 688_800 - 2 * 2_500_000 == 4_311_200
    assert report_yuan(led.view.balance_micro) == Decimal("4.31")
    assert led.refold() == led.view


def test_daily_standing_charge_golden() -> None:
    """minigrid example: 0.2000/day, Nairobi (UTC+3). From 1 Jan 12:00 to 4 Jan 00:00 local the
    days starting 2, 3 and 4 Jan are due: 3 x 0.20 = 0.60; 1 Jan (started before) is not."""
    b = load_book([EXAMPLES / "minigrid-daily.toml"])
    due = fixed_charges_due("acc", b, ms("2026-01-01T12:00:00+03:00"), ms("2026-01-04T00:00:00+03:00"))
    assert [d.period_start_ms for d in due] == [
        ms("2026-01-02T00:00:00+03:00"), ms("2026-01-03T00:00:00+03:00"), ms("2026-01-04T00:00:00+03:00")
    ]
    assert sum(d.amount_micro for d in due) == 600_000
