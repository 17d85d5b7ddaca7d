"""Small helpers for tests that drive MQTT clients against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiomqtt
import pytest


async def refused(c: aiomqtt.Client) -> str:
    """Connecting must fail; returns the error text."""
    with pytest.raises(aiomqtt.MqttError) as info:
        async with c:
            # a TLS 1.3 server can reject the client certificate after the client
            # considers the handshake done: make the session prove itself
            await c.subscribe("edgegw/v1/probe/cmd", qos=1, timeout=3)
    return str(info.value)


async def collect(c: aiomqtt.Client, into: list[tuple[str, bytes]]) -> None:
    async for msg in c.messages:
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        into.append((msg.topic.value, payload))


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def tasks(*coros: Coroutine[Any, Any, Any]) -> AsyncIterator[list[asyncio.Task[Any]]]:
    ts = [asyncio.create_task(c) for c in coros]
    try:
        yield ts
    finally:
        for t in ts:
            t.cancel()
        await asyncio.gather(*ts, return_exceptions=True)
