"""The headend's ingest: the central side of the uplink contract, in code.

For every batch it receives it:

1. verifies and decodes it: a sealed batch (encoding 2) must open under the
   key the headend shares with that gateway (:class:`GatewayRegistry`:
   enrolled, not revoked) and name the gateway whose topic it came on; a
   batch that fails is logged, counted and never stored or acked. Unsealed
   batches (encoding 1) are accepted only by a headend without a registry
   (development) or with ``allow_plain=True``;
2. in one transaction, records the batch (gateway, epoch, seq) with the
   SHA-256 of its payload — if that identity is already known the batch is a
   duplicate (or, with other bytes, a conflict) and nothing else is written —
   and stores its records, each keyed by (gateway, epoch, record id)
   (:mod:`headend.store`);
3. commits (``synchronous=FULL``), and only then
4. publishes the ack ``{"seq", "epoch", "status": "stored" | "duplicate" |
   "conflict", "records", "mac"}`` at QoS 1; for a sealed batch the ``mac``
   binds it to that batch under a key only this headend and the gateway can
   derive (:mod:`store_forward.acks`).

A crash between 3 and 4 makes the gateway retransmit; step 2 turns that into
a duplicate ack. See docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Protocol

import aiomqtt

from firmware_bridge.backoff import backoff_delay, stop_if_cancelled
from firmware_bridge.cause_log import CauseLog
from headend.registry import GatewayRegistry
from headend.store import CONFLICT_REASON, HeadendStore, StoreBatch
from store_forward import presence, wire
from store_forward.acks import ack_key, ack_mac, encode_ack
from store_forward.codec import DecodeError, decode_rows
from store_forward.presence import Presence
from store_forward.topics import DEFAULT_PREFIX, Topics, gateway_of, up_filter

log = logging.getLogger(__name__)

Decoder = Callable[[bytes], StoreBatch]

# Seconds to wait for the broker to take an ack (see Headend._handle).
ACK_PUBLISH_TIMEOUT_S = 3.0


class IngestObserver(Protocol):
    """What the ingest tells about itself (:class:`headend.metrics.HeadendMetrics`)."""

    def on_connected(self, up: bool) -> None: ...

    def on_connect_failed(self) -> None: ...

    def on_batch(self, status: str, records_new: int) -> None: ...

    def on_refused(self, reason: str) -> None: ...

    def on_presence(self, gateway: str, p: Presence) -> None: ...


def presence_filter(prefix: str = DEFAULT_PREFIX) -> str:
    """Every gateway's retained presence (never a shared subscription: every
    headend needs every gateway's)."""
    return f"{prefix}/+/state"


def presence_gateway(topic: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """Gateway id from ``{prefix}/{gw}/state``; None for another topic."""
    head = prefix + "/"
    if not topic.startswith(head) or not topic.endswith("/state"):
        return None
    gw = topic[len(head) : -len("/state")]
    return gw if gw and "/" not in gw else None


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Headend:
    """Subscribe, store, then ack. Runs until cancelled; reconnects on its own."""

    def __init__(
        self,
        db: HeadendStore,
        *,
        host: str,
        port: int,
        prefix: str = DEFAULT_PREFIX,
        share_group: str | None = None,
        identifier: str | None = None,
        registry: GatewayRegistry | None = None,
        allow_plain: bool | None = None,
        decode: Decoder | None = None,
        tls_context: ssl.SSLContext | None = None,
        observer: IngestObserver | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        """``tls_context``: a client-side context for TLS to the broker (with the
        headend's certificate loaded for mutual TLS), e.g.
        :meth:`headend.tls.BrokerTLS.context`; None connects in plain MQTT.
        ``observer`` (e.g. the metrics) is told of connections, batches and
        presence messages; with one, the headend also subscribes to every
        gateway's presence. ``clock_ms`` (default: the system's wall clock) is
        the time a batch or a presence message is recorded as received, and
        the time of the command results a batch carries."""
        self.db = db
        self.host = host
        self.port = port
        self.prefix = prefix
        self.share_group = share_group
        self.identifier = identifier or f"edgegw-headend-{random.randrange(1 << 32):08x}"
        self.registry = registry
        # Unsealed batches only where no registry says which gateways exist.
        self.allow_plain = registry is None if allow_plain is None else allow_plain
        self.decode: Decoder = decode or self._decode
        self.tls_context = tls_context
        self.clock_ms = clock_ms or _wall_ms
        self.batches_received = 0
        self.rejected = 0
        self.rejections: dict[str, int] = {}
        self.connected = asyncio.Event()
        self.observer = observer
        # a broker that stays away is logged once per change of cause, not per retry
        self._link_log = CauseLog(log, "headend: broker", fields={"broker": f"{host}:{port}"})
        self._store_log = CauseLog(log, "headend", level=logging.ERROR)
        self._presence_log = CauseLog(log, "headend", level=logging.WARNING)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._link_log.stopped()
            self._store_log.stopped()

    async def _run(self) -> None:
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
                    await client.subscribe(up_filter(self.prefix, self.share_group), qos=1)
                    # every gateway's retained presence: stored, and told to the observer
                    await client.subscribe(presence_filter(self.prefix), qos=1)
                    if self.observer is not None:
                        self.observer.on_connected(True)
                    self.connected.set()
                    if not self._link_log.ok("subscribed again"):
                        log.info(
                            "headend subscribed on %s:%d (%s)",
                            self.host,
                            self.port,
                            "TLS" if self.tls_context is not None else "plain MQTT",
                        )
                    async for msg in client.messages:
                        await self._handle(client, msg)
                        stop_if_cancelled()
            except (aiomqtt.MqttError, OSError) as exc:
                stop_if_cancelled()  # the client's exit turned a cancellation into this
                self._link_log.failed(f"connection lost: {exc}")
            except Exception as exc:
                # A store error (database down, a bug): nothing was acked, so the
                # gateways send again; reconnect rather than stop ingesting for good.
                self._store_log.failed(f"failed; reconnecting: {exc!r}", exc_info=True)
            if self.observer is not None:
                self.observer.on_connect_failed()
                self.observer.on_connected(False)
            self.connected.clear()
            stop_if_cancelled()
            await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0, rng))
            attempt += 1

    async def _presence(self, gateway: str, payload: bytes) -> None:
        p = presence.parse(payload)
        if p is None:
            if payload:  # an empty retained message clears the topic: not a state
                log.warning(
                    "presence of %s not understood: %r", gateway, payload[:64], extra={"gateway": gateway}
                )
            return
        if p.gateway is not None and p.gateway != gateway:
            log.warning(
                "presence on %s names gateway %s: ignored", gateway, p.gateway, extra={"gateway": gateway}
            )
            return
        if self.observer is not None:
            self.observer.on_presence(gateway, p)
        try:
            await self.db.save_presence(gateway, p, self.clock_ms())
        except Exception as exc:  # presence is information: batches must go on regardless
            self._presence_log.failed(f"presence not stored: {exc!r}")
        else:
            self._presence_log.ok("presence stored again")

    def _decode(self, payload: bytes) -> StoreBatch:
        # a sealed batch's readings as rows: what the store writes, without a record
        # object per reading (store_forward.wire.decode_batch_rows)
        lookup = self.registry.key_lookup if self.registry is not None else None
        return decode_rows(payload, lookup, allow_plain=self.allow_plain)

    def _reject(self, kind: str) -> None:
        self.rejected += 1
        self.rejections[kind] = self.rejections.get(kind, 0) + 1

    def _observe_batch(self, status: str, records_new: int) -> None:
        if self.observer is not None:
            self.observer.on_batch(status, records_new)

    def _mac(self, batch: StoreBatch, status: str) -> bytes | None:
        """The ack's MAC for a sealed batch (under a key derived from its batch key)."""
        if not isinstance(batch, wire.DecodedBatch | wire.DecodedRows) or self.registry is None:
            return None
        key = self.registry.key_lookup(batch.gateway_id, batch.key_id)
        if key is None:  # revoked since the batch was opened: no ack the gateway would take
            return None
        return ack_mac(
            ack_key(key),
            gateway_id=batch.gateway_id,
            epoch=batch.epoch,
            seq=batch.seq,
            key_id=batch.key_id,
            status=status,
            digest=batch.digest,
        )

    async def _handle(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        presence_gw = presence_gateway(msg.topic.value, self.prefix)
        if presence_gw is not None:
            await self._presence(presence_gw, payload)
            return
        self.batches_received += 1
        topic_gw = gateway_of(msg.topic.value, self.prefix)
        if topic_gw is None:
            return
        try:
            batch = self.decode(payload)
        except DecodeError as exc:
            # Nothing authenticated to answer to: record and drop (no ack, so a
            # gateway with a real problem keeps its data and retries).
            self._reject(exc.reason.split(":")[0])
            if self.observer is not None:
                self.observer.on_refused(exc.reason.split(":")[0])
            log.error(
                "refused batch on %s (%d bytes): %s", msg.topic.value, len(payload), exc.reason,
                extra={"gateway": topic_gw},
            )  # fmt: skip
            return
        if batch.gateway_id != topic_gw:
            # Not MAC'd: the gateway of this topic holds no key for another's batch.
            self._reject("topic mismatch")
            reason = f"batch names gateway {batch.gateway_id!r} but came on {topic_gw!r}'s topic"
            log.error("rejecting batch %d: %s", batch.seq, reason, extra={"gateway": topic_gw})
            self._observe_batch("rejected", 0)
            reply = encode_ack(seq=batch.seq, epoch=batch.epoch, status="rejected", reason=reason)
        else:
            result = await self.db.store(batch, self.clock_ms())
            self._store_log.ok("storing again")
            self._observe_batch(result.status, result.records_new)
            if result.status == "conflict":
                self._reject("conflict")
                log.critical(
                    "batch %d of %s (epoch %s): %s; not acked as stored",
                    batch.seq,
                    batch.gateway_id,
                    batch.epoch or "legacy",
                    CONFLICT_REASON,
                    extra={"gateway": batch.gateway_id},
                )
            reply = encode_ack(
                seq=batch.seq,
                epoch=batch.epoch,
                status=result.status,
                records=result.records_new,
                reason=CONFLICT_REASON if result.status == "conflict" else None,
                mac=self._mac(batch, result.status),
            )
        # A short timeout: on a dead connection aiomqtt does not fail a pending QoS 1
        # publish, and the headend would sit out the client's whole timeout. A lost
        # ack costs nothing: the gateway re-sends and the batch is a duplicate.
        await client.publish(
            Topics(self.prefix, topic_gw).ack, reply, qos=1, timeout=ACK_PUBLISH_TIMEOUT_S
        )
