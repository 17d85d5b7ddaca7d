"""A stand-in SMS gateway for the caring-reminder tests: a real aiohttp server on a
loopback port that records every request (arrival time, headers, JSON) and
answers from a script of statuses (200 once the script is used up)."""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes
    json: dict[str, Any]
    status: int  # what the receiver answered


@dataclass
class SmsReceiver:
    script: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    def answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer the next request with ``status`` (then 200 again)."""
        self.script.append((status, headers or {}))

    @property
    def delivered(self) -> list[dict[str, Any]]:
        """Messages answered 2xx, in arrival order, each id once (repeats dropped, as a
        gateway honouring Idempotency-Key would)."""
        seen: set[str] = set()
        out = []
        for r in self.requests:
            if 200 <= r.status < 300 and r.json["id"] not in seen:
                seen.add(r.json["id"])
                out.append(r.json)
        return out

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        status, headers = self.script.popleft() if self.script else (200, {})
        self.requests.append(Received(time.monotonic(), dict(request.headers), body, json.loads(body), status))
        return web.json_response({"accepted": 200 <= status < 300}, status=status, headers=headers)

    async def __aenter__(self) -> SmsReceiver:
        app = web.Application()
        app.router.add_post("/sms", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        for addr in self._runner.addresses:
            self.port = int(addr[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sms"
