"""One way to run SQL on either of the headend's databases (SQLite, PostgreSQL).

The central tables (:mod:`headend.central_db`) are written once, with ``?``
placeholders; :class:`Tx` runs them on an aiosqlite connection or (with the
placeholders rewritten to ``%s``) on a psycopg one, inside a transaction the
caller owns. The statements use only what both dialects share (``ON
CONFLICT``, ``RETURNING``); where they differ the caller asks
:attr:`Tx.postgres`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import aiosqlite

Row = tuple[Any, ...]

_PLACEHOLDER = re.compile(r"\?")


def to_pg(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (the statements hold no ``?`` or ``%``
    of their own)."""
    if "%" in sql:
        raise ValueError("statement holds a '%', which psycopg would read as a placeholder")
    return _PLACEHOLDER.sub("%s", sql)


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

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self.conn.execute(sql, tuple(args)) as cur:
            row = await cur.fetchone()
        return None if row is None else tuple(row)

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self.conn.execute(sql, tuple(args)) as cur:
            return [tuple(r) for r in await cur.fetchall()]


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
