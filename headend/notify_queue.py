"""The durable notice queue (``notify_queue``), as the notifier reads and updates it.

The stores insert rows in the transaction of the batch whose events made them
(:func:`headend.notices.statements`); this module is the other side: it owns a
connection of its own to the same database (the SQLite file, or PostgreSQL)
and moves rows through their states:

``pending`` → ``sent`` | ``superseded`` | ``cleared`` | ``expired`` |
``unaddressed`` | ``failed``

A send is recorded *before* the request goes out (``attempts`` + 1 and
``next_attempt_ms`` one lease ahead, committed), so a headend that dies
while posting tries the row again after the lease, and never more often than
``max_attempts``. A row is ``sent`` once the webhook answered 2xx; a crash
between that answer and the commit sends it again, with the same ``id``
(at least once: the receiver drops repeats by the ``Idempotency-Key``).

With PostgreSQL several headends may run a notifier: one holds a session
advisory lock (:data:`PG_LEADER_LOCK`) and sends; the others wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import orjson

from headend.notices import NoticeKind, Queued, SentBefore

PG_LEADER_LOCK = 727_003

STATES = ("pending", "sent", "superseded", "cleared", "expired", "unaddressed", "failed")


@dataclass(frozen=True)
class Row:
    id: int
    notice_id: str
    gateway: str
    account: str
    kind: NoticeKind
    event_type: str
    event_ms: int
    facts: dict[str, Any]
    attempts: int
    next_attempt_ms: int

    def queued(self) -> Queued:
        return Queued(self.id, self.notice_id, self.kind, self.event_ms, self.attempts, self.next_attempt_ms)


_ROW = (
    "id, notice_id, gateway_id, account, kind, event_type, event_ms, facts, attempts, next_attempt_ms"
)


def _row(r: Sequence[Any]) -> Row:
    return Row(int(r[0]), str(r[1]), str(r[2]), str(r[3]), NoticeKind(r[4]), str(r[5]), int(r[6]),
               orjson.loads(r[7]), int(r[8]), int(r[9]))  # fmt: skip


class _Sql(Protocol):
    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int: ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    async def close(self) -> None: ...


class _Sqlite:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self.lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self.db.rollback()
                raise
            await self.db.commit()

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self.db.execute(sql, tuple(args))
        return int(cur.rowcount)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.db.execute(sql, tuple(args)) as cur:
            return [tuple(r) async for r in cur]

    async def close(self) -> None:
        await self.db.close()


class _Pg:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self.lock, self.conn.transaction():
            yield

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self.conn.execute(sql.replace("?", "%s"), tuple(args))
        return int(cur.rowcount)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # autocommit: outside transaction() every statement is its own transaction
        cur = await self.conn.execute(sql.replace("?", "%s"), tuple(args))
        return [tuple(r) for r in await cur.fetchall()]

    async def close(self) -> None:
        await self.conn.close()


class NotifyQueue:
    """The queue's rows on one connection of the notifier's own."""

    def __init__(self, sql: _Sql, *, postgres: bool, where: str = "") -> None:
        self._sql = sql
        self.postgres = postgres
        self._where = where  # the file or DSN, to connect again

    @classmethod
    async def open_sqlite(cls, path: str | Path) -> NotifyQueue:
        """The queue in the headend's SQLite file (the store must have made its tables)."""
        db = await aiosqlite.connect(str(path), isolation_level=None)
        await db.execute("PRAGMA busy_timeout=10000")
        await db.execute("PRAGMA synchronous=FULL")
        return cls(_Sqlite(db), postgres=False, where=str(path))

    @classmethod
    async def open_postgres(cls, dsn: str) -> NotifyQueue:
        import psycopg  # the postgres extra: only where a DSN is given

        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        return cls(_Pg(conn), postgres=True, where=dsn)

    async def close(self) -> None:
        await self._sql.close()

    async def reconnect(self) -> None:
        """A new connection after the database went away (a PostgreSQL restart): the
        leader lock, if held, went with the old one."""
        with contextlib.suppress(Exception):
            await self._sql.close()
        fresh = await (NotifyQueue.open_postgres(self._where) if self.postgres else NotifyQueue.open_sqlite(self._where))
        self._sql = fresh._sql

    async def lead(self) -> bool:
        """Whether this notifier may send (always with SQLite; with PostgreSQL, while
        it holds the leader lock: taken here if free, kept for the session)."""
        if not self.postgres:
            return True
        rows = await self._sql.fetch("SELECT pg_try_advisory_lock(?)", (PG_LEADER_LOCK,))
        return bool(rows and rows[0][0])

    async def due_accounts(self, now_ms: int, limit: int = 200) -> list[str]:
        rows = await self._sql.fetch(
            "SELECT account FROM notify_queue WHERE state = 'pending' AND next_attempt_ms <= ?"
            " GROUP BY account ORDER BY min(id) LIMIT ?",
            (now_ms, limit),
        )
        return [str(r[0]) for r in rows]

    async def next_due_ms(self) -> int | None:
        rows = await self._sql.fetch("SELECT min(next_attempt_ms) FROM notify_queue WHERE state = 'pending'")
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    async def pending(self, account: str) -> list[Row]:
        rows = await self._sql.fetch(
            f"SELECT {_ROW} FROM notify_queue WHERE state = 'pending' AND account = ? ORDER BY id", (account,)
        )
        return [_row(r) for r in rows]

    async def sent_since(self, account: str, since_ms: int) -> list[SentBefore]:
        rows = await self._sql.fetch(
            "SELECT sent_ms, kind FROM notify_queue WHERE account = ? AND state = 'sent' AND sent_ms > ?",
            (account, since_ms),
        )
        return [SentBefore(int(t), NoticeKind(k).urgent) for t, k in rows]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[NotifyQueue]:
        async with self._sql.transaction():
            yield self

    # -- inside transaction() -----------------------------------------------------

    async def finish(self, notice_id: str, state: str, now_ms: int, detail: str = "",
                     http_status: int | None = None) -> bool:  # fmt: skip
        """A final state for a pending row (False: it was no longer pending)."""
        assert state in STATES and state != "pending"
        n = await self._sql.execute(
            "UPDATE notify_queue SET state = ?, decided_ms = ?, detail = ?,"
            " http_status = COALESCE(?, http_status),"
            " sent_ms = CASE WHEN ? = 'sent' THEN ? ELSE sent_ms END"
            " WHERE notice_id = ? AND state = 'pending'",
            (state, now_ms, detail[:500], http_status, state, now_ms, notice_id),
        )
        return n == 1

    async def wait(self, notice_id: str, until_ms: int, detail: str) -> None:
        await self._sql.execute(
            "UPDATE notify_queue SET next_attempt_ms = ?, detail = ? WHERE notice_id = ? AND state = 'pending'",
            (until_ms, detail[:500], notice_id),
        )

    async def attempt(self, notice_id: str, lease_until_ms: int, recipient: str, language: str,
                      text: str) -> int:  # fmt: skip
        """Record an attempt about to be made; returns its number."""
        await self._sql.execute(
            "UPDATE notify_queue SET attempts = attempts + 1, next_attempt_ms = ?, recipient = ?,"
            " language = ?, text = ? WHERE notice_id = ? AND state = 'pending'",
            (lease_until_ms, recipient, language, text, notice_id),
        )
        rows = await self._sql.fetch("SELECT attempts FROM notify_queue WHERE notice_id = ?", (notice_id,))
        return int(rows[0][0])

    async def retry(self, notice_id: str, at_ms: int, detail: str, http_status: int | None) -> None:
        await self._sql.execute(
            "UPDATE notify_queue SET next_attempt_ms = ?, detail = ?, http_status = ?"
            " WHERE notice_id = ? AND state = 'pending'",
            (at_ms, detail[:500], http_status, notice_id),
        )

    # -- reading ------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        rows = await self._sql.fetch("SELECT state, count(*) FROM notify_queue GROUP BY state")
        return {str(s): int(n) for s, n in rows}

    async def rows(self, account: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where, args = ("WHERE account = ?", (account,)) if account else ("", ())
        rows = await self._sql.fetch(
            "SELECT notice_id, gateway_id, account, kind, event_ms, state, attempts, sent_ms, recipient,"
            f" language, text, http_status, detail FROM notify_queue {where} ORDER BY id LIMIT ?",
            (*args, limit),
        )
        keys = ("notice_id", "gateway", "account", "kind", "event_ms", "state", "attempts", "sent_ms",
                "recipient", "language", "text", "http_status", "detail")  # fmt: skip
        return [dict(zip(keys, r, strict=True)) for r in rows]
