"""Reconnect back-off: how long to wait before trying a lost link again.

One rule for every link that reconnects on its own (the uplink to the broker,
the headend's subscription, a bus that failed to open): exponential in the
number of failed attempts, bounded, and half of it random so that many
gateways cut off together do not come back in step.

A loop that reconnects forever must still stop when it is cancelled, and a
cancellation can be lost on the way: Python 3.11's ``asyncio.wait_for`` drops
one that arrives in the step its awaited future completes (aiomqtt's publish
with a timeout goes through it), and an exception raised while a cancellation
unwinds (a failed disconnect in aiomqtt's exit) replaces it. Such loops call
:func:`stop_if_cancelled` after each piece of work and before each back-off.
Only in a task that runs no TaskGroup of its own: on 3.11 a TaskGroup whose
child failed while it waited for the others cancels its parent and never takes
that back, so the parent's count of cancellations stays raised (the uplink and
central's dispatcher run theirs in TaskGroups and do not use it).
"""

from __future__ import annotations

import asyncio
import random

__all__ = ["backoff_delay", "stop_if_cancelled"]


def stop_if_cancelled() -> None:
    """Raise :class:`asyncio.CancelledError` when the running task was asked to stop
    and something it awaited swallowed the cancellation (see the module's text)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Jittered exponential back-off ("equal jitter"): half fixed, half random."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return cap / 2 + rng.uniform(0, cap / 2)
