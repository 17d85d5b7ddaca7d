"""What the headend keeps per gateway for its fleet view (and its metrics).

Every stored batch updates three small tables in the same transaction as its
records, from the records that were new (a duplicate changes nothing):

* ``fleet_gateways``: per gateway, when its last batch arrived, the newest
  record time central holds from it, how old the oldest record of its last
  batch was on arrival (the backlog it was draining), batches and records;
* ``fleet_meters``: per meter, its health state as the gateway last reported
  it (``meter.online`` / ``meter.offline`` / ``meter.quarantined`` events) and
  since when — a transition older than the one stored does not replace it
  (batches may arrive out of order);
* ``fleet_counters``: per gateway, cutoffs and restores the gateway's cutoff
  policy decided (``cutoff.action.*``), command results by outcome
  (``command_result``, and the counts of ``command_rejections`` summaries),
  relay alarms.

The tables are small (gateways × meters) and are what ``/metrics`` reads
(:mod:`headend.metrics`), so a scrape never scans the readings or events.
Several headends sharing one PostgreSQL database share these tables too.
They are filled from the moment the headend runs with them; batches stored
before are not counted.

:func:`fleet_update` is pure; both stores apply its result with their SQL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from store_forward.presence import Presence

METER_STATES = ("online", "offline", "quarantined")

# Counter names in fleet_counters.
CUTOFFS = "cutoffs"
RESTORES = "restores"
RELAY_ALARMS = "relay_alarms"
COMMAND_PREFIX = "command."  # command.applied, command.duplicate, command.rejected
COMMAND_OUTCOMES = ("applied", "duplicate", "rejected")

_RESTORE_ACTIONS = ("cutoff.action.close", "cutoff.action.close_allowed")


class RecordLike(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def created_ms(self) -> int: ...

    @property
    def body(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MeterState:
    state: str
    since_ms: int


@dataclass
class FleetUpdate:
    """What one stored batch changes in the fleet tables."""

    gateway: str
    received_ms: int
    records: int = 0
    oldest_ms: int | None = None  # record times (a reading's own time, else created)
    newest_ms: int | None = None
    meters: dict[str, MeterState] = field(default_factory=dict)  # the latest per meter
    counts: Counter[str] = field(default_factory=Counter)
    health: tuple[int, int, dict[str, Any]] | None = None  # newest (record id, time, body)

    @property
    def lag_ms(self) -> int | None:
        """How old the oldest new record was when the batch arrived."""
        return None if self.oldest_ms is None else max(0, self.received_ms - self.oldest_ms)


def record_time_ms(r: RecordLike) -> int:
    """When a record happened: a reading's poll time, else its creation time."""
    if r.kind == "reading":
        t = r.body.get("t")
        if isinstance(t, int) and not isinstance(t, bool):
            return t
    return int(r.created_ms)


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def fleet_update(
    gateway: str, new_records: Iterable[RecordLike], received_ms: int, reading_times: Sequence[int] = ()
) -> FleetUpdate:
    """The fleet view's change from the records of a batch that were new;
    ``reading_times``: the poll times of new readings given without a record
    (a batch whose readings were decoded as rows), counted as those records."""
    u = FleetUpdate(gateway, received_ms)
    records = list(new_records)
    if not records and not reading_times:
        return u
    u.records = len(records) + len(reading_times)
    times = list(reading_times)
    for r in records:  # record_time_ms(r), inline
        if r.kind == "reading":
            t = r.body.get("t")
            if isinstance(t, int) and not isinstance(t, bool):
                times.append(t)
                continue
        times.append(int(r.created_ms))
    u.oldest_ms, u.newest_ms = min(times), max(times)
    # events in record order (the latest state of a meter wins); readings only count
    for r in sorted((r for r in records if r.kind == "event"), key=lambda r: r.id):
        body = r.body
        kind = body.get("type")
        if not isinstance(kind, str):
            continue
        if kind.startswith("meter.") and kind[6:] in METER_STATES:
            meter = body.get("meter")
            if isinstance(meter, str) and meter:
                since = _int(body.get("time_ms"), int(r.created_ms))
                before = u.meters.get(meter)
                if before is None or since >= before.since_ms:
                    u.meters[meter] = MeterState(kind[6:], since)
        elif kind == HEALTH_EVENT:
            t = _int(body.get("time_ms"), int(r.created_ms))
            if u.health is None or t >= u.health[1]:
                u.health = (r.id, t, dict(body))
        elif kind == "cutoff.action.trip":
            u.counts[CUTOFFS] += 1
        elif kind in _RESTORE_ACTIONS:
            u.counts[RESTORES] += 1
        elif kind == "relay.alarm":
            u.counts[RELAY_ALARMS] += 1
        elif kind == "command_result":
            outcome = body.get("outcome")
            if outcome in COMMAND_OUTCOMES:
                u.counts[COMMAND_PREFIX + outcome] += 1
        elif kind == "command_rejections":
            u.counts[COMMAND_PREFIX + "rejected"] += max(0, _int(body.get("count"), 0))
    return u


@dataclass(frozen=True)
class GatewayRow:
    gateway: str
    last_batch_ms: int
    newest_record_ms: int | None
    last_batch_lag_ms: int | None
    batches: int
    records: int


@dataclass(frozen=True)
class FleetSnapshot:
    """The fleet tables as read for one scrape."""

    gateways: tuple[GatewayRow, ...] = ()
    meters: tuple[tuple[str, str, int], ...] = ()  # (gateway, state, meters in it)
    counters: tuple[tuple[str, str, int], ...] = ()  # (gateway, name, value)


# The tables (SQLite; store_pg.py has the PostgreSQL spelling).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_gateways (
    gateway_id        TEXT PRIMARY KEY,
    last_batch_ms     INTEGER NOT NULL,
    newest_record_ms  INTEGER,
    last_batch_lag_ms INTEGER,
    batches           INTEGER NOT NULL,
    records           INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_meters (
    gateway_id TEXT NOT NULL,
    meter_id   TEXT NOT NULL,
    state      TEXT NOT NULL,
    since_ms   INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, meter_id)
);
CREATE TABLE IF NOT EXISTS fleet_counters (
    gateway_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, name)
);
CREATE TABLE IF NOT EXISTS fleet_presence (
    gateway_id TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    since_ms   INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    version    TEXT,
    boot_id    TEXT,
    started_ms INTEGER,
    session_ms INTEGER,
    reason     TEXT
);
CREATE TABLE IF NOT EXISTS fleet_health (
    gateway_id TEXT PRIMARY KEY,
    time_ms    INTEGER NOT NULL,
    record_id  INTEGER NOT NULL,
    body       TEXT NOT NULL
);
"""

# Statements shared by both stores (``?`` placeholders; store_pg swaps them for %s).
UPSERT_GATEWAY = (
    "INSERT INTO fleet_gateways (gateway_id, last_batch_ms, newest_record_ms, last_batch_lag_ms,"
    " batches, records) VALUES (?, ?, ?, ?, 1, ?)"
    " ON CONFLICT (gateway_id) DO UPDATE SET"
    " last_batch_ms = CASE WHEN excluded.last_batch_ms > fleet_gateways.last_batch_ms"
    "   THEN excluded.last_batch_ms ELSE fleet_gateways.last_batch_ms END,"
    " newest_record_ms = CASE WHEN fleet_gateways.newest_record_ms IS NULL"
    "   OR excluded.newest_record_ms > fleet_gateways.newest_record_ms"
    "   THEN excluded.newest_record_ms ELSE fleet_gateways.newest_record_ms END,"
    " last_batch_lag_ms = excluded.last_batch_lag_ms,"
    " batches = fleet_gateways.batches + 1,"
    " records = fleet_gateways.records + excluded.records"
)
UPSERT_METER = (
    "INSERT INTO fleet_meters (gateway_id, meter_id, state, since_ms) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (gateway_id, meter_id) DO UPDATE SET"
    " state = excluded.state, since_ms = excluded.since_ms"
    " WHERE excluded.since_ms >= fleet_meters.since_ms"
)
ADD_COUNTER = (
    "INSERT INTO fleet_counters (gateway_id, name, value) VALUES (?, ?, ?)"
    " ON CONFLICT (gateway_id, name) DO UPDATE SET value = fleet_counters.value + excluded.value"
)
SELECT_GATEWAYS = (
    "SELECT gateway_id, last_batch_ms, newest_record_ms, last_batch_lag_ms, batches, records"
    " FROM fleet_gateways ORDER BY gateway_id"
)
SELECT_METERS = (
    "SELECT gateway_id, state, count(*) FROM fleet_meters GROUP BY gateway_id, state"
    " ORDER BY gateway_id, state"
)
SELECT_COUNTERS = "SELECT gateway_id, name, value FROM fleet_counters ORDER BY gateway_id, name"
# Presence as the broker's retained message last said (every headend receives it;
# the same message again changes nothing, a change of state moves since_ms).
UPSERT_PRESENCE = (
    "INSERT INTO fleet_presence (gateway_id, state, since_ms, updated_ms, version, boot_id,"
    " started_ms, session_ms, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (gateway_id) DO UPDATE SET"
    " since_ms = CASE WHEN fleet_presence.state = excluded.state"
    "   AND fleet_presence.session_ms IS NOT DISTINCT FROM excluded.session_ms"
    "   THEN fleet_presence.since_ms ELSE excluded.since_ms END,"
    " state = excluded.state, updated_ms = excluded.updated_ms,"
    " version = COALESCE(excluded.version, fleet_presence.version),"
    " boot_id = COALESCE(excluded.boot_id, fleet_presence.boot_id),"
    " started_ms = COALESCE(excluded.started_ms, fleet_presence.started_ms),"
    " session_ms = COALESCE(excluded.session_ms, fleet_presence.session_ms),"
    " reason = excluded.reason"
)
SELECT_PRESENCE = (
    "SELECT gateway_id, state, since_ms, updated_ms, version, boot_id, started_ms, session_ms, reason"
    " FROM fleet_presence ORDER BY gateway_id"
)
# The newest health record per gateway (every one is also in ``events``).
UPSERT_HEALTH = (
    "INSERT INTO fleet_health (gateway_id, time_ms, record_id, body) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (gateway_id) DO UPDATE SET"
    " time_ms = excluded.time_ms, record_id = excluded.record_id, body = excluded.body"
    " WHERE excluded.time_ms >= fleet_health.time_ms"
)
SELECT_HEALTH = "SELECT gateway_id, time_ms, record_id, body FROM fleet_health ORDER BY gateway_id"
HEALTH_EVENT = "gateway.health"


def presence_params(gateway: str, p: Presence, now_ms: int) -> tuple[Any, ...]:
    return (
        gateway, p.state.value, now_ms, now_ms, p.version, p.boot_id, p.started_ms, p.session_ms,
        None if p.reason is None else p.reason.value,
    )


@dataclass(frozen=True)
class PresenceRow:
    gateway: str
    state: str
    since_ms: int
    updated_ms: int
    version: str | None
    boot_id: str | None
    started_ms: int | None
    session_ms: int | None
    reason: str | None

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> PresenceRow:
        g, st, since, upd, ver, boot, started, session, reason = row
        return cls(
            str(g), str(st), int(since), int(upd), ver, boot,
            None if started is None else int(started), None if session is None else int(session), reason,
        )


def statements(u: FleetUpdate) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements (``?`` placeholders) that apply ``u``; none for an empty batch."""
    if not u.records:
        return []
    out: list[tuple[str, tuple[Any, ...]]] = [
        (UPSERT_GATEWAY, (u.gateway, u.received_ms, u.newest_ms, u.lag_ms, u.records))
    ]
    out += [(UPSERT_METER, (u.gateway, m, s.state, s.since_ms)) for m, s in sorted(u.meters.items())]
    out += [(ADD_COUNTER, (u.gateway, k, n)) for k, n in sorted(u.counts.items()) if n]
    if u.health is not None:
        rid, t, body = u.health
        out.append((UPSERT_HEALTH, (u.gateway, t, rid, orjson.dumps(body).decode())))
    return out


def snapshot(
    gateways: Iterable[tuple[Any, ...]],
    meters: Iterable[tuple[Any, ...]],
    counters: Iterable[tuple[Any, ...]],
) -> FleetSnapshot:
    """A :class:`FleetSnapshot` from the rows of the three SELECTs above."""

    def opt(v: Any) -> int | None:
        return None if v is None else int(v)

    return FleetSnapshot(
        tuple(
            GatewayRow(str(g), int(b), opt(n), opt(lag), int(nb), int(nr))
            for g, b, n, lag, nb, nr in gateways
        ),
        tuple((str(g), str(s), int(n)) for g, s, n in meters),
        tuple((str(g), str(k), int(v)) for g, k, v in counters),
    )
