"""Revenue-protection checks on every meter, in the daemon's cycle transaction.

The checks themselves are pure (:mod:`gateway.billing.risk`); this shell keeps
what they need between readings and turns findings into ``risk.*`` events for
central, each with its evidence:

* per reading: register going backwards, consumption while the relay is open
  (bypass or a welded relay), meter clock drift against trusted time, relay
  state different from the last command;
* zero consumption for days with the relay closed (a streak tracked per meter);
* a sudden drop against the meter's own history, checked once per local day
  from daily consumption kept in ``risk_daily`` (survives restarts).

A finding is reported once when it appears, and again only after a day if it
persists, so a stuck condition cannot flood the uplink.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import aiosqlite

from firmware_bridge.events import event
from firmware_bridge.reading import Quantity, Reading
from gateway.billing.money import register_ckwh
from gateway.billing.rating import RegisterReading
from gateway.billing.risk import (
    RiskConfig,
    RiskEvent,
    check_reading,
    check_sudden_drop,
    check_zero_consumption,
)
from store_forward.outbox import Outbox
from store_forward.records import RecordClass, RecordKind
from store_forward.schema import Schema, Step

TABLE = """
CREATE TABLE IF NOT EXISTS risk_daily (
    meter_id   TEXT    NOT NULL,
    day        TEXT    NOT NULL,  -- local date, ISO
    first_ckwh INTEGER NOT NULL,  -- import register at the first reading of the day
    last_ckwh  INTEGER NOT NULL,
    PRIMARY KEY (meter_id, day)
)
"""
# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema("risk_monitor", Step(4, "each meter's register at the first and last reading of a day", (TABLE,)))

REPEAT_AFTER_MS = 86_400_000


@dataclass
class _MeterState:
    prev: Reading | None = None
    streak_start: RegisterReading | None = None  # first reading of an unchanged, relay-closed run
    last_day: str | None = None
    commanded_open: bool | None = None
    commanded_at_ms: int | None = None


class RiskMonitor:
    def __init__(self, timezone: str, cfg: RiskConfig | None = None) -> None:
        self.tz = ZoneInfo(timezone)
        self.tz_name = timezone
        self.cfg = cfg or RiskConfig()
        self._meters: dict[str, _MeterState] = {}
        self._reported: dict[tuple[str, str], int] = {}  # (meter, kind) -> last report ms

    def relay_commanded(self, meter_id: str, open: bool, at_ms: int) -> None:
        st = self._meters.setdefault(meter_id, _MeterState())
        st.commanded_open, st.commanded_at_ms = open, at_ms

    async def on_readings_in(
        self, db: aiosqlite.Connection, outbox: Outbox, readings: Sequence[Reading], now_ms: int
    ) -> list[RiskEvent]:
        found: list[RiskEvent] = []
        for r in readings:
            st = self._meters.setdefault(r.meter_id, _MeterState())
            found += check_reading(
                st.prev, r, commanded_open=st.commanded_open, commanded_at_ms=st.commanded_at_ms, cfg=self.cfg
            )
            rr = RegisterReading.from_reading(r, str(r.time_ms))
            if rr is not None:
                found += self._zero_streak(st, r, rr)
                found += await self._daily_in(db, st, rr)
            st.prev = r
        reported = [e for e in found if self._due(e, now_ms)]
        for e in reported:
            await outbox.add_in(
                db,
                RecordClass.EVENT,
                RecordKind.EVENT,
                now_ms,
                event(f"risk.{e.kind.value}", meter=e.meter_id, time_ms=e.time_ms, evidence=dict(e.evidence)),
            )
        return reported

    def _due(self, e: RiskEvent, now_ms: int) -> bool:
        key = (e.meter_id, e.kind.value)
        last = self._reported.get(key)
        if last is not None and now_ms - last < REPEAT_AFTER_MS:
            return False
        self._reported[key] = now_ms
        return True

    def _zero_streak(self, st: _MeterState, r: Reading, rr: RegisterReading) -> list[RiskEvent]:
        closed = r.good(Quantity.RELAY_OPEN) in (None, 0)
        start = st.streak_start
        if not closed or start is None or register_ckwh(rr.import_kwh) != register_ckwh(start.import_kwh):
            st.streak_start = rr if closed else None
            return []
        found_event = check_zero_consumption(start, rr, relay_closed_throughout=True, cfg=self.cfg)
        return [] if found_event is None else [found_event]

    async def _daily_in(self, db: aiosqlite.Connection, st: _MeterState, rr: RegisterReading) -> list[RiskEvent]:
        day = datetime.fromtimestamp(rr.time_ms / 1000, self.tz).date().isoformat()
        ck = register_ckwh(rr.import_kwh)
        await db.execute(
            "INSERT INTO risk_daily (meter_id, day, first_ckwh, last_ckwh) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (meter_id, day) DO UPDATE SET last_ckwh = excluded.last_ckwh",
            (rr.meter_id, day, ck, ck),
        )
        new_day = st.last_day is not None and st.last_day != day
        st.last_day = day
        if not new_day:
            return []
        # A day's consumption runs from its first reading to the next day's first reading.
        need = self.cfg.drop_recent_days + self.cfg.drop_history_days + 1
        async with db.execute(
            "SELECT first_ckwh FROM risk_daily WHERE meter_id = ? AND day <= ?"
            " ORDER BY day DESC LIMIT ?",
            (rr.meter_id, day, need),
        ) as cur:
            firsts = [int(f) for (f,) in reversed(list(await cur.fetchall()))]
        daily = [max(0, b - a) for a, b in itertools.pairwise(firsts)]
        found_event = check_sudden_drop(rr.meter_id, daily, rr.time_ms, self.cfg)
        return [] if found_event is None else [found_event]
