"""A scripted DL/T 645 peer on 127.0.0.1: records requests, answers as told."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware_bridge.dlt645.codec import Frame, FrameParser
from firmware_bridge.dlt645.messages import read_reply

ADDR = "000102030425"
DI = 0x00010000
REPLY = read_reply(ADDR, DI, bytes.fromhex("42061200"))

Script = Callable[[Frame], list[bytes | float]]  # bytes to send, floats to sleep


@dataclass
class Peer:
    script: Script
    port: int = 0
    requests: list[tuple[float, Frame]] = field(default_factory=list)
    on_connect: bytes = b""
    close_after: int | None = None  # drop the connection after this many requests
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        parser = FrameParser()
        writer.write(self.on_connect)
        try:
            while data := await reader.read(4096):
                for ev in parser.feed(data):
                    if not isinstance(ev, Frame):
                        continue
                    self.requests.append((loop.time(), ev))
                    if self.close_after is not None and len(self.requests) >= self.close_after:
                        self.close_after = None
                        return
                    for step in self.script(ev):
                        if isinstance(step, float):
                            await asyncio.sleep(step)
                        else:
                            writer.write(step)
                            await writer.drain()
        finally:
            writer.close()
