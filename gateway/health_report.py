"""The gateway's periodic health record, sent to central through the outbox.

Every ``gateway.health_interval_s`` the supervisor samples one ``gateway.health``
event (record class 0, like every event: it waits in the outbox while the link
is down and arrives later, so an offline period is seen afterwards, not lost),
stamped when sampled; it rides the writer's next transaction (a poll cycle's)
and commits alone only when none came within its bound
(:func:`gateway.daemon.supervisor.health_ride_s`).
It carries what an operator of a fleet needs to judge a box nobody visits:

- software version, boot id, uptime of the daemon and of the board;
- disk: total, free and used bytes of the database's filesystem;
- outbox: records waiting, age of the oldest, batches awaiting ack;
- load average and the board's temperature where it reports one
  (``/sys/class/thermal/thermal_zone*/temp``);
- trusted time: its source and whether the system clock is behind the floor;
- link statistics: state, connects, failures, batches published, acked and
  retransmitted, last authenticated contact;
- meters by state: online, offline, quarantined, not yet read.

:func:`build` is pure over what :func:`sample` reads from the machine and the
daemon, so the record's shape is tested without a board.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firmware_bridge.events import event
from gateway import __version__, heartbeat
from gateway.meter_health import State

if TYPE_CHECKING:
    from gateway.daemon.supervisor import Daemon

EVENT = "gateway.health"
DEFAULT_INTERVAL_S = 300.0
THERMAL = Path("/sys/class/thermal")
DB_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Machine:
    """What the board says of itself."""

    boot_id: str | None
    uptime_s: float | None
    load: tuple[float, float, float] | None
    temperature_c: float | None
    disk_total: int | None
    disk_free: int | None


def read_temperature(root: Path = THERMAL) -> float | None:
    """The highest temperature of the board's thermal zones (°C), None if none."""
    temps = []
    try:
        zones = sorted(root.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for z in zones:
        try:
            temps.append(int(z.read_text().strip()) / 1000)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None


def read_machine(db_dir: Path) -> Machine:
    try:
        uptime: float | None = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        uptime = None
    try:
        load: tuple[float, float, float] | None = os.getloadavg()
    except OSError:
        load = None
    total: int | None
    free: int | None
    try:
        st = os.statvfs(db_dir)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    except OSError:
        total = free = None
    return Machine(heartbeat.boot_id(), uptime, load, read_temperature(), total, free)


def build(
    *,
    now_ms: int,
    started_ms: int,
    machine: Machine,
    outbox: tuple[int, int | None, int] | None,
    time_state: dict[str, Any] | None,
    link: dict[str, Any] | None,
    meters: Counter[str],
    version: str = __version__,
) -> dict[str, Any]:
    """The ``gateway.health`` event body."""
    body: dict[str, Any] = {
        "time_ms": now_ms,
        "version": version,
        "boot_id": machine.boot_id,
        "uptime_s": max(0, (now_ms - started_ms) // 1000),
        "board_uptime_s": None if machine.uptime_s is None else int(machine.uptime_s),
        "load": None if machine.load is None else [round(x, 2) for x in machine.load],
        "temperature_c": None if machine.temperature_c is None else round(machine.temperature_c, 1),
        "disk": {
            "total_bytes": machine.disk_total,
            "free_bytes": machine.disk_free,
            "used_bytes": None
            if machine.disk_total is None or machine.disk_free is None
            else machine.disk_total - machine.disk_free,
        },
        "meters": {s: meters.get(s, 0) for s in (*(x.value for x in State), "unknown")},
    }
    if outbox is not None:
        records, oldest_ms, batches = outbox
        body["outbox"] = {
            "records": records,
            "oldest_age_s": None if oldest_ms is None else max(0, (now_ms - oldest_ms) // 1000),
            "batches_pending": batches,
        }
    if time_state is not None:
        body["time"] = time_state
    if link is not None:
        body["link"] = link
    return event(EVENT, body)


async def sample(daemon: Daemon) -> dict[str, Any]:
    """The health record of the running daemon, now."""
    cfg = daemon.config
    now_ms = daemon.time_ms()
    outbox = None
    if daemon.outbox is not None:
        try:
            async with asyncio.timeout(DB_TIMEOUT_S):
                outbox = await daemon.outbox.depth()
        except Exception:  # busy or faulted: the record goes without it this time
            outbox = None
    time_state = None
    if daemon.clock is not None:
        st = daemon.clock.state
        time_state = {"quality": st.quality.value, "behind_floor": bool(st.behind_floor)}
    link = None
    up = daemon.uplink
    if up is not None:
        s = up.stats
        link = {
            "state": s.state.value,
            "connects": s.connects,
            "connect_failures": s.connect_failures,
            "published": s.published,
            "acked": s.acked,
            "retransmits": s.retransmits,
            "last_contact_ms": s.last_contact_ms,
        }
    meters: Counter[str] = Counter()
    for m in cfg.meters:
        known = daemon.meter_states.get(m.id)
        meters[known.state.value if known is not None else "unknown"] += 1
    machine = await asyncio.to_thread(read_machine, cfg.storage.path.parent)
    return build(
        now_ms=now_ms, started_ms=daemon.started_ms, machine=machine, outbox=outbox,
        time_state=time_state, link=link, meters=meters,
    )
