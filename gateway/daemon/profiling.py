"""An opt-in CPU profile of the daemon's event-loop thread (a developer aid).

With ``EDGEGW_PROFILE=FILE`` in the environment of ``edgegw run``, the daemon
runs under :mod:`cProfile` timed by :func:`time.thread_time` — the CPU of the
event-loop thread only, not its waits and not the database or packing threads —
and writes the profile (:mod:`pstats` format) to ``FILE`` when it stops::

    EDGEGW_PROFILE=/tmp/gw.prof edgegw run --config gateway.toml
    python -m pstats /tmp/gw.prof     # sort tottime, stats 30

``EDGEGW_PROFILE_AFTER_S=N`` starts the profile N seconds after the daemon
started, leaving its start-up (the database's checks, every ledger verified)
out of a profile of the steady state.

Without the variable nothing is set up: the daemon's code runs as it always does.
A profiled daemon runs slower (cProfile costs about as much again as the
Python it measures), so read the profile's shares, not its absolute times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "EDGEGW_PROFILE"
AFTER_VAR = "EDGEGW_PROFILE_AFTER_S"


@contextlib.contextmanager
def profiled(env: Mapping[str, str]) -> Iterator[Path | None]:
    """Profile the calling thread (an event loop's: it must be running) while the
    block runs when ``env`` names a file in :data:`ENV_VAR`; yields that file
    (None: not profiling)."""
    target = env.get(ENV_VAR, "")
    if not target:
        yield None
        return
    import cProfile

    path = Path(target)
    if path.is_dir():
        raise ValueError(f"{ENV_VAR}={target}: a directory, not a file to write the profile to")
    after = env.get(AFTER_VAR, "") or "0"
    try:
        after_s = float(after)
    except ValueError:
        raise ValueError(f"{AFTER_VAR}={after}: not a number of seconds") from None
    if not after_s >= 0:
        raise ValueError(f"{AFTER_VAR}={after}: must be 0 or more seconds")
    prof = cProfile.Profile(time.thread_time)
    log.warning("profiling the event loop's CPU to %s (%s set)", path, ENV_VAR)
    later: asyncio.TimerHandle | None = None
    if after_s:
        later = asyncio.get_running_loop().call_later(after_s, prof.enable)
    else:
        prof.enable()
    try:
        yield path
    finally:
        if later is not None:
            later.cancel()
        prof.disable()
        prof.dump_stats(str(path))
        log.warning("CPU profile written to %s", path)
