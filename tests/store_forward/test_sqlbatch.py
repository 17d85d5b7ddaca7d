"""Statements in one trip to the connection's thread: in order, in the caller's
transaction, rows returned, the first failure raised and the rest not run."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from store_forward.sqlbatch import Statement, run


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    async with aiosqlite.connect(tmp_path / "t.db", isolation_level=None) as c:
        await c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        yield c


async def test_in_order_with_rows(conn: aiosqlite.Connection) -> None:
    await conn.execute("BEGIN IMMEDIATE")
    out = await run(conn, [
        Statement("INSERT INTO t (k, v) VALUES (?, ?)", [(1, "a"), (2, "b")], many=True),
        Statement("SELECT k, v FROM t ORDER BY k"),
        Statement("UPDATE t SET v = ? WHERE k = ?", ("c", 2)),
        Statement("SELECT count(*) FROM t WHERE v = 'c'"),
    ])  # fmt: skip
    await conn.commit()
    assert [list(map(tuple, rows)) for rows in out] == [[], [(1, "a"), (2, "b")], [], [(1,)]]
    assert await run(conn, []) == []


async def test_runs_on_the_connection_thread(conn: aiosqlite.Connection) -> None:
    seen: list[str] = []
    await conn.create_function("whoami", 0, lambda: seen.append(threading.current_thread().name) or 1)
    await conn.execute_fetchall("SELECT whoami()")
    await run(conn, [Statement("SELECT whoami()")])
    assert len(seen) == 2 and seen[0] == seen[1] != threading.current_thread().name


async def test_first_failure_raises_and_the_rest_is_not_run(conn: aiosqlite.Connection) -> None:
    await conn.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.IntegrityError):
        await run(conn, [
            Statement("INSERT INTO t (k, v) VALUES (1, 'a')"),
            Statement("INSERT INTO t (k, v) VALUES (1, 'again')"),
            Statement("INSERT INTO t (k, v) VALUES (2, 'b')"),
        ])  # fmt: skip
    assert [tuple(r) for r in await conn.execute_fetchall("SELECT k, v FROM t")] == [(1, "a")]
    await conn.rollback()
    assert list(await conn.execute_fetchall("SELECT k FROM t")) == []
