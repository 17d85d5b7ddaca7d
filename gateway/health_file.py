"""The daemon's health file: what the updater's health gate reads.

The running daemon rewrites one small JSON file (``edgegw run --health-file``,
or ``EDGEGW_HEALTH_FILE``; ``/run/edgegw/health.json`` under systemd, a tmpfs,
so it costs no flash writes) whenever a milestone changes and at least every
``interval_s`` as a heartbeat::

    {"format": 1, "pid": 812, "version": "0.2.0", "boot_id": "…",
     "started_ns": 5120000000, "updated_ns": 9120000000,
     "ready": true, "buses": 1, "poll_cycles": 12, "readings": 40,
     "acks": 3, "storage": "normal"}

``ready``: the database is open (and migrated) and READY=1 went to systemd;
``poll_cycles``: poll cycles committed; ``readings``: readings committed;
``acks``: uplink batches central acknowledged. Times are ``CLOCK_BOOTTIME``
nanoseconds of the boot named by ``boot_id``, so a wall clock that jumps
cannot make an old file look fresh. The file is replaced by a rename, never
written in place; it is not fsynced (after a power cut it must not count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "EDGEGW_HEALTH_FILE"
FORMAT = 1
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id (the kernel's random boot id)."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return "unknown"


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def write_file(path: Path, doc: dict[str, Any]) -> None:
    """Replace ``path`` with ``doc`` by a rename (readers see the old or the new file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(json.dumps(doc, sort_keys=True).encode() + b"\n")
    os.replace(tmp, path)


def read_file(path: Path) -> dict[str, Any] | None:
    """The health document, or None when there is none (or it is not one)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


class HealthReporter:
    """Writes the health file from ``snapshot()`` (the daemon's counters)."""

    def __init__(
        self,
        path: Path,
        *,
        version: str,
        snapshot: Callable[[], dict[str, Any]],
        interval_s: float = 5.0,
    ) -> None:
        self.path = path
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.base = {
            "format": FORMAT,
            "pid": os.getpid(),
            "version": version,
            "boot_id": boot_id(),
            "started_ns": boottime_ns(),
        }
        self.writes = 0
        self._last: dict[str, Any] | None = None

    def write_now(self) -> None:
        state = self.snapshot()
        doc = {**self.base, **state, "updated_ns": boottime_ns()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_file(self.path, doc)
        except OSError:
            return  # a health file that cannot be written only delays an update's commit
        self._last = state
        self.writes += 1

    async def run(self, check_s: float = 0.5) -> None:
        """Write at once, then on every change (checked every ``check_s``) and at
        least every ``interval_s``."""
        last_write = 0.0
        while True:
            now = time.monotonic()
            if self.snapshot() != self._last or now - last_write >= self.interval_s:
                self.write_now()
                last_write = now
            await asyncio.sleep(check_s)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
