"""Simulated meters: DL/T 645-2007 (:mod:`.dlt645`) and Modbus RTU/TCP (:mod:`.modbus`).

Each runs on its own too::

    python -m testbed.simulators.dlt645 --help
    python -m testbed.simulators.modbus --help
"""

from __future__ import annotations

import asyncio
import contextlib
import signal


async def wait_for_stop_signal() -> None:
    """Until SIGINT or SIGTERM. The handlers are the event loop's own, so a
    simulator started in the background of a shell (which starts it with SIGINT
    ignored) still stops on either."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
