"""The gateway daemon: a supervisor, one writer, a poller and a relay worker per bus.

* :mod:`gateway.daemon.supervisor` — :class:`Daemon`: the TaskGroup, start-up,
  storage faults and a full disk, commands, maintenance, stopping;
* :mod:`gateway.daemon.writer` — the work queue (:class:`Cycle`, :class:`Tick`)
  and the one SQLite writer;
* :mod:`gateway.daemon.poller` — a bus poller and the slices it hands over;
* :mod:`gateway.daemon.relay_worker` — relay operations queued per bus and run
  beside the polling.
"""

from gateway.daemon.supervisor import (
    Daemon,
    DaemonStats,
    NoBilling,
    StartupError,
    prepare_storage_dir,
    wall_ms,
)
from gateway.daemon.writer import Cycle, Tick

__all__ = [
    "Cycle",
    "Daemon",
    "DaemonStats",
    "NoBilling",
    "StartupError",
    "Tick",
    "prepare_storage_dir",
    "wall_ms",
]
