"""The real daemon's systemd notifications: READY, a gated watchdog, STOPPING.

The daemon polls a real Modbus TCP simulator and writes a real SQLite
database; its notifications go to a real AF_UNIX datagram socket read the way
systemd reads ``$NOTIFY_SOCKET``. Each stall is real:

* database: another connection holds ``BEGIN EXCLUSIVE`` on the gateway's
  database file, so the writer's ``BEGIN IMMEDIATE`` waits on the lock;
* polling: the meter answers later than the watchdog's poll deadline (the
  bus timeout is longer still, so the poller is stuck inside its cycle);
* event loop: a blocking call runs on the daemon's loop.

In each case WATCHDOG=1 must stop, STATUS= must say why, and the pings must
resume when the stall ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.daemon import Daemon
from testbed.simulators.modbus import ModbusSimulator
from tests.harness.site import bus, gateway_config, meter

POLL_S = 0.2
DEADLINE_S = 0.8  # both watchdog conditions (the daemon's own default is minutes)
WATCHDOG_USEC = 100_000  # the gate ticks at half of this: every 50 ms
STALL_S = 2.0


class NotifySocket:
    """A bound AF_UNIX datagram socket, read promptly in a thread, as systemd does."""

    def __init__(self) -> None:
        # sun_path is limited to 108 bytes: keep the path short.
        self.dir = tempfile.mkdtemp(prefix="egw-ntf-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.lock = threading.Lock()
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.received.append((time.monotonic(), data.decode()))

    def messages(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str]]:
        with self.lock:
            return [(t, m) for t, m in self.received if since <= t <= until]

    def pings(self, since: float, until: float = float("inf")) -> list[float]:
        return [t for t, m in self.messages(since, until) if m == "WATCHDOG=1"]

    def first(self, pred: Callable[[str], bool], since: float = 0.0) -> tuple[float, str] | None:
        for t, m in self.messages(since):
            if pred(m):
                return t, m
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


async def wait_message(
    ns: NotifySocket, pred: Callable[[str], bool], since: float, timeout_s: float, what: str
) -> tuple[float, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = ns.first(pred, since)
        if found is not None:
            return found
        await asyncio.sleep(0.02)
    seen = [m for _, m in ns.messages(since)]
    raise AssertionError(f"no {what} within {timeout_s} s; received since: {seen[-12:]}")


def site(tmp: Path, modbus_port: int) -> Path:
    return gateway_config(  # nobody listens at the broker: the uplink keeps reconnecting, never in the way
        tmp,
        "gw-watchdog",
        gateway={"poll_interval_s": POLL_S},
        storage={"path": str(tmp / "gateway.db")},
        uplink={"reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        buses=[bus(modbus_port, timeout_s=5.0)],  # longer than the watchdog's poll deadline in this test
        meters=[meter()],
    )


@contextlib.asynccontextmanager
async def running_daemon(
    tmp: Path, ns: NotifySocket, sim: ModbusSimulator
) -> AsyncIterator[tuple[Daemon, asyncio.Event, asyncio.Task[None]]]:
    env = {
        "NOTIFY_SOCKET": ns.path,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "WATCHDOG_PID": str(os.getpid()),
    }
    daemon = Daemon(
        load_config(site(tmp, sim.port)), env=env, watchdog_deadlines_s=(DEADLINE_S, DEADLINE_S)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon, stop, task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def assert_pinging(ns: NotifySocket, seconds: float) -> None:
    """WATCHDOG=1 keeps arriving: no gap longer than a few tick intervals."""
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    pings = ns.pings(t0)
    tick = WATCHDOG_USEC / 2e6
    assert len(pings) >= seconds / tick / 2, f"{len(pings)} pings in {seconds} s"
    gaps = [b - a for a, b in zip([t0, *pings], [*pings, time.monotonic()], strict=True)]
    # Generous for a loaded machine, still well below the stalls' withheld windows.
    assert max(gaps) < 0.5, f"ping gap of {max(gaps):.2f} s while healthy"


async def assert_stall_withholds(
    ns: NotifySocket, begun: float, ended: float, condition: str
) -> float:
    """During the stall: the withheld STATUS names ``condition``, and no ping after it."""
    t_w, status = await wait_message(
        ns, lambda m: m.startswith("STATUS=watchdog withheld:"), begun, 0.1, "withheld STATUS"
    )
    assert f"{condition} stalled for " in status and f"(limit {DEADLINE_S:g} s)" in status, status
    # Withheld once the condition is older than its deadline (it was last noted
    # at most one poll interval or commit before the stall began), not before.
    assert DEADLINE_S - POLL_S - 0.1 <= t_w - begun <= DEADLINE_S + 1.0, t_w - begun
    assert ended - t_w >= 0.4, "stall too short to show anything"
    assert ns.pings(t_w + 0.01, ended) == [], "pinged while stalled"
    return t_w


async def test_ready_watchdog_stalls_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    ns = notify_socket

    async with ModbusSimulator(units=[1]) as sim:
        async with running_daemon(tmp_path, ns, sim) as (daemon, stop, task):
            # -- READY=1 once the database is open, then pings while polling ------
            await asyncio.wait_for(daemon.ready.wait(), 15)
            t_ready, ready = await wait_message(
                ns, lambda m: m.startswith("READY=1"), 0.0, 2, "READY=1"
            )
            assert ready == "READY=1\nSTATUS=gateway gw-watchdog: 1 meters"
            assert ns.pings(0.0, t_ready) == [], "pinged before READY=1"
            cycles = daemon.stats.cycles
            await assert_pinging(ns, 1.0)
            assert daemon.stats.cycles > cycles, "pings without poll cycles committed"

            # -- (a) the database does not commit: another writer holds it ----------
            db_path = tmp_path / "gateway.db"
            other = sqlite3.connect(
                db_path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            try:
                await asyncio.to_thread(other.execute, "BEGIN EXCLUSIVE")
                begun = time.monotonic()
                await asyncio.sleep(0.1)  # a commit that won the race has been counted
                committed = daemon.stats.cycles
                await asyncio.sleep(STALL_S - 0.1)
                assert daemon.stats.cycles == committed, "a commit got through the lock"
                ended = time.monotonic()
                t_w = await assert_stall_withholds(ns, begun, ended, "db")
                _, status = ns.first(lambda m: m.startswith("STATUS="), t_w) or (0, "")
                assert "poll" not in status, "polling went on while the writer waited"
            finally:
                await asyncio.to_thread(other.execute, "ROLLBACK")
                other.close()
            t_run, _ = await wait_message(
                ns, lambda m: m == "STATUS=running", ended, 3, "STATUS=running after the lock"
            )
            await wait_message(ns, lambda m: m == "WATCHDOG=1", t_run, 1, "pings after the lock")
            # The writer waited on the lock (busy timeout), it did not drop the cycles.
            assert daemon.stats.commit_failures == 0
            await assert_pinging(ns, 0.6)

            # -- (b) the meter answers later than the poll deadline -----------------
            # The next request (within one poll interval) takes 3 s; the bus timeout is 5 s.
            sim.meter(1).delay_s = STALL_S + 1.0
            begun = time.monotonic()
            await asyncio.sleep(STALL_S)
            sim.meter(1).delay_s = 0.0  # the request in flight still takes its time
            ended = begun + STALL_S + 0.8
            await asyncio.sleep(max(0.0, ended - time.monotonic()))
            await assert_stall_withholds(ns, begun, ended, "poll")
            t_run, _ = await wait_message(
                ns, lambda m: m == "STATUS=running", ended, 3, "STATUS=running after the meter"
            )
            await wait_message(ns, lambda m: m == "WATCHDOG=1", t_run, 1, "pings after the meter")
            await assert_pinging(ns, 0.6)

            # -- (c) the daemon's event loop is blocked ----------------------------
            asyncio.get_running_loop().call_soon(time.sleep, STALL_S)
            await asyncio.sleep(0)  # the blocking call runs before this resumes
            blocked_until = time.monotonic()
            assert ns.pings(blocked_until - STALL_S + 0.1, blocked_until) == []
            await wait_message(ns, lambda m: m == "WATCHDOG=1", blocked_until, 2, "pings after")
            await assert_pinging(ns, 0.6)

            # -- STOPPING=1 on stop, and no ping after it ----------------------------
            stop.set()
            await asyncio.wait_for(asyncio.shield(task), 15)
            t_stop, _ = await wait_message(ns, lambda m: m == "STOPPING=1", 0.0, 1, "STOPPING=1")
            await asyncio.sleep(0.3)
            assert ns.pings(t_stop) == []
