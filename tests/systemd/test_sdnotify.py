"""sd_notify against a real AF_UNIX datagram socket, and the gated watchdog."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.sdnotify import Notifier, WatchdogGate, stalled_conditions, watchdog_interval_s


class Listener:
    """Reads the datagrams as systemd would (promptly, in its own thread)."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.received: list[str] = []
        self.lock = threading.Lock()
        sock.settimeout(0.05)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.received.append(data.decode())

    def messages(self, settle: float = 0.15) -> list[str]:
        """Messages received since the last call (after letting in-flight ones arrive)."""
        time.sleep(settle)
        with self.lock:
            out, self.received = self.received, []
        return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    lst = Listener(s, path)
    yield lst
    lst.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"edgegw-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    lst = Listener(s, "@" + name)
    yield lst
    lst.close()


def test_ready_status_watchdog_stopping(listener: Listener) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.name})
    assert n.enabled
    assert n.ready("db open, keys loaded")
    assert n.status("polling 12 meters\nsecond line")
    assert n.watchdog()
    assert n.stopping()
    assert listener.messages() == [
        "READY=1\nSTATUS=db open, keys loaded",
        "STATUS=polling 12 meters second line",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_abstract_namespace(abstract_listener: Listener) -> None:
    n = Notifier({"NOTIFY_SOCKET": abstract_listener.name})
    assert n.ready()
    assert abstract_listener.messages() == ["READY=1"]


def test_outside_systemd_is_a_noop(tmp_path: Path) -> None:
    assert not Notifier({}).ready()
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    # A socket path with no listener: reported as False, never raised.
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")}).ready()


def test_watchdog_interval() -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    pid = os.getpid()
    assert watchdog_interval_s({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(pid)}) == 2.5
    assert watchdog_interval_s({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None


def test_stalled_conditions_pure() -> None:
    assert stalled_conditions({"poll": 0.0, "db": 5.0}, {"poll": 10, "db": 10}, 10.0) == {}
    assert stalled_conditions({"poll": 0.0, "db": 5.0}, {"poll": 10, "db": 10}, 10.5) == {
        "poll": 10.5
    }


def test_gate_stops_pinging_when_polling_stalls(listener: Listener) -> None:
    t = [0.0]
    gate = WatchdogGate(
        Notifier({"NOTIFY_SOCKET": listener.name}),
        poll_deadline_s=10,
        db_deadline_s=30,
        clock=lambda: t[0],
    )
    sent = []
    for _ in range(6):  # polling progresses every 5 s, the database commits
        t[0] += 5
        gate.note_poll_progress()
        gate.note_db_write_ok()
        sent.append(gate.tick())
    assert sent == [True] * 6
    assert listener.messages() == ["WATCHDOG=1"] * 6
    for _ in range(4):  # the poller stalls; the database is still fine
        t[0] += 5
        gate.note_db_write_ok()
        gate.tick()
    msgs = listener.messages()
    assert msgs.count("WATCHDOG=1") == 2  # 5 s and 10 s after the last poll: within the limit
    assert [m for m in msgs if m.startswith("STATUS=")] == [
        "STATUS=watchdog withheld: poll stalled for 15.0 s (limit 10 s)"
    ]
    t[0] += 1
    gate.note_poll_progress()
    assert gate.tick()
    assert listener.messages() == ["STATUS=running", "WATCHDOG=1"]


def test_gate_stops_pinging_when_db_stalls(listener: Listener) -> None:
    t = [0.0]
    gate = WatchdogGate(
        Notifier({"NOTIFY_SOCKET": listener.name}), db_deadline_s=3, clock=lambda: t[0]
    )
    t[0] = 4
    gate.note_poll_progress()
    assert not gate.tick()
    assert gate.problems() == ["db stalled for 4.0 s (limit 3 s)"]
    with pytest.raises(KeyError):
        gate.note("nonexistent")


async def test_gate_run_loop_with_real_clock(listener: Listener) -> None:
    """A live loop: pings while a fake poller progresses, none once it stops."""
    gate = WatchdogGate(
        Notifier({"NOTIFY_SOCKET": listener.name}), poll_deadline_s=0.15, db_deadline_s=60
    )

    async def poller(cycles: int) -> None:
        for _ in range(cycles):
            gate.note_poll_progress()
            await asyncio.sleep(0.02)

    task = asyncio.create_task(gate.run(interval_s=0.03))
    try:
        await poller(15)  # ~0.3 s of progress
        during = gate.pings
        assert during >= 5
        await asyncio.sleep(0.2)  # poller stalled beyond its deadline
        stalled_at = gate.pings
        await asyncio.sleep(0.3)
        assert gate.pings == stalled_at, "watchdog kept pinging with a stalled poller"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    msgs = await asyncio.to_thread(listener.messages)
    assert msgs.count("WATCHDOG=1") == gate.pings
    assert any(m.startswith("STATUS=watchdog withheld: poll stalled") for m in msgs)
