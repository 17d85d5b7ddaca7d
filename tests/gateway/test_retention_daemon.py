"""Ledger retention in the running daemon: a Modbus simulator, a real mosquitto and the
headend. Debits written ten days ago (the system clock set back) leave the gateway's
ledger once the headend acknowledged them; central holds every one, and the ledger
still verifies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from gateway.billing import ledger_store as ls
from gateway.config import load_config
from gateway.daemon import Daemon, wall_ms
from gateway.security.trusted_time import boot_ms
from headend.ingest import Headend
from headend.store import HeadendDB
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import daemon_running, rows, until
from tests.harness.mosquitto import Mosquitto
from tests.harness.site import DEV_UPLINK, gateway_config, meter, prepaid_account

DAY = 86_400_000
ACC = "acct-001"


def site(tmp: Path, modbus_port: int, broker_port: int) -> Path:
    acct = prepaid_account(tmp, opening="100.00", alarm1="2.00", alarm2="1.00", close_permit="0.50")
    path = gateway_config(
        tmp,
        "gw-retention",
        modbus_port=modbus_port,
        gateway={"timezone": "Asia/Shanghai"},
        broker={"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        uplink={**DEV_UPLINK, "batch_max_records": 50},
        meters=[meter(account=ACC)],
        accounts=[acct],
    )
    path.write_text(path.read_text() + "\n[billing]\nledger_retention_days = 7\n")
    return path


@asynccontextmanager
async def running(path: Path, offset_ms: int) -> AsyncIterator[Daemon]:
    daemon = Daemon(load_config(path), clock_ms=lambda: wall_ms() + offset_ms, mono_ms=boot_ms,
                    clock_synced=lambda: True)
    daemon.maintenance_interval_s = 0.3
    daemon.retention_interval_s = 0.3
    async with daemon_running(daemon):
        yield daemon


def debits(db: Path) -> dict[str, tuple[int, int]]:
    return {
        str(i): (int(a), int(t))
        for i, a, t in rows(db, "SELECT entry_id, amount_micro, time_ms FROM billing_entry WHERE kind = 'debit'")
    }


def central_charges(db: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for (body,) in rows(db, "SELECT body FROM events WHERE kind = 'charge'"):
        e = json.loads(body)
        out[str(e["id"])] = (int(e["amount_micro"]), int(e["time_ms"]))
    return out


async def test_old_acknowledged_debits_leave_the_ledger_and_central_holds_every_one(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    db, central = tmp_path / "gw.db", tmp_path / "central.db"
    hdb = await HeadendDB.open(central)
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    try:
        async with ModbusSimulator(units=[1], load_kw="400") as sim:  # a debit every poll
            path = site(tmp_path, sim.port, mosquitto.port)
            async with running(path, -10 * DAY):  # ten days ago
                await until(lambda: len(debits(db)) >= 10, 30, "ten debits")
            old = debits(db)
            assert all(t < wall_ms() - 9 * DAY for _, t in old.values())
            async with running(path, 0) as daemon:  # today: they are older than 7 days
                await until(lambda: not set(old) & set(debits(db)), 30, "the old debits pruned")
                await until(lambda: set(old) <= set(central_charges(central)), 30, "central has them")
                assert daemon.stats.cycles > 0
    finally:
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()
    # central holds every debit the gateway let go, with the same amount and time
    charges = central_charges(central)
    assert {i: charges[i] for i in old} == old
    # what is left are today's debits; the opening balance stays; the ledger verifies
    now = wall_ms()
    assert all(t > now - DAY for _, t in debits(db).values())
    assert rows(db, "SELECT count(*) FROM billing_entry WHERE kind = 'adjustment'") == [(1,)]
    (base_seq, pruned), = rows(db, "SELECT base_seq, pruned FROM billing_fold_base WHERE account = ?", ACC)
    assert pruned >= len(old) and base_seq > len(old)
    async with aiosqlite.connect(db) as conn:
        view = await ls.verify(conn, ACC)
    # money: what central holds plus what has not reached it yet is the balance
    local = rows(db, "SELECT entry_id, amount_micro FROM billing_entry")
    unsent = sum(int(a) for i, a in local if i not in charges)
    assert view.balance_micro == sum(a for a, _ in charges.values()) + unsent
