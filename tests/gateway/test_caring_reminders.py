"""Caring reminders from a real gateway: a real daemon (an ``edgegw run`` process)
with two prepaid accounts whose simulated meters run out of credit, a real
mosquitto, the headend's ingest with its SQLite store, the notifier and a real
HTTP receiver on loopback. The notifier's clock is injected: it is noon in
Shanghai for it. One customer is awake: the low-balance reminder reaches the
receiver before the relay trips, then the cut notice; alarm 2 falls in the
same rate-limit window and is not sent. The other customer's quiet hours hold
every reminder; the cut notice still goes at once. The read API shows the
notices and the cut supply."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp

from headend.console.db import open_console_db
from headend.ingest import Headend
from headend.notifier import Notifier, WebhookSink
from headend.notify_config import load_notify_config
from headend.notify_queue import NotifyQueue
from headend.read_api import ReadApiSettings, TokenFile, new_token
from headend.store import HeadendDB
from headend.web import build_app, serve
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.mosquitto import Mosquitto
from tests.harness.sms_receiver import SmsReceiver

ROOT = Path(__file__).resolve().parents[2]
SH = ZoneInfo("Asia/Shanghai")

ACCOUNT = """
account = "{account}"
timezone = "Asia/Shanghai"
opening_balance = "0.40"
meters = ["{meter}"]
protected = false

[limits]
alarm1 = "0.30"
alarm2 = "0.15"
overdraft = "0.00"
close_permit = "0.05"
close_mode = "direct"
reconnect_delay_s = 0
relay_min_interval_s = 0
"""

METER = """
[[meter]]
id = "{meter}"
bus = "lan"
protocol = "modbus"
unit_id = {unit}
profile = "sdm120"
account = "{account}"
[meter.relay]
kind = "coil"
address = 0
min_interval_s = 0

[[account]]
id = "{account}"
settings = "{account}.toml"
tariffs = ["flat.toml"]
"""


def site(tmp: Path, broker_port: int, modbus_port: int) -> Path:
    shutil.copy(ROOT / "examples" / "tariffs" / "flat.toml", tmp / "flat.toml")
    parts = []
    for unit, account in ((1, "acct-awake"), (2, "acct-asleep")):
        (tmp / f"{account}.toml").write_text(ACCOUNT.format(account=account, meter=f"m00{unit}"))
        parts.append(METER.format(account=account, meter=f"m00{unit}", unit=unit))
    path = tmp / "site.toml"
    path.write_text(
        f"""
[gateway]
id = "gw-care"
site = "test"
timezone = "Asia/Shanghai"
poll_interval_s = 0.2

[storage]
path = "gw.db"

[broker]
port = {broker_port}
keepalive_s = 5

[uplink]
allow_unauthenticated_acks = true
reconnect_min_s = 0.1
reconnect_max_s = 0.3

[[bus]]
name = "lan"
type = "tcp"
host = "127.0.0.1"
port = {modbus_port}
timeout_s = 0.5
retries = 0
"""
        + "".join(parts)
    )
    return path


def notice_file(tmp: Path, url: str) -> Path:
    path = tmp / "notify.toml"
    path.write_text(
        f"""
[webhook]
url = "{url}"
retry_min_s = 0.2
retry_max_s = 1

[defaults]
language = "zh-CN"
timezone = "Asia/Shanghai"
quiet_hours = "21:00-08:00"

[limits]
reminder_interval_s = 21600

[[customer]]
account = "acct-awake"
phone = "+8613800000001"
language = "en"

[[customer]]
account = "acct-asleep"
phone = "+8613800000002"
quiet_hours = "11:00-14:00"   # a midday rest: it is noon for the notifier
"""
    )
    return path


def noon_clock() -> callable:  # type: ignore[valid-type]
    """Real time moved to today's 12:00 in Shanghai (event ages stay within hours)."""
    now = dt.datetime.now(SH)
    shift_ms = int((now.replace(hour=12, minute=0, second=0, microsecond=0) - now).total_seconds() * 1000)
    return lambda: time.time_ns() // 1_000_000 + shift_ms


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=config.parent,
        )  # fmt: skip


async def test_reminders_before_the_cut_and_quiet_hours(tmp_path: Path, mosquitto: Mosquitto) -> None:
    central = tmp_path / "central.db"
    store = await HeadendDB.open(central)
    ingest = asyncio.create_task(Headend(store, host="127.0.0.1", port=mosquitto.port).run())
    queue = await NotifyQueue.open_sqlite(central)
    trips: dict[int, float] = {}
    async with SmsReceiver() as rx, ModbusSimulator(units=[1, 2], load_kw="150") as sim:
        cfg = load_notify_config(notice_file(tmp_path, rx.url))
        notifier = Notifier(queue, cfg, WebhookSink(cfg.webhook), clock_ms=noon_clock(), poll_s=0.2)
        notify = asyncio.create_task(notifier.run())
        log = tmp_path / "gateway.log"
        proc = start_daemon(site(tmp_path, mosquitto.port, sim.port), log)

        def tripped() -> bool:
            for unit in (1, 2):
                if sim.meter(unit).relay_open and unit not in trips:
                    trips[unit] = time.monotonic()
            return len(trips) == 2

        try:
            await until(tripped, 60, "both relays trip when the credit is gone", 0.05)
            await until(lambda: len(rx.delivered) >= 3, 20, "the cut notices")
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 30)
            notify.cancel()
            ingest.cancel()
            await asyncio.gather(notify, ingest, return_exceptions=True)
        assert rc == 0, log.read_text()[-3000:]

        awake = [r for r in rx.requests if r.json["account"] == "acct-awake"]
        asleep = [r for r in rx.requests if r.json["account"] == "acct-asleep"]
        # the awake customer: a reminder well before the cut, then the cut; one reminder per window
        assert [r.json["kind"] for r in awake] == ["low_balance", "cutoff"], [r.json for r in awake]
        assert awake[0].at < trips[1], "the reminder came after the relay tripped"
        assert awake[0].json["language"] == "en" and "below the reminder level" in awake[0].json["text"]
        assert awake[1].json["urgent"] and "supply was cut" in awake[1].json["text"]
        # the customer in quiet hours: no reminder, the cut at once (in Chinese)
        assert [r.json["kind"] for r in asleep] == ["cutoff"]
        assert "停止供电" in asleep[0].json["text"] and asleep[0].json["to"] == "+8613800000002"

        states = {(r["account"], r["kind"]): r["state"] for r in await queue.rows()}
        assert states[("acct-awake", "nearly_used_up")] == "superseded"
        assert states[("acct-asleep", "low_balance")] == "superseded"
        assert states[("acct-asleep", "nearly_used_up")] == "superseded"
        assert states[("acct-asleep", "cutoff")] == "sent"

        # the read API shows the same
        db = await open_console_db(central)
        token = new_token(tmp_path / "tokens", "test")
        runner, port = await serve(build_app(read_api=ReadApiSettings(db, TokenFile(tmp_path / "tokens"))), "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
                async with s.get(f"http://127.0.0.1:{port}/api/v1/balances") as r:
                    bal = {b["account"]: b for b in (await r.json())["balances"]}
                async with s.get(f"http://127.0.0.1:{port}/api/v1/notifications", params={"state": "sent"}) as r:
                    sent = (await r.json())["notifications"]
        finally:
            await runner.cleanup()
            await db.close()
        assert {a: b["level"] for a, b in bal.items()} == {"acct-awake": "cutoff", "acct-asleep": "cutoff"}
        assert all(b["balance_micro"] <= 0 for b in bal.values())
        assert sorted((n["account"], n["kind"]) for n in sent) == [
            ("acct-asleep", "cutoff"), ("acct-awake", "cutoff"), ("acct-awake", "low_balance")]
    await queue.close()
    await store.close()
