"""Small builders shared by the billing tests (tariffs from TOML text, readings)."""

from __future__ import annotations

import tomllib
from datetime import datetime
from decimal import Decimal

from gateway.billing.rating import RegisterReading
from gateway.billing.tariff import Tariff, TariffBook
from gateway.billing.tariff_file import parse_tariff

TZ = "Asia/Shanghai"


def ms(iso: str) -> int:
    """ISO 8601 local time in Asia/Shanghai unless an offset is given -> Unix ms."""
    if not any(c in iso[10:] for c in "+Z") and iso[10:].count("-") == 0:
        iso += "+08:00"
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def tariff(text: str, source: str = "test.toml") -> Tariff:
    return parse_tariff(tomllib.loads(text), source, default_timezone=TZ)


def book(*texts: str) -> TariffBook:
    return TariffBook(tuple(tariff(t, f"v{i}.toml") for i, t in enumerate(texts)))


def rr(
    rid: str,
    iso: str,
    kwh: str,
    meter: str = "m1",
    **rates: str,
) -> RegisterReading:
    return RegisterReading(rid, meter, ms(iso), Decimal(kwh), {k.upper(): Decimal(v) for k, v in rates.items()})


FLAT = """
id = "flat"
version = 1
effective_from = "2026-01-01"
price = "0.5600"
"""

TOU = """
id = "tou"
version = 1
effective_from = "2026-01-01"
[prices]
T2 = "0.7500"
T4 = "0.3500"
[tou]
workday = [["00:00", "T4"], ["08:00", "T2"], ["22:00", "T4"]]
"""

FLAT_TIER = """
id = "tier"
version = 1
effective_from = "2026-01-01"
price = "0.5000"
[tier]
period = "annual"
settlement_month = 1
settlement_day = 1
thresholds_kwh = [10, 20]
surcharges = ["0", "0.05", "0.30"]
"""

TIER_PRICES_MONTHLY = """
id = "tiered"
version = 1
effective_from = "2026-01-01"
[tier]
period = "monthly"
settlement_day = 25
thresholds_kwh = [180, 280]
prices = ["0.5383", "0.5883", "0.8383"]
"""

TOU_TIER = """
id = "tou-tier"
version = 1
effective_from = "2026-01-01"
[prices]
T2 = "0.7500"
T4 = "0.3500"
[tou]
workday = [["00:00", "T4"], ["08:00", "T2"], ["22:00", "T4"]]
[tier]
period = "monthly"
settlement_day = 1
thresholds_kwh = [10]
surcharges = ["0", "0.10"]
"""
