"""The read-only HTTP JSON API for integrators: what the headend holds, without our decoder.

Mounted under ``/api/v1`` by :func:`headend.web.build_app` (``edgegw headend
run --api HOST:PORT``); docs/openapi.yaml describes every route and answer
(a test validates real answers against it), docs/integration.md shows how
to use it.

=======  ==========================================  ==========================
method   path                                        what
=======  ==========================================  ==========================
GET      /api/v1/readings                            register (and telemetry)
                                                     readings by gateway, meter,
                                                     time range
GET      /api/v1/events                              events by gateway, type,
                                                     account, time range
GET      /api/v1/balances                            each account's last reported
                                                     balance and supply state
GET      /api/v1/gateways                            presence, health, backlog,
                                                     meters by state, counters
GET      /api/v1/gateways/{gateway}                  one gateway, with its meters
GET      /api/v1/notifications                       the caring reminders' queue
=======  ==========================================  ==========================

Every route needs ``Authorization: Bearer <token>`` with a token the
:class:`ReadAuth` in use accepts (:class:`TokenFile`: ``edgegw headend
api-token``). Lists are in a stable order and paged by ``limit`` (default
1000, at most 10000) and an opaque ``after`` cursor (the previous answer's
``next``; ``null`` when there is no more). Times are integer milliseconds
since the epoch (``from`` inclusive, ``to`` exclusive; ISO 8601 with an
offset is taken too); values are decimal strings exactly as the meter
reported them; money is integer micro-yuan plus a decimal string of yuan.
An error is ``{"error": {"code", "message"}}`` with its HTTP status (400 a
parameter, 401 no valid token, 404 unknown gateway).

The API reads through a connection of its own (:mod:`headend.console.db`,
SQLite or PostgreSQL) and never writes.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from firmware_bridge.errors import EdgeGwError, ErrorKind
from headend.console.db import ConsoleDb, json_obj

PREFIX = "/api/v1"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
BALANCE_EVENTS = ("cutoff.state_change", "cutoff.trip_pending", "cutoff.restore_pending")
LEVEL_EVENTS = ("cutoff.state_change",)


class ReadAuth(Protocol):
    async def authenticate(self, token: str) -> str | None:
        """The caller's name for a valid token, else None."""
        ...


class TokenFile:
    """Read tokens from a file of ``NAME sha256:HEX`` lines (the SHA-256 of each token;
    the tokens themselves are never stored). Read again when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._hashes: dict[bytes, str] = {}

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            self._hashes, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        hashes = {}
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].startswith("sha256:"):
                try:
                    hashes[bytes.fromhex(parts[1][7:])] = parts[0]
                except ValueError:
                    continue
        self._hashes, self._mtime = hashes, mtime

    async def authenticate(self, token: str) -> str | None:
        self._load()
        digest = hashlib.sha256(token.encode()).digest()
        for known, name in self._hashes.items():
            if hmac.compare_digest(known, digest):
                return name
        return None


def new_token(path: Path, name: str) -> str:
    """A new read token for ``name``: its hash appended to ``path``, the token returned
    (shown once). Names are letters, digits, ``-``, ``_``, ``.``."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"token name {name!r}: use letters, digits, '-', '_', '.'")
    token = "edgegw-read-" + secrets.token_urlsafe(32)
    line = f"{name} sha256:{hashlib.sha256(token.encode()).hexdigest()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(line)
    path.chmod(0o600)
    return token


@dataclass
class ReadApiSettings:
    db: ConsoleDb
    auth: ReadAuth


READ_API = web.AppKey("read_api", ReadApiSettings)


class BadParam(EdgeGwError):
    """A query parameter the API cannot use (answered 400)."""

    kind = ErrorKind.INVALID

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


Handler = Callable[[web.Request, ReadApiSettings], Awaitable[web.Response]]


def _route(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def route(request: web.Request) -> web.Response:
        s = request.app[READ_API]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        who = await s.auth.authenticate(token.strip()) if scheme.lower() == "bearer" and token else None
        if who is None:
            return error(401, "unauthenticated", "a valid API token is needed (Authorization: Bearer <token>)",
                         {"WWW-Authenticate": 'Bearer realm="edgegw"'})  # fmt: skip
        try:
            return await handler(request, s)
        except BadParam as exc:
            return error(400, "bad_parameter", exc.message)

    return route


# -- parameters ----------------------------------------------------------------------


def _params(request: web.Request, allowed: set[str]) -> Mapping[str, str]:
    q = request.query
    for k in q:
        if k not in allowed:
            raise BadParam(f"unknown parameter {k!r} (allowed: {', '.join(sorted(allowed))})")
        if len(q.getall(k)) > 1:
            raise BadParam(f"parameter {k!r} given more than once")
    return q


def _time(q: Mapping[str, str], name: str) -> int | None:
    v = q.get(name)
    if v is None:
        return None
    if v.lstrip("-").isdigit():
        return int(v)
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        raise BadParam(f"{name}: milliseconds since the epoch or ISO 8601 with an offset, got {v!r}") from None
    if t.tzinfo is None:
        raise BadParam(f"{name}: an ISO 8601 time needs its UTC offset (e.g. +08:00), got {v!r}")
    return int(t.timestamp() * 1000)


def _limit(q: Mapping[str, str]) -> int:
    v = q.get("limit")
    if v is None:
        return DEFAULT_LIMIT
    if not v.isdigit() or not 1 <= int(v) <= MAX_LIMIT:
        raise BadParam(f"limit must be an integer in 1..{MAX_LIMIT}, got {v!r}")
    return int(v)


def _text(q: Mapping[str, str], name: str) -> str | None:
    v = q.get(name)
    if v is not None and (not v or len(v) > 200):
        raise BadParam(f"{name} must be 1..200 characters")
    return v


def _cursor(parts: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


def _after(q: Mapping[str, str], n: int) -> list[Any] | None:
    v = q.get("after")
    if v is None:
        return None
    try:
        parts = json.loads(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)))
    except (ValueError, binascii.Error):
        parts = None
    if not isinstance(parts, list) or len(parts) != n:
        raise BadParam("after: not a cursor this API gave")
    return parts


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _yuan(micro: int | None) -> str | None:
    if micro is None:
        return None
    # reported balances are truncated to the fen, as the gateway reports them
    fen = abs(micro) // 10_000
    return f"{'-' if micro < 0 and fen else ''}{fen // 100}.{fen % 100:02d}"


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.lstrip("-").isdigit():
        return int(v)
    return None


# -- readings --------------------------------------------------------------------------


async def readings(request: web.Request, s: ReadApiSettings) -> web.Response:
    q = _params(request, {"gateway", "meter", "from", "to", "class", "limit", "after"})
    cls = q.get("class", "billing")
    if cls not in ("billing", "telemetry"):
        raise BadParam(f"class must be billing or telemetry, got {cls!r}")
    table = "readings" if cls == "billing" else "telemetry"
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    for name, col in (("gateway", "gateway_id"), ("meter", "meter_id")):
        v = _text(q, name)
        if v is not None:
            where.append(f"{col} = ?")
            args.append(v)
    t0, t1 = _time(q, "from"), _time(q, "to")
    if t0 is not None:
        where.append("time_ms >= ?")
        args.append(t0)
    if t1 is not None:
        where.append("time_ms < ?")
        args.append(t1)
    after = _after(q, 4)
    if after is not None:
        where.append("(time_ms, gateway_id, epoch, record_id) > (?, ?, ?, ?)")
        args += after
    limit = _limit(q)
    rows = await s.db.fetchall(
        "SELECT time_ms, gateway_id, epoch, record_id, meter_id, time_source, quantities, quality, batch_seq"
        f" FROM {table} WHERE {' AND '.join(where)}"
        " ORDER BY time_ms, gateway_id, epoch, record_id LIMIT ?",
        (*args, limit + 1),
    )
    out = []
    for t, gw, ep, rid, meter, src, values, quality, bseq in rows[:limit]:
        out.append({
            "gateway": gw, "meter": meter, "time_ms": int(t), "time": _iso(int(t)), "time_source": src,
            "class": cls, "values": json_obj(values), "quality": json_obj(quality) if quality else {},
            "epoch": ep, "record_id": int(rid), "batch_seq": int(bseq),
        })  # fmt: skip
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = _cursor([int(last[0]), last[1], last[2], int(last[3])])
    return _json({"readings": out, "next": nxt})


# -- events ----------------------------------------------------------------------------


def _event(gw: str, ep: str, rid: int, kind: str, created: int, body: Any) -> dict[str, Any]:
    b = json_obj(body)
    t = _int(b.get("time_ms"))
    t = created if t is None else t
    return {
        "gateway": gw, "epoch": ep, "record_id": int(rid), "kind": kind,
        "type": b.get("type") if isinstance(b.get("type"), str) else None,
        "account": b.get("account") if isinstance(b.get("account"), str) else None,
        "created_ms": int(created), "time_ms": int(t), "time": _iso(int(t)), "body": b,
    }  # fmt: skip


async def events(request: web.Request, s: ReadApiSettings) -> web.Response:
    q = _params(request, {"gateway", "type", "account", "kind", "from", "to", "limit", "after"})
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    db = s.db
    for name, col in (("gateway", "gateway_id"), ("type", db.jtext("body", "type")),
                      ("account", db.jtext("body", "account")), ("kind", "kind")):  # fmt: skip
        v = _text(q, name)
        if v is not None:
            where.append(f"{col} = ?")
            args.append(v)
    t0, t1 = _time(q, "from"), _time(q, "to")
    if t0 is not None:
        where.append("created_ms >= ?")
        args.append(t0)
    if t1 is not None:
        where.append("created_ms < ?")
        args.append(t1)
    after = _after(q, 4)
    if after is not None:
        where.append("(created_ms, gateway_id, epoch, record_id) > (?, ?, ?, ?)")
        args += after
    limit = _limit(q)
    rows = await db.fetchall(
        f"SELECT created_ms, gateway_id, epoch, record_id, kind, body FROM events WHERE {' AND '.join(where)}"
        " ORDER BY created_ms, gateway_id, epoch, record_id LIMIT ?",
        (*args, limit + 1),
    )
    out = [_event(gw, ep, rid, kind, int(c), body) for c, gw, ep, rid, kind, body in rows[:limit]]
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = _cursor([int(last[0]), last[1], last[2], int(last[3])])
    return _json({"events": out, "next": nxt})


# -- balances --------------------------------------------------------------------------


def _path(db: ConsoleDb, column: str, *keys: str) -> str:
    """The text at a nested JSON path, in the database's dialect."""
    if db.dialect == "postgres":
        inner = "".join(f"->'{k}'" for k in keys[:-1])
        return f"({column}{inner}->>'{keys[-1]}')"
    return f"json_extract({column}, '$.{'.'.join(keys)}')"


async def balances(request: web.Request, s: ReadApiSettings) -> web.Response:
    """Each account's newest balance report (a cutoff event's ``balance_micro``, or a
    top-up's ``balance_after_micro``), the charges the gateway reported after it,
    and the supply state from its newest level change."""
    q = _params(request, {"account", "gateway"})
    db = s.db
    account = _text(q, "account")
    gateway = _text(q, "gateway")
    typ = db.jtext("body", "type")
    acct = f"COALESCE({db.jtext('body', 'account')}, {_path(db, 'body', 'effect', 'account')})"
    kinds = ", ".join(f"'{k}'" for k in (*BALANCE_EVENTS, "command_result"))
    where = [f"{typ} IN ({kinds})", f"{acct} IS NOT NULL", "kind = 'event'"]
    args: list[Any] = []
    if account is not None:
        where.append(f"{acct} = ?")
        args.append(account)
    if gateway is not None:
        where.append("gateway_id = ?")
        args.append(gateway)
    bal = f"COALESCE({db.jtext('body', 'balance_micro')}, {_path(db, 'body', 'effect', 'balance_after_micro')})"
    rows = await db.fetchall(
        f"SELECT gateway_id, {acct} AS account, created_ms, {typ}, {bal} AS balance, body FROM events"
        f" WHERE {' AND '.join(where)} ORDER BY created_ms, gateway_id, epoch, record_id",
        tuple(args),
    )
    accounts: dict[tuple[str, str], dict[str, Any]] = {}
    for gw, acc, created, etype, balance, body in rows:
        b = json_obj(body)
        micro = _int(balance)
        if micro is None:
            continue
        t = _int(b.get("time_ms")) or _int(b.get("at_ms")) or int(created)
        a = accounts.setdefault((str(acc), str(gw)), {"account": str(acc), "gateway": str(gw)})
        if t >= a.get("as_of_ms", -1):
            a.update(balance_micro=micro, balance=_yuan(micro), as_of_ms=t, as_of=_iso(t), source=etype)
        if etype in LEVEL_EVENTS and t >= a.get("level_since_ms", -1):
            a.update(level=b.get("to"), supply=b.get("state"), reason=b.get("reason"), level_since_ms=t)
    out = []
    for (acc, gw), a in sorted(accounts.items()):
        charges = await db.fetchall(
            f"SELECT {db.jtext('body', 'amount_micro')}, {db.jtext('body', 'time_ms')} FROM events"
            f" WHERE kind = 'charge' AND gateway_id = ? AND {db.jtext('body', 'account')} = ?"
            " AND created_ms >= ?",
            (gw, acc, a["as_of_ms"] - 86_400_000),  # a charge is created at or after its time
        )
        since = sum(_int(m) or 0 for m, t in charges if (_int(t) or 0) > a["as_of_ms"])
        est = a["balance_micro"] + since
        out.append({
            "account": acc, "gateway": gw, "balance_micro": a["balance_micro"], "balance": a["balance"],
            "as_of_ms": a["as_of_ms"], "as_of": a["as_of"], "source": a["source"],
            "charges_since_micro": since, "estimated_balance_micro": est, "estimated_balance": _yuan(est),
            "level": a.get("level"), "supply": a.get("supply"), "reason": a.get("reason"),
            "level_since_ms": a.get("level_since_ms"),
        })  # fmt: skip
    return _json({"balances": out})


# -- gateways --------------------------------------------------------------------------


async def _gateway_ids(db: ConsoleDb) -> list[str]:
    ids = {str(r[0]) for r in await db.fetchall("SELECT gateway_id FROM fleet_gateways")}
    ids |= {str(r[0]) for r in await db.fetchall("SELECT gateway_id FROM fleet_presence")}
    ids |= {str(r[0]) for r in await db.fetchall("SELECT DISTINCT gateway_id FROM batches")}
    return sorted(ids)


async def _gateway(db: ConsoleDb, gw: str, now_ms: int, *, meters: bool) -> dict[str, Any]:
    p = await db.fetchone(
        "SELECT state, since_ms, updated_ms, version, boot_id, started_ms, session_ms, reason"
        " FROM fleet_presence WHERE gateway_id = ?",
        (gw,),
    )
    f = await db.fetchone(
        "SELECT last_batch_ms, newest_record_ms, last_batch_lag_ms, batches, records FROM fleet_gateways"
        " WHERE gateway_id = ?",
        (gw,),
    )
    h = await db.fetchone("SELECT time_ms, body FROM fleet_health WHERE gateway_id = ?", (gw,))
    states = {
        str(state): int(n)
        for state, n in await db.fetchall(
            "SELECT state, count(*) FROM fleet_meters WHERE gateway_id = ? GROUP BY state", (gw,)
        )
    }
    counters = {
        str(k): int(v)
        for k, v in await db.fetchall("SELECT name, value FROM fleet_counters WHERE gateway_id = ?", (gw,))
    }
    presence = None
    if p is not None:
        presence = {
            "state": p[0], "since_ms": int(p[1]), "updated_ms": int(p[2]), "version": p[3], "boot_id": p[4],
            "started_ms": _int(p[5]), "session_ms": _int(p[6]), "reason": p[7],
        }  # fmt: skip
    backlog = None
    if f is not None:
        age = [x for x in (_int(f[2]), None if f[1] is None else max(0, now_ms - int(f[1]))) if x is not None]
        backlog = {
            "last_batch_ms": int(f[0]), "newest_record_ms": _int(f[1]), "last_batch_lag_ms": _int(f[2]),
            "backlog_age_ms": max(age) if age else None, "batches": int(f[3]), "records": int(f[4]),
        }  # fmt: skip
    out: dict[str, Any] = {
        "gateway": gw,
        "presence": presence,
        "ingest": backlog,
        "health": None if h is None else {"time_ms": int(h[0]), "body": json_obj(h[1])},
        "meters_by_state": {s: states.get(s, 0) for s in ("online", "offline", "quarantined")},
        "counters": counters,
    }
    if meters:
        out["meters"] = [
            {"meter": m, "state": st, "since_ms": int(t)}
            for m, st, t in await db.fetchall(
                "SELECT meter_id, state, since_ms FROM fleet_meters WHERE gateway_id = ? ORDER BY meter_id",
                (gw,),
            )
        ]
    return out


def _now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


async def gateways(request: web.Request, s: ReadApiSettings) -> web.Response:
    _params(request, set())
    now = _now_ms()
    return _json({"gateways": [await _gateway(s.db, g, now, meters=False) for g in await _gateway_ids(s.db)]})


async def gateway(request: web.Request, s: ReadApiSettings) -> web.Response:
    _params(request, set())
    gw = request.match_info["gateway"]
    if gw not in await _gateway_ids(s.db):
        return error(404, "not_found", f"no gateway {gw!r} is known here")
    return _json(await _gateway(s.db, gw, _now_ms(), meters=True))


# -- notifications ---------------------------------------------------------------------


async def notifications(request: web.Request, s: ReadApiSettings) -> web.Response:
    q = _params(request, {"account", "state", "limit", "after"})
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    for name in ("account", "state"):
        v = _text(q, name)
        if v is not None:
            where.append(f"{name} = ?")
            args.append(v)
    after = _after(q, 1)
    if after is not None:
        where.append("id > ?")
        args.append(after[0])
    limit = _limit(q)
    rows = await s.db.fetchall(
        "SELECT id, notice_id, gateway_id, account, kind, event_type, event_ms, state, attempts, sent_ms,"
        f" recipient, language, text, http_status, detail FROM notify_queue WHERE {' AND '.join(where)}"
        " ORDER BY id LIMIT ?",
        (*args, limit + 1),
    )
    keys = ("id", "notice_id", "gateway", "account", "kind", "event_type", "event_ms", "state", "attempts",
            "sent_ms", "recipient", "language", "text", "http_status", "detail")  # fmt: skip
    out = [dict(zip(keys[1:], r[1:], strict=True)) for r in rows[:limit]]
    for o in out:
        o["urgent"] = o["kind"] in ("cutoff", "restored")
    nxt = _cursor([int(rows[limit - 1][0])]) if len(rows) > limit else None
    return _json({"notifications": out, "next": nxt})


ROUTES: list[tuple[str, Handler]] = [
    ("/readings", readings),
    ("/events", events),
    ("/balances", balances),
    ("/gateways", gateways),
    ("/gateways/{gateway}", gateway),
    ("/notifications", notifications),
]


def mount_read_api(app: web.Application, settings: ReadApiSettings, prefix: str = PREFIX) -> None:
    """Add the read API's routes under ``prefix`` to ``app``."""
    app[READ_API] = settings
    for path, handler in ROUTES:
        app.router.add_get(prefix + path, _route(handler))

