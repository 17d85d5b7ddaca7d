"""Helpers for end-to-end tests: a site config, a daemon run in a task, and checks on the headend database."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.daemon import Daemon
from tests.harness.site import DEV_UPLINK, bus, gateway_config, meter


def site_config(
    path: Path,
    *,
    gateway_id: str,
    db: Path,
    broker_port: int,
    modbus_port: int,
    units: list[int],
    poll_s: float = 0.2,
) -> Path:
    return gateway_config(
        path.parent,
        gateway_id,
        gateway={"site": "test site", "poll_interval_s": poll_s},
        storage={"path": str(db)},
        broker={"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        uplink={**DEV_UPLINK, "batch_max_records": 50, "window": 4},
        buses=[bus(modbus_port, name="tcp-1")],
        meters=[meter(f"m{u:03d}", unit=u, bus="tcp-1", account=f"acct-{u:03d}", relay=False) for u in units],
        name=path.name,
    )


def headend_readings(path: Path, gateway_id: str) -> list[tuple[int, str, int]]:
    """(record id, meter, time) of every reading the headend stored, by record id."""
    with sqlite3.connect(path) as db:
        return [
            (int(r), str(m), int(t))
            for r, m, t in db.execute(
                "SELECT record_id, meter_id, time_ms FROM readings WHERE gateway_id = ?"
                " ORDER BY record_id",
                (gateway_id,),
            )
        ]


def gateway_counters(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        kv = {str(k): v for k, v in db.execute("SELECT key, value FROM kv")}
        (backlog,) = db.execute("SELECT count(*) FROM outbox WHERE kind = 'reading'").fetchone()
    return {
        "committed": int(kv.get("readings_committed", 0)),
        "acked": int(kv.get("readings_acked", 0)),
        "backlog": int(backlog),
    }


def assert_exactly_once(readings: list[tuple[int, str, int]], committed: int) -> None:
    """Reading records were numbered 1..n in commit order (events share the sequence)."""
    ids = [r[0] for r in readings]
    assert len(ids) == len(set(ids)), "a record id arrived twice"
    keys = [(m, t) for _, m, t in readings]
    assert len(keys) == len(set(keys)), "the same meter reading was stored twice"
    assert len(readings) == committed, f"{committed} committed but {len(readings)} at the headend"


async def until(pred: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Wait, bounded, until ``pred()`` holds; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s: {what}")


class Running:
    """A daemon run in a task; ``async with`` stops it (if it did not stop by itself)."""

    def __init__(self, path: Path, **settings: Any) -> None:
        self.daemon = Daemon(load_config(path))
        for k, v in settings.items():
            setattr(self.daemon, k, v)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Daemon:
        self.task = asyncio.create_task(self.daemon.run(self.stop))
        await asyncio.wait_for(self.daemon.ready.wait(), 15)
        return self.daemon

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)

    async def stopped_by_itself(self, timeout_s: float) -> None:
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), timeout_s)


@asynccontextmanager
async def daemon_running(daemon: Daemon) -> AsyncIterator[Daemon]:
    """``daemon`` running until the block ends (ready within 15 s, stopped within 30 s)."""
    stop = asyncio.Event()
    run = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 15)
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` in the SQLite database ``db``, as tuples."""
    with sqlite3.connect(db) as conn:
        return [tuple(r) for r in conn.execute(sql, args)]
