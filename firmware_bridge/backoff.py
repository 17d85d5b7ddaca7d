"""Reconnect back-off: how long to wait before trying a lost link again.

One rule for every link that reconnects on its own (the uplink to the broker,
the headend's subscription, a bus that failed to open): exponential in the
number of failed attempts, bounded, and half of it random so that many
gateways cut off together do not come back in step.
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Jittered exponential back-off ("equal jitter"): half fixed, half random."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return cap / 2 + rng.uniform(0, cap / 2)
