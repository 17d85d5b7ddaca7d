"""One way to run SQL on either of the headend's databases (SQLite, PostgreSQL).

The central tables (:mod:`headend.central_db`) are written once, with ``?``
placeholders; :class:`Tx` runs them on an aiosqlite connection or (with the
placeholders rewritten to ``%s``) on a psycopg one, inside a transaction the
caller owns. The statements use only what both dialects share (``ON
CONFLICT``, ``RETURNING``); where they differ the caller asks
:attr:`Tx.postgres`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

import aiosqlite

log = logging.getLogger(__name__)

Row = tuple[Any, ...]

_PLACEHOLDER = re.compile(r"\?")


def to_pg(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (the statements hold no ``?`` or ``%``
    of their own)."""
    if "%" in sql:
        raise ValueError("statement holds a '%', which psycopg would read as a placeholder")
    return _PLACEHOLDER.sub("%s", sql)


async def begin_sqlite(conn: aiosqlite.Connection, statement: str = "BEGIN IMMEDIATE") -> None:
    """Begin a transaction on ``conn``, safely for a task that is cancelled meanwhile.

    aiosqlite runs each statement on the connection's own thread: a task
    cancelled while it awaits ``BEGIN`` leaves that statement to run anyway,
    and the connection inside a transaction nobody ends (every later
    ``BEGIN`` then fails). So a cancelled ``BEGIN`` is followed by a rollback
    on the same thread before the cancellation goes on, and a transaction
    found open at the start (left by anything else) is rolled back first.
    """
    if conn.in_transaction:
        log.warning("a transaction was left open on the connection; rolled back")
        await conn.rollback()
    try:
        await conn.execute(statement)
    except asyncio.CancelledError:
        await conn.rollback()  # queued behind the BEGIN: runs after it
        raise


class Tx(Protocol):
    """A connection inside a transaction the caller owns."""

    @property
    def postgres(self) -> bool: ...

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...


class SqliteTx:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    @property
    def postgres(self) -> bool:
        return False

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self.conn.execute(sql, tuple(args))
        n = cur.rowcount
        await cur.close()
        return int(n)

    # Statements that return rows run to their end in one call on aiosqlite's thread
    # (execute_fetchall): a task cancelled meanwhile cannot leave a half-read cursor,
    # whose unfinished statement (an UPDATE ... RETURNING) would block the next COMMIT.

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = list(await self.conn.execute_fetchall(sql, tuple(args)))
        return tuple(rows[0]) if rows else None

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self.conn.execute_fetchall(sql, tuple(args))]


class PgTx:
    """On a ``psycopg.AsyncConnection`` (typed loosely: psycopg is optional)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @property
    def postgres(self) -> bool:
        return True

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self.conn.execute(to_pg(sql), tuple(args))
        return int(cur.rowcount)

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        cur = await self.conn.execute(to_pg(sql), tuple(args))
        row = await cur.fetchone()
        return None if row is None else tuple(row)

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        cur = await self.conn.execute(to_pg(sql), tuple(args))
        return [tuple(r) for r in await cur.fetchall()]
