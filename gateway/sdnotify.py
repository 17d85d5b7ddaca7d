"""systemd service notifications (sd_notify) in pure Python, and a gated watchdog.

The protocol: newline-separated ``KEY=VALUE`` lines in one datagram sent to the
AF_UNIX socket named by ``$NOTIFY_SOCKET``. A name starting with ``@`` is in
the abstract namespace (the ``@`` becomes a NUL byte). Outside systemd the
variable is unset and every call is a no-op that returns False.

The watchdog is only useful if a ping means "the gateway is doing its job".
:class:`WatchdogGate` therefore sends ``WATCHDOG=1`` only while every liveness
condition was met recently: the daemon calls :meth:`WatchdogGate.note_poll_progress`
after each poll cycle that made progress and :meth:`WatchdogGate.note_db_write_ok`
after each committed write. A stalled poller or a database that no longer
commits stops the pings, and systemd restarts the service after ``WatchdogSec=``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = [
    "Notifier",
    "WatchdogGate",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval_s",
]


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends notifications to one ``NOTIFY_SOCKET`` (read from ``env`` at construction)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        e = os.environ if env is None else env
        path = e.get("NOTIFY_SOCKET") or None
        if path is not None and not (path.startswith("/") or path.startswith("@")):
            path = None  # vsock and other transports are not used on this appliance
        self.address: str | bytes | None = None if path is None else _address(path)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if not under systemd or on error."""
        if self.address is None:
            return False
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            # Non-blocking: a full receive queue must never stall the caller's event loop.
            flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            with socket.socket(socket.AF_UNIX, flags) as s:
                s.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, status_text: str | None = None) -> bool:
        fields = ["READY=1"]
        if status_text:
            fields.append(f"STATUS={status_text}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (e.g. while a long database recovery runs)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval_s(
    env: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The watchdog timeout systemd expects pings within, in seconds, or None if disabled.

    Reads ``WATCHDOG_USEC``; when ``WATCHDOG_PID`` is set it must be this process.
    Ping at half this interval or more often.
    """
    e = os.environ if env is None else env
    usec = e.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = e.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


_default: Notifier | None = None


def _notifier() -> Notifier:
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def notify(*fields: str) -> bool:
    return _notifier().notify(*fields)


def ready(status_text: str | None = None) -> bool:
    return _notifier().ready(status_text)


def status(text: str) -> bool:
    return _notifier().status(text)


def watchdog() -> bool:
    return _notifier().watchdog()


def stopping() -> bool:
    return _notifier().stopping()


# ---------------------------------------------------------------------------
# Gated watchdog


def stalled_conditions(
    last: Mapping[str, float], deadlines: Mapping[str, float], now: float
) -> dict[str, float]:
    """Pure: the conditions not noted within their deadline, with their age in seconds."""
    return {name: now - last[name] for name, limit in deadlines.items() if now - last[name] > limit}


class WatchdogGate:
    """Pings the systemd watchdog only while every liveness condition holds.

    ``deadlines`` maps a condition name to the longest time (s) allowed between
    two notes of it. The clock starts at construction, so each condition has one
    deadline of grace after start-up.
    """

    def __init__(
        self,
        notifier: Notifier | None = None,
        *,
        poll_deadline_s: float = 180.0,
        db_deadline_s: float = 300.0,
        extra: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier if notifier is not None else _notifier()
        self.clock = clock
        self.deadlines: dict[str, float] = {"poll": poll_deadline_s, "db": db_deadline_s}
        self.deadlines.update(extra or {})
        start = clock()
        self.last: dict[str, float] = dict.fromkeys(self.deadlines, start)
        self._withheld: tuple[str, ...] = ()
        self.pings = 0

    def note(self, condition: str) -> None:
        if condition not in self.deadlines:
            raise KeyError(f"unknown liveness condition {condition!r}")
        self.last[condition] = self.clock()

    def note_poll_progress(self) -> None:
        self.note("poll")

    def note_db_write_ok(self) -> None:
        self.note("db")

    def problems(self) -> list[str]:
        stalled = stalled_conditions(self.last, self.deadlines, self.clock())
        return [
            f"{n} stalled for {age:.1f} s (limit {self.deadlines[n]:g} s)"
            for n, age in stalled.items()
        ]

    def tick(self) -> bool:
        """Ping if healthy; otherwise withhold and say why in STATUS (once per change)."""
        stalled = stalled_conditions(self.last, self.deadlines, self.clock())
        names = tuple(sorted(stalled))
        if names:
            if names != self._withheld:
                self.notifier.status("watchdog withheld: " + "; ".join(self.problems()))
            self._withheld = names
            return False
        if self._withheld:
            self.notifier.status("running")
            self._withheld = ()
        if self.notifier.watchdog():
            self.pings += 1
        return True

    async def run(self, interval_s: float | None = None) -> None:
        """Tick forever (until cancelled) at ``interval_s``, default half of WATCHDOG_USEC.

        Returns at once when no watchdog is configured and no interval is given.
        """
        if interval_s is None:
            wd = watchdog_interval_s()
            if wd is None:
                return
            interval_s = wd / 2
        while True:
            self.tick()
            await asyncio.sleep(interval_s)
