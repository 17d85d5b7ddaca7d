"""A database written by the previous release opens, migrates and loses nothing.

The fixture (tests/fixtures/previous_release, made by its make.py with the
code of that release) is what that release's daemon left behind on a small
site: accounts and their ledgers, top-ups, the replay state, the audit log with
signed checkpoints, a configuration change, relay operations, records
acknowledged, sent and not acknowledged, numbered and never sent, never
batched, and one set aside as damaged. Every test works on a copy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import storage_setup
from gateway.cli import main as edgegw
from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.database import SCHEMA, open_database
from gateway.security import audit
from gateway.security.envelope import Envelope, Outcome, RejectReason, parse_envelope, sign_command
from gateway.security.roles import CommandType
from headend.ingest import Headend
from headend.store import HeadendDB
from store_forward.database import SchemaVersionError
from tests.gateway.e2e import until
from tests.harness.mosquitto import Mosquitto, free_port

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "previous_release"
MANIFEST: dict[str, Any] = json.loads((FIXTURE / "manifest.json").read_text())
# Tables whose rows opening the database moves on by design: a new nonce epoch
# for the storage key each time the database is opened (store_forward.sealing).
ADVANCED_ON_OPEN = {"storage_nonce_epoch"}


def central_key(role: str, generation: int = 1) -> Ed25519PrivateKey:
    """Central's keys of the fixture (make.py derives them from the same seeds)."""
    seed = hashlib.sha256(f"edge-gateway migration fixture: {role} key {generation}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def copy_site(tmp: Path) -> Path:
    """A copy of the fixture's site, its keystore private as on a gateway (git keeps
    no directory modes)."""
    site = tmp / "site"
    shutil.copytree(FIXTURE / "site", site)
    keys = site / "keys"
    keys.chmod(0o700)
    for f in keys.iterdir():
        f.chmod(0o600)
    return site


def snapshot(db: Path) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every table: its columns and all its rows."""
    out: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for t in tables:
            cur = conn.execute(f'SELECT * FROM "{t}"')
            out[t] = ([d[0] for d in cur.description], [tuple(r) for r in cur.fetchall()])
    return out


def user_version(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


async def test_a_database_of_the_previous_release_migrates_and_loses_nothing(tmp_path: Path) -> None:
    site = copy_site(tmp_path)
    db = site / "gw.db"
    assert user_version(db) == MANIFEST["user_version"] == 2
    before = snapshot(db)
    assert {t: len(rows) for t, (_, rows) in before.items()} == MANIFEST["tables"]
    cfg = load_config(site / "gateway.toml")
    ob = await open_database(db, keys=storage_setup.storage_keys(cfg))
    await ob.close()
    assert user_version(db) == SCHEMA.version
    after = snapshot(db)
    assert set(before) <= set(after)
    for table, (columns, rows) in before.items():
        now_columns, now_rows = after[table]
        assert set(columns) <= set(now_columns), table
        kept = {tuple(r[now_columns.index(c)] for c in columns) for r in now_rows}
        if table in ADVANCED_ON_OPEN:
            assert len(now_rows) == len(rows), table
            continue
        missing = [r for r in rows if r not in kept]
        assert not missing, f"{table}: {len(missing)} row(s) lost, e.g. {missing[0]}"
        if table != "kv":  # opening may record what it checked (a key tag), never less
            assert len(now_rows) == len(rows), table
    # every record still opens under the keys it was sealed with (two storage key
    # versions: the key was rotated while the release ran)
    ob = await open_database(db, keys=storage_setup.storage_keys(cfg))
    try:
        stats = await ob.stats()
        assert stats.records == MANIFEST["tables"]["outbox"]
        assert await ob.pending_batches() == MANIFEST["pending_batches"]
        opened = 0
        exclude: list[int] = []
        while (batch := await ob.next_batch(MANIFEST["stopped_ms"], exclude=exclude)) is not None:
            exclude.append(batch.seq)
            opened += len(batch.records)
        assert opened == stats.records
        assert (await ob.stats()).records == stats.records  # nothing set aside as damaged
    finally:
        await ob.close()
    assert audit.verify(db).ok
    # opened again: nothing left to migrate
    ob = await open_database(db, keys=storage_setup.storage_keys(cfg))
    await ob.close()
    assert user_version(db) == SCHEMA.version


def point_at(site: Path, broker_port: int) -> Path:
    """The fixture's configuration, on this test's broker; its meters' bus nowhere."""
    path = site / "gateway.toml"
    text = path.read_text()
    cfg = load_config(path)
    (bus,) = cfg.buses
    text = re.sub(rf"\bport = {cfg.broker.port}\b", f"port = {broker_port}", text, count=1)
    text = re.sub(rf"\bport = {bus.port}\b", f"port = {free_port()}", text, count=1)
    path.write_text(text)
    return path


def headend_record_ids(db: Path) -> set[int]:
    with sqlite3.connect(db) as conn:
        return {
            int(r)
            for table in ("readings", "telemetry", "events")
            for (r,) in conn.execute(f"SELECT record_id FROM {table}")
        }


async def test_the_daemon_runs_on_it_replays_stay_refused_and_pending_records_are_sent(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    site = copy_site(tmp_path)
    db = site / "gw.db"
    pending_ids = {r[0] for r in snapshot(db)["outbox"][1]}
    path = point_at(site, mosquitto.port)
    # the daemon's clock takes up where the release stopped (the commands' windows)
    start, t0 = MANIFEST["stopped_ms"] + 120_000, time.monotonic()

    def clock_ms() -> int:
        return start + int((time.monotonic() - t0) * 1000)

    hdb = await HeadendDB.open(tmp_path / "central.db")
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    daemon = Daemon(load_config(path), clock_ms=clock_ms, clock_synced=lambda: True)
    stop = asyncio.Event()
    run = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 20)
        assert user_version(db) == SCHEMA.version
        assert daemon.commands is not None and daemon.prepaid is not None and daemon.outbox is not None
        outbox, prepaid, commands = daemon.outbox, daemon.prepaid, daemon.commands

        async def balances() -> dict[str, int]:
            async with outbox.transaction() as conn:
                views = {a: await prepaid.ledger.view(conn, a) for a in sorted(prepaid.accounts)}
            return {a: v.balance_micro for a, v in views.items()}

        # the money is where the release left it (the ledgers were verified at start)
        assert await balances() == MANIFEST["balances_micro"]
        # every command the release applied is refused when it comes again
        applied = [c for c in MANIFEST["commands"] if c["outcome"] == "applied"]
        assert len(applied) >= 10
        for c in applied:
            raw = base64.b64decode(c["envelope"])
            env = parse_envelope(raw)
            assert isinstance(env, Envelope)
            res = await commands.handle(raw, channel=c["channel"])
            assert res.outcome is Outcome.REJECTED, (c["command_id"], res)
            if env.issuer != "billing-k1":  # revoked by the release: refused for that first
                assert res.reason is RejectReason.REPLAY, (c["command_id"], res)
        assert await balances() == MANIFEST["balances_micro"]
        # and a new sale is credited, signed with central's current billing key
        now = daemon.time_ms()
        sale = sign_command(
            central_key("billing", 2),
            issuer="billing-k2",
            target=MANIFEST["gateway"],
            command_id="sale-after-upgrade",
            counter=2,
            issued_at_ms=now - 1_000,
            expires_at_ms=now + 3_600_000,
            type=CommandType.TOPUP,
            body={"account": "acct-001", "amount_micro": 4_000_000, "purchase_counter": 4,
                  "payment_channel": "mobile_app"},
        )  # fmt: skip
        assert (await commands.handle(sale, channel="mqtt")).outcome is Outcome.APPLIED
        expected = dict(MANIFEST["balances_micro"])
        expected["acct-001"] += 4_000_000
        assert await balances() == expected
        # the records the release had not delivered reach central: the batches it sent
        # (as their stored bytes), the one it numbered, and the ones never batched
        await until(lambda: pending_ids <= headend_record_ids(tmp_path / "central.db"), 30,
                    "every pending record of the release at central")  # fmt: skip
        await until(lambda: not set(MANIFEST["pending_batches"]) & set(_pending(db)), 15,
                    "the release's batches acknowledged")  # fmt: skip
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()
    assert audit.verify(db).ok


def _pending(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [int(s) for (s,) in conn.execute("SELECT seq FROM batches")]


def test_a_database_from_a_newer_release_is_refused_and_the_daemon_does_not_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = copy_site(tmp_path)
    db = site / "gw.db"
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA.version + 1}")
    image = db.read_bytes()
    cfg = load_config(site / "gateway.toml")

    async def opening() -> None:
        await open_database(db, keys=storage_setup.storage_keys(cfg))

    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA.version + 1} was written by a newer"):
        asyncio.run(opening())
    assert edgegw(["run", "--config", str(site / "gateway.toml")]) == 1
    assert "cannot start" in caplog.text and "newer release" in caplog.text
    assert db.read_bytes() == image, "nothing was written to it"
