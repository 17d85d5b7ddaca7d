"""The notifier against a real HTTP receiver on a loopback port, with the queue the
headend's own stores fill (SQLite file and PostgreSQL): a night of events with an
injected clock (reminder by day, nothing during quiet hours, the cut and the
restore at once, the deferred reminder at the end of the quiet hours, one per
rate-limit window); retries with back-off across a restart; refusals; no
customer on file."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from headend.notices import NoticeKind
from headend.notifier import Notifier, WebhookSink
from headend.notify_config import NotifyConfig, load_notify_config
from headend.notify_queue import NotifyQueue
from headend.store import HeadendDB, HeadendStore
from store_forward import wire_json
from store_forward.records import Record, RecordClass
from tests.harness.sms_receiver import SmsReceiver
from tests.headend.test_headend_scaleout import pg_dsn

__all__ = ["pg_dsn"]

SH = ZoneInfo("Asia/Shanghai")
EPOCH = "00000000000000aa"
SECRET = b"a-webhook-secret-of-some-length"


def at(day: int, h: int, m: int = 0) -> int:
    return int(dt.datetime(2026, 3, day, h, m, tzinfo=SH).timestamp() * 1000)


def notice_file(tmp: Path, url: str, **limits: int) -> Path:
    (tmp / "hook.secret").write_bytes(SECRET + b"\n")
    lim = "\n".join(f"{k} = {v}" for k, v in limits.items())
    path = tmp / "notify.toml"
    path.write_text(
        f"""
[webhook]
url = "{url}"
secret_file = "hook.secret"
timeout_s = 5
max_attempts = 4
retry_min_s = 10
retry_max_s = 60

[defaults]
language = "zh-CN"
timezone = "Asia/Shanghai"
quiet_hours = "21:00-08:00"

[limits]
{lim}

[[customer]]
account = "acct-001"
phone = "+8613800000001"

[[customer]]
account = "acct-en"
phone = "+8613800000002"
language = "en"
"""
    )
    return path


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


class Central:
    """The headend's store plus the notifier's queue, on SQLite or PostgreSQL."""

    def __init__(self, store: HeadendStore, queue: NotifyQueue, reopen: Any) -> None:
        self.store, self.queue, self.reopen = store, queue, reopen
        self.seq = 0
        self.rid = 0

    async def events(self, *bodies: dict[str, Any], gateway: str = "gw-1") -> None:
        recs = []
        for b in bodies:
            self.rid += 1
            recs.append(Record(self.rid, RecordClass.EVENT, "event", int(b["time_ms"]), b))
        self.seq += 1
        batch = wire_json.decode(wire_json.encode(gateway, self.seq, recs, epoch=EPOCH))
        assert (await self.store.store(batch, int(b["time_ms"]))).status == "stored"
        # the same batch again (a lost ack) queues nothing more
        assert (await self.store.store(batch, int(b["time_ms"]))).status == "duplicate"


@pytest.fixture(params=["sqlite", "postgres"])
async def central(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Central]:
    if request.param == "sqlite":
        path = tmp_path / "central.db"
        store: HeadendStore = await HeadendDB.open(path)

        async def reopen() -> NotifyQueue:
            return await NotifyQueue.open_sqlite(path)
    else:
        from headend.store_pg import PostgresHeadendDB

        dsn = request.getfixturevalue("pg_dsn")
        store = await PostgresHeadendDB.open(dsn)

        async def reopen() -> NotifyQueue:
            return await NotifyQueue.open_postgres(dsn)

    c = Central(store, await reopen(), reopen)
    try:
        yield c
    finally:
        await c.queue.close()
        await store.close()


def change(t: int, frm: str, to: str, balance: str, account: str = "acct-001", **kw: Any) -> dict[str, Any]:
    return {"type": "cutoff.state_change", "account": account, "time_ms": t, "from": frm, "to": to,
            "balance": balance, "balance_micro": int(float(balance) * 1e6), "state": "…", "reason": "…", **kw}  # fmt: skip


def notifier(c: Central, cfg: NotifyConfig, clock: Clock) -> Notifier:
    return Notifier(c.queue, cfg, WebhookSink(cfg.webhook), clock_ms=clock, rng=random.Random(1))


async def test_a_night_of_notices(central: Central, tmp_path: Path) -> None:
    c = central
    async with SmsReceiver() as rx:
        cfg = load_notify_config(notice_file(tmp_path, rx.url, reminder_interval_s=6 * 3600))
        clock = Clock(at(1, 20))
        n = notifier(c, cfg, clock)
        try:
            # 20:00 alarm 1: a reminder, at once
            await c.events(change(clock.ms, "normal", "alarm1", "9.80"))
            assert await n.tick() == 1
            assert [m["kind"] for m in rx.delivered] == ["low_balance"]
            first = rx.requests[0]
            assert first.headers["Idempotency-Key"] == first.json["id"] == "gw-1/00000000000000aa/1"
            want = "sha256=" + hmac.new(SECRET, first.body, hashlib.sha256).hexdigest()
            assert first.headers["X-Edgegw-Signature"] == want
            assert first.json["to"] == "+8613800000001" and first.json["language"] == "zh-CN"
            assert "9.80" in first.json["text"] and "余额" in first.json["text"]
            # 20:30 alarm 2: within the reminder interval, it waits
            clock.ms = at(1, 20, 30)
            await c.events(change(clock.ms, "alarm1", "alarm2", "4.90"))
            assert await n.tick() == 0
            # 22:00 (quiet hours) the cut is due but held: a reminder, so it waits too
            clock.ms = at(1, 22)
            await c.events({"type": "cutoff.trip_pending", "account": "acct-001", "time_ms": clock.ms,
                            "balance": "-0.01", "state": "cut pending: no-disconnect window until 08:00"})  # fmt: skip
            assert await n.tick() == 0
            # 22:30 the cut: told at once, quiet hours or not; the reminders are old news
            clock.ms = at(1, 22, 30)
            await c.events(change(clock.ms, "alarm2", "cutoff", "-0.05"))
            assert await n.tick() == 1
            # 23:00 a top-up restores the supply: told at once
            clock.ms = at(1, 23)
            await c.events(change(clock.ms, "cutoff", "alarm2", "3.00"))
            assert await n.tick() == 1
            # 23:30 into overdraft again: a reminder, held by the quiet hours until 08:00
            clock.ms = at(1, 23, 30)
            await c.events(change(clock.ms, "alarm2", "grace", "-0.20"))
            for h, m in ((23, 31), (24 + 5, 0), (24 + 7, 59)):
                clock.ms = at(1, 0) + (h * 60 + m) * 60_000
                assert await n.tick() == 0
            clock.ms = at(2, 8)
            assert await n.tick() == 1
            clock.ms = at(2, 9)
            assert await n.tick() == 0
        finally:
            await n.sink.close()
        kinds = [m["kind"] for m in rx.delivered]
        assert kinds == ["low_balance", "cutoff", "restored", "overdraft"]
        assert [m["urgent"] for m in rx.delivered] == [False, True, True, False]
        assert all(len(r.json["text"]) > 10 for r in rx.requests) and len(rx.requests) == 4
        states = {r["kind"]: r["state"] for r in await c.queue.rows("acct-001")}
        assert states == {"low_balance": "sent", "nearly_used_up": "superseded", "cut_pending": "superseded",
                          "cutoff": "sent", "restored": "sent", "overdraft": "sent"}  # fmt: skip
        sent_at = {r["kind"]: r["sent_ms"] for r in await c.queue.rows("acct-001")}
        assert sent_at["cutoff"] == at(1, 22, 30) and sent_at["overdraft"] == at(2, 8)


async def test_retries_back_off_and_survive_a_restart(central: Central, tmp_path: Path) -> None:
    c = central
    async with SmsReceiver() as rx:
        cfg = load_notify_config(notice_file(tmp_path, rx.url))
        clock = Clock(at(3, 12))
        rx.answer(503)
        rx.answer(429, {"Retry-After": "45"})
        await c.events(change(clock.ms, "alarm2", "cutoff", "-0.01"))
        n = notifier(c, cfg, clock)
        assert await n.tick() == 1 and rx.delivered == []
        row = (await c.queue.rows("acct-001"))[0]
        assert (row["state"], row["attempts"], row["http_status"]) == ("pending", 1, 503)
        assert await n.tick() == 0  # backing off (5..10 s after a first failure)
        clock.ms += 10_000
        assert await n.tick() == 1 and rx.delivered == []  # 429, Retry-After 45
        clock.ms += 30_000
        assert await n.tick() == 0
        await n.sink.close()
        # the headend restarts: a new queue connection, a new notifier
        await c.queue.close()
        c.queue = await c.reopen()
        n = notifier(c, cfg, clock)
        clock.ms += 15_001
        assert await n.tick() == 1
        await n.sink.close()
        assert [m["kind"] for m in rx.delivered] == ["cutoff"]
        assert [r.status for r in rx.requests] == [503, 429, 200]
        assert len({r.json["id"] for r in rx.requests}) == 1
        assert [r.json["attempt"] for r in rx.requests] == [1, 2, 3]
        row = (await c.queue.rows("acct-001"))[0]
        assert (row["state"], row["attempts"]) == ("sent", 3)

        # a refusal is final; a gateway that never answers well is given up after max_attempts
        rx.answer(400)
        for _ in range(4):
            rx.answer(500)
        clock.ms += 3600_000
        await c.events(change(clock.ms, "cutoff", "normal", "50.00"),
                       change(clock.ms, "normal", "cutoff", "-1.00", account="acct-en"))  # fmt: skip
        n = notifier(c, cfg, clock)
        for _ in range(8):
            await n.tick()
            clock.ms += 61_000
        await n.sink.close()
        rows = {r["account"]: r for r in await c.queue.rows() if r["kind"] in ("restored", "cutoff")
                and r["state"] != "sent"}  # fmt: skip
        assert rows["acct-001"]["state"] == "failed" and rows["acct-001"]["http_status"] == 400
        assert rows["acct-001"]["attempts"] == 1
        assert rows["acct-en"]["state"] == "failed" and rows["acct-en"]["attempts"] == 4
        assert "gave up after 4 attempts" in rows["acct-en"]["detail"]


async def test_no_customer_on_file_and_old_news(central: Central, tmp_path: Path) -> None:
    c = central
    async with SmsReceiver() as rx:
        cfg = load_notify_config(notice_file(tmp_path, rx.url))
        clock = Clock(at(4, 12))
        await c.events(change(clock.ms, "alarm2", "cutoff", "-0.01", account="acct-unknown"),
                       change(clock.ms - 2 * 86400_000, "normal", "alarm1", "9.00", account="acct-en"))  # fmt: skip
        n = notifier(c, cfg, clock)
        assert await n.tick() == 0
        await n.sink.close()
        assert rx.requests == []
        states = {r["account"]: r["state"] for r in await c.queue.rows()}
        assert states == {"acct-unknown": "unaddressed", "acct-en": "expired"}
        assert NoticeKind.CUTOFF.urgent
