"""Several statements on the writer connection in one trip to its thread.

aiosqlite runs every call on the connection's own thread: each ``execute`` is a
hand-over to that thread and a wake-up of the event loop when it is done. A
transaction of the outbox is a dozen statements, most of whose results nobody
reads, so statements that follow each other in one function go together:
:func:`run` executes them in order, on the connection's thread, in one call,
and returns each one's rows. They run inside the caller's transaction; the
first that fails raises there (the statements after it are not run), as if
they had been awaited one by one.

This reaches into aiosqlite for the two things its public API does not offer:
the call that runs a function on the connection's thread (``_execute``, which
every public method is built on) and the ``sqlite3`` connection itself
(``_conn``), used on that thread only. ``tests/store_forward/test_sqlbatch.py``
holds both to what this module expects of them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite


@dataclass(frozen=True, slots=True)
class Statement:
    """``sql`` with its parameters; ``many``: ``params`` is a sequence of parameter
    sets (``executemany``, no rows returned)."""

    sql: str
    params: Sequence[Any] | Iterable[Sequence[Any]] = ()
    many: bool = False


def _run_all(conn: sqlite3.Connection, statements: Sequence[Statement]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for st in statements:
        if st.many:
            conn.executemany(st.sql, st.params)
            out.append([])
        else:
            cur = conn.execute(st.sql, st.params)  # type: ignore[arg-type]
            try:
                out.append(cur.fetchall())
            finally:
                cur.close()
    return out


async def run(db: aiosqlite.Connection, statements: Sequence[Statement]) -> list[list[Any]]:
    """Execute ``statements`` in order in one call on ``db``'s thread; the rows of
    each (an empty list for statements that return none)."""
    if not statements:
        return []
    conn = db._conn  # (see the module documentation)
    result: list[list[Any]] = await db._execute(_run_all, conn, list(statements))
    return result
