"""Storage faults in the whole daemon: a damaged database never resets money.

Real parts throughout: the daemon (in this process, or a real ``edgegw run``
process that is killed), its SQLite files, a Modbus TCP simulator metering a
load on a prepaid account with a supply relay, signed commands from a central
signer, and, where the uplink matters, a real mosquitto with the reference
headend storing what arrives.

* a database damaged at rest: the daemon starts on a new database, keeps the
  damaged files byte for byte, tells central (a critical event the headend
  stores), shows it in ``edgegw status``, never puts the opening balance back,
  does not accept the old top-up again, holds the account (no debit, no relay
  change) until a signed central balance snapshot settles it, then bills again;
* a bit flipped in the write-ahead log of a process killed right after it
  committed a top-up: SQLite alone drops the top-up silently; the daemon sees
  it, keeps the evidence, and the top-up is either recovered or its account
  held — never lost without a word, never credited twice;
* damage found while running: the same, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.cli import main as cli_main
from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.security.envelope import Outcome, RejectReason
from gateway.security.roles import CommandType
from headend.ingest import Headend
from headend.store import HeadendDB
from store_forward.storage_state import StorageMode
from store_forward.topics import Topics
from store_forward.walcheck import FRAME_HEADER_BYTES, check_wal
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.mosquitto import Mosquitto, free_port
from tests.harness.procs import start_gateway
from tests.harness.site import gateway_config, meter, prepaid_account
from tests.security.conftest import GATEWAY, Central

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3_600_000

def site(tmp: Path, modbus_port: int, broker_port: int, central: Central) -> Path:
    acct = prepaid_account(tmp, opening="0.30", alarm1="0.20", alarm2="0.10", close_permit="0.05")
    (tmp / "trust.json").write_text(json.dumps(central.trust().to_dict()))
    return gateway_config(
        tmp,
        GATEWAY,
        modbus_port=modbus_port,
        gateway={"timezone": "Asia/Shanghai"},
        storage={"path": "gw.db", "reserve_bytes": 0},
        broker={"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        uplink={"ack_timeout_s": 2.0, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        security={"trust_file": "trust.json"},
        meters=[meter(account="acct-001")],
        accounts=[acct],
    )


@contextlib.asynccontextmanager
async def running(config: Path, **kw: Any) -> AsyncIterator[Daemon]:
    daemon = Daemon(load_config(config), **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        ready = asyncio.create_task(daemon.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises what stopped the daemon
        assert ready in done, "daemon not ready within 30 s"
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def topup(
    central: Central, now_ms: int, *, command_id: str, counter: int, micro: int = 5_000_000
) -> bytes:
    return central.cmd(
        CommandType.TOPUP,
        {
            "account": "acct-001",
            "amount_micro": micro,
            "purchase_counter": counter,
            "payment_channel": "counter",
        },
        command_id=command_id,
        issued_at=now_ms,
        expires_at=now_ms + HOUR,
    )


def rows(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def ledger(db: Path, account: str = "acct-001") -> list[tuple[str, int]]:
    return [
        (str(e), int(a))
        for e, a in rows(
            db,
            "SELECT entry_id, amount_micro FROM billing_entry WHERE account = ? ORDER BY seq",
            (account,),
        )
    ]


def readings_committed(db: Path) -> int:
    r = rows(db, "SELECT value FROM kv WHERE key = 'readings_committed'")
    return int(r[0][0]) if r else 0


def headend_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        got = rows(path, "SELECT body FROM events WHERE gateway_id = ?", (GATEWAY,))
    except sqlite3.Error:
        return []
    return [json.loads(b) for (b,) in got]


def damage_table(db: Path, table: str) -> bytes:
    """Zero every page of ``table`` in a database that is closed; returns the file's bytes."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [
            int(p) for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,))
        ]
        (ps,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    wal = db.with_name(db.name + "-wal")
    assert pages and (not wal.exists() or wal.stat().st_size == 0)
    data = bytearray(db.read_bytes())
    for p in pages:
        data[(p - 1) * ps : p * ps] = b"\x00" * ps
    db.write_bytes(bytes(data))
    return bytes(data)


@contextlib.asynccontextmanager
async def headend(tmp: Path, broker: Mosquitto) -> AsyncIterator[Path]:
    path = tmp / "central.db"
    hdb = await HeadendDB.open(path)
    task = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=broker.port).run())
    try:
        yield path
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await hdb.close()


async def test_database_damaged_at_rest(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    central = Central()
    db = tmp_path / "gw.db"
    async with (
        ModbusSimulator(units=[1], load_kw="20") as sim,
        headend(tmp_path, mosquitto) as central_db,
    ):
        config = site(tmp_path, sim.port, mosquitto.port, central)
        # -- a gateway in service: a top-up, some debits
        async with running(config) as daemon:
            assert daemon.commands is not None
            sold = topup(central, daemon.clock_ms(), command_id="sale-1", counter=1)
            res = await daemon.commands.handle(sold, channel="mqtt")
            assert res.outcome is Outcome.APPLIED, res
            await until(lambda: any(e.startswith("debit:") for e, _ in ledger(db)), 20, "a debit")
        before = ledger(db)
        assert ("adjust:opening:acct-001", 300_000) in before and (
            "topup:sale-1",
            5_000_000,
        ) in before
        damaged = damage_table(db, "billing_account")

        # -- the next start finds the damage
        async with running(config) as daemon:
            outbox = daemon.outbox
            assert outbox is not None and daemon.commands is not None
            state = outbox.storage
            assert state.mode is StorageMode.RECOVERING and state.held == ("acct-001",)
            [evidence] = list((tmp_path / "gw.db.evidence").iterdir())
            assert (evidence / "gw.db").read_bytes() == damaged  # kept byte for byte
            assert state.evidence == str(evidence)
            # never the opening balance again, nothing credited or debited while held
            assert ledger(db) == []
            assert rows(
                db, "SELECT balance_micro FROM billing_account WHERE account = 'acct-001'"
            ) == [(0,)]
            # the old top-up is not accepted again
            again = await daemon.commands.handle(sold, channel="mqtt")
            assert again.outcome is not Outcome.APPLIED, again
            # a new sale for the held account is refused with the reason; its id stays free
            now = daemon.clock_ms()
            new_sale = topup(central, now, command_id="sale-2", counter=2, micro=1_000_000)
            refused = await daemon.commands.handle(new_sale, channel="mqtt")
            assert refused.outcome is Outcome.REJECTED and "snapshot" in refused.message, refused
            # polling goes on, the account is neither debited nor cut
            n = readings_committed(db)
            await until(lambda: readings_committed(db) > n + 5, 10, "readings while held")
            assert ledger(db) == [] and not sim.meter(1).relay_open
            # central hears of it
            await until(
                lambda: (
                    {"storage_fault", "storage_recovered"}
                    <= {e.get("type") for e in headend_events(central_db)}
                ),
                20,
                "the storage events at the headend",
            )
            fault = next(e for e in headend_events(central_db) if e.get("type") == "storage_fault")
            assert fault["severity"] == "critical" and fault["evidence"] == str(evidence)
            recovered = next(
                e for e in headend_events(central_db) if e.get("type") == "storage_recovered"
            )
            assert recovered["held_accounts"] == ["acct-001"]
            # edgegw status says so
            assert await asyncio.to_thread(cli_main, ["status", "--config", str(config)]) == 0
            out = capsys.readouterr().out
            assert "RECOVERING" in out and "acct-001" in out and str(evidence) in out
            # a signed central balance snapshot settles the account; billing resumes
            balance = sum(a for _, a in before)
            snap = central.cmd(
                CommandType.BALANCE_SNAPSHOT,
                {
                    "id": "snap-1",
                    "account": "acct-001",
                    "central_seq": 1,
                    "as_of_seq": 0,
                    "balance_micro": balance,
                    "time_ms": now,
                    "purchase_counter": 1,
                },
                issued_at=daemon.clock_ms(),
                expires_at=daemon.clock_ms() + HOUR,
            )
            settled = await daemon.commands.handle(snap, channel="mqtt")
            assert settled.outcome is Outcome.APPLIED, settled
            assert outbox.storage.mode is StorageMode.NORMAL
            await until(
                lambda: any(e.startswith("debit:") for e, _ in ledger(db)), 20, "debits again"
            )
            # the refused sale is applied now, under the same id
            ok = await daemon.commands.handle(
                topup(central, daemon.clock_ms(), command_id="sale-2", counter=2, micro=1_000_000),
                channel="mqtt",
            )
            assert ok.outcome is Outcome.APPLIED, ok
            assert ("topup:sale-2", 1_000_000) in ledger(db)
            assert not any(e.startswith("adjust:opening:") for e, _ in ledger(db))


async def test_damage_found_while_running(tmp_path: Path) -> None:
    """The periodic integrity check finds damage: evidence, a new database, the money
    state recovered from the evidence — without a restart, polling all along."""
    central = Central()
    db = tmp_path / "gw.db"
    async with ModbusSimulator(units=[1], load_kw="20") as sim:
        config = site(tmp_path, sim.port, free_port(), central)
        async with running(config, integrity_check_s=0) as daemon:
            assert daemon.commands is not None and daemon.outbox is not None
            res = await daemon.commands.handle(
                topup(central, daemon.clock_ms(), command_id="sale-1", counter=1), channel="mqtt"
            )
            assert res.outcome is Outcome.APPLIED
            await until(lambda: any(e.startswith("debit:") for e, _ in ledger(db)), 20, "a debit")
            # damage a page of the readings' table on disk behind the daemon's back
            with sqlite3.connect(db) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                (page,) = conn.execute(
                    "SELECT pageno FROM dbstat WHERE name = 'meter_status' LIMIT 1"
                ).fetchone()
                (ps,) = conn.execute("PRAGMA page_size").fetchone()
            with db.open("r+b") as f:
                f.seek((page - 1) * ps)
                f.write(b"\xff" * ps)
            found = await daemon.check_storage_now()
            assert found is not None
            await until(lambda: (tmp_path / "gw.db.evidence").exists(), 10, "evidence")
            await until(
                lambda: (
                    daemon.outbox is not None
                    and daemon.outbox.storage.mode is not StorageMode.FAULT
                    and daemon.storage_started
                ),
                20,
                "recovery in place",
            )
            # the ledger was intact: the account is back with its money, not its opening balance
            assert daemon.outbox.storage.mode is StorageMode.NORMAL
            entries = ledger(db)
            assert ("topup:sale-1", 5_000_000) in entries and (
                "adjust:opening:acct-001",
                300_000,
            ) in entries
            assert daemon.outbox.generation == 2
            n = readings_committed(db)
            await until(lambda: readings_committed(db) > n + 3, 10, "polling into the new database")
            again = await daemon.commands.handle(
                topup(central, daemon.clock_ms() - 1, command_id="sale-1", counter=1),
                channel="mqtt",
            )
            assert again.outcome is not Outcome.APPLIED
            assert sum(1 for e, _ in ledger(db) if e == "topup:sale-1") == 1
            assert not sim.meter(1).relay_open


# --------------------------------------------------------------------------- WAL bit flip after a kill


def main_file_has(db: Path, entry_id: str) -> bool:
    """Is the entry in the main database file alone (not only in its WAL)?"""
    d = db.parent / "main-only"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    shutil.copy(db, d / "x.db")
    try:
        return bool(rows(d / "x.db", "SELECT 1 FROM billing_entry WHERE entry_id = ?", (entry_id,)))
    except sqlite3.OperationalError:  # not even the table: everything is in the log
        return False
    finally:
        shutil.rmtree(d)


def sqlite_alone_sees(db: Path, wal: bytes, entry_id: str) -> bool:
    d = db.parent / "sqlite-view"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    shutil.copy(db, d / "x.db")
    (d / "x.db-wal").write_bytes(wal)
    conn = sqlite3.connect(d / "x.db")
    try:
        return bool(
            conn.execute("SELECT 1 FROM billing_entry WHERE entry_id = ?", (entry_id,)).fetchall()
        )
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
        shutil.rmtree(d)


def pages_of(db: Path, wal: bytes, table: str) -> set[int]:
    """Page numbers of ``table`` in the database as its whole log leaves it."""
    d = db.parent / "pages-view"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    shutil.copy(db, d / "x.db")
    (d / "x.db-wal").write_bytes(wal)
    conn = sqlite3.connect(d / "x.db")
    try:
        return {
            int(p) for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,))
        }
    finally:
        conn.close()
        shutil.rmtree(d)


@pytest.mark.parametrize("where", ["first_frame", "account_row"])
async def test_flipped_wal_bit_after_a_kill_does_not_drop_a_committed_topup(
    tmp_path: Path, mosquitto: Mosquitto, where: str
) -> None:
    """``first_frame``: a bit of the log's first page (no money in it): the top-up comes
    back with its ledger. ``account_row``: a bit of the newest copy of the account
    page: the ledger no longer folds to it, so the account is held."""
    central = Central()
    db = tmp_path / "gw.db"
    log = tmp_path / "gateway.log"
    wal_path = db.with_name("gw.db-wal")
    async with ModbusSimulator(units=[1], load_kw="20") as sim:
        config = site(tmp_path, sim.port, mosquitto.port, central)
        topic = Topics("edgegw/v1", GATEWAY).cmd
        sale = ""
        envelope = b""
        for attempt in range(1, 4):  # until the top-up is in the log when the process dies
            proc = start_gateway(config, log, cwd=config.parent)
            try:
                ups = log.read_text().count("uplink up") if log.exists() else 0

                def on_link(n: int = ups) -> bool:
                    return log.read_text().count("uplink up") > n

                await until(on_link, 30, "gateway on the link")
                sale = f"sale-{attempt}"
                envelope = topup(central, int(time.time() * 1000), command_id=sale, counter=attempt)

                def committed(s: str = sale) -> bool:
                    q = "SELECT 1 FROM billing_entry WHERE entry_id = ?"
                    return bool(rows(db, q, (f"topup:{s}",)))

                async with aiomqtt.Client("127.0.0.1", mosquitto.port) as c:
                    for _ in range(20):  # the same envelope again until it is in (idempotent)
                        await c.publish(topic, envelope, qos=1)
                        with contextlib.suppress(AssertionError):
                            await until(committed, 1.0, "the top-up committed", poll_s=0.02)
                            break
                    else:
                        raise AssertionError(
                            "the top-up never committed:\n" + log.read_text()[-3000:]
                        )
            finally:
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
            if wal_path.exists() and not main_file_has(db, f"topup:{sale}"):
                break
        else:
            raise AssertionError("the top-up never stayed in the log until the kill")
        # one bit flips in the log
        wal = bytearray(wal_path.read_bytes())
        report = check_wal(bytes(wal))
        assert report.sqlite_frames > 1, report.reason
        if where == "first_frame":
            victim = report.frames[0]
            at = 1000
        else:
            account_pages = pages_of(db, bytes(wal), "billing_account")
            victim = [f for f in report.frames if f.page_no in account_pages][-1]
            assert victim.index > 0
            page = bytes(
                wal[
                    victim.offset + FRAME_HEADER_BYTES : victim.offset
                    + FRAME_HEADER_BYTES
                    + (report.page_size or 0)
                ]
            )
            # the row's columns follow each other: the balance comes right after the name
            at = page.rindex(b"acct-001") + len(b"acct-001")
        wal[victim.offset + FRAME_HEADER_BYTES + at] ^= 0x10 if where == "first_frame" else 0x01
        flipped = bytes(wal)
        wal_path.write_bytes(flipped)
        # SQLite on its own would now drop committed transactions without a word (with
        # the first frame damaged, the top-up among them)
        assert check_wal(flipped).corrupt
        if where == "first_frame":
            assert not sqlite_alone_sees(db, flipped, f"topup:{sale}")

        async with running(config) as daemon:
            outbox = daemon.outbox
            assert outbox is not None and daemon.commands is not None
            [evidence] = list((tmp_path / "gw.db.evidence").iterdir())
            assert (evidence / "gw.db-wal").read_bytes() == flipped
            manifest = json.loads((evidence / "manifest.json").read_text())
            assert manifest["kind"] == "wal" and manifest["wal"]["lost_commit_frames"]
            state = outbox.storage
            credited = [e for e, _ in ledger(db) if e == f"topup:{sale}"]
            # not lost without a word: recovered with its credit, or the account held
            assert (credited and "acct-001" not in state.held) or state.held == ("acct-001",), (
                state,
                ledger(db),
            )
            if where == "first_frame":
                assert credited and state.mode is StorageMode.NORMAL
            else:
                assert state.mode is StorageMode.RECOVERING and state.held == ("acct-001",)
                assert ledger(db) == []  # nothing unproved, no opening balance
            again = await daemon.commands.handle(envelope, channel="mqtt")
            assert again.outcome is not Outcome.APPLIED, again
            assert again.reason in (
                None,  # duplicate: its id came back with the evidence
                RejectReason.REPLAY,
                RejectReason.COUNTER_STALE,
                RejectReason.ISSUED_BEFORE_RECOVERY,
            ), again
            assert sum(1 for e, _ in ledger(db) if e == f"topup:{sale}") == len(credited) <= 1
            assert not sim.meter(1).relay_open
