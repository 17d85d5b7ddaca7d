"""A full disk in the whole daemon: it keeps polling and protecting money, never loops.

The gateway's database lives on a small tmpfs mounted for the test (skipped,
with the reason, where mounting is not permitted); a filler file takes the
rest of it. The daemon runs with a real ``NOTIFY_SOCKET`` and short watchdog
deadlines, polls a Modbus TCP simulator metering a heavy load on a prepaid
account:

* full while running: the reserve is released (money and events go on
  committing into it), then work waits in memory; the watchdog keeps being
  fed and systemd sees why in STATUS=; the account that runs out of money is
  still cut (decided in memory); when space returns everything held is stored
  in order and the reserve comes back — the same process all along;
* full at start, with the reserve already used up by an earlier episode (the
  start that used to fail with "database or disk is full" and be restarted by
  systemd for ever): READY=1, polling, pings, STATUS= saying the disk is
  full; then space returns and the readings are stored, the reserve re-created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.daemon import Daemon
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.gateway.test_prepaid_daemon import outbox_bodies
from tests.harness.site import gateway_config, meter, prepaid_account
from tests.systemd.test_daemon_watchdog import NotifySocket, wait_message

ROOT = Path(__file__).resolve().parents[2]
WATCHDOG_USEC = 200_000  # pings every 100 ms
DEADLINE_S = 1.5  # both watchdog conditions


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


def site(tmp: Path, fs: Path, modbus_port: int, balance: str) -> Path:
    acct = prepaid_account(tmp, opening=balance, alarm1="0.02", alarm2="0.01", close_permit="0.05")
    return gateway_config(
        tmp,
        "gw-full",
        modbus_port=modbus_port,
        gateway={"timezone": "Asia/Shanghai"},
        storage={"path": str(fs / "gw.db"), "reserve_bytes": 0},
        uplink={"reconnect_min_s": 0.2, "reconnect_max_s": 0.5},  # nobody listens: the link is down
        meters=[meter(account="acct-001")],
        accounts=[acct],
    )


def fill(fs: Path) -> Path:
    """Take every free byte of the filesystem (a filler file)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 64 * 1024, 4096, 512):
            block = b"\0" * size
            for _ in range(100_000):
                try:
                    os.write(fd, block)
                except OSError:
                    break
    finally:
        os.close(fd)
    st = os.statvfs(fs)
    assert st.f_bavail * st.f_frsize < 64 * 1024, "the filesystem did not fill"
    return filler


def committed(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT value FROM kv WHERE key = 'readings_committed'").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


@contextlib.asynccontextmanager
async def running(
    config: Path, ns: NotifySocket
) -> AsyncIterator[tuple[Daemon, asyncio.Task[None]]]:
    env = {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    daemon = Daemon(load_config(config), env=env, watchdog_deadlines_s=(DEADLINE_S, DEADLINE_S))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        ready = asyncio.create_task(daemon.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert ready in done, "not ready within 30 s"
        yield daemon, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def assert_fed(ns: NotifySocket, seconds: float) -> None:
    """The watchdog is pinged all along (no gap as long as a deadline)."""
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    pings = ns.pings(t0)
    gaps = [b - a for a, b in zip([t0, *pings], [*pings, time.monotonic()], strict=True)]
    assert pings and max(gaps) < DEADLINE_S, f"watchdog starved: gaps {max(gaps):.2f} s"


async def test_disk_full_while_running(
    small_fs: Path, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    db = small_fs / "gw.db"
    ns = notify_socket
    async with ModbusSimulator(units=[1], load_kw="150") as sim:  # ~0.023 yuan/s
        config = site(tmp_path, small_fs, sim.port, balance="0.15")
        async with running(config, ns) as (daemon, task):
            outbox = daemon.outbox
            assert outbox is not None and outbox.ballast.exists()
            await until(lambda: committed(db) > 3, 10, "readings stored")
            filler = fill(small_fs)
            # the reserve goes first, so that money and events still commit
            await until(lambda: not outbox.ballast.exists(), 10, "the reserve released")
            n = committed(db)
            await until(lambda: committed(db) > n, 10, "readings committed into the reserve")
            fill(small_fs)  # whatever keeps filling the disk takes the rest too
            await until(lambda: daemon.waiting_for_space, 30, "waiting for space")
            t_full = time.monotonic()
            await wait_message(ns, lambda m: "disk full" in m, t_full - 30, 5, "STATUS= disk full")
            held = daemon.backlog.readings()
            await assert_fed(ns, 2 * DEADLINE_S)
            assert daemon.backlog.readings() > held, "polling stopped while the disk is full"
            # the money runs out while nothing can be written: the trip is decided in memory
            await until(lambda: sim.meter(1).relay_open, 30, "the trip while the disk is full")
            assert daemon.waiting_for_space and not task.done()
            # space returns
            n = committed(db)
            filler.unlink()
            await until(lambda: not daemon.waiting_for_space, 15, "space noticed")
            await until(lambda: committed(db) > n, 10, "held readings stored")
            await until(lambda: outbox.ballast.exists(), 20, "the reserve re-created")
            assert not task.done()
    bodies = await outbox_bodies(db, "event")
    types = [b["type"] for b in bodies]
    assert "storage_full" in types, types
    assert "relay.operation" in types  # the trip made while full has its event
    assert types.count("gateway_started") == 1  # one process all along


async def test_disk_full_at_start_does_not_loop(
    small_fs: Path, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    db = small_fs / "gw.db"
    ns = notify_socket
    async with ModbusSimulator(units=[1], load_kw="1") as sim:
        config = site(tmp_path, small_fs, sim.port, balance="50")
        async with running(config, ns):
            await until(lambda: committed(db) > 3, 10, "readings stored")
        before = committed(db)
        # an earlier episode used the reserve up, and the disk is still full
        (small_fs / "gw.db.ballast").unlink()
        filler = fill(small_fs)
        t0 = time.monotonic()
        async with running(config, ns) as (daemon, task):
            await wait_message(ns, lambda m: m.startswith("READY=1"), t0, 10, "READY=1")
            await until(lambda: daemon.waiting_for_space, 10, "waiting for space")
            await wait_message(ns, lambda m: "disk full" in m, t0, 10, "STATUS= disk full")
            await assert_fed(ns, 2 * DEADLINE_S)
            await until(lambda: daemon.backlog.readings() > 5, 10, "polling while full")
            assert committed(db) == before and not task.done()
            filler.unlink()
            await until(lambda: committed(db) > before + 5, 20, "held readings stored")
            await until(lambda: (small_fs / "gw.db.ballast").exists(), 20, "the reserve re-created")
            assert not daemon.waiting_for_space and not task.done()
            n = committed(db)
            await until(lambda: committed(db) > n + 3, 10, "polling into the database again")
    types = [b["type"] for b in await outbox_bodies(db, "event")]
    assert "storage_full" in types and types.count("gateway_started") == 2, types
