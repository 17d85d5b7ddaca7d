"""How much the gateway's database may hold, and what to free when it holds too
much (pure): the outbox sheds telemetry first, and only past a hard floor the
oldest unacknowledged billing records, each time with an alarm. The reserve
file kept beside the database (``ballast_bytes``) is the database owner's
(:class:`store_forward.database.Database`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoragePolicy:
    """How much the outbox may hold.

    ``max_bytes`` is the ceiling on live database bytes; above it telemetry is
    shed. ``reserve_bytes`` is free space kept on the filesystem: below twice
    the reserve telemetry is shed. Billing records and events may grow past
    the ceiling by a margin (the larger of ``reserve_bytes`` and a quarter of
    ``max_bytes``); past that margin, or with less free space than the
    reserve itself (the hard floor), the oldest unbatched billing records go
    too, each time with a critical alarm event. Events, batches already sent
    and the ledger's tables are never evicted.
    """

    max_bytes: int = 256 * 1024 * 1024
    reserve_bytes: int = 16 * 1024 * 1024
    keep_recent_telemetry_ms: int = 24 * 3600 * 1000
    # A file of this size beside the database, given up when the disk is
    # full anyway (another process filled it), so that batching and acks —
    # which need a little space to free a lot — still work. The write-ahead
    # log is checkpointed when it holds half of it (:func:`reserve_for`).
    ballast_bytes: int = 2 * 1024 * 1024


# The reserve file by the size of the site: 2 MiB, and 16 KiB a meter above 128
# meters, up to 16 MiB at 1,024 meters.
RESERVE_MIN_BYTES = 2 * 1024 * 1024
RESERVE_PER_METER_BYTES = 16 * 1024
RESERVE_MAX_BYTES = 16 * 1024 * 1024


def reserve_for(meters: int) -> int:
    """The reserve file's size for a gateway of ``meters`` meters.

    The write-ahead log is checkpointed at half the reserve (so that giving the
    reserve up always leaves room to checkpoint). A checkpoint writes every page
    the log changed since the last one once, whatever the number of times it
    changed: the accounts, the baselines and the ledger's per-account index
    leaves, one each per meter, are written once per checkpoint. At 1 MiB of log
    a 1,000-meter site checkpoints every few hundred readings, and each of those
    scattered 1 KiB pages costs a 4 KiB page of the page cache every time; a log
    that holds a few minutes of a large site writes them once per few minutes.
    Small sites keep the 2 MiB reserve (and the 1 MiB log)."""
    return min(RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, meters * RESERVE_PER_METER_BYTES))


@dataclass(frozen=True)
class EvictionPlan:
    shed_bytes: int  # telemetry to free
    hard_bytes: int  # billing to free (hard floor)


def plan_eviction(live_bytes: int, free_bytes: int, policy: StoragePolicy) -> EvictionPlan:
    """What to free, given live database bytes and free filesystem bytes (pure)."""
    over_ceiling = max(0, live_bytes - policy.max_bytes)
    short_of_reserve = max(0, 2 * policy.reserve_bytes - free_bytes)
    shed = max(over_ceiling, short_of_reserve)
    hard_ceiling = policy.max_bytes + max(policy.reserve_bytes, policy.max_bytes // 4)
    hard = max(0, policy.reserve_bytes - free_bytes, live_bytes - hard_ceiling)
    return EvictionPlan(shed, hard)


# How long the kernel keeps a dirtied page-cache page before writing it back
# (``vm.dirty_expire_centisecs``). The appliance sets ten minutes
# (systemd/60-edgegw-writeback.conf, installed by systemd/install.sh): SQLite's
# shared-memory index of the write-ahead log is dirtied by every commit and never
# needs to reach the card, and at the kernel's default of 30 s a small site sends
# it there after every commit.
DIRTY_EXPIRE = Path("/proc/sys/vm/dirty_expire_centisecs")
APPLIANCE_WRITEBACK_S = 600


def page_cache_writeback_s(path: Path | None = None) -> float | None:
    """Seconds after which the kernel writes a dirtied page back (None: unknown);
    ``path``: the sysctl's file (default :data:`DIRTY_EXPIRE`)."""
    try:
        return int((DIRTY_EXPIRE if path is None else path).read_text().strip()) / 100
    except (OSError, ValueError):
        return None
