"""Tests that run on both event loops the services can run on.

``@BOTH_LOOPS`` on an async test (under a directory whose conftest.py
implements :func:`loop_factories` as pytest-asyncio's
``pytest_asyncio_loop_factories`` hook) runs it once on asyncio's loop and once
on uvloop's (ids ``[asyncio]`` and ``[uvloop]``); every other test keeps
asyncio's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
BOTH_LOOPS = pytest.mark.asyncio(loop_factories=list(LOOPS))
ASYNCIO_ONLY = {"asyncio": LOOPS["asyncio"]}


def loop_factories(item: pytest.Item) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Both loops for a test marked ``@BOTH_LOOPS``, asyncio's for the others."""
    marker = item.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_factories"):
        return LOOPS
    return ASYNCIO_ONLY
