"""The real daemon's start and stop: timeout extension while slow, the USB audit spool.

* A start held up by another process's exclusive lock on the database sends
  EXTEND_TIMEOUT_USEC to the notify socket until READY; a stop sends it after
  STOPPING=1.
* Records the USB provisioning unit spooled (it runs as another user and never
  opens the gateway database) end up in the hash-chained audit log and as
  events for central, also when they arrive while the daemon runs.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import gateway.daemon.supervisor as daemon_mod
from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.security import audit
from provisioning.usb import AUDIT_SPOOL, audit_spool_writer
from testbed.simulators.modbus import ModbusSimulator
from tests.systemd.test_daemon_watchdog import NotifySocket, notify_socket, site, wait_message

__all__ = ["notify_socket"]  # the fixture, used by name

LOCK_S = 1.5


def hold_exclusive(db: Path, seconds: float, locked: threading.Event) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_slow_start_and_stop_extend_the_timeout(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_mod, "EXTEND_STEP_S", 0.3)  # renewed every 0.1 s
    ns = notify_socket
    async with ModbusSimulator(units=[1]) as sim:
        cfg = load_config(site(tmp_path, sim.port))
        first = Daemon(cfg, env={})
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await asyncio.wait_for(first.ready.wait(), 20)
        stop.set()
        await asyncio.wait_for(task, 20)  # the database exists now

        locked = threading.Event()
        holder = threading.Thread(target=hold_exclusive, args=(cfg.storage.path, LOCK_S, locked))
        holder.start()
        assert locked.wait(5)
        t0 = time.monotonic()
        daemon = Daemon(cfg, env={"NOTIFY_SOCKET": ns.path})
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            t_ready, _ = await wait_message(ns, lambda m: m.startswith("READY=1"), t0, 20, "READY")
            extends = [t for t, m in ns.messages(t0, t_ready) if m == "EXTEND_TIMEOUT_USEC=300000"]
            assert t_ready - t0 >= LOCK_S - 0.3, "the lock did not hold the start up"
            assert len(extends) >= 5, f"{len(extends)} extensions during a {t_ready - t0:.1f} s start"
            assert max(b - a for a, b in zip([t0, *extends], [*extends, t_ready], strict=True)) < 1.0  # renewed every 0.1 s; generous for a loaded machine
            await asyncio.sleep(0.5)
            assert not [m for _, m in ns.messages(t_ready + 0.05) if m.startswith("EXTEND")], (
                "extensions went on after READY"
            )
        finally:
            t_stop = time.monotonic()
            stop.set()
            await asyncio.wait_for(task, 20)
            holder.join(5)
        t_stopping, _ = await wait_message(ns, lambda m: m == "STOPPING=1", t_stop, 5, "STOPPING")
        assert [m for _, m in ns.messages(t_stopping) if m == "EXTEND_TIMEOUT_USEC=300000"]


def with_provisioning_dir(site_file: Path, prov: Path) -> None:
    site_file.write_text(site_file.read_text() + f'\n[security]\nprovisioning_dir = "{prov}"\n')


async def test_usb_audit_spool_goes_into_the_audit_log(tmp_path: Path) -> None:
    prov = tmp_path / "provisioning"
    prov.mkdir()
    spool = prov / AUDIT_SPOOL
    write = audit_spool_writer(spool)
    await write("provisioning.refused", {"bundle": "b1.egwb", "code": "bad-signature"})
    await write("provisioning.accepted", {"bundle": "b2.egwb", "version": 7})
    with spool.open("ab") as f:
        f.write(b"{not json\n")  # a damaged line is kept as evidence, not dropped
    async with ModbusSimulator(units=[1]) as sim:
        path = site(tmp_path, sim.port)
        with_provisioning_dir(path, prov)
        cfg = load_config(path)
        daemon = Daemon(cfg, env={})
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 20)
            assert not spool.exists(), "spool not drained before READY"
            # Records spooled while the daemon runs are imported on its next pass.
            await write("provisioning.refused", {"bundle": "b3.egwb", "code": "expired"})
            assert daemon.outbox is not None
            assert await daemon.drain_provisioning_audit(daemon.outbox) == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    result = audit.verify(cfg.storage.path)
    assert result.ok, result.summary()
    db = sqlite3.connect(cfg.storage.path)
    try:
        rows = db.execute(
            "SELECT actor, action, details FROM audit_log WHERE actor = 'provisioning:usb' ORDER BY seq"
        ).fetchall()
    finally:
        db.close()
    assert [(a, act) for a, act, _ in rows] == [
        ("provisioning:usb", "provisioning.refused"),
        ("provisioning:usb", "provisioning.accepted"),
        ("provisioning:usb", "provisioning.audit-spool-corrupt"),
        ("provisioning:usb", "provisioning.refused"),
    ]
    assert json.loads(rows[0][2]) == {"bundle": "b1.egwb", "code": "bad-signature"}
    assert json.loads(rows[2][2]) == {"line": "{not json"}
    assert not spool.with_name(AUDIT_SPOOL + ".draining").exists()
    from tests.gateway.test_prepaid_daemon import outbox_bodies

    events = [b for b in await outbox_bodies(cfg.storage.path, "event") if b.get("type") == "provisioning.audit"]
    assert [e["action"] for e in events] == [
        "provisioning.refused",
        "provisioning.accepted",
        "provisioning.audit-spool-corrupt",
        "provisioning.refused",
    ]


def test_provisioning_dir_is_derived_from_a_release_path(tmp_path: Path) -> None:
    from gateway.config import SecuritySection

    sec = SecuritySection()
    assert sec.provisioning_root(Path("/var/lib/edgegw/provisioning/current/files/gateway.toml")) == Path(
        "/var/lib/edgegw/provisioning"
    )
    assert sec.provisioning_root(
        Path("/var/lib/edgegw/provisioning/releases/v3-abc/files/gateway.toml")
    ) == Path("/var/lib/edgegw/provisioning")
    assert sec.provisioning_root(Path("/etc/edgegw/gateway.toml")) is None
    assert SecuritySection(provisioning_dir=tmp_path).provisioning_root(Path("/etc/x.toml")) == tmp_path
