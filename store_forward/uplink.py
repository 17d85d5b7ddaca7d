"""The uplink: drains the outbox to the broker and deletes only on the headend's ack.

Delivery is at-least-once on the wire with an idempotent effect:

* a batch keeps its sequence number and records for ever (see outbox), so a
  retransmission is the same batch;
* a broker PUBACK only means the broker has it; the batch is deleted when
  the headend's ack (published after the headend's own commit) arrives and
  proves itself: for a sealed batch a MAC under a key derived from the
  batch's key, over (gateway, epoch, seq, key id, status, payload digest)
  (:mod:`store_forward.acks`). A forged, malformed or unverifiable ack deletes
  nothing; it is counted by cause in ``stats.acks_refused`` and logged once
  per cause. Acks for unsealed batches (development) carry no MAC and are
  used only with ``unauthenticated_acks=True``;
* a batch without an ack after ``ack_timeout_s`` is published again; after a
  reconnect every unacknowledged batch is published again, oldest first;
* paho may also re-send a QoS 1 publish by itself after a reconnect; the
  headend de-duplicates on (gateway, epoch, seq), so that is harmless.

Contact with central (:attr:`Uplink.last_contact_ms`, what the cutoff
policy's out-of-contact protection reads) is counted only from authenticated
messages: an ack that verified, and — reported by the command handler
through :meth:`Uplink.note_contact` — a command whose signature verified.
Anything else on the ack or command topics changes nothing.

Batches are sealed with the gateway's uplink key (encoding 2, see
:mod:`store_forward.codec`) when the outbox makes them, and the sealed bytes
are stored with the batch: a retransmission, after a reconnect or a restart,
sends the very same bytes, and ``edgegw backlog export`` writes them too.

Pacing follows the link (:mod:`store_forward.pacing`): batch size from the
measured delivery rate (capped by ``batch_max_bytes``), an AIMD window of
batches awaiting acks (capped by ``window``), an optional byte-rate ceiling;
events bypass window and ceiling. Publishes of different batches overlap, so
the link stays busy while the next batch is being sealed.

The connection loop is written out (aiomqtt 2.x has no auto-reconnect):
connect, subscribe to acks, run sender and receiver in a TaskGroup; on any
MQTT error wait a jittered exponential back-off and connect again. Polling
and storage never wait on any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from firmware_bridge.backoff import backoff_delay
from firmware_bridge.cause_log import CauseLog
from store_forward import presence
from store_forward.acks import Ack, AckError, parse_ack, verify_ack
from store_forward.codec import BatchCodec, JsonCodec, encoding_of, sealed_key_id
from store_forward.outbox import K_LINK, K_LINK_SINCE, BatchPlan, Outbox, OutboxError
from store_forward.pacing import LinkPacer
from store_forward.records import Record, RecordClass, RecordKind
from store_forward.settings import BrokerSettings, UplinkSettings
from store_forward.tls import client_tls_context
from store_forward.topics import Topics

log = logging.getLogger(__name__)

CommandSink = Callable[[bytes], Awaitable[None]]
# What an extra subscription delivers (Uplink.subscribe_extra): (topic, payload), or
# None when the connection it was made on has ended.
Delivery = tuple[str, bytes] | None


class LinkState(enum.StrEnum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


@dataclass
class UplinkStats:
    connects: int = 0
    connect_failures: int = 0  # connection attempts that failed, and connections lost
    published: int = 0
    readings_sent: int = 0  # readings in batches published for the first time
    retransmits: int = 0
    acked: int = 0
    rejected: int = 0
    bytes_sent: int = 0
    last_error: str | None = None
    # Last authenticated contact with central (a verified ack or signed command).
    last_contact_ms: int | None = None
    last_contact_source: str | None = None
    acks_refused: dict[str, int] = field(default_factory=dict)  # by cause; nothing deleted
    commands: int = 0  # messages on the command topic (verified or not)
    state: LinkState = LinkState.DOWN
    ack_latency_s: list[float] = field(default_factory=list)
    window: int = 0
    batch_bytes: int = 0
    rate_bytes_per_s: float | None = None


def tls_context(broker: BrokerSettings) -> ssl.SSLContext:
    """The broker connection's TLS context (:func:`store_forward.tls.client_tls_context`:
    server verification always on; TLS 1.2 or newer; client certificate if given).
    Raises :class:`store_forward.tls.TLSFileError` naming the ``broker.*`` key, the file
    and the cause."""
    return client_tls_context(broker.ca_file, broker.cert_file, broker.key_file)


@dataclass
class _InFlight:
    payload: bytes
    epoch: str
    sent_at: float
    deadline: float
    queued: int  # bytes in flight when sent, itself included
    urgent: bool


def _billing_readings(records: Sequence[Record]) -> int:
    return sum(r.kind == RecordKind.READING and r.cls == RecordClass.BILLING for r in records)


class Uplink:
    def __init__(
        self,
        outbox: Outbox,
        *,
        gateway_id: str,
        broker: BrokerSettings,
        settings: UplinkSettings,
        codec: BatchCodec | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        rng: random.Random | None = None,
        on_command: CommandSink | None = None,
        max_bytes_per_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        unauthenticated_acks: bool = False,
        identity: presence.Identity | None = None,
        ack_fold_s: float = 0.0,
    ) -> None:
        """``codec``: :class:`store_forward.codec.SealedCodec` in deployments; without
        one, batches go as unsealed encoding 1 (development; logged as a warning),
        and their acks, which nothing can authenticate, delete batches only with
        ``unauthenticated_acks`` (``uplink.allow_unauthenticated_acks``).

        ``ack_fold_s``: 0 deletes an acknowledged batch at once, in a transaction of
        its own; above 0 the ack is applied with the next transaction that writes
        anyway (the daemon's poll-cycle commit), or on its own once it waited this
        long (the daemon passes twice its poll interval, at least 2 s)."""
        self.outbox = outbox
        self.gateway_id = gateway_id
        # what the retained presence says of this gateway (store_forward.presence)
        self.identity = identity or presence.Identity(gateway_id, "unknown", None, clock_ms())
        self._session_ms: int | None = None
        self.broker = broker
        self.settings = settings
        if codec is None:
            codec = JsonCodec()
            log.warning("uplink %s: no uplink key configured; batches are NOT sealed", gateway_id)
        self.codec = codec
        self.unauthenticated_acks = unauthenticated_acks
        if not codec.sealed and not unauthenticated_acks:
            log.error(
                "uplink %s: batches are not sealed, so their acks cannot be authenticated:"
                " nothing is deleted on an ack and acks do not count as contact with central"
                " (configure the uplink key, or for development uplink.allow_unauthenticated_acks)",
                gateway_id,
            )
        self._ack_causes_logged: set[str] = set()
        self.clock_ms = clock_ms
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.on_command = on_command
        self.topics = Topics(broker.topic_prefix, gateway_id)
        # a link that keeps failing is logged once per change of cause, not per retry
        self._link_log = CauseLog(log, "uplink")
        self.stats = UplinkStats()
        self.pacer = LinkPacer(
            batch_max_bytes=settings.batch_max_bytes,
            max_window=settings.window,
            max_bytes_per_s=max_bytes_per_s,
            ack_timeout_s=settings.ack_timeout_s,
        )
        self._wake = asyncio.Event()
        self._since_checked = False  # link "since" carried over from the last run, checked once
        self._inflight: dict[int, _InFlight] = {}
        self.ack_fold_s = ack_fold_s
        # the connection while it is up, and the other parts' subscriptions on it
        self._connection: aiomqtt.Client | None = None
        self._extra: dict[str, asyncio.Queue[Delivery]] = {}
        outbox.packer = self._pack
        outbox.gateway_id = gateway_id
        outbox.batch_plan = self._batch_plan

    def _batch_plan(self) -> BatchPlan | None:
        """While the link is up, the writer's transaction numbers the next batches:
        what a send would take now (store_forward.outbox.Outbox.fold_in)."""
        if self.stats.state is not LinkState.UP:
            return None
        now = self.monotonic()
        backlog_ok = self.pacer.may_send_backlog(len(self._inflight), self._inflight_bytes(), now)
        return BatchPlan(
            self.settings.batch_max_records,
            self.pacer.batch_bytes(),
            255 if backlog_ok else int(RecordClass.EVENT),
        )

    def notify(self) -> None:
        """New records were committed: wake the sender."""
        self._wake.set()

    @property
    def last_contact_ms(self) -> int | None:
        """When central was last heard from in a way it alone can produce (a verified
        ack or signed command); None: not since start."""
        return self.stats.last_contact_ms

    def note_contact(self, source: str) -> None:
        """An authenticated message from central arrived (``source``: "ack", "command")."""
        self.stats.last_contact_ms = self.clock_ms()
        self.stats.last_contact_source = source

    async def _set_state(self, state: LinkState) -> None:
        if self.stats.state is state:
            return
        was_up = self.stats.state is LinkState.UP
        self.stats.state = state
        # Each attempt passes through connecting and down: the journal gets the
        # causes from the CauseLog (one line per change), not these.
        log.debug("uplink %s", state.value)
        values: dict[str, Any] = {K_LINK: state.value}
        # "since" is when the link last came up, or last went down: retries between
        # down and connecting do not move it, nor does a restart while it stays down.
        if was_up != (state is LinkState.UP):
            values[K_LINK_SINCE] = self.clock_ms()
        if not self._since_checked:
            self._since_checked = True
            try:
                kv = await self.outbox.kv()
            except OutboxError:
                kv = {}
            stayed_down = kv.get(K_LINK) not in (None, LinkState.UP.value) and kv.get(K_LINK_SINCE)
            if state is LinkState.UP or not stayed_down:
                values[K_LINK_SINCE] = self.clock_ms()
        try:
            await self.outbox.set_state(values)
        except OutboxError as exc:  # a full disk must not stop the uplink (it frees space)
            log.error("uplink: cannot record link state: %s", exc)

    def _client(self) -> aiomqtt.Client:
        b = self.broker
        self._session_ms = self.clock_ms()  # this MQTT session's start, in its birth and will
        return aiomqtt.Client(
            b.host,
            b.port,
            username=b.username,
            password=b.password,
            # A persistent session under a stable client id: the broker keeps the QoS 1
            # command subscription while the link is down and queues central's
            # commands for it (and acks that came late); they arrive on reconnect.
            # The command handler refuses a copy it already applied, so a command
            # the broker and central's resend both deliver is applied once. With a
            # client certificate the id is the gateway id, its CN: the name the
            # shipped broker gives the session whatever is asked (use_username_as_clientid).
            identifier=self.gateway_id if b.tls and b.cert_file is not None else f"edgegw-{self.gateway_id}",
            clean_session=False,
            keepalive=b.keepalive_s,
            timeout=max(5.0, self.settings.ack_timeout_s),
            tls_context=tls_context(b) if b.tls else None,
            will=aiomqtt.Will(
                self.topics.state,
                presence.death(self.identity, presence.OfflineReason.LOST, self._session_ms),
                qos=1,
                retain=True,
            ),
        )

    # -- other subscriptions on this connection -------------------------------------

    async def subscribe_extra(self, topic: str, sink: asyncio.Queue[Delivery]) -> None:
        """Subscribe ``topic`` (QoS 0) on the uplink's connection; what arrives on it
        goes into ``sink`` as (topic, payload).

        The broker names a session by the client certificate's CN whatever client
        id is asked for (examples/mosquitto: ``use_username_as_clientid``), so a
        gateway has one connection: a second one would close this one and, with a
        clean session, drop the commands queued in its persistent session. The
        gateway's other MQTT needs (software chunks) ride on this one. QoS 0: a
        subscription left in the persistent session by an interrupted download
        queues nothing while the gateway is away. When the connection ends, None
        goes into every sink and the subscriptions are forgotten (not renewed on
        reconnect: subscribe again). Raises :class:`aiomqtt.MqttError` while the
        link is not up."""
        client = self._connection
        if client is None:
            raise aiomqtt.MqttError("uplink is not connected")
        self._extra[topic] = sink
        await client.subscribe(topic, qos=0)

    async def unsubscribe_extra(self, topic: str) -> None:
        """Undo :meth:`subscribe_extra` (nothing if the connection has ended since)."""
        if self._extra.pop(topic, None) is None or self._connection is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await self._connection.unsubscribe(topic)

    def _connection_ended(self) -> None:
        self._connection = None
        for sink in {id(s): s for s in self._extra.values()}.values():
            sink.put_nowait(None)
        self._extra.clear()

    async def run(self) -> None:
        """Forever: connect, drain, and reconnect with back-off after any failure."""
        try:
            await self._run()
        finally:
            self._link_log.stopped()  # a stop while failing: the count of the last cause

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._set_state(LinkState.CONNECTING)
            try:
                async with self._client() as client:
                    self.stats.connects += 1
                    attempt = 0
                    await client.subscribe(self.topics.ack, qos=1)
                    if self.on_command is not None:
                        await client.subscribe(self.topics.cmd, qos=1)
                    assert self._session_ms is not None
                    await client.publish(
                        self.topics.state,
                        presence.birth(self.identity, self._session_ms),
                        qos=1,
                        retain=True,
                    )
                    self._connection = client
                    await self._set_state(LinkState.UP)
                    if not self._link_log.ok("connected"):
                        log.info("uplink up (connected to %s:%d)", self.broker.host, self.broker.port)
                    self._inflight.clear()
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._receive(client))
                            tg.create_task(self._send(client, tg))
                    except asyncio.CancelledError:
                        # A clean stop: the broker publishes the last will only for a
                        # connection that dies, so say "offline" before disconnecting.
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(2.0):
                                await client.publish(
                                    self.topics.state,
                                    presence.death(
                                        self.identity, presence.OfflineReason.STOPPED, self._session_ms
                                    ),
                                    qos=1,
                                    retain=True,
                                )
                        raise
            except* (aiomqtt.MqttError, OSError, TimeoutError) as eg:
                self.stats.connect_failures += 1
                self.stats.last_error = "; ".join(str(e) for e in eg.exceptions)
                self._link_log.failed(f"connection lost: {self.stats.last_error}")
            except* Exception as eg:
                # Anything else (a client library surprise) must not end delivery for
                # good: log it with its traceback and reconnect like after a link loss.
                self.stats.connect_failures += 1
                self.stats.last_error = "; ".join(repr(e) for e in eg.exceptions)
                self._link_log.failed(f"failed, reconnecting: {self.stats.last_error}", exc_info=eg)
            finally:
                self._connection_ended()
            await self._set_state(LinkState.DOWN)
            delay = backoff_delay(
                attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s, self.rng
            )
            attempt += 1
            await asyncio.sleep(delay)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            if msg.topic.value == self.topics.cmd:
                # Signed commands: the handler verifies, applies and answers through the
                # outbox. Central re-sends a command until it sees its result event, so a
                # command lost between PUBACK and the handler's commit is not lost for good.
                # Contact is noted by the handler's owner once a signature verified.
                if self.on_command is not None and isinstance(msg.payload, bytes):
                    self.stats.commands += 1
                    await self.on_command(msg.payload)
                continue
            if msg.topic.value == self.topics.ack:
                await self.on_ack(msg.payload)
                continue
            sink = self._extra.get(msg.topic.value)
            if sink is not None and isinstance(msg.payload, (bytes, bytearray)):
                sink.put_nowait((msg.topic.value, bytes(msg.payload)))

    def _refuse_ack(self, cause: str, detail: str) -> None:
        self.stats.acks_refused[cause] = self.stats.acks_refused.get(cause, 0) + 1
        if cause not in self._ack_causes_logged:
            self._ack_causes_logged.add(cause)
            log.warning(
                "uplink %s: ack refused, nothing deleted (%s): %s; further acks refused"
                " for this cause are only counted",
                self.gateway_id,
                cause,
                detail,
            )

    async def _authenticate(self, ack: Ack) -> tuple[str, str] | None:
        """None if ``ack`` proves itself for one of our unacknowledged batches,
        else (cause, detail)."""
        seq = ack.seq
        entry = self._inflight.get(seq)
        if entry is not None:
            epoch, payload = entry.epoch, entry.payload
        else:
            try:
                found = await self.outbox.pending_batch(seq)
            except OutboxError as exc:
                return "unverifiable", f"cannot read batch {seq}: {exc}"
            if found is None or found[1] is None or self.outbox.ack_waiting(seq):
                return "unknown batch", f"no batch {seq} awaits an ack"
            epoch, payload = found[0], found[1]
        if ack.epoch != epoch:
            return "wrong epoch", f"ack for batch {seq} of epoch {ack.epoch!r}, ours is {epoch!r}"
        key_id = sealed_key_id(payload)
        if key_id is None:
            if encoding_of(payload) == 1 and self.unauthenticated_acks:
                return None
            return "unauthenticated", f"ack for unsealed batch {seq}, and unauthenticated acks are off"
        key = self.codec.ack_key(key_id)
        if key is None:
            return "no ack key", f"batch {seq} was sealed under key id {key_id}, which is not loaded"
        if ack.mac is None:
            return "unauthenticated", f"ack for sealed batch {seq} without a mac"
        digest = hashlib.sha256(payload).digest()
        if not verify_ack(
            ack, key, gateway_id=self.gateway_id, epoch=epoch, seq=seq, key_id=key_id, digest=digest
        ):
            return "bad mac", f"the mac of the {ack.status!r} ack for batch {seq} does not verify"
        return None

    async def on_ack(self, payload: object) -> None:
        """One message from the ack topic: delete the batch only on a valid ack."""
        try:
            ack = parse_ack(payload)
        except AckError as exc:
            self._refuse_ack(exc.cause, str(exc))
            return
        refused = await self._authenticate(ack)
        if refused is not None:
            self._refuse_ack(*refused)
            return
        self.note_contact("ack")
        seq = ack.seq
        if ack.holds_batch:
            if self.ack_fold_s <= 0:
                try:
                    await self.outbox.ack(seq, epoch=ack.epoch)
                except OutboxError as exc:
                    # Not deleted: the batch goes again and comes back as a duplicate ack.
                    log.error("uplink: cannot delete acknowledged batch %d: %s", seq, exc)
                    return
            else:
                # Deleted with the next transaction (an ack lost in a crash: the batch
                # goes again and comes back as a duplicate ack).
                self.outbox.ack_later(seq, epoch=ack.epoch)
            entry = self._inflight.pop(seq, None)
            if entry is not None:
                now = self.monotonic()
                self.pacer.on_ack(len(entry.payload), entry.sent_at, entry.queued, now)
                self.stats.ack_latency_s.append(now - entry.sent_at)
                del self.stats.ack_latency_s[:-100]
            self.stats.acked += 1
        else:
            # The headend could not take the batch ("rejected"), or holds other bytes
            # under its identity ("conflict"). It stays stored; retry slowly.
            self.stats.rejected += 1
            log.log(
                logging.CRITICAL if ack.status == "conflict" else logging.ERROR,
                "headend answered %s for batch %d (epoch %s): %s",
                ack.status,
                seq,
                ack.epoch or "legacy",
                ack.reason,
            )
            entry = self._inflight.get(seq)
            if entry is not None:
                entry.deadline = self.monotonic() + min(4 * (entry.deadline - entry.sent_at), 3600.0)
        self._wake.set()

    async def _publish(self, client: aiomqtt.Client, seq: int, payload: bytes, within_s: float) -> None:
        await client.publish(self.topics.up, payload, qos=1, timeout=within_s)
        self.stats.bytes_sent += len(payload)
        try:
            await self.outbox.mark_sent(seq, self.clock_ms())
        except OutboxError as exc:
            log.error("uplink: cannot record the send of batch %d: %s", seq, exc)

    def _pack(
        self, seq: int, records: Sequence[Record], max_bytes: int, *, epoch: str
    ) -> tuple[bytes, int]:
        return self.codec.pack(self.gateway_id, seq, records, max_bytes, epoch=epoch)

    def _inflight_bytes(self) -> int:
        return sum(len(e.payload) for e in self._inflight.values())

    def _start(self, tg: asyncio.TaskGroup, client: aiomqtt.Client, seq: int, entry: _InFlight) -> None:
        timeout = self.pacer.ack_deadline_s(entry.queued)
        tg.create_task(self._publish(client, seq, entry.payload, timeout))

    async def _send(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        s = self.settings
        pacer = self.pacer
        while True:
            self._wake.clear()
            if self.outbox.acks_due(self.ack_fold_s):
                try:
                    await self.outbox.apply_acks()
                except OutboxError as exc:
                    log.error("uplink: cannot delete acknowledged batches: %s", exc)
            now = self.monotonic()
            for seq, entry in sorted(self._inflight.items()):
                if now >= entry.deadline:
                    pacer.on_timeout(now)
                    self.stats.retransmits += 1
                    entry.sent_at = now
                    entry.queued = self._inflight_bytes()
                    entry.deadline = now + pacer.ack_deadline_s(entry.queued)
                    pacer.on_send(len(entry.payload), now)
                    self._start(tg, client, seq, entry)
            wait = 0.0
            while True:
                now = self.monotonic()
                wait = pacer.send_wait_s(now, urgent=False)
                backlog_ok = pacer.may_send_backlog(len(self._inflight), self._inflight_bytes(), now)
                try:
                    batch = await self.outbox.next_batch(
                        self.clock_ms(),
                        exclude=self._inflight.keys(),
                        max_records=s.batch_max_records,
                        max_bytes=pacer.batch_bytes(),
                        pack=self._pack,
                        max_cls=None if backlog_ok else int(RecordClass.EVENT),
                    )
                except OutboxError as exc:
                    log.error("uplink: cannot form a batch: %s", exc)
                    wait = max(wait, 1.0)
                    break
                if batch is None:
                    break
                payload = batch.payload  # the stored bytes: every send is the same
                assert payload is not None  # next_batch with a packer always has them
                urgent = all(r.cls == RecordClass.EVENT for r in batch.records)
                now = self.monotonic()
                queued = self._inflight_bytes() + len(payload)
                entry = _InFlight(
                    payload, batch.epoch, now, now + pacer.ack_deadline_s(queued), queued, urgent
                )
                self._inflight[batch.seq] = entry
                pacer.on_send(len(payload), now)
                self._start(tg, client, batch.seq, entry)
                self.stats.published += 1
                if batch.attempts:
                    self.stats.retransmits += 1
                else:
                    self.stats.readings_sent += _billing_readings(batch.records)
            self.stats.window = pacer.window()
            self.stats.batch_bytes = pacer.batch_bytes()
            self.stats.rate_bytes_per_s = pacer.rate
            timeout = 1.0
            if wait > 0:
                timeout = min(timeout, max(wait, 0.01))
            if self._inflight:
                soonest = min(e.deadline for e in self._inflight.values())
                timeout = max(0.01, min(timeout, soonest - self.monotonic()))
            # Not asyncio.wait_for: before Python 3.12 it returns the inner result
            # instead of raising when it is cancelled in the same loop iteration as
            # the wake-up completes (new records arriving as the link drops). This
            # loop would then go on with a dead session: publishing into a TaskGroup
            # that is shutting down, or, with nothing to send, never ending, so the
            # uplink would not reconnect. asyncio.timeout lets the cancellation through.
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
