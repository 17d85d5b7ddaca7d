"""The dispatcher: publishes queued commands and resends them until the gateway answers.

Every second (or at once when a command is queued) it takes, in one
transaction, the open commands whose next attempt is due
(:meth:`headend.central_db.CentralDB.due`) and decides with
:func:`headend.commands.pick`:

* a command whose expiry passed is marked ``expired`` and never sent again;
* a command never sent goes out while its gateway has fewer than
  :data:`~headend.commands.WINDOW` commands awaiting an answer — also to a
  gateway that is offline: it keeps a persistent MQTT session with a QoS 1
  subscription to its command topic, so the broker holds the command until
  it is back;
* a command already sent is published again when its resend time has come
  (:func:`~headend.commands.resend_delay_ms`: 30 s, doubling to 15 min) and
  the gateway is not known to be offline (its retained presence; after it
  comes back, 30 s for what the broker held to be answered);
* a command the gateway refused as out of order (``counter_stale``,
  ``issued_before_recovery``) is re-signed first, with the issuer's next
  counter and the same command id (the gateway applies an id once).

The commands are marked sent and committed before they are published: a
crash between the two only makes the command due again later. A publish
that fails makes it due at once. The gateway refuses a second copy of an
applied envelope (``replay``) and answers ``duplicate`` for a re-signed one,
so resending never applies anything twice.

Results come back through the ingest (:func:`headend.central_db.apply_results_in`),
not through the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import aiomqtt

from firmware_bridge.backoff import backoff_delay
from firmware_bridge.cause_log import CauseLog
from headend.central import wall_ms
from headend.central_db import CentralDB
from headend.commands import GAP_RETRY_MS, Pending, Presence, pick, resend_delay_ms
from headend.ingest import presence_filter, presence_gateway
from headend.signing import Signer, SigningError
from store_forward.command_roles import CommandType
from store_forward.presence import parse as parse_presence
from store_forward.topics import DEFAULT_PREFIX, Topics

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0


@dataclass
class DispatchStats:
    sent: int = 0
    resent: int = 0
    expired: int = 0
    resigned: int = 0
    held: int = 0
    publish_failures: int = 0
    ticks: int = 0


@dataclass(frozen=True)
class Outgoing:
    command_id: str
    gateway_id: str
    envelope: bytes
    first: bool


@dataclass
class Dispatcher:
    db: CentralDB
    signer: Signer | None
    host: str
    port: int
    prefix: str = DEFAULT_PREFIX
    tls_context: ssl.SSLContext | None = None
    identifier: str | None = None
    clock_ms: Callable[[], int] = wall_ms
    interval_s: float = 1.0
    batch: int = 500
    window: int | None = None
    presence: dict[str, Presence] = field(default_factory=dict)
    stats: DispatchStats = field(default_factory=DispatchStats)

    def __post_init__(self) -> None:
        if self.identifier is None:
            self.identifier = f"edgegw-central-{random.randrange(1 << 32):08x}"
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self._link_log = CauseLog(log, "central dispatcher: broker")

    def wake(self) -> None:
        """A command was queued: look at the queue now."""
        self._wake.set()

    # -- presence -----------------------------------------------------------

    def note_presence(self, gateway: str, payload: bytes, now_ms: int) -> None:
        """A message on the gateway's retained presence topic (store_forward.presence;
        anything else is ignored). ``now_ms`` is central's clock: the time the gateway
        came back counts from when central heard of it."""
        said = parse_presence(payload)
        if said is None:
            return
        online = said.online
        before = self.presence.get(gateway)
        if before is None or before.online != online:
            self.presence[gateway] = Presence(online, now_ms)
            log.info("gateway %s is %s", gateway, "online" if online else "offline")

    # -- one pass over the queue --------------------------------------------

    async def take(self, now_ms: int) -> list[Outgoing]:
        """Expire, re-sign and mark sent what is due; the envelopes to publish, in order."""
        out: list[Outgoing] = []
        async with self.db.transaction() as tx:
            due = await self.db.due(tx, now_ms, self.batch)
            if due:
                # gateways another dispatcher is sending to right now wait for its pass
                mine = await self.db.claim_gateways(tx, {r.gateway_id for r in due})
                due = [r for r in due if r.gateway_id in mine]
            if not due:
                return out
            inflight = await self.db.in_flight(tx, {r.gateway_id for r in due})
            chosen = pick(
                [Pending(r.seq, r.gateway_id, r.state, r.next_attempt_ms, r.expires_ms) for r in due],
                inflight,
                self.presence,
                now_ms,
                **({"window": self.window} if self.window is not None else {}),
            )
            by_seq = {r.seq: r for r in due}
            for seq in chosen.to_expire:
                await self.db.mark_expired(tx, by_seq[seq], now_ms)
                self.stats.expired += 1
            for seq in chosen.to_send:
                row = by_seq[seq]
                envelope = row.envelope
                if row.resign:
                    try:
                        if self.signer is None:
                            raise SigningError("this central has no signing keys")
                        key = self.signer.key_for(CommandType(row.type))
                        counter = await self.db.next_counter(tx, key.key_id, now_ms)
                        envelope = self.signer.sign(
                            CommandType(row.type),
                            target=row.gateway_id,
                            command_id=row.command_id,
                            counter=counter,
                            issued_ms=now_ms,
                            expires_ms=row.expires_ms,
                            body=row.body,
                        )
                    except SigningError as exc:
                        why = f"cannot re-sign: {exc}"
                        await self.db.hold(tx, row, now_ms, now_ms + GAP_RETRY_MS, why)
                        self.stats.held += 1
                        log.error("command %s: %s", row.command_id, why)
                        continue
                    await self.db.resigned(tx, row, key.key_id, counter, now_ms, envelope, now_ms)
                    self.stats.resigned += 1
                await self.db.mark_sent(tx, row, now_ms, now_ms + resend_delay_ms(row.attempts + 1))
                out.append(Outgoing(row.command_id, row.gateway_id, envelope, row.attempts == 0))
        return out

    async def publish(self, client: aiomqtt.Client, batch: list[Outgoing], now_ms: int) -> int:
        """Publish at QoS 1 in order; on the first failure the rest are made due
        again and the error is raised (the connection is re-made)."""
        done = 0
        try:
            for o in batch:
                await client.publish(
                    Topics(self.prefix, o.gateway_id).cmd, o.envelope, qos=1, timeout=PUBLISH_TIMEOUT_S
                )
                done += 1
                if o.first:
                    self.stats.sent += 1
                else:
                    self.stats.resent += 1
        except BaseException as exc:
            self.stats.publish_failures += 1
            async with self.db.transaction() as tx:
                for o in batch[done:]:
                    await self.db.unsend(tx, o.command_id, now_ms, f"{type(exc).__name__}: {exc}", o.first)
            raise
        return done

    async def tick(self, client: aiomqtt.Client) -> int:
        """One pass: returns how many commands were published."""
        self.stats.ticks += 1
        now = self.clock_ms()
        batch = await self.take(now)
        if not batch:
            return 0
        return await self.publish(client, batch, now)

    # -- the loop -----------------------------------------------------------

    async def _presence(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            gw = presence_gateway(msg.topic.value, self.prefix)
            if gw is not None and isinstance(msg.payload, bytes):
                self.note_presence(gw, msg.payload, self.clock_ms())

    async def _dispatch(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            await self.tick(client)
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run(self) -> None:
        """Forever: connect, follow presence, dispatch; reconnect after any failure."""
        attempt = 0
        rng = random.Random()
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.identifier,
                    clean_session=True,
                    timeout=10,
                    tls_context=self.tls_context,
                ) as client:
                    attempt = 0
                    await client.subscribe(presence_filter(self.prefix), qos=1)
                    self.connected.set()
                    self._link_log.ok("connected")
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._presence(client))
                        tg.create_task(self._dispatch(client))
            except* (aiomqtt.MqttError, OSError, TimeoutError) as eg:
                self._link_log.failed(f"connection lost: {'; '.join(str(e) for e in eg.exceptions)}")
            except* Exception as eg:
                # a database error, a bug: log it and keep going after the back-off
                self._link_log.failed(f"failed: {eg.exceptions!r}", exc_info=eg)
            self.connected.clear()
            await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0, rng))
            attempt += 1
