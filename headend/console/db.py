"""The console's connection to the headend database (SQLite or PostgreSQL).

The console reads what the ingest stored (batches, readings, events and,
where present, the fleet tables) and keeps its own users and sessions in the
same database, so one backup holds everything and several headend processes
sharing a PostgreSQL database share their users and sessions too. It uses a
connection of its own: SQLite in WAL mode lets it read while the ingest's
single writer commits; its own writes (a login, a logout, a session seen
again) are rare and wait for the writer's lock (``busy_timeout``).

SQL is written once with ``?`` placeholders; :class:`ConsoleDb` turns them
into ``%s`` for PostgreSQL. :meth:`ConsoleDb.jtext` spells "the text of key
``k`` of a JSON column" in each dialect, in exactly the form the stores'
expression indexes use (:mod:`headend.store`, :mod:`headend.store_pg`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

Row = tuple[Any, ...]

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS console_users (
    username      TEXT PRIMARY KEY,
    role          TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    created_ms    INTEGER NOT NULL,
    changed_ms    INTEGER NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS console_sessions (
    id_hash    TEXT PRIMARY KEY,   -- SHA-256 of the cookie's value: a copy of the table opens no session
    username   TEXT    NOT NULL,
    csrf       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    seen_ms    INTEGER NOT NULL,
    remote     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS console_sessions_user ON console_sessions (username);
CREATE TABLE IF NOT EXISTS console_login_failures (
    key     TEXT    NOT NULL,      -- 'user:NAME' or 'ip:ADDRESS'
    time_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS console_login_failures_key ON console_login_failures (key, time_ms);
"""

PG_SCHEMA = SQLITE_SCHEMA.replace("INTEGER", "BIGINT")


def json_obj(value: Any) -> dict[str, Any]:
    """A JSON column's value as a dict (SQLite keeps text, PostgreSQL JSONB a dict)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (str, bytes, bytearray)):
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return {}
        return doc if isinstance(doc, dict) else {}
    return {}


class ConsoleDb:
    """One connection to the headend database, used by one console."""

    dialect: str

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; the rows it changed."""
        raise NotImplementedError

    async def has_table(self, name: str) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def jtext(self, column: str, key: str) -> str:
        raise NotImplementedError

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, args)
        return rows[0] if rows else None


class SqliteConsoleDb(ConsoleDb):
    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: str | Path) -> SqliteConsoleDb:
        # The headend store first: it creates or migrates the ingest's tables.
        from headend.store import HeadendDB

        await (await HeadendDB.open(path)).close()
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.executescript(SQLITE_SCHEMA)
        return cls(conn)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._conn.execute(sql, tuple(args)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self._conn.execute(sql, tuple(args))
        n = cur.rowcount
        await cur.close()
        return int(n)

    async def has_table(self, name: str) -> bool:
        row = await self.fetchone("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return row is not None

    async def close(self) -> None:
        await self._conn.close()

    def jtext(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"


class PostgresConsoleDb(ConsoleDb):
    dialect = "postgres"

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()  # one connection: one statement at a time

    @classmethod
    async def open(cls, dsn: str) -> PostgresConsoleDb:
        import psycopg

        from headend.store_pg import PostgresHeadendDB

        await (await PostgresHeadendDB.open(dsn)).close()
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(727002)")
            await conn.execute(PG_SCHEMA)
        return cls(conn)

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._lock:
            cur = await self._conn.execute(self._sql(sql), tuple(args) or None)
            return [tuple(r) for r in await cur.fetchall()]

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._lock:
            cur = await self._conn.execute(self._sql(sql), tuple(args) or None)
            return int(cur.rowcount)

    async def has_table(self, name: str) -> bool:
        row = await self.fetchone("SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(row and row[0])

    async def close(self) -> None:
        await self._conn.close()

    def jtext(self, column: str, key: str) -> str:
        return f"({column}->>'{key}')"


async def open_console_db(db: str | Path | None = None, dsn: str | None = None) -> ConsoleDb:
    """The console's connection: PostgreSQL at ``dsn``, else the SQLite file ``db``."""
    if dsn:
        return await PostgresConsoleDb.open(dsn)
    if db is None:
        raise ValueError("no database: give a SQLite file or a PostgreSQL DSN")
    return await SqliteConsoleDb.open(db)
