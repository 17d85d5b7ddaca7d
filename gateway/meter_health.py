"""Meter health for central: online → offline → quarantined → back, as events.

The bus scheduler keeps each meter's health
(:class:`firmware_bridge.scheduler.MeterHealth`). What central needs is its
changes: a meter that stops answering (``meter.offline``, with the last
error), one the scheduler gives up polling every cycle and only re-probes
(``meter.quarantined``) and one that answers again (``meter.online``, with how
long it was away). Each change is an event in the outbox, committed with the
poll cycle that saw it, and one log line; the state is kept in the
``meter_health`` table of the gateway's database, so a restart announces
nothing that did not change and ``edgegw status`` shows since when a meter is
in its state.

:func:`state_of` and :func:`changes` are pure; the rest is the small SQLite
shell.
"""

from __future__ import annotations

import enum
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiosqlite

from firmware_bridge.events import event
from firmware_bridge.scheduler import MeterHealth
from store_forward.schema import Schema, Step

TABLE = """
CREATE TABLE IF NOT EXISTS meter_health (
    meter_id    TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('online', 'offline', 'quarantined')),
    since_ms    INTEGER NOT NULL,
    last_error  TEXT
)
"""
# Declared to the gateway database's schema registry (gateway.database).
SCHEMA = Schema("meter_health", Step(4, "each meter's state as central last heard it", (TABLE,)))

# More changes of one kind than this in one cycle on one bus are logged as one
# line (a supply outage takes a whole bus offline at once); events stay per meter.
SUMMARY_AFTER = 3


class State(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class Known:
    state: State
    since_ms: int


@dataclass(frozen=True)
class Change:
    meter: str
    bus: str
    before: Known | None
    after: State
    at_ms: int
    last_error: str | None
    consecutive_failures: int
    last_good_ms: int | None

    def event(self, account: str | None = None) -> dict[str, Any]:
        """The event for central (``meter.online`` / ``meter.offline`` / ``meter.quarantined``)."""
        fields: dict[str, Any] = {
            "meter": self.meter,
            "bus": self.bus,
            "from": self.before.state.value if self.before else None,
            "time_ms": self.at_ms,
            "last_good_ms": self.last_good_ms,
        }
        if account:
            fields["account"] = account
        if self.after is State.ONLINE:
            if self.before is not None:
                fields["away_ms"] = max(0, self.at_ms - self.before.since_ms)
        else:
            fields["last_error"] = self.last_error
            fields["consecutive_failures"] = self.consecutive_failures
        return event(f"meter.{self.after.value}", fields)


def error_text(h: MeterHealth) -> str | None:
    err = h.last_error
    return None if err is None else f"{err.kind}: {err.text}"


def state_of(h: MeterHealth) -> State | None:
    """The meter's state for central; None before its first attempt."""
    if h.quarantined:
        return State.QUARANTINED
    if h.online:
        return State.ONLINE
    if h.last_attempt_ms is not None:
        return State.OFFLINE
    return None


def changes(
    known: Mapping[str, Known], health: Mapping[str, MeterHealth], bus: str, now_ms: int
) -> list[Change]:
    """The meters of ``health`` whose state differs from ``known`` (pure)."""
    out: list[Change] = []
    for meter, h in health.items():
        state = state_of(h)
        before = known.get(meter)
        if state is None or (before is not None and before.state is state):
            continue
        at = h.last_attempt_ms if h.last_attempt_ms is not None else now_ms
        out.append(
            Change(meter, bus, before, state, at, error_text(h), h.consecutive_failures, h.last_good_ms)
        )
    return out


def log_changes(log: logging.Logger, found: Iterable[Change]) -> None:
    """One line per change; more than :data:`SUMMARY_AFTER` of one kind on a bus
    in one cycle are one line (with the first meters and the common error)."""
    groups: dict[tuple[str, State], list[Change]] = defaultdict(list)
    for c in found:
        groups[(c.bus, c.after)].append(c)
    for (bus, state), group in groups.items():
        level = logging.INFO if state is State.ONLINE else logging.WARNING
        if len(group) > SUMMARY_AFTER:
            first = ", ".join(c.meter for c in group[:SUMMARY_AFTER])
            errors = {c.last_error for c in group}
            why = f": {errors.pop()}" if len(errors) == 1 and state is not State.ONLINE else ""
            log.log(
                level, "bus %s: %d meters %s (%s, ...)%s", bus, len(group), state.value, first, why,
                extra={"bus": bus, "state": state.value, "meters": len(group)},
            )  # fmt: skip
            continue
        for c in group:
            fields = {"bus": bus, "meter": c.meter, "state": state.value}
            if state is State.ONLINE:
                away = f" after {_duration(c.at_ms - c.before.since_ms)} {c.before.state.value}" if c.before else ""
                log.info("meter %s on bus %s: online%s", c.meter, bus, away, extra=fields)
            elif state is State.QUARANTINED:
                log.warning(
                    "meter %s on bus %s: quarantined after %d failures, now only re-probed: %s",
                    c.meter, bus, c.consecutive_failures, c.last_error, extra=fields,
                )  # fmt: skip
            else:
                log.warning("meter %s on bus %s: offline: %s", c.meter, bus, c.last_error, extra=fields)


def _duration(ms: int) -> str:
    s = max(0, ms) // 1000
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"


async def start_in(db: aiosqlite.Connection) -> dict[str, Known]:
    """The states as last recorded."""
    async with db.execute("SELECT meter_id, state, since_ms FROM meter_health") as cur:
        return {str(m): Known(State(s), int(t)) async for m, s, t in cur}


async def save_in(db: aiosqlite.Connection, found: Iterable[Change]) -> None:
    await db.executemany(
        "INSERT INTO meter_health (meter_id, state, since_ms, last_error) VALUES (?,?,?,?)"
        " ON CONFLICT (meter_id) DO UPDATE SET state=excluded.state,"
        " since_ms=excluded.since_ms, last_error=excluded.last_error",
        [(c.meter, c.after.value, c.at_ms, c.last_error) for c in found],
    )


async def read(db: aiosqlite.Connection) -> dict[str, tuple[str, int, str | None]]:
    """meter -> (state, since_ms, last error) for ``edgegw status``; empty for a
    database the daemon has not written this table to yet."""
    async with db.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meter_health'"
    ) as cur:
        row = await cur.fetchone()
    if not row or not row[0]:
        return {}
    async with db.execute("SELECT meter_id, state, since_ms, last_error FROM meter_health") as cur:
        return {str(m): (str(s), int(t), e) async for m, s, t, e in cur}
