"""What the console's pages show, read from the headend database.

Everything here reads tables the ingest writes (``batches``, ``readings``,
``events``: :mod:`headend.store`) through indexes the stores create for it.
Where the headend keeps a fleet view (the ``fleet_gateways`` and
``fleet_meters`` tables, when present) the fleet list reads it; without them
the same figures come from the base tables, only slower. Presence is what
every headend stores from the gateways' retained presence messages
(``fleet_presence``); a headend process may hand in its own view instead
(:data:`PresenceSource`); with neither the pages say "no presence data".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from headend.console.balance import BalancePath, LedgerEntry, balance_path
from headend.console.db import ConsoleDb, json_obj

# Event types of the fleet-wide alarm list (docs/console.md, "Alarms and risk events").
ALARM_TYPES = (
    "cutoff.state_change",
    "cutoff.trip_pending",
    "cutoff.restore_pending",
    "cutoff.action.trip",
    "cutoff.action.alarm_on",
    "relay.alarm",
    "relay.refused",
    "relay_intent_expired",
    "meter.offline",
    "meter.quarantined",
    "meter.register_reset",
    "billing.fixed_held",
    "storage_full_readings_dropped",
    "storage_recovered",
    "config_rolled_back",
)
CUTOFF_STATE_TYPES = ("cutoff.state_change", "cutoff.trip_pending", "cutoff.restore_pending")
METER_STATE_TYPES = ("meter.online", "meter.offline", "meter.quarantined")
HEALTH_TYPE = "gateway.health"  # the gateway's periodic health record (docs/protocol.md)
ENERGY = "energy_import_kwh"
MAX_CHART_METERS = 8
CHART_WINDOW_MS = 24 * 3_600_000


@dataclass(frozen=True)
class Presence:
    online: bool
    since_ms: int | None = None


PresenceSource = Callable[[], Mapping[str, Presence]]


@dataclass(frozen=True)
class Event:
    gateway: str
    record_id: int
    kind: str  # the record kind: "event" or "charge"
    created_ms: int
    body: dict[str, Any]

    @property
    def type(self) -> str:
        t = self.body.get("type")
        return t if isinstance(t, str) else self.kind

    @property
    def time_ms(self) -> int:
        """When it happened (the body's own time where it has one)."""
        for key in ("time_ms", "at_ms"):
            v = self.body.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return self.created_ms


@dataclass(frozen=True)
class FleetRow:
    gateway: str
    presence: Presence | None
    last_batch_ms: int | None
    newest_record_ms: int | None
    backlog_ms: int | None  # how old the oldest record of its last batch was on arrival
    meters: int
    meters_offline: int
    health: Event | None


@dataclass(frozen=True)
class MeterRow:
    meter: str
    state: str | None  # online / offline / quarantined, as the gateway last reported it
    since_ms: int | None
    last_reading_ms: int | None
    values: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AccountRow:
    account: str
    level: str | None
    state: str | None
    reason: str | None
    since_ms: int | None


@dataclass(frozen=True)
class AccountView:
    gateway: str
    account: str
    path: BalancePath
    cutoff: Event | None  # the latest cutoff state event
    history: list[Event]  # cutoff and relay events, newest first
    credits: list[LedgerEntry]  # the top-ups the gateway applied, newest first
    malformed: int  # charge records that could not be read


def _i(v: Any) -> int | None:
    return None if v is None else int(v)


class ConsoleQueries:
    def __init__(self, db: ConsoleDb, presence: PresenceSource | None = None) -> None:
        self.db = db
        self.presence_source = presence
        self._stored_presence: dict[str, Presence] | None = None

    def _type(self) -> str:
        return self.db.jtext("body", "type")

    def _account(self) -> str:
        return self.db.jtext("body", "account")

    def presence(self) -> Mapping[str, Presence] | None:
        """Presence per gateway (call :meth:`load_presence` first for the stored one)."""
        if self.presence_source is not None:
            return self.presence_source()
        return self._stored_presence

    async def load_presence(self) -> None:
        """Read ``fleet_presence`` once per request (when no source was handed in)."""
        if self.presence_source is not None or self._stored_presence is not None:
            return
        if not await self.db.has_table("fleet_presence"):
            return
        rows = await self.db.fetchall("SELECT gateway_id, state, since_ms FROM fleet_presence")
        # no row yet: no gateway has published presence ("no presence data")
        self._stored_presence = {str(g): Presence(st == "online", _i(since)) for g, st, since in rows} or None

    async def _events(self, where: str, args: tuple[Any, ...], order: str = "DESC", limit: int = 100) -> list[Event]:
        rows = await self.db.fetchall(
            f"SELECT gateway_id, record_id, kind, created_ms, body FROM events WHERE {where}"
            f" ORDER BY created_ms {order} LIMIT ?",
            (*args, limit),
        )
        return [Event(str(g), int(r), str(k), int(c), json_obj(b)) for g, r, k, c, b in rows]

    # -- the fleet -------------------------------------------------------------------

    async def gateway_ids(self) -> list[str]:
        await self.load_presence()
        ids: set[str] = set()
        if await self.db.has_table("fleet_gateways"):
            ids.update(str(r[0]) for r in await self.db.fetchall("SELECT gateway_id FROM fleet_gateways"))
        ids.update(str(r[0]) for r in await self.db.fetchall("SELECT DISTINCT gateway_id FROM batches"))
        ids.update((self.presence() or {}).keys())
        return sorted(ids)

    async def fleet(self, query: str = "", offset: int = 0, limit: int = 100) -> tuple[list[FleetRow], int]:
        """One page of the fleet (gateway ids containing ``query``) and how many match."""
        ids = [g for g in await self.gateway_ids() if query.lower() in g.lower()]
        return await self.fleet_rows(ids[offset : offset + limit]), len(ids)

    async def fleet_rows(self, page: list[str]) -> list[FleetRow]:
        fleet_tables = await self.db.has_table("fleet_gateways")
        await self.load_presence()
        presence = self.presence()
        rows = []
        for gw in page:
            last = newest = lag = None
            if fleet_tables:
                row = await self.db.fetchone(
                    "SELECT last_batch_ms, newest_record_ms, last_batch_lag_ms FROM fleet_gateways"
                    " WHERE gateway_id = ?",
                    (gw,),
                )
                if row is not None:
                    last, newest, lag = _i(row[0]), _i(row[1]), _i(row[2])
            if last is None:
                row = await self.db.fetchone("SELECT max(received_ms) FROM batches WHERE gateway_id = ?", (gw,))
                last = _i(row[0]) if row else None
            if newest is None:
                newest = await self._newest_reading(gw)
            meters = await self.meter_states(gw)
            offline = sum(1 for s, _ in meters.values() if s in ("offline", "quarantined"))
            known = len(set(meters) | set(await self.meter_ids(gw)))
            health = await self._events(f"gateway_id = ? AND {self._type()} = ?", (gw, HEALTH_TYPE), limit=1)
            rows.append(
                FleetRow(
                    gw,
                    None if presence is None else presence.get(gw),
                    last,
                    newest,
                    lag,
                    known,
                    offline,
                    health[0] if health else None,
                )
            )
        return rows

    async def _newest_reading(self, gw: str) -> int | None:
        newest = None
        for meter in await self.meter_ids(gw):
            row = await self.db.fetchone(
                "SELECT max(time_ms) FROM readings WHERE gateway_id = ? AND meter_id = ?", (gw, meter)
            )
            if row and row[0] is not None:
                newest = max(int(row[0]), newest or 0)
        return newest

    async def meter_ids(self, gw: str) -> list[str]:
        """The meters central holds readings of (one index probe per meter)."""
        out: list[str] = []
        while len(out) < 10_000:
            row = await self.db.fetchone(
                "SELECT min(meter_id) FROM readings WHERE gateway_id = ? AND meter_id > ?",
                (gw, out[-1] if out else ""),
            )
            if row is None or row[0] is None:
                break
            out.append(str(row[0]))
        return out

    async def meter_states(self, gw: str) -> dict[str, tuple[str, int]]:
        """Each meter's state as its gateway last reported it, and since when."""
        if await self.db.has_table("fleet_meters"):
            rows = await self.db.fetchall(
                "SELECT meter_id, state, since_ms FROM fleet_meters WHERE gateway_id = ?", (gw,)
            )
            if rows:
                return {str(m): (str(s), int(t)) for m, s, t in rows}
        states: dict[str, tuple[str, int]] = {}
        marks = ", ".join("?" * len(METER_STATE_TYPES))
        for e in await self._events(
            f"gateway_id = ? AND {self._type()} IN ({marks})", (gw, *METER_STATE_TYPES), order="ASC", limit=100_000
        ):
            meter = e.body.get("meter")
            if isinstance(meter, str):
                before = states.get(meter)
                if before is None or e.time_ms >= before[1]:
                    states[meter] = (e.type.removeprefix("meter."), e.time_ms)
        return states

    # -- one gateway -------------------------------------------------------------------

    async def known(self, gw: str) -> bool:
        await self.load_presence()
        row = await self.db.fetchone("SELECT 1 FROM batches WHERE gateway_id = ? LIMIT 1", (gw,))
        return row is not None or gw in (self.presence() or {})

    async def gateway_summary(self, gw: str) -> FleetRow:
        return (await self.fleet_rows([gw]))[0]

    async def batch_counts(self, gw: str) -> tuple[int, int]:
        row = await self.db.fetchone(
            "SELECT count(*), coalesce(sum(n_records), 0) FROM batches WHERE gateway_id = ?", (gw,)
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def meters(self, gw: str) -> list[MeterRow]:
        states = await self.meter_states(gw)
        out = []
        for meter in sorted(set(states) | set(await self.meter_ids(gw))):
            row = await self.db.fetchone(
                "SELECT time_ms, quantities FROM readings WHERE gateway_id = ? AND meter_id = ?"
                " ORDER BY time_ms DESC LIMIT 1",
                (gw, meter),
            )
            state = states.get(meter)
            values = {str(k): str(v) for k, v in json_obj(row[1]).items()} if row else {}
            out.append(
                MeterRow(
                    meter,
                    state[0] if state else None,
                    state[1] if state else None,
                    int(row[0]) if row else None,
                    values,
                )
            )
        return out

    async def energy_series(self, gw: str, meters: list[str]) -> tuple[list[tuple[str, list[tuple[int, float]]]], int]:
        """kWh used per meter over the day before the gateway's newest reading
        (the import register less its first value in that window), and the window's start."""
        newest = await self._newest_reading(gw)
        if newest is None:
            return [], 0
        start = newest - CHART_WINDOW_MS
        out = []
        for meter in meters[:MAX_CHART_METERS]:
            rows = await self.db.fetchall(
                "SELECT time_ms, quantities FROM readings WHERE gateway_id = ? AND meter_id = ? AND time_ms >= ?"
                " ORDER BY time_ms LIMIT 20000",
                (gw, meter, start),
            )
            pts: list[tuple[int, float]] = []
            first: Decimal | None = None
            for t, q in rows:
                try:
                    v = Decimal(str(json_obj(q)[ENERGY]))
                except (KeyError, InvalidOperation):
                    continue
                first = v if first is None else first
                pts.append((int(t), float(v - first)))
            if pts:
                out.append((meter, pts))
        return out, min((pts[0][0] for _, pts in out), default=start)

    async def events(self, gw: str, limit: int = 50) -> list[Event]:
        return await self._events("gateway_id = ? AND kind = 'event'", (gw,), limit=limit)

    async def command_results(self, gw: str, limit: int = 50) -> list[Event]:
        return await self._events(f"gateway_id = ? AND {self._type()} = ?", (gw, "command_result"), limit=limit)

    async def accounts(self, gw: str) -> list[AccountRow]:
        names: list[str] = []
        acc = self._account()
        while len(names) < 10_000:
            row = await self.db.fetchone(
                f"SELECT min({acc}) FROM events WHERE gateway_id = ? AND {acc} > ?",
                (gw, names[-1] if names else ""),
            )
            if row is None or row[0] is None:
                break
            names.append(str(row[0]))
        latest: dict[str, Event] = {}
        marks = ", ".join("?" * len(CUTOFF_STATE_TYPES))
        for e in await self._events(
            f"gateway_id = ? AND {self._type()} IN ({marks})", (gw, *CUTOFF_STATE_TYPES), order="ASC", limit=100_000
        ):
            a = e.body.get("account")
            if isinstance(a, str) and (a not in latest or e.time_ms >= latest[a].time_ms):
                latest[a] = e
        out = []
        for name in names:
            last = latest.get(name)
            b = last.body if last else {}
            out.append(
                AccountRow(
                    name,
                    str(b["to"]) if "to" in b else None,
                    str(b["state"]) if "state" in b else None,
                    str(b["reason"]) if "reason" in b else None,
                    last.time_ms if last else None,
                )
            )
        return out

    async def account(self, gw: str, account: str) -> AccountView | None:
        acc = self._account()
        charges = await self._events(
            f"gateway_id = ? AND {acc} = ? AND kind = 'charge'", (gw, account), order="ASC", limit=1_000_000
        )
        events = await self._events(
            f"gateway_id = ? AND {acc} = ? AND kind = 'event'", (gw, account), limit=200
        )
        if not charges and not events:
            return None
        entries, malformed = [], 0
        for c in charges:
            try:
                entries.append(LedgerEntry.from_record(c.body))
            except (KeyError, ValueError, TypeError):
                malformed += 1
        path = balance_path(entries)
        cutoff = next((e for e in events if e.type in CUTOFF_STATE_TYPES), None)
        history = [e for e in events if e.type.startswith(("cutoff.", "relay.", "risk."))][:50]
        credits = sorted((e for e in entries if e.kind == "credit"), key=lambda e: -e.seq)
        return AccountView(gw, account, path, cutoff, history, credits, malformed)

    # -- alarms and risk ---------------------------------------------------------------

    async def alarms(self, gw: str | None = None, limit: int = 100) -> list[Event]:
        marks = ", ".join("?" * len(ALARM_TYPES))
        where, args = f"{self._type()} IN ({marks})", tuple[str, ...](ALARM_TYPES)
        if gw:
            where, args = f"gateway_id = ? AND {where}", (gw, *ALARM_TYPES)
        events = await self._events(where, tuple(args), limit=limit * 2)
        # A state change back to normal is not an alarm.
        return [e for e in events if not (e.type == "cutoff.state_change" and e.body.get("to") == "normal")][:limit]

    async def risks(self, gw: str | None = None, limit: int = 100) -> list[Event]:
        t = self._type()
        where, args = f"{t} >= ? AND {t} < ?", tuple[str, ...](("risk.", "risk/"))
        if gw:
            where, args = f"gateway_id = ? AND {where}", (gw, *args)
        return await self._events(where, tuple(args), limit=limit)
