"""Flood limits on rejected commands (pure).

A flood of garbage must not fill the disk or the uplink: rejections and
failures are counted per (reason, hour). The first of each is audited in
full, the first ``event_budget`` of each are reported to central in detail,
and the rest are summed up in one summary row and event per (reason, hour)
when the hour is over (:mod:`gateway.commands.handler` writes them). A port's
refusals are counted under their own code (:func:`tally_key`), apart from
unauthenticated junk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from gateway.security.envelope import CommandResult

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Bucket:
    """Rejections of one reason in one hour."""

    reason: str
    hour_ms: int
    count: int
    first_ms: int
    last_ms: int
    channels: tuple[str, ...] = ()


@dataclass(frozen=True)
class RejectionNote:
    audit: bool  # write this rejection's audit row in full
    event: bool  # send a detailed result event
    bucket: Bucket


Tally = Mapping[tuple[str, int], Bucket]


def tally_key(result: CommandResult) -> str:
    """The flood bucket of a rejection: its reason, and the refusing owner's code if any.

    A port's refusals (``bad_body:counter_gap``) are counted apart from
    unauthenticated garbage (``bad_body``), so a flood of junk cannot use up
    the event budget that tells central about a refused top-up.
    """
    reason = result.reason.value if result.reason else "unknown"
    return f"{reason}:{result.code}" if result.code else reason


def tally_rejection(
    tally: Tally, reason: str, now_ms: int, channel: str, *, event_budget: int
) -> tuple[dict[tuple[str, int], Bucket], RejectionNote]:
    """Count one rejection (pure): the first per (reason, hour) is audited in full."""
    hour = now_ms - now_ms % HOUR_MS
    new = dict(tally)
    old = new.get((reason, hour))
    if old is None:
        b = Bucket(reason, hour, 1, now_ms, now_ms, (channel,))
    else:
        chans = old.channels if channel in old.channels else (*old.channels, channel)
        b = replace(old, count=old.count + 1, last_ms=max(old.last_ms, now_ms), channels=chans)
    new[(reason, hour)] = b
    return new, RejectionNote(audit=b.count == 1, event=b.count <= event_budget, bucket=b)


def due_summaries(tally: Tally, now_ms: int) -> tuple[dict[tuple[str, int], Bucket], list[Bucket]]:
    """Split off buckets of hours before ``now_ms``'s hour; summaries for those seen > once."""
    hour = now_ms - now_ms % HOUR_MS
    keep = {k: b for k, b in tally.items() if b.hour_ms >= hour}
    done = sorted(
        (b for b in tally.values() if b.hour_ms < hour and b.count > 1),
        key=lambda b: (b.hour_ms, b.reason),
    )
    return keep, done
