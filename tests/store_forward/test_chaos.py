"""SIGKILL chaos: the gateway process killed at random points during ingest and
drain (and the broker restarted now and then); afterwards every committed
reading is at the headend exactly once and no nonce epoch was used twice."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headend.ingest import Headend
from headend.store import HeadendDB
from tests.harness.mosquitto import Mosquitto
from tests.store_forward.helpers import Site, running

ROOT = Path(__file__).resolve().parents[2]


def start(db: Path, site: Site, ks_path: Path, port: int, mode: str) -> subprocess.Popen[bytes]:
    pub = base64.b64encode(site.headend_public).decode()
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store_forward.chaos_child", str(db), str(ks_path), pub, str(port), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )


def gateway_state(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        kv = {str(k): v for k, v in c.execute("SELECT key, value FROM kv") if isinstance(v, int)}
        (records,) = c.execute("SELECT count(*) FROM outbox").fetchone()
        nonces = [bytes(b)[1:13] for (b,) in c.execute("SELECT body FROM outbox")]
    assert len(nonces) == len(set(nonces)), "a nonce is stored twice"
    return {**kv, "records": int(records)}


async def chaos(tmp_path: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    site = Site(tmp_path)
    ks = site.gateway("gw-chaos")
    db = tmp_path / "gw.db"
    hdb = await HeadendDB.open(tmp_path / "central.db")
    # sessions survive a broker restart (persistence, saved on SIGTERM)
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    await asyncio.to_thread(broker.start)
    port = broker.port
    epochs: list[int] = []
    try:
        he = Headend(hdb, host="127.0.0.1", port=port, registry=site.registry())
        async with running(he.run()):
            for k in range(kills):
                proc = start(db, site, ks.path, port, "ingest" if k % 5 else "drain")
                assert proc.stdout is not None
                if rng.random() < 0.15:  # during start-up: imports, quick_check, epoch
                    await asyncio.sleep(rng.uniform(0.05, 0.5))
                else:
                    line = await asyncio.to_thread(proc.stdout.readline)
                    if line.startswith(b"open "):
                        epochs.append(int(line.split()[1]))
                    await asyncio.sleep(rng.uniform(0.0, 0.6))
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
                if k % 10 == 9:  # the broker goes down and comes back (keeps sessions)
                    await asyncio.to_thread(broker.stop)
                    await asyncio.sleep(0.1)
                    await asyncio.to_thread(broker.start)  # the same port
            assert gateway_state(db)["readings_committed"] > 0
            # a clean run drains what is left
            proc = start(db, site, ks.path, port, "drain")
            try:
                deadline = time.monotonic() + 60
                while gateway_state(db)["records"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
            finally:
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
    finally:
        await asyncio.to_thread(broker.stop)
        await hdb.close()
    state = gateway_state(db)
    assert state["records"] == 0, "backlog not drained"
    assert len(epochs) == len(set(epochs)) and epochs == sorted(epochs), epochs
    with sqlite3.connect(tmp_path / "central.db") as c:
        readings = c.execute("SELECT record_id, meter_id, time_ms FROM readings").fetchall()
        (telemetry,) = c.execute("SELECT count(*) FROM telemetry").fetchone()
    ids = [r[0] for r in readings]
    assert len(ids) == len(set(ids))
    assert len({(m, t) for _, m, t in readings}) == len(readings), "a reading stored twice"
    assert len(readings) == state["readings_committed"] == state["readings_acked"]
    assert telemetry == state["telemetry_committed"]


async def test_sigkill_chaos_during_ingest_and_drain(tmp_path: Path) -> None:
    await chaos(tmp_path, kills=50, seed=int.from_bytes(os.urandom(4)))


@pytest.mark.long
@pytest.mark.timeout(1800)
async def test_sigkill_chaos_long(tmp_path: Path) -> None:
    await chaos(tmp_path, kills=500, seed=int.from_bytes(os.urandom(4)))
