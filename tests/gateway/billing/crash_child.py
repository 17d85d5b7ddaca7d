"""Child process for the crash-consistency test: a minimal daemon loop.

Per cycle, in ONE transaction: store a reading, rate it, append the debit,
then commit. On start it resumes after the last committed reading and
re-delivers that reading once (as a restarted poller would).

    python -m tests.gateway.billing.crash_child DB N
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal

import aiosqlite

from gateway.billing import ledger_store
from gateway.billing.rating import RegisterReading
from gateway.billing.tariff import TariffBook
from tests.gateway.billing._util import FLAT, book

T0 = 1_772_400_000_000  # 2026-03-02 around 05:20 local
ACCOUNT = "acc-1"


def reading(i: int) -> RegisterReading:
    return RegisterReading(f"r{i:05d}", "m1", T0 + i * 60_000, Decimal(i * 37) / 100)


async def run(db: str, n: int, tariffs: TariffBook) -> None:
    async with aiosqlite.connect(db) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("BEGIN IMMEDIATE")
        await ledger_store.init_schema(conn)
        await conn.execute("CREATE TABLE IF NOT EXISTS reading (id TEXT PRIMARY KEY, i INTEGER NOT NULL)")
        await conn.commit()
        async with conn.execute("SELECT COALESCE(MAX(i), 0) FROM reading") as cur:
            row = await cur.fetchone()
        start = row[0] if row else 0
        for i in range(start, n):
            r = reading(i)
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute("INSERT OR IGNORE INTO reading (id, i) VALUES (?, ?)", (r.reading_id, i))
            await ledger_store.rate_reading(conn, ACCOUNT, r, tariffs)
            await conn.commit()
            print(i, flush=True)


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], int(sys.argv[2]), book(FLAT)))
