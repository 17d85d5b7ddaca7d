"""The prepaid story of ``edgegw demo``, on a compressed clock.

One real second is one minute of site time (``SPEED = 60``), so a demo of a
few tens of seconds covers an evening: household-01 runs out of credit while
the link is down, gets its warnings, its cutoff is deferred by the evening
no-disconnect window, the supply is cut when the window ends, and a top-up
sent by central when the link returns restores it.

The plan is computed from the demo's duration ``D`` (real seconds = site
minutes from the start):

====================  =========================================
0.20 D                link goes down
0.45 D – 0.65 D       no-disconnect window (local time of day)
0.55 D                balance reaches the overdraft limit: trip due,
                      deferred by the window
0.65 D                window ends: trip
0.80 D                link back up
0.82 D                central sends a top-up; supply restored
====================  =========================================

Everything here is data and pure arithmetic; the demo runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

SPEED = 60  # site seconds per real second
TIMEZONE = "Asia/Shanghai"
PRICE = Decimal("0.5600")  # yuan/kWh, flat
OPENING = Decimal("1.00")
ALARM1 = Decimal("0.80")
ALARM2 = Decimal("0.40")
OVERDRAFT = Decimal("0.20")
CLOSE_PERMIT = Decimal("0.10")
TOPUP_MICRO = 10_000_000  # 10.00 yuan


class SiteClock:
    """Site time running ``speed`` times faster than real time from ``start_ms``."""

    def __init__(self, start_ms: int, speed: int = SPEED) -> None:
        self.start_ms = start_ms
        self.speed = speed
        self._t0 = time.monotonic()

    def ms(self) -> int:
        return self.start_ms + int((time.monotonic() - self._t0) * self.speed * 1000)

    def seconds(self) -> float:
        return self.ms() / 1000


@dataclass(frozen=True)
class Plan:
    duration_s: float
    start_ms: int  # site time at the start, on a whole minute
    window_start: str  # "HH:MM" local
    window_end: str
    load_kw: Decimal  # household-01's load
    link_down_s: float
    link_up_s: float
    topup_s: float


def _hhmm(start: datetime, minutes: float) -> str:
    t = start + timedelta(minutes=round(minutes))
    return f"{t.hour:02d}:{t.minute:02d}"


def make_plan(duration_s: float, now_ms: int) -> Plan:
    tz = ZoneInfo(TIMEZONE)
    start = datetime.fromtimestamp(now_ms / 1000, tz).replace(second=0, microsecond=0)
    d = duration_s  # site minutes
    # spend opening balance + overdraft in 0.55 D site minutes
    yuan_per_hour = (OPENING + OVERDRAFT) / (Decimal(str(0.55 * d)) / 60)
    load = (yuan_per_hour / PRICE).quantize(Decimal("0.001"), ROUND_HALF_UP)
    w0, w1 = round(0.45 * d), round(0.65 * d)
    if w1 <= w0:
        w1 = w0 + 1
    return Plan(
        duration_s=duration_s,
        start_ms=int(start.timestamp() * 1000),
        window_start=_hhmm(start, w0),
        window_end=_hhmm(start, w1),
        load_kw=load,
        link_down_s=0.2 * d,
        link_up_s=0.8 * d,
        topup_s=0.82 * d,
    )


def tariff_text() -> str:
    return f"""# Flat residential price used by the demo.
id = "demo-flat"
version = 1
effective_from = "2020-01-01T00:00:00+08:00"
timezone = "{TIMEZONE}"
price = "{PRICE}"
"""


def account_text(plan: Plan) -> str:
    return f"""# household-01: a prepaid account with an evening no-disconnect window.
account = "household-01"
timezone = "{TIMEZONE}"
opening_balance = "{OPENING}"
meters = ["meter-01"]
protected = false

[limits]
alarm1 = "{ALARM1}"
alarm2 = "{ALARM2}"
overdraft = "{OVERDRAFT}"
close_permit = "{CLOSE_PERMIT}"
close_mode = "direct"
reconnect_delay_s = 0
relay_min_interval_s = 60

[[no_disconnect]]
start = "{plan.window_start}"
end = "{plan.window_end}"
days = ["workday", "weekend", "holiday"]
"""
