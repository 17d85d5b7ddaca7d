"""How much the gateway's database may hold, and what to free when it holds too
much (pure): the outbox sheds telemetry first, and only past a hard floor the
oldest unacknowledged billing records, each time with an alarm. The reserve
file kept beside the database (``ballast_bytes``) is the database owner's
(:class:`store_forward.database.Database`).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    # which need a little space to free a lot — still work.
    ballast_bytes: int = 2 * 1024 * 1024


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
