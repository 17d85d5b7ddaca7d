"""Sneakernet: export the sealed backlog, import it at central, then the online
delivery of the same batches is a no-op; and the CLI round trip."""

from __future__ import annotations

import argparse
import functools
import sqlite3
import time
from pathlib import Path

import pytest

from gateway import backlog_cli
from gateway.config import BrokerSection
from headend import cli as headend_cli
from headend.ingest import Headend
from headend.store import HeadendDB
from headend.usb_import import import_backlog
from store_forward.outbox import Outbox
from store_forward.uplink import Uplink
from tests.harness.mosquitto import Mosquitto
from tests.store_forward.helpers import Site, running, settings, six_quantity_reading, wait_for


def counts(path: Path) -> tuple[int, int, int]:
    with sqlite3.connect(path) as db:
        (r,) = db.execute("SELECT count(*) FROM readings").fetchone()
        (t,) = db.execute("SELECT count(*) FROM telemetry").fetchone()
        (b,) = db.execute("SELECT count(*) FROM batches").fetchone()
    return int(r), int(t), int(b)


async def test_export_import_then_online_replay_is_a_no_op(tmp_path: Path) -> None:
    site = Site(tmp_path)
    ks = site.gateway("gw-s")
    ob = await Outbox.open(tmp_path / "gw.db")
    for k in range(20):
        await ob.commit_cycle(k, [six_quantity_reading(f"m{j}", 900_000 * k + j, k) for j in range(15)])
    async with Mosquitto(tmp_path / "broker") as broker:
        up = Uplink(ob, gateway_id="gw-s", broker=BrokerSection(port=broker.port), settings=settings(), codec=site.codec(ks))
        # The link is down (the uplink never runs yet); a technician takes the backlog.
        from store_forward.sneakernet import export_backlog

        n = await export_backlog(ob, tmp_path / "stick")  # the uplink's registered codec
        assert n >= 2
        assert (await ob.stats()).records == 600  # nothing deleted on the gateway
        hdb = await HeadendDB.open(tmp_path / "central.db")
        registry = site.registry()
        r = await import_backlog(hdb, tmp_path / "stick", key_lookup=registry.key_lookup, now_ms=1)
        assert (r.stored, r.duplicate, r.refused) == (n, 0, [])
        assert counts(tmp_path / "central.db") == (300, 300, n)
        again = await import_backlog(hdb, tmp_path / "stick", key_lookup=registry.key_lookup, now_ms=2)
        assert (again.stored, again.duplicate) == (0, n)
        # The link comes back: the same batches go online and are answered "duplicate".
        he = Headend(hdb, host="127.0.0.1", port=broker.port, registry=registry)
        async with running(he.run(), up.run()):
            async def drained() -> bool:
                return (await ob.stats()).records == 0
            await wait_for(drained, 20, "online replay acked")
        assert counts(tmp_path / "central.db") == (300, 300, n)
        st = await ob.stats()
        assert st.readings_acked == 300 == st.readings_committed
        await hdb.close()
    await ob.close()


async def test_damaged_or_foreign_files_are_refused(tmp_path: Path) -> None:
    site = Site(tmp_path)
    ks = site.gateway("gw-s")
    ob = await Outbox.open(tmp_path / "gw.db")
    await ob.commit_cycle(1, [six_quantity_reading("m1", 1, 1)])
    codec = site.codec(ks)
    from store_forward.sneakernet import export_backlog

    n = await export_backlog(ob, tmp_path / "stick", pack=functools.partial(codec.pack, "gw-s"), gateway_id="gw-s")
    await ob.close()
    files = sorted((tmp_path / "stick").glob("*.batch"))
    assert len(files) == n == 2
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 1
    files[0].write_bytes(bytes(data))
    hdb = await HeadendDB.open(tmp_path / "central.db")
    r = await import_backlog(hdb, tmp_path / "stick", key_lookup=site.registry().key_lookup, now_ms=1)
    assert r.stored == 1 and len(r.refused) == 1 and "checksum" in r.refused[0]
    await hdb.close()


def test_cli_export_and_import(tmp_path: Path) -> None:
    import asyncio
    import base64

    site = Site(tmp_path)
    ks = site.gateway("gw-cli")
    db = tmp_path / "gw.db"
    config = tmp_path / "site.toml"
    config.write_text(
        f'[gateway]\nid = "gw-cli"\nsite = "t"\n[storage]\npath = "{db}"\n'
        '[[bus]]\nname = "tcp-1"\ntype = "tcp"\nhost = "127.0.0.1"\n'
        '[[meter]]\nid = "m1"\nbus = "tcp-1"\nprotocol = "modbus"\nunit_id = 1\nprofile = "sdm120"\n'
    )

    async def fill() -> None:
        from store_forward.storage_keys import StorageKeys

        ob = await Outbox.open(db, keys=StorageKeys.from_keystore(ks))
        await ob.commit_cycle(1, [six_quantity_reading("m1", t, t) for t in range(50)])
        await ob.close()

    asyncio.run(fill())
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    backlog_cli.register(sub)
    hp = sub.add_parser("headend")
    headend_cli.register_headend(hp.add_subparsers(dest="h", required=True))
    pub = base64.b64encode(site.headend_public).decode()
    args = parser.parse_args(
        ["backlog", "export", "--config", str(config), "--to", str(tmp_path / "usb"),
         "--keystore", str(ks.path), "--headend-public-key", pub]
    )
    assert args.func(args) == 0
    args = parser.parse_args(
        ["headend", "import", str(tmp_path / "usb"), "--db", str(tmp_path / "c.db"),
         "--key", str(site.headend_key_path), "--registry", str(site.registry_dir)]
    )
    assert args.func(args) == 0
    assert counts(tmp_path / "c.db")[:2] == (50, 50)
    # unknown gateway: the registry lacks it, import refuses (exit 1) and stores nothing
    (site.registry_dir / "gw-cli.json").unlink()
    args = parser.parse_args(
        ["headend", "import", str(tmp_path / "usb"), "--db", str(tmp_path / "d.db"),
         "--key", str(site.headend_key_path), "--registry", str(site.registry_dir)]
    )
    assert args.func(args) == 1
    assert counts(tmp_path / "d.db") == (0, 0, 0)
    _ = time, pytest
