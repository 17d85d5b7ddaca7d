"""The event loop the services run on: uvloop by default, asyncio's own on request.

``edgegw run`` and ``edgegw headend run`` spend most of their CPU time in the
event loop itself (waking up for a meter's reply, a timer, a socket), and
uvloop (libuv) does that work in C. :func:`run` runs a service's main
coroutine on it when it can be imported, else on asyncio's loop with one
warning line; ``EDGEGW_EVENT_LOOP=asyncio`` in the environment chooses
asyncio's loop (``uvloop``, the default, the other value).

What the code must not assume under uvloop: its transports have the methods of
asyncio's transports without deriving from ``asyncio.Transport`` (no
``isinstance`` checks on them), and its clock (``loop.time()``) and timers
count whole milliseconds, so a timer may fire up to a millisecond before the
deadline a high-resolution clock would give.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

log = logging.getLogger("firmware_bridge.event_loop")

ENV_VAR = "EDGEGW_EVENT_LOOP"
UVLOOP = "uvloop"
ASYNCIO = "asyncio"
CHOICES = (UVLOOP, ASYNCIO)

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(env: Mapping[str, str] | None = None) -> tuple[str, LoopFactory | None]:
    """The loop to run on, as ``(name, factory)``: ``("uvloop", uvloop.new_event_loop)``
    unless ``EDGEGW_EVENT_LOOP=asyncio`` or uvloop cannot be imported, then
    ``("asyncio", None)`` (asyncio's default loop). An unknown value is a warning
    and the default."""
    env = os.environ if env is None else env
    wanted = env.get(ENV_VAR, "").strip().lower() or UVLOOP
    if wanted not in CHOICES:
        log.warning(
            "%s=%s: not one of %s; running on %s",
            ENV_VAR,
            env.get(ENV_VAR),
            ", ".join(CHOICES),
            UVLOOP,
        )
        wanted = UVLOOP
    if wanted == ASYNCIO:
        return ASYNCIO, None
    try:
        import uvloop
    except ImportError as exc:
        log.warning("event loop: uvloop cannot be imported (%s); running on asyncio's loop", exc)
        return ASYNCIO, None
    return UVLOOP, uvloop.new_event_loop


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: which loop the calling coroutine runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return UVLOOP if module.split(".")[0] == UVLOOP else ASYNCIO


def run(main: Coroutine[Any, Any, T], env: Mapping[str, str] | None = None) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` chooses."""
    _, factory = loop_factory(env)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
