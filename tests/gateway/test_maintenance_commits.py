"""The daemon's maintenance pass writes only what changed: at a small site whose
buses are quiet, a pass with nothing to do commits nothing (every job: the
provisioning audit spool, the time floor, rejection summaries, relay intents of
commands, the replay table, the configuration confirmation, ledger retention,
the audit checkpoint). The running daemon with a trust file, a keystore and a
prepaid account, a Modbus simulator, a real mosquitto and a real headend;
commits counted from the database's write-ahead log and ``PRAGMA data_version``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

from gateway.config import load_config
from gateway.daemon import Daemon
from headend.ingest import Headend
from headend.store import HeadendDB
from provisioning.keys import Keystore
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import daemon_running, until
from tests.harness.mosquitto import Mosquitto
from tests.harness.site import DEV_UPLINK, gateway_config, meter, prepaid_account
from tests.harness.walcommits import commits_since, log_mark
from tests.security.conftest import GATEWAY, Central


def site(tmp: Path, modbus_port: int, broker_port: int) -> Path:
    (tmp / "trust.json").write_text(json.dumps(Central().trust().to_dict()))
    Keystore.init(tmp / "keys", GATEWAY)
    acct = prepaid_account(tmp, opening="100.00", alarm1="2.00", alarm2="1.00", close_permit="0.50")
    path = gateway_config(
        tmp,
        GATEWAY,
        modbus_port=modbus_port,
        # one poll at start, then none for a minute; no health records
        gateway={"poll_interval_s": 60.0, "health_interval_s": 0},
        broker={"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        uplink=DEV_UPLINK,
        security={"trust_file": "trust.json", "keystore": "keys"},
        meters=[meter(account="acct-001")],
        accounts=[acct],
    )
    path.write_text(path.read_text() + "\n[billing]\nledger_retention_days = 7\n")
    return path


def batches(db: Path) -> list[int]:
    """The batches in the database (not yet deleted by an applied ack)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        return [int(s) for (s,) in c.execute("SELECT seq FROM batches")]


async def test_a_maintenance_pass_with_nothing_to_do_commits_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "gw.db"
    hdb = await HeadendDB.open(tmp_path / "central.db")
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    try:
        async with ModbusSimulator(units=[1]) as sim:
            daemon = Daemon(load_config(site(tmp_path, sim.port, mosquitto.port)))
            daemon.maintenance_interval_s = 3600.0  # the passes below are the test's
            async with daemon_running(daemon):
                outbox = daemon.outbox
                assert outbox is not None and daemon.commands is not None and daemon.remote_config is not None
                await until(lambda: daemon.stats.cycles >= 1 and daemon.stats.readings >= 1, 15, "the first poll")
                await until(lambda: daemon.uplink is not None and daemon.uplink.stats.acked >= 1, 15, "an ack")

                async def acked_pass() -> int:
                    """A pass once every batch made is acknowledged (a later ack would be
                    something to do); the commits it made."""
                    assert outbox is not None
                    await until(lambda: all(outbox.ack_waiting(s) for s in batches(db)), 15,
                                "every batch acknowledged")  # fmt: skip
                    mark = log_mark(db)
                    await daemon.maintain(outbox, checkpoint=True, prune=True, retention=True)
                    return commits_since(db, mark)

                assert await acked_pass() >= 1  # the first pass takes the ledger's mark
                # what that pass sent out is acknowledged, and the ack applied, by the next
                # (a machine under load delivers the ack between passes)
                for _ in range(3):
                    if await acked_pass() == 0:
                        break
                else:
                    raise AssertionError("maintenance never settles")
                other = sqlite3.connect(db)
                try:
                    for _ in range(2):
                        await until(lambda: all(outbox.ack_waiting(s) for s in batches(db)), 15, "acknowledged")
                        mark, seen = log_mark(db), other.execute("PRAGMA data_version").fetchone()
                        await daemon.maintain(outbox, checkpoint=True, prune=True, retention=True)
                        assert commits_since(db, mark) == 0
                        assert other.execute("PRAGMA data_version").fetchone() == seen
                finally:
                    other.close()
                assert daemon.stats.readings == 1  # nothing else happened meanwhile
    finally:
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()
