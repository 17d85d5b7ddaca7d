"""Central's tables beside the headend's: the command queue, accounts, payments, API tokens.

They live in the headend's database (the SQLite file or the PostgreSQL
database ``edgegw headend run`` stores batches in), because the gateways'
answers arrive there: when the ingest stores a batch it applies the
``command_result`` events and top-up credits in it to the queue in the
**same transaction** (:func:`apply_results_in`), so a result is taken exactly
once, like the batch.

=========================  ====================================================
``central_commands``       one row per command: what was asked (type, body,
                           who asked, the signed envelope last sent), its
                           delivery state (:mod:`headend.commands`), the
                           gateway's answer, and for a top-up the credit the
                           gateway's ledger reported
``central_command_log``    every step of every command (created, sent, resent,
                           result, re-signed, expired), append only
``central_accounts``       which gateway serves an account, the last purchase
                           counter central assigned it (never reused) and its
                           last snapshot number
``central_issuers``        the last counter of each signing key (never reused)
``central_payments``       every payment a channel posted, by (channel,
                           idempotency key), with the response it was given
``central_api_tokens``     API tokens: name, role, channel, SHA-256 of the
                           secret (the token itself is never stored)
=========================  ====================================================

:class:`CentralDB` owns one connection of its own (the ingest keeps its own),
and runs one transaction at a time on it. Several headend processes may
share a PostgreSQL database: the dispatcher claims commands with ``FOR UPDATE
SKIP LOCKED`` and the gateways it sends to with a transaction-level advisory
lock (:meth:`CentralDB.claim_gateways`), and counters are taken under the row
lock of their row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from headend.commands import Action, State, Transition, on_result, parse_result
from headend.sql import PgTx, SqliteTx, Tx, begin_sqlite

# first key of the advisory locks by which a dispatcher holds a gateway's commands
# for its pass (the second is the gateway id's hashtext): "EDGW"
DISPATCH_LOCK_CLASS = 0x45444757

_TABLES = """
CREATE TABLE IF NOT EXISTS central_commands (
    seq              {SERIAL},
    command_id       TEXT    NOT NULL UNIQUE,
    gateway_id       TEXT    NOT NULL,
    type             TEXT    NOT NULL,
    role             TEXT    NOT NULL,
    issuer           TEXT    NOT NULL,
    counter          {INT}   NOT NULL,
    body             TEXT    NOT NULL,
    account          TEXT,
    meter            TEXT,
    amount_micro     {INT},
    payment_channel  TEXT,
    purchase_counter {INT},
    requested_by     TEXT    NOT NULL,
    created_ms       {INT}   NOT NULL,
    issued_ms        {INT}   NOT NULL,
    expires_ms       {INT}   NOT NULL,
    envelope         {BLOB}  NOT NULL,
    state            TEXT    NOT NULL,
    resign           {INT}   NOT NULL DEFAULT 0,
    attempts         {INT}   NOT NULL DEFAULT 0,
    first_sent_ms    {INT},
    last_sent_ms     {INT},
    next_attempt_ms  {INT}   NOT NULL,
    results          {INT}   NOT NULL DEFAULT 0,
    last_result_ms   {INT},
    final_ms         {INT},
    reason           TEXT,
    code             TEXT,
    message          TEXT,
    effect           TEXT,
    credited_ms      {INT},
    credited_micro   {INT},
    request_key      TEXT    UNIQUE
);
CREATE INDEX IF NOT EXISTS central_commands_due ON central_commands (state, next_attempt_ms);
CREATE INDEX IF NOT EXISTS central_commands_gateway ON central_commands (gateway_id, seq);
CREATE INDEX IF NOT EXISTS central_commands_account ON central_commands (account, seq);
CREATE INDEX IF NOT EXISTS central_commands_created ON central_commands (type, created_ms);
CREATE TABLE IF NOT EXISTS central_command_log (
    id         {SERIAL},
    command_id TEXT  NOT NULL,
    at_ms      {INT} NOT NULL,
    event      TEXT  NOT NULL,
    detail     TEXT  NOT NULL
);
CREATE INDEX IF NOT EXISTS central_command_log_command ON central_command_log (command_id, id);
CREATE TABLE IF NOT EXISTS central_accounts (
    account_id       TEXT  PRIMARY KEY,
    gateway_id       TEXT  NOT NULL,
    purchase_counter {INT} NOT NULL,
    snapshot_seq     {INT} NOT NULL DEFAULT 0,
    created_ms       {INT} NOT NULL
);
CREATE TABLE IF NOT EXISTS central_issuers (
    issuer  TEXT  PRIMARY KEY,
    counter {INT} NOT NULL
);
CREATE TABLE IF NOT EXISTS central_payments (
    channel         TEXT   NOT NULL,
    idempotency_key TEXT   NOT NULL,
    request_sha256  {BLOB} NOT NULL,
    token_id        TEXT   NOT NULL,
    account         TEXT   NOT NULL,
    amount_micro    {INT}  NOT NULL,
    reference       TEXT,
    received_ms     {INT}  NOT NULL,
    command_id      TEXT   NOT NULL,
    http_status     {INT}  NOT NULL,
    response        TEXT   NOT NULL,
    PRIMARY KEY (channel, idempotency_key)
);
CREATE INDEX IF NOT EXISTS central_payments_received ON central_payments (received_ms);
CREATE TABLE IF NOT EXISTS central_api_tokens (
    token_id      TEXT   PRIMARY KEY,
    name          TEXT   NOT NULL,
    role          TEXT   NOT NULL,
    channel       TEXT,
    secret_sha256 {BLOB} NOT NULL,
    created_ms    {INT}  NOT NULL,
    revoked_ms    {INT}
);
"""

SQLITE_SCHEMA = _TABLES.format(
    SERIAL="INTEGER PRIMARY KEY AUTOINCREMENT", INT="INTEGER", BLOB="BLOB"
)
# The command states for integrators (docs/integration.md, "PostgreSQL views"), as
# ``GET /api/v1/commands`` gives them. Like the headend's ``edgegw_*`` views, columns
# are only ever added at the end.
PG_COMMANDS_VIEW = """
CREATE OR REPLACE VIEW edgegw_commands AS
SELECT command_id, gateway_id, type, state, account, meter, amount_micro, payment_channel, purchase_counter,
       requested_by, role, issuer AS signed_by, created_ms, to_timestamp(created_ms / 1000.0) AS created_at,
       expires_ms, attempts, first_sent_ms, last_sent_ms,
       CASE WHEN state IN ('queued', 'sent') THEN next_attempt_ms END AS next_attempt_ms,
       results, last_result_ms, final_ms, to_timestamp(final_ms / 1000.0) AS final_at, reason, code, message,
       credited_micro, credited_ms, body::jsonb AS body, effect::jsonb AS effect, seq
  FROM central_commands;
COMMENT ON VIEW edgegw_commands IS
  'Central''s commands to the gateways and their delivery states (queued, sent, applied, refused, expired, superseded)';
"""
PG_SCHEMA = (
    _TABLES.format(SERIAL="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", INT="BIGINT", BLOB="BYTEA")
    + PG_COMMANDS_VIEW
)
# Serialises schema creation between processes starting together (PostgreSQL).
PG_SCHEMA_LOCK = 727001

COMMAND_COLS = (
    "seq, command_id, gateway_id, type, role, issuer, counter, body, account, meter,"
    " amount_micro, payment_channel, purchase_counter, requested_by, created_ms, issued_ms,"
    " expires_ms, envelope, state, resign, attempts, first_sent_ms, last_sent_ms,"
    " next_attempt_ms, results, last_result_ms, final_ms, reason, code, message, effect,"
    " credited_ms, credited_micro, request_key"
)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


@dataclass(frozen=True)
class CommandRow:
    seq: int
    command_id: str
    gateway_id: str
    type: str
    role: str
    issuer: str
    counter: int
    body: dict[str, Any]
    account: str | None
    meter: str | None
    amount_micro: int | None
    payment_channel: str | None
    purchase_counter: int | None
    requested_by: str
    created_ms: int
    issued_ms: int
    expires_ms: int
    envelope: bytes
    state: State
    resign: bool
    attempts: int
    first_sent_ms: int | None
    last_sent_ms: int | None
    next_attempt_ms: int
    results: int
    last_result_ms: int | None
    final_ms: int | None
    reason: str | None
    code: str | None
    message: str | None
    effect: dict[str, Any] | None
    credited_ms: int | None
    credited_micro: int | None
    request_key: str | None

    @classmethod
    def of(cls, r: Sequence[Any]) -> CommandRow:
        return cls(
            seq=int(r[0]),
            command_id=str(r[1]),
            gateway_id=str(r[2]),
            type=str(r[3]),
            role=str(r[4]),
            issuer=str(r[5]),
            counter=int(r[6]),
            body=json.loads(r[7]),
            account=_opt_str(r[8]),
            meter=_opt_str(r[9]),
            amount_micro=_opt_int(r[10]),
            payment_channel=_opt_str(r[11]),
            purchase_counter=_opt_int(r[12]),
            requested_by=str(r[13]),
            created_ms=int(r[14]),
            issued_ms=int(r[15]),
            expires_ms=int(r[16]),
            envelope=bytes(r[17]),
            state=State(str(r[18])),
            resign=bool(r[19]),
            attempts=int(r[20]),
            first_sent_ms=_opt_int(r[21]),
            last_sent_ms=_opt_int(r[22]),
            next_attempt_ms=int(r[23]),
            results=int(r[24]),
            last_result_ms=_opt_int(r[25]),
            final_ms=_opt_int(r[26]),
            reason=_opt_str(r[27]),
            code=_opt_str(r[28]),
            message=_opt_str(r[29]),
            effect=None if r[30] is None else json.loads(r[30]),
            credited_ms=_opt_int(r[31]),
            credited_micro=_opt_int(r[32]),
            request_key=_opt_str(r[33]),
        )


@dataclass(frozen=True)
class NewCommand:
    command_id: str
    gateway_id: str
    type: str
    role: str
    issuer: str
    counter: int
    body: Mapping[str, Any]
    requested_by: str
    created_ms: int
    issued_ms: int
    expires_ms: int
    envelope: bytes
    account: str | None = None
    meter: str | None = None
    amount_micro: int | None = None
    payment_channel: str | None = None
    purchase_counter: int | None = None
    request_key: str | None = None


@dataclass(frozen=True)
class AccountRow:
    account_id: str
    gateway_id: str
    purchase_counter: int
    snapshot_seq: int
    created_ms: int


@dataclass(frozen=True)
class PaymentRow:
    channel: str
    idempotency_key: str
    request_sha256: bytes
    token_id: str
    account: str
    amount_micro: int
    reference: str | None
    received_ms: int
    command_id: str
    http_status: int
    response: dict[str, Any]


@dataclass(frozen=True)
class TokenRow:
    token_id: str
    name: str
    role: str
    channel: str | None
    secret_sha256: bytes
    created_ms: int
    revoked_ms: int | None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- results


async def log_step(tx: Tx, command_id: str, at_ms: int, event: str, detail: Mapping[str, Any]) -> None:
    await tx.execute(
        "INSERT INTO central_command_log (command_id, at_ms, event, detail) VALUES (?, ?, ?, ?)",
        (command_id, at_ms, event, _dumps(dict(detail))),
    )


async def _later_relay_applied(tx: Tx, row: CommandRow) -> bool:
    if row.type != "relay.operate" or row.meter is None:
        return False
    found = await tx.one(
        "SELECT 1 FROM central_commands WHERE gateway_id = ? AND type = 'relay.operate'"
        " AND meter = ? AND seq > ? AND state = 'applied'",
        (row.gateway_id, row.meter, row.seq),
    )
    return found is not None


async def _apply_transition(tx: Tx, row: CommandRow, t: Transition, now_ms: int) -> None:
    if t.action is Action.IGNORE or t.state is None:
        return
    final = t.state not in (State.QUEUED, State.SENT)
    if t.action is Action.APPLY:
        await tx.execute(
            "UPDATE central_commands SET state = 'applied', final_ms = ?, reason = NULL,"
            " code = NULL, message = NULL, resign = 0 WHERE seq = ?",
            (now_ms, row.seq),
        )
        if row.type in ("topup", "balance.snapshot") and row.account is not None:
            # a top-up of the account waiting for this one goes out now: a later one
            # behind an applied top-up; any one behind a snapshot, which may move the
            # account's purchase counter past a gap (a top-up refused for good)
            after = row.seq if row.type == "topup" else 0
            await tx.execute(
                "UPDATE central_commands SET next_attempt_ms = ? WHERE account = ?"
                " AND type = 'topup' AND state = 'queued' AND code = 'counter_gap' AND seq > ?",
                (now_ms, row.account, after),
            )
        return
    await tx.execute(
        "UPDATE central_commands SET state = ?, reason = ?, code = ?, message = ?,"
        " resign = ?, final_ms = ?, next_attempt_ms = ? WHERE seq = ?",
        (
            t.state.value,
            t.reason,
            t.code,
            t.message or None,
            1 if t.action is Action.RESIGN else 0,
            now_ms if final else None,
            t.next_attempt_ms if t.next_attempt_ms is not None else row.next_attempt_ms,
            row.seq,
        ),
    )


async def command_row(tx: Tx, command_id: str) -> CommandRow | None:
    r = await tx.one(f"SELECT {COMMAND_COLS} FROM central_commands WHERE command_id = ?", (command_id,))
    return None if r is None else CommandRow.of(r)


async def apply_results_in(
    tx: Tx, gateway_id: str, records: Iterable[Any], now_ms: int
) -> int:
    """Apply the answers among a stored batch's new records to the command queue.

    ``records`` are the batch's records that were new (a duplicate batch
    changes nothing). A ``command_result`` event moves its command
    (:func:`headend.commands.on_result`); a ledger credit of a top-up
    (``charge`` record, entry ``topup:<command id>``) records the amount the
    gateway's ledger credited. Only commands of ``gateway_id`` are touched.
    Runs in the caller's transaction; returns the number of commands changed.
    """
    changed = 0
    for r in records:
        body = r.body
        if r.kind == "charge":
            if isinstance(body, Mapping) and body.get("kind") == "credit":
                eid = body.get("id")
                amount = body.get("amount_micro")
                if isinstance(eid, str) and eid.startswith("topup:") and isinstance(amount, int):
                    n = await tx.execute(
                        "UPDATE central_commands SET credited_ms = ?, credited_micro = ?"
                        " WHERE command_id = ? AND gateway_id = ? AND type = 'topup'"
                        " AND credited_ms IS NULL",
                        (now_ms, amount, eid[len("topup:") :], gateway_id),
                    )
                    changed += n
            continue
        if r.kind != "event":
            continue
        result = parse_result(body)
        if result is None:
            continue
        row = await command_row(tx, result.command_id)
        if row is None or row.gateway_id != gateway_id:
            continue
        t = on_result(
            row.state,
            result,
            command_type=row.type,
            now_ms=now_ms,
            expires_ms=row.expires_ms,
            later_relay_applied=await _later_relay_applied(tx, row),
        )
        await tx.execute(
            "UPDATE central_commands SET results = results + 1, last_result_ms = ? WHERE seq = ?",
            (now_ms, row.seq),
        )
        if result.effect is not None and result.is_applied:
            await tx.execute(
                "UPDATE central_commands SET effect = ? WHERE seq = ?",
                (_dumps(result.effect), row.seq),
            )
        await _apply_transition(tx, row, t, now_ms)
        await log_step(
            tx,
            row.command_id,
            now_ms,
            "result",
            {
                "outcome": result.outcome,
                "reason": result.reason,
                "code": result.code,
                "message": result.message,
                "gateway_at_ms": result.at_ms,
                "channel": result.channel,
                "action": t.action.value,
                "state": (t.state or row.state).value,
            },
        )
        changed += 1
    return changed


# --------------------------------------------------------------------------- the store


class CentralDB:
    """The central tables on a connection of their own (SQLite or PostgreSQL)."""

    def __init__(self, tx: Tx, close: Any, begin: Any) -> None:
        self._tx = tx
        self._close = close
        self._begin = begin
        self._lock = asyncio.Lock()

    @property
    def postgres(self) -> bool:
        return self._tx.postgres

    @classmethod
    async def open_sqlite(cls, path: str | Path) -> CentralDB:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA busy_timeout=10000")
        await conn.executescript(SQLITE_SCHEMA)

        @contextlib.asynccontextmanager
        async def begin(readonly: bool = False) -> AsyncIterator[None]:
            # a reader does not take the write lock (WAL: it sees the last commit)
            await begin_sqlite(conn, "BEGIN" if readonly else "BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

        return cls(SqliteTx(conn), conn.close, begin)

    @classmethod
    async def open_postgres(cls, dsn: str) -> CentralDB:
        # psycopg is an optional dependency (the ``postgres`` extra): imported only here.
        import psycopg

        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=False)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_SCHEMA_LOCK,))
            await conn.execute(PG_SCHEMA)
        def begin(readonly: bool = False) -> Any:
            return conn.transaction()

        return cls(PgTx(conn), conn.close, begin)

    @classmethod
    async def open(cls, *, db: str | Path | None = None, dsn: str | None = None) -> CentralDB:
        if dsn:
            return await cls.open_postgres(dsn)
        if db is None:
            raise ValueError("no database: give a SQLite file or a PostgreSQL DSN")
        return await cls.open_sqlite(db)

    async def close(self) -> None:
        await self._close()

    @contextlib.asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[Tx]:
        """One transaction at a time on this connection; committed at the end,
        rolled back on any exception. ``readonly``: only reads (SQLite then takes
        no write lock, so readers never wait for the ingest's writes)."""
        async with self._lock:
            async with self._begin(readonly):
                yield self._tx

    # -- counters -----------------------------------------------------------

    @staticmethod
    async def next_counter(tx: Tx, issuer: str, now_ms: int) -> int:
        """The issuer's next counter: above every one it used, and at least
        ``now_ms`` × 1000, so a database restored from an old copy still never
        repeats one (the gateway would refuse it as stale)."""
        floor = now_ms * 1000
        row = await tx.one(
            "UPDATE central_issuers SET counter = CASE WHEN counter + 1 > ? THEN counter + 1"
            " ELSE ? END WHERE issuer = ? RETURNING counter",
            (floor, floor, issuer),
        )
        if row is not None:
            return int(row[0])
        await tx.execute(
            "INSERT INTO central_issuers (issuer, counter) VALUES (?, ?)", (issuer, floor)
        )
        return floor

    # -- accounts -----------------------------------------------------------

    @staticmethod
    async def account(tx: Tx, account_id: str) -> AccountRow | None:
        r = await tx.one(
            "SELECT account_id, gateway_id, purchase_counter, snapshot_seq, created_ms"
            " FROM central_accounts WHERE account_id = ?",
            (account_id,),
        )
        return None if r is None else AccountRow(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]))

    @staticmethod
    async def accounts(tx: Tx, gateway_id: str | None = None) -> list[AccountRow]:
        where, args = ("WHERE gateway_id = ?", (gateway_id,)) if gateway_id else ("", ())
        rows = await tx.all(
            "SELECT account_id, gateway_id, purchase_counter, snapshot_seq, created_ms"
            f" FROM central_accounts {where} ORDER BY account_id",
            args,
        )
        return [AccountRow(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]

    @staticmethod
    async def add_account(
        tx: Tx, account_id: str, gateway_id: str, purchase_counter: int, now_ms: int
    ) -> bool:
        """False if the account exists already (nothing changes)."""
        n = await tx.execute(
            "INSERT INTO central_accounts (account_id, gateway_id, purchase_counter, created_ms)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (account_id) DO NOTHING",
            (account_id, gateway_id, purchase_counter, now_ms),
        )
        return n > 0

    @staticmethod
    async def next_purchase_counter(tx: Tx, account_id: str) -> int | None:
        """The account's next purchase counter, taken for good (None: no such account)."""
        row = await tx.one(
            "UPDATE central_accounts SET purchase_counter = purchase_counter + 1"
            " WHERE account_id = ? RETURNING purchase_counter",
            (account_id,),
        )
        return None if row is None else int(row[0])

    @staticmethod
    async def next_snapshot_seq(tx: Tx, account_id: str) -> int | None:
        row = await tx.one(
            "UPDATE central_accounts SET snapshot_seq = snapshot_seq + 1"
            " WHERE account_id = ? RETURNING snapshot_seq",
            (account_id,),
        )
        return None if row is None else int(row[0])

    # -- commands -----------------------------------------------------------

    @staticmethod
    async def insert_command(tx: Tx, c: NewCommand) -> None:
        await tx.execute(
            "INSERT INTO central_commands (command_id, gateway_id, type, role, issuer, counter,"
            " body, account, meter, amount_micro, payment_channel, purchase_counter,"
            " requested_by, created_ms, issued_ms, expires_ms, envelope, state,"
            " next_attempt_ms, request_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, 'queued', ?, ?)",
            (
                c.command_id,
                c.gateway_id,
                c.type,
                c.role,
                c.issuer,
                c.counter,
                _dumps(dict(c.body)),
                c.account,
                c.meter,
                c.amount_micro,
                c.payment_channel,
                c.purchase_counter,
                c.requested_by,
                c.created_ms,
                c.issued_ms,
                c.expires_ms,
                c.envelope,
                c.created_ms,
                c.request_key,
            ),
        )
        await log_step(
            tx,
            c.command_id,
            c.created_ms,
            "created",
            {"by": c.requested_by, "issuer": c.issuer, "counter": c.counter, "expires_ms": c.expires_ms},
        )

    @staticmethod
    async def command(tx: Tx, command_id: str) -> CommandRow | None:
        return await command_row(tx, command_id)

    @staticmethod
    async def by_request(tx: Tx, request_key: str) -> CommandRow | None:
        """The command a request (e.g. a console form) made, if it made one. On
        PostgreSQL the key is locked for the transaction first, so a request
        resubmitted at once to another process waits here, then finds it."""
        if tx.postgres:
            await tx.one("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (request_key,))
        r = await tx.one(
            f"SELECT {COMMAND_COLS} FROM central_commands WHERE request_key = ?", (request_key,)
        )
        return None if r is None else CommandRow.of(r)

    @staticmethod
    async def commands(
        tx: Tx,
        *,
        gateway_id: str | None = None,
        account: str | None = None,
        state: str | None = None,
        type: str | None = None,
        limit: int = 100,
        before_seq: int | None = None,
    ) -> list[CommandRow]:
        """Newest first."""
        where: list[str] = []
        args: list[Any] = []
        for col, v in (("gateway_id", gateway_id), ("account", account), ("state", state), ("type", type)):
            if v is not None:
                where.append(f"{col} = ?")
                args.append(v)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = f"SELECT {COMMAND_COLS} FROM central_commands"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(max(1, min(limit, 1000)))
        return [CommandRow.of(r) for r in await tx.all(sql, args)]

    @staticmethod
    async def log(tx: Tx, command_id: str) -> list[dict[str, Any]]:
        rows = await tx.all(
            "SELECT at_ms, event, detail FROM central_command_log WHERE command_id = ? ORDER BY id",
            (command_id,),
        )
        return [{"at_ms": int(r[0]), "event": str(r[1]), **json.loads(r[2])} for r in rows]

    @staticmethod
    async def due(tx: Tx, now_ms: int, limit: int) -> list[CommandRow]:
        """Open commands whose next attempt is due, in queue order (PostgreSQL: locked
        for this transaction, skipping those another dispatcher holds)."""
        sql = (
            f"SELECT {COMMAND_COLS} FROM central_commands WHERE state IN ('queued', 'sent')"
            " AND next_attempt_ms <= ? ORDER BY seq LIMIT ?"
        )
        if tx.postgres:
            sql += " FOR UPDATE SKIP LOCKED"
        return [CommandRow.of(r) for r in await tx.all(sql, (now_ms, limit))]

    @staticmethod
    async def claim_gateways(tx: Tx, gateways: Iterable[str]) -> set[str]:
        """The gateways this transaction may send commands to: on PostgreSQL those no
        other dispatcher is sending to at this moment, each held by a transaction-level
        advisory lock until this transaction ends (another dispatcher's pass skips
        them, so that the in-flight window and the queue order hold per gateway
        however many dispatchers share the database); SQLite has one writer: all."""
        gws = sorted(set(gateways))
        if not tx.postgres:
            return set(gws)
        mine: set[str] = set()
        for g in gws:
            row = await tx.one("SELECT pg_try_advisory_xact_lock(?, hashtext(?))", (DISPATCH_LOCK_CLASS, g))
            if row is not None and row[0]:
                mine.add(g)
        return mine

    @staticmethod
    async def in_flight(tx: Tx, gateways: Iterable[str]) -> dict[str, int]:
        gws = sorted(set(gateways))
        if not gws:
            return {}
        marks = ", ".join("?" * len(gws))
        rows = await tx.all(
            f"SELECT gateway_id, count(*) FROM central_commands WHERE state = 'sent'"
            f" AND gateway_id IN ({marks}) GROUP BY gateway_id",
            gws,
        )
        return {str(g): int(n) for g, n in rows}

    @staticmethod
    async def mark_sent(tx: Tx, row: CommandRow, now_ms: int, next_attempt_ms: int) -> None:
        await tx.execute(
            "UPDATE central_commands SET state = 'sent', attempts = attempts + 1,"
            " first_sent_ms = COALESCE(first_sent_ms, ?), last_sent_ms = ?, next_attempt_ms = ?"
            " WHERE seq = ? AND state IN ('queued', 'sent')",
            (now_ms, now_ms, next_attempt_ms, row.seq),
        )
        await log_step(
            tx, row.command_id, now_ms, "sent" if row.attempts == 0 else "resent",
            {"attempt": row.attempts + 1, "counter": row.counter},
        )  # fmt: skip

    @staticmethod
    async def unsend(tx: Tx, command_id: str, now_ms: int, error: str, first: bool) -> None:
        """A publish that failed: due again at once (it may or may not have reached
        the broker; the gateway takes it once either way). A first send that failed
        is queued again, so it goes out even while the gateway is offline."""
        await tx.execute(
            "UPDATE central_commands SET next_attempt_ms = ?,"
            " state = CASE WHEN ? = 1 THEN 'queued' ELSE state END"
            " WHERE command_id = ? AND state IN ('queued', 'sent')",
            (now_ms, 1 if first else 0, command_id),
        )
        await log_step(tx, command_id, now_ms, "publish_failed", {"error": error[:200]})

    @staticmethod
    async def mark_expired(tx: Tx, row: CommandRow, now_ms: int) -> None:
        await tx.execute(
            "UPDATE central_commands SET state = 'expired', reason = 'expired', code = NULL,"
            " message = ?, final_ms = ?, resign = 0 WHERE seq = ? AND state IN ('queued', 'sent')",
            (f"expired at {row.expires_ms} before the gateway applied it", now_ms, row.seq),
        )
        await log_step(tx, row.command_id, now_ms, "expired", {"expires_ms": row.expires_ms})

    @staticmethod
    async def resigned(
        tx: Tx, row: CommandRow, issuer: str, counter: int, issued_ms: int, envelope: bytes, now_ms: int
    ) -> None:
        await tx.execute(
            "UPDATE central_commands SET issuer = ?, counter = ?, issued_ms = ?, envelope = ?,"
            " resign = 0 WHERE seq = ?",
            (issuer, counter, issued_ms, envelope, row.seq),
        )
        await log_step(
            tx, row.command_id, now_ms, "resigned",
            {"issuer": issuer, "counter": counter, "previous_counter": row.counter, "because": row.reason},
        )  # fmt: skip

    @staticmethod
    async def hold(tx: Tx, row: CommandRow, now_ms: int, until_ms: int, why: str) -> None:
        """Keep a command back (e.g. no key to re-sign it with) and say why."""
        await tx.execute(
            "UPDATE central_commands SET next_attempt_ms = ?, message = ? WHERE seq = ?",
            (until_ms, why, row.seq),
        )
        await log_step(tx, row.command_id, now_ms, "held", {"why": why, "until_ms": until_ms})

    # -- payments -----------------------------------------------------------

    @staticmethod
    async def payment(tx: Tx, channel: str, key: str) -> PaymentRow | None:
        r = await tx.one(
            "SELECT channel, idempotency_key, request_sha256, token_id, account, amount_micro,"
            " reference, received_ms, command_id, http_status, response FROM central_payments"
            " WHERE channel = ? AND idempotency_key = ?",
            (channel, key),
        )
        if r is None:
            return None
        return PaymentRow(
            str(r[0]), str(r[1]), bytes(r[2]), str(r[3]), str(r[4]), int(r[5]),
            _opt_str(r[6]), int(r[7]), str(r[8]), int(r[9]), json.loads(r[10]),
        )  # fmt: skip

    @staticmethod
    async def insert_payment(tx: Tx, p: PaymentRow) -> bool:
        """False if (channel, key) is taken (by a concurrent request)."""
        n = await tx.execute(
            "INSERT INTO central_payments (channel, idempotency_key, request_sha256, token_id,"
            " account, amount_micro, reference, received_ms, command_id, http_status, response)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (channel, idempotency_key)"
            " DO NOTHING",
            (
                p.channel, p.idempotency_key, p.request_sha256, p.token_id, p.account,
                p.amount_micro, p.reference, p.received_ms, p.command_id, p.http_status,
                _dumps(p.response),
            ),
        )  # fmt: skip
        return n > 0

    @staticmethod
    async def topups_between(tx: Tx, start_ms: int, end_ms: int) -> list[tuple[Any, ...]]:
        """(payment channel, state, amount, credited amount, via payment API) of every
        top-up created in [start, end)."""
        return await tx.all(
            "SELECT c.payment_channel, c.state, c.amount_micro, c.credited_micro,"
            " CASE WHEN p.command_id IS NULL THEN 0 ELSE 1 END"
            " FROM central_commands c LEFT JOIN central_payments p ON p.command_id = c.command_id"
            " WHERE c.type = 'topup' AND c.created_ms >= ? AND c.created_ms < ?",
            (start_ms, end_ms),
        )

    # -- API tokens ---------------------------------------------------------

    @staticmethod
    async def insert_token(tx: Tx, t: TokenRow) -> None:
        await tx.execute(
            "INSERT INTO central_api_tokens (token_id, name, role, channel, secret_sha256,"
            " created_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (t.token_id, t.name, t.role, t.channel, t.secret_sha256, t.created_ms),
        )

    @staticmethod
    async def token(tx: Tx, token_id: str) -> TokenRow | None:
        r = await tx.one(
            "SELECT token_id, name, role, channel, secret_sha256, created_ms, revoked_ms"
            " FROM central_api_tokens WHERE token_id = ?",
            (token_id,),
        )
        if r is None:
            return None
        return TokenRow(str(r[0]), str(r[1]), str(r[2]), _opt_str(r[3]), bytes(r[4]), int(r[5]), _opt_int(r[6]))

    @staticmethod
    async def tokens(tx: Tx) -> list[TokenRow]:
        rows = await tx.all(
            "SELECT token_id, name, role, channel, secret_sha256, created_ms, revoked_ms"
            " FROM central_api_tokens ORDER BY created_ms, token_id"
        )
        return [
            TokenRow(str(r[0]), str(r[1]), str(r[2]), _opt_str(r[3]), bytes(r[4]), int(r[5]), _opt_int(r[6]))
            for r in rows
        ]

    @staticmethod
    async def revoke_token(tx: Tx, token_id: str, now_ms: int) -> bool:
        n = await tx.execute(
            "UPDATE central_api_tokens SET revoked_ms = ? WHERE token_id = ? AND revoked_ms IS NULL",
            (now_ms, token_id),
        )
        return n > 0
