"""Caring reminders, the moving part: the queue's due notices through a hook.

:class:`Notifier` looks at the queue (:mod:`headend.notify_queue`) every
``poll_s`` and at each account with a notice due asks :func:`headend.notices.plan`
what to do; the notices to send now are rendered in the customer's language
(:mod:`headend.notify_text`) and handed to a :class:`NoticeSink`.

The hook shipped is :class:`WebhookSink`: one HTTP POST of JSON per message
to an SMS gateway (or anything that speaks HTTP)::

    POST <webhook.url>
    Content-Type: application/json
    Idempotency-Key: <id>
    X-Edgegw-Signature: sha256=<hex HMAC-SHA256 of the body under the secret>   (with secret_file)

    {"id": "gw-1/0123456789abcdef/4711", "kind": "cutoff", "urgent": true,
     "to": "+8613800000001", "language": "zh-CN", "text": "【停电通知】…",
     "account": "acct-001", "gateway": "gw-1", "event": "cutoff.state_change",
     "event_time_ms": 1767225600000, "balance": "-0.01", "attempt": 1}

A 2xx answer means delivered to the gateway. 408, 425, 429 and 5xx answers,
timeouts and connection errors are tried again after a jittered, doubling
back-off (``retry_min_s`` … ``retry_max_s``, or the answer's ``Retry-After``
seconds when longer), at most ``max_attempts`` times; any other answer fails
the notice at once (a request the gateway will never take). Every outcome is
in the queue row (state, attempts, HTTP status, detail). Other hooks
implement :class:`NoticeSink`.

Time comes from ``clock_ms`` (injected by the tests); quiet hours and rate
limits are computed on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson

from firmware_bridge.backoff import backoff_delay
from firmware_bridge.cause_log import CauseLog
from headend.notices import Act, plan
from headend.notify_config import (
    NotifyConfig,
    NotifyConfigError,
    WebhookSettings,
    load_notify_config,
)
from headend.notify_queue import NotifyQueue, Row
from headend.notify_text import render

log = logging.getLogger(__name__)

LEASE_MS = 60_000  # an attempt in hand: how long before another may be made
TRANSIENT = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Message:
    id: str
    kind: str
    urgent: bool
    to: str
    language: str
    text: str
    account: str
    gateway: str
    event: str
    event_time_ms: int
    balance: str | None
    attempt: int

    def json(self) -> bytes:
        return orjson.dumps(self.__dict__, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Delivery:
    ok: bool
    retry: bool = False  # not delivered, worth trying again
    status: int | None = None
    detail: str = ""
    retry_after_s: float | None = None


class NoticeSink(Protocol):
    async def send(self, message: Message) -> Delivery: ...

    async def close(self) -> None: ...


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Edgegw-Signature`` header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink:
    """POST each message as JSON to ``settings.url`` (aiohttp)."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def send(self, message: Message) -> Delivery:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        body = message.json()
        headers = {"Content-Type": "application/json", "Idempotency-Key": message.id}
        if self.settings.secret:
            headers["X-Edgegw-Signature"] = signature(self.settings.secret, body)
        try:
            async with self._session.post(self.settings.url, data=body, headers=headers) as resp:
                text = (await resp.text(errors="replace"))[:200]
                status = resp.status
                after = _retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Delivery(False, True, None, f"{type(exc).__name__}: {exc}"[:200])
        if 200 <= status < 300:
            return Delivery(True, status=status, detail=text)
        transient = status in TRANSIENT or status >= 500
        return Delivery(False, transient, status, f"HTTP {status}: {text}", after)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


class Notifier:
    """Sends the queue's due notices; :meth:`tick` once, :meth:`run` until cancelled."""

    def __init__(
        self,
        queue: NotifyQueue,
        config: NotifyConfig,
        sink: NoticeSink,
        *,
        clock_ms: Callable[[], int] | None = None,
        rng: random.Random | None = None,
        poll_s: float = 1.0,
        config_path: Path | None = None,
    ) -> None:
        self.queue = queue
        self.config = config
        self.sink = sink
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.rng = rng or random.Random()
        self.poll_s = poll_s
        self.config_path = config_path
        self._mtimes = self._stat()
        self.counts: dict[str, int] = {}
        self._hook_log = CauseLog(log, "notices: webhook", level=logging.WARNING)
        self._db_log = CauseLog(log, "notices: queue", level=logging.ERROR)

    def _stat(self) -> tuple[float, ...]:
        out = []
        for p in self.config.sources:
            try:
                out.append(p.stat().st_mtime)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def _reload(self) -> None:
        """The notice file again when it (or its customers file) changed."""
        if self.config_path is None:
            return
        now = self._stat()
        if now == self._mtimes:
            return
        self._mtimes = now
        try:
            self.config = load_notify_config(self.config_path)
        except NotifyConfigError as exc:
            log.error("notice file changed but is not valid; keeping the one in use:\n%s", exc)
            return
        log.info("notice file read again: %d customers", len(self.config.customers))

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def tick(self) -> int:
        """Handle every account with a notice due now; the number of messages attempted."""
        self._reload()
        now = self.clock_ms()
        attempted = 0
        for account in await self.queue.due_accounts(now):
            attempted += await self._account(account, now)
        return attempted

    async def _account(self, account: str, now: int) -> int:
        policy = self.config.policy
        rows = {r.notice_id: r for r in await self.queue.pending(account)}
        sent = await self.queue.sent_since(account, now - policy.history_ms)
        recipient = self.config.customers.get(account)
        decisions = plan([r.queued() for r in rows.values()], sent, recipient, now, policy)
        sends: list[tuple[Row, Message]] = []
        async with self.queue.transaction() as q:
            for d in decisions:
                row = rows[d.notice_id]
                if d.act is Act.WAIT:
                    assert d.until_ms is not None
                    await q.wait(d.notice_id, d.until_ms, d.why)
                elif d.act is Act.SEND:
                    assert recipient is not None
                    text = render(
                        self.config.templates, recipient.language, row.kind, account=account,
                        name=recipient.name, facts=row.facts, event_ms=row.event_ms, tz=recipient.tz,
                    )  # fmt: skip
                    n = await q.attempt(d.notice_id, now + LEASE_MS, recipient.phone, recipient.language, text)
                    bal = row.facts.get("balance")
                    sends.append((row, Message(
                        row.notice_id, row.kind.value, row.kind.urgent, recipient.phone, recipient.language,
                        text, account, row.gateway, row.event_type, row.event_ms,
                        None if bal is None else str(bal), n,
                    )))  # fmt: skip
                else:
                    await q.finish(d.notice_id, d.act.value, now, d.why)
                    self._count(d.act.value)
                    if d.act is Act.UNADDRESSED:
                        log.warning("notice %s for account %s: no customer on file", row.kind, account,
                                    extra={"account": account})  # fmt: skip
        for row, msg in sends:
            await self._send(row, msg)
        return len(sends)

    async def _send(self, row: Row, msg: Message) -> None:
        result = await self.sink.send(msg)
        now = self.clock_ms()
        hook = self.config.webhook
        async with self.queue.transaction() as q:
            if result.ok:
                await q.finish(row.notice_id, "sent", now, result.detail, result.status)
                self._count("sent")
                self._hook_log.ok("delivering again")
                log.info("notice %s sent to account %s (%s)", msg.kind, msg.account, msg.id,
                         extra={"account": msg.account, "gateway": msg.gateway})  # fmt: skip
                return
            if result.retry and msg.attempt < hook.max_attempts:
                delay = backoff_delay(msg.attempt - 1, hook.retry_min_s, hook.retry_max_s, self.rng)
                if result.retry_after_s is not None:
                    delay = max(delay, min(result.retry_after_s, hook.retry_max_s))
                await q.retry(row.notice_id, now + int(delay * 1000), result.detail, result.status)
                self._count("retried")
                self._hook_log.failed(f"not delivered, trying again: {result.detail}")
                return
            why = result.detail if not result.retry else f"gave up after {msg.attempt} attempts: {result.detail}"
            await q.finish(row.notice_id, "failed", now, why, result.status)
            self._count("failed")
            log.error("notice %s for account %s failed: %s", msg.kind, msg.account, why,
                      extra={"account": msg.account})  # fmt: skip

    async def run(self) -> None:
        """Until cancelled: lead (PostgreSQL: one notifier at a time), then tick."""
        leading = False
        try:
            while True:
                try:
                    if not leading:
                        leading = await self.queue.lead()
                        if leading:
                            log.info("notices: this headend sends the caring reminders")
                    if leading:
                        await self.tick()
                    self._db_log.ok("queue readable again")
                except Exception as exc:  # the database away: connect again, never stop
                    self._db_log.failed(f"cannot work the queue: {exc!r}")
                    leading = False
                    with contextlib.suppress(Exception):
                        await self.queue.reconnect()
                await asyncio.sleep(self.poll_s if leading else max(self.poll_s, 5.0))
        finally:
            self._hook_log.stopped()
            self._db_log.stopped()
            with contextlib.suppress(Exception):
                await self.sink.close()

