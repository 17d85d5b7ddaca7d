"""Commands from MQTT: the uplink's command topic, handled one at a time.

:class:`CommandInbox` takes commands from the uplink's own connection (the
daemon) and hands every message to
:meth:`gateway.commands.handler.CommandHandler.handle`. There is no second
connection for commands: the shipped broker names a session by the client
certificate's CN (``use_username_as_clientid``), so another connection with
the gateway's certificate would take the uplink's persistent session and the
commands queued in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomqtt

from gateway.commands.handler import CommandHandler
from gateway.security.envelope import CommandResult
from store_forward.topics import Topics


class CommandInbox:
    """Commands from the uplink's MQTT connection, handled one at a time in arrival order.

    The uplink subscribes with :meth:`subscribe` after each (re)connect and,
    in its message loop, passes every message whose topic :meth:`wants` to
    :meth:`offer` (non-blocking). :meth:`run` (a task in the daemon's
    TaskGroup) handles them; ``on_result`` is called after each one (e.g. to
    wake the uplink so the result event goes out at once). The queue is
    bounded: beyond ``max_queued`` waiting commands new ones are dropped and
    counted (central re-sends a command whose result it has not seen).
    """

    def __init__(
        self,
        handler: CommandHandler,
        topics: Topics,
        *,
        max_queued: int = 64,
        on_result: Callable[[CommandResult], None] | None = None,
    ) -> None:
        self.handler = handler
        self.topic = topics.cmd
        self.on_result = on_result
        self.dropped = 0
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_queued)

    async def subscribe(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topic, qos=1)

    def wants(self, topic: aiomqtt.Topic | str) -> bool:
        return (topic.value if isinstance(topic, aiomqtt.Topic) else topic) == self.topic

    def offer(self, payload: bytes | bytearray | str | int | float | None) -> bool:
        raw = bytes(payload) if isinstance(payload, (bytes, bytearray)) else b""
        try:
            self._queue.put_nowait(raw)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    async def run(self) -> None:
        while True:
            raw = await self._queue.get()
            try:
                result = await self.handler.handle(raw, channel="mqtt")
            finally:
                self._queue.task_done()
            if self.on_result is not None:
                self.on_result(result)

    async def drain(self) -> None:
        """Wait until every offered command has been handled (tests, shutdown)."""
        await self._queue.join()

