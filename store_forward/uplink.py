"""The uplink: drains the outbox to the broker and deletes only on the headend's ack.

Delivery is at-least-once on the wire with an idempotent effect:

* a batch keeps its sequence number and records for ever (see outbox), so a
  retransmission is the same batch;
* a broker PUBACK only means the broker has it; the batch is deleted when
  the headend's ack (published after the headend's own commit) arrives;
* a batch without an ack after ``ack_timeout_s`` is published again; after a
  reconnect every unacknowledged batch is published again, oldest first;
* paho may also re-send a QoS 1 publish by itself after a reconnect; the
  headend de-duplicates on (gateway, seq), so that is harmless.

The connection loop is written out (aiomqtt 2.x has no auto-reconnect):
connect, subscribe to acks, run sender and receiver in a TaskGroup; on any
MQTT error wait a jittered exponential back-off and connect again. Polling
and storage never wait on any of this.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiomqtt
import orjson

from gateway.config import BrokerSection, UplinkSection
from store_forward import wire_json
from store_forward.outbox import K_LINK, K_LINK_SINCE, Outbox
from store_forward.records import Record, RecordKind
from store_forward.topics import Topics

log = logging.getLogger(__name__)

Encoder = Callable[[str, int, Sequence[Record]], bytes]
CommandSink = Callable[[bytes], Awaitable[None]]


class LinkState(enum.StrEnum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


@dataclass
class UplinkStats:
    connects: int = 0
    published: int = 0
    readings_sent: int = 0  # readings in batches published for the first time
    retransmits: int = 0
    acked: int = 0
    rejected: int = 0
    bytes_sent: int = 0
    last_error: str | None = None
    last_ack_ms: int | None = None  # last application-level contact with central
    commands: int = 0
    state: LinkState = LinkState.DOWN
    ack_latency_s: list[float] = field(default_factory=list)


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Jittered exponential back-off ("equal jitter"): half fixed, half random."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return cap / 2 + rng.uniform(0, cap / 2)


def tls_context(broker: BrokerSection) -> ssl.SSLContext:
    """Server verification always on; TLS 1.2 or newer; client certificate if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(broker.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if broker.cert_file and broker.key_file:
        ctx.load_cert_chain(str(broker.cert_file), str(broker.key_file))
    return ctx


@dataclass
class _InFlight:
    payload: bytes
    sent_at: float
    timeout_s: float


class Uplink:
    def __init__(
        self,
        outbox: Outbox,
        *,
        gateway_id: str,
        broker: BrokerSection,
        settings: UplinkSection,
        encode: Encoder = wire_json.encode,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        rng: random.Random | None = None,
        on_command: CommandSink | None = None,
    ) -> None:
        self.outbox = outbox
        self.gateway_id = gateway_id
        self.broker = broker
        self.settings = settings
        self.encode = encode
        self.clock_ms = clock_ms
        self.rng = rng or random.Random()
        self.on_command = on_command
        self.topics = Topics(broker.topic_prefix, gateway_id)
        self.stats = UplinkStats()
        self._wake = asyncio.Event()
        self._inflight: dict[int, _InFlight] = {}

    def notify(self) -> None:
        """New records were committed: wake the sender."""
        self._wake.set()

    async def _set_state(self, state: LinkState) -> None:
        if self.stats.state is state:
            return
        self.stats.state = state
        log.info("uplink %s", state.value)
        await self.outbox.set_state({K_LINK: state.value, K_LINK_SINCE: self.clock_ms()})

    def _client(self) -> aiomqtt.Client:
        b = self.broker
        return aiomqtt.Client(
            b.host,
            b.port,
            username=b.username,
            password=b.password,
            identifier=f"edgegw-{self.gateway_id}",
            clean_session=True,
            keepalive=b.keepalive_s,
            timeout=max(5.0, self.settings.ack_timeout_s),
            tls_context=tls_context(b) if b.tls else None,
            will=aiomqtt.Will(self.topics.state, b"offline", qos=1, retain=True),
        )

    async def run(self) -> None:
        """Forever: connect, drain, and reconnect with back-off after any failure."""
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
                    await client.publish(self.topics.state, b"online", qos=1, retain=True)
                    await self._set_state(LinkState.UP)
                    self._inflight.clear()
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._receive(client))
                        tg.create_task(self._send(client))
            except* (aiomqtt.MqttError, OSError, TimeoutError) as eg:
                self.stats.last_error = "; ".join(str(e) for e in eg.exceptions)
                log.warning("uplink connection lost: %s", self.stats.last_error)
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
                if self.on_command is not None and isinstance(msg.payload, bytes):
                    self.stats.commands += 1
                    self.stats.last_ack_ms = self.clock_ms()
                    await self.on_command(msg.payload)
                continue
            try:
                ack = orjson.loads(msg.payload) if isinstance(msg.payload, bytes) else None
                seq = int(ack["seq"])
                status = str(ack["status"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("ignoring malformed ack on %s", msg.topic)
                continue
            self.stats.last_ack_ms = self.clock_ms()
            if status in ("stored", "duplicate"):
                await self.outbox.ack(seq)
                entry = self._inflight.pop(seq, None)
                if entry is not None:
                    self.stats.ack_latency_s.append(time.monotonic() - entry.sent_at)
                    del self.stats.ack_latency_s[:-100]
                self.stats.acked += 1
            else:
                # The headend could not take the batch. It stays stored; retry slowly.
                self.stats.rejected += 1
                log.error("headend rejected batch %d: %s", seq, ack.get("reason"))
                entry = self._inflight.get(seq)
                if entry is not None:
                    entry.timeout_s = min(entry.timeout_s * 4, 3600.0)
            self._wake.set()

    async def _publish(self, client: aiomqtt.Client, seq: int, payload: bytes) -> None:
        await client.publish(
            self.topics.up, payload, qos=1, timeout=self.settings.ack_timeout_s
        )
        await self.outbox.mark_sent(seq, self.clock_ms())
        self.stats.bytes_sent += len(payload)

    async def _send(self, client: aiomqtt.Client) -> None:
        s = self.settings
        while True:
            self._wake.clear()
            now = time.monotonic()
            for seq, entry in sorted(self._inflight.items()):
                if now - entry.sent_at >= entry.timeout_s:
                    entry.sent_at = now
                    self.stats.retransmits += 1
                    await self._publish(client, seq, entry.payload)
            while len(self._inflight) < s.window:
                batch = await self.outbox.next_batch(
                    self.clock_ms(),
                    exclude=self._inflight.keys(),
                    max_records=s.batch_max_records,
                    max_bytes=s.batch_max_bytes,
                )
                if batch is None:
                    break
                payload = self.encode(self.gateway_id, batch.seq, batch.records)
                self._inflight[batch.seq] = _InFlight(payload, time.monotonic(), s.ack_timeout_s)
                await self._publish(client, batch.seq, payload)
                self.stats.published += 1
                if batch.attempts:
                    self.stats.retransmits += 1
                else:
                    self.stats.readings_sent += sum(
                        r.kind == RecordKind.READING for r in batch.records
                    )
            timeout = 1.0
            if self._inflight:
                soonest = min(e.sent_at + e.timeout_s for e in self._inflight.values())
                timeout = max(0.01, min(timeout, soonest - time.monotonic()))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
