"""A fleet of simulated gateways that publish like real ones, without a daemon each.

Each simulated gateway has its own gateway id, its own X25519 exchange key
and Ed25519 identity, and an enrollment document in the headend's registry
in the format ``edgegw keys export-public`` writes (the headend reads it
with :class:`headend.registry.GatewayRegistry`). It seals its batches with
the batch key derived as a real gateway derives it
(:func:`store_forward.uplink_keys.derive_uplink_key`, key id 1) and the real
encoder (:class:`store_forward.codec.SealedCodec`: encoding 2, the smaller
of zlib and LZMA), numbered as an outbox numbers them: record ids and batch
seqs counting up from 1 under one batch epoch, one record class per batch,
events before billing registers before telemetry.

Per poll round (15 minutes of simulated time) a gateway makes, for each of
its meters, one reading: the energy registers (total and the four
time-of-use rates, a random walk on the load with the rate of the hour from
:data:`testbed.simulators.dlt645.RATE_BY_HOUR`) as a BILLING record and
voltage, current, power, power factor and frequency (random walks, as
bench/uplink.py's site) as a TELEMETRY record, exactly as
:func:`store_forward.records.split_reading` splits a poll. Before them, in
an EVENT batch: a ``gateway.health`` record every ``health_every`` rounds
(built by :func:`gateway.health_report.build`) and ``command_result``
records for the commands it is told to answer.

On the broker it behaves as the uplink does: a retained birth on
``{prefix}/{gw}/state`` (:mod:`store_forward.presence`), batches at QoS 1 on
``{prefix}/{gw}/up``, acks taken from ``{prefix}/{gw}/ack`` and verified
(the MAC under the gateway's ack key, :mod:`store_forward.acks`); a batch
without an ack after ``ack_timeout_s`` is sent again with the same bytes;
at the end a retained ``offline``/``stopped``. At most ``window`` batches
of the whole fleet are unacknowledged at once.

What differs from a real fleet, and why it does not matter to what this
measures (the headends):

* Gateways are multiplexed over ``connections`` MQTT connections (16 by
  default): the broker sees that many clients, not one per gateway, so its
  per-connection costs (keepalives, TLS sessions, memory per client) are not
  exercised. A connection can have only one last will, so the simulator
  publishes each gateway's death itself at a clean stop; a killed simulator
  leaves its gateways "online".
* Batches can be sealed before the timed phase (:func:`seal_rounds`, in
  worker processes), so that the simulator's sealing does not limit the rate
  the headends are offered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.events import event
from firmware_bridge.reading import Measurement, Quality, Quantity, Reading, TimeSource
from gateway import health_report
from store_forward import presence
from store_forward.acks import AckError, ack_key, parse_ack, verify_ack
from store_forward.batch_epoch import EPOCH_BYTES
from store_forward.codec import SealedCodec
from store_forward.records import Record, RecordClass, RecordKind, split_reading
from store_forward.topics import DEFAULT_PREFIX, Topics
from store_forward.uplink_keys import PURPOSE, derive_uplink_key, fingerprint
from testbed.simulators.dlt645 import RATE_BY_HOUR

INTERVAL_MS = 900_000  # one poll round: 15 minutes of simulated time
KEY_ID = 1
VERSION = "0.1.0-sim"
_RATES = (
    Quantity.ENERGY_IMPORT_T1,
    Quantity.ENERGY_IMPORT_T2,
    Quantity.ENERGY_IMPORT_T3,
    Quantity.ENERGY_IMPORT_T4,
)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def gateway_id(index: int) -> str:
    return f"sim-{index:06d}"


@dataclass(frozen=True)
class SimGateway:
    """One simulated gateway's identity and batch key (what its keystore would hold)."""

    index: int
    gateway_id: str
    key: bytes  # the batch key of key id 1 towards this headend
    epoch: str  # the batch epoch of its outbox
    boot_id: str

    @property
    def ack_key(self) -> bytes:
        return ack_key(self.key)


def provision(
    count: int, registry: Path, headend_public: bytes, *, seed: int = 1, first: int = 0
) -> list[SimGateway]:
    """Make ``count`` gateways and enroll each in ``registry`` (one JSON file each,
    the fields of ``edgegw keys export-public``). Keys are fresh; epochs and boot
    ids follow from ``seed``."""
    registry.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    out = []
    for i in range(first, first + count):
        gw = gateway_id(i)
        identity = (
            Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        exchange = X25519PrivateKey.generate()
        exch_pub = exchange.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        doc = {
            "gateway_id": gw,
            "identity_ed25519": _b64(identity),
            "identity_fingerprint": fingerprint(identity),
            "exchange_x25519": _b64(exch_pub),
            "exchange_fingerprint": fingerprint(exch_pub),
            "key_versions": {PURPOSE: KEY_ID},
        }
        (registry / f"{gw}.json").write_bytes(orjson.dumps(doc))
        shared = exchange.exchange(X25519PublicKey.from_public_bytes(headend_public))
        key = derive_uplink_key(shared, gw, headend_public, KEY_ID)
        epoch = rnd.randbytes(EPOCH_BYTES).hex()
        out.append(SimGateway(i, gw, key, epoch, rnd.randbytes(16).hex()))
    return out


# --------------------------------------------------------------------------- data


class MeterWalk:
    """The meters of one gateway: energy registers and instantaneous values as
    random walks (deterministic for a seed)."""

    def __init__(self, meters: int, seed: int) -> None:
        self.rnd = rnd = random.Random(seed)
        self.meters = meters
        self.ids = [f"{seed % 1_000_000:06d}{i:06d}" for i in range(meters)]
        # centi-kWh per rate register
        self.rates = [[rnd.randint(1_000, 200_000) for _ in range(4)] for _ in range(meters)]
        self.load_kw = [rnd.uniform(0.1, 3.0) for _ in range(meters)]
        self.volts = [rnd.uniform(222, 238) for _ in range(meters)]
        self.freq = 50.0

    def poll(self, time_ms: int) -> list[Reading]:
        """One poll of every meter at about ``time_ms`` (15 minutes after the last)."""
        rnd = self.rnd
        hour = (time_ms // 3_600_000) % 24
        rate = RATE_BY_HOUR[hour] - 1
        self.freq = min(50.2, max(49.8, self.freq + rnd.gauss(0, 0.01)))
        out = []
        for i in range(self.meters):
            load = self.load_kw[i] = min(8.0, max(0.0, self.load_kw[i] + rnd.gauss(0, 0.2)))
            self.rates[i][rate] += round(load * 25)  # kW x 0.25 h, in centi-kWh
            volts = self.volts[i] = min(245.0, max(215.0, self.volts[i] + rnd.gauss(0, 1.5)))
            pf = rnd.uniform(0.80, 0.99)
            v = round(volts, 1)
            quality = Quality.SUSPECT if rnd.random() < 0.01 else Quality.GOOD
            values = {
                Quantity.ENERGY_IMPORT: Measurement(Decimal(sum(self.rates[i])).scaleb(-2)),
                **{
                    q: Measurement(Decimal(c).scaleb(-2))
                    for q, c in zip(_RATES, self.rates[i], strict=True)
                },
                Quantity.VOLTAGE: Measurement(Decimal(f"{v:.1f}"), quality),
                Quantity.CURRENT: Measurement(Decimal(f"{load * 1000 / (v * pf):.3f}")),
                Quantity.POWER: Measurement(Decimal(f"{load:.4f}")),
                Quantity.POWER_FACTOR: Measurement(Decimal(f"{pf:.3f}")),
                Quantity.FREQUENCY: Measurement(Decimal(f"{self.freq:.2f}")),
            }
            t = time_ms + i * 1_100 + rnd.randint(0, 400)  # the bus reads one meter after another
            out.append(Reading(self.ids[i], t, values, TimeSource.SYSTEM_SYNCED))
        return out


@dataclass(frozen=True)
class FleetSpec:
    """What every simulated gateway does per round."""

    meters: int = 100
    telemetry: bool = True  # send the instantaneous values too (TELEMETRY records)
    health_every: int = 1  # a health record every this many rounds (0: never)
    start_ms: int = 1_767_225_600_000  # simulated time of round 0
    seed: int = 1


@dataclass(frozen=True)
class SealedBatch:
    """One batch ready to publish."""

    gateway: int  # index into the fleet
    seq: int
    payload: bytes
    readings: int  # meter readings (BILLING records)
    records: int

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.payload).digest()


class GatewayModel:
    """One simulated gateway's outbox: numbers records and batches, seals them."""

    def __init__(self, gw: SimGateway, spec: FleetSpec) -> None:
        self.gw = gw
        self.spec = spec
        self.meters = MeterWalk(spec.meters, spec.seed * 1_000_003 + gw.index)
        self.codec = SealedCodec(KEY_ID, gw.key)
        self.next_record = 1
        self.next_seq = 1
        self.started_ms = spec.start_ms - 3_600_000

    def _records(
        self, cls: RecordClass, kind: str, items: Iterable[tuple[int, dict[str, Any]]]
    ) -> list[Record]:
        out = []
        for created_ms, body in items:
            out.append(Record(self.next_record, cls, kind, created_ms, body))
            self.next_record += 1
        return out

    def health(self, now_ms: int, round_no: int) -> dict[str, Any]:
        machine = health_report.Machine(
            boot_id=self.gw.boot_id,
            uptime_s=(now_ms - self.started_ms) / 1000 + 60,
            load=(0.2, 0.15, 0.1),
            temperature_c=45.0,
            disk_total=8 << 30,
            disk_free=(6 << 30) - round_no * 4096,
        )
        return health_report.build(
            now_ms=now_ms,
            started_ms=self.started_ms,
            machine=machine,
            outbox=(0, None, 0),
            time_state={"quality": "system_synced", "behind_floor": False},
            link={"state": "up", "connects": 1, "connect_failures": 0, "published": self.next_seq - 1,
                  "acked": self.next_seq - 1, "retransmits": 0, "last_contact_ms": now_ms},
            meters=Counter({"online": self.spec.meters}),
            version=VERSION,
        )  # fmt: skip

    @staticmethod
    def command_result(command_id: str, at_ms: int) -> dict[str, Any]:
        return event(
            "command_result",
            {"outcome": "applied", "id": command_id, "channel": "mqtt", "at_ms": at_ms,
             "command_type": "time.sync", "issuer": "ops-sim"},
        )  # fmt: skip

    def round(self, k: int, command_ids: Sequence[str] = ()) -> list[SealedBatch]:
        """Round ``k``'s batches (events, billing, telemetry), sealed."""
        spec = self.spec
        now_ms = spec.start_ms + k * INTERVAL_MS
        events: list[tuple[int, dict[str, Any]]] = []
        if spec.health_every and k % spec.health_every == 0:
            events.append((now_ms, self.health(now_ms, k)))
        events += [(now_ms, self.command_result(c, now_ms)) for c in command_ids]
        by_cls: dict[RecordClass, list[tuple[int, dict[str, Any]]]] = {}
        for reading in self.meters.poll(now_ms):
            for cls, body in split_reading(reading):
                if cls is RecordClass.TELEMETRY and not spec.telemetry:
                    continue
                by_cls.setdefault(cls, []).append((reading.time_ms, body))
        out = []
        for cls, kind, items in (
            (RecordClass.EVENT, RecordKind.EVENT, events),
            (RecordClass.BILLING, RecordKind.READING, by_cls.get(RecordClass.BILLING, [])),
            (RecordClass.TELEMETRY, RecordKind.READING, by_cls.get(RecordClass.TELEMETRY, [])),
        ):
            if not items:
                continue
            records = self._records(cls, kind, items)
            seq = self.next_seq
            self.next_seq += 1
            payload = self.codec.encode(self.gw.gateway_id, seq, records, epoch=self.gw.epoch)
            readings = len(records) if cls is RecordClass.BILLING else 0
            out.append(SealedBatch(self.gw.index, seq, payload, readings, len(records)))
        return out


def _seal_chunk(
    gateways: Sequence[SimGateway],
    spec: FleetSpec,
    rounds: int,
    commands: Mapping[str, Sequence[str]],
) -> list[list[SealedBatch]]:
    models = [GatewayModel(g, spec) for g in gateways]
    per_round = []
    for k in range(rounds):
        batches = []
        for m in models:
            batches += m.round(k, commands.get(m.gw.gateway_id, ()) if k == 0 else ())
        per_round.append(batches)
    return per_round


def seal_rounds(
    gateways: Sequence[SimGateway],
    spec: FleetSpec,
    rounds: int,
    *,
    commands: Mapping[str, Sequence[str]] | None = None,
    workers: int = 1,
) -> list[list[SealedBatch]]:
    """Every batch of ``rounds`` rounds of the fleet, sealed (in ``workers`` processes),
    round by round; within a round, gateway by gateway. ``commands``: command ids
    each gateway answers (``applied``) in round 0."""
    cmds = dict(commands or {})
    if workers <= 1 or len(gateways) < 2 * workers:
        return _seal_chunk(gateways, spec, rounds, cmds)
    size = -(-len(gateways) // workers)
    chunks = [gateways[i : i + size] for i in range(0, len(gateways), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_seal_chunk, chunks, [spec] * len(chunks), [rounds] * len(chunks),
                              [cmds] * len(chunks)))  # fmt: skip
    return [[b for part in parts for b in part[k]] for k in range(rounds)]


# --------------------------------------------------------------------------- broker side


class FleetError(EdgeGwError):
    """The fleet could not deliver its batches (no ack within the deadline)."""

    kind = ErrorKind.TRANSPORT


@dataclass
class FleetStats:
    published: int = 0
    retransmits: int = 0
    acked: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    bad_acks: int = 0  # an ack that does not parse, or whose MAC does not verify
    unmatched_acks: int = 0  # for no batch in flight (a second ack after a resend)
    readings_acked: int = 0
    records_acked: int = 0
    presence_published: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["statuses"] = dict(self.statuses)
        return d


@dataclass
class _Pending:
    batch: SealedBatch
    sent: float
    tries: int = 1


class Fleet:
    """The simulated gateways on the broker, over ``connections`` MQTT connections.

    ::

        async with Fleet(gateways, host, port) as fleet:
            await fleet.birth()
            for batches in seal_rounds(gateways, spec, rounds):
                await fleet.send(batches)
            await fleet.drain(timeout_s=600)
            await fleet.death()
    """

    def __init__(
        self,
        gateways: Sequence[SimGateway],
        host: str,
        port: int,
        *,
        prefix: str = DEFAULT_PREFIX,
        connections: int = 16,
        window: int = 256,
        ack_timeout_s: float = 60.0,
        client_prefix: str = "fleet-sim",
    ) -> None:
        if not gateways:
            raise ValueError("a fleet needs at least one gateway")
        self.gateways = list(gateways)
        self.host = host
        self.port = port
        self.prefix = prefix
        self.n_conn = max(1, min(connections, len(self.gateways)))
        self.window = max(1, window)
        self.ack_timeout_s = ack_timeout_s
        self.client_prefix = client_prefix
        self.stats = FleetStats()
        self._first = self.gateways[0].index
        if [g.index - self._first for g in self.gateways] != list(range(len(self.gateways))):
            raise ValueError(
                "the fleet's gateways must have consecutive indexes (as provision makes them)"
            )
        self._topics = [Topics(prefix, g.gateway_id) for g in self.gateways]
        self._by_id = {g.gateway_id: g for g in self.gateways}
        self._ack_keys: dict[int, bytes] = {}
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._slots = asyncio.Semaphore(self.window)
        self._idle = asyncio.Event()
        self._idle.set()
        self._clients: list[aiomqtt.Client] = []
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.started_ms = int(time.time() * 1000)

    def _conn(self, index: int) -> aiomqtt.Client:
        return self._clients[index % self.n_conn]

    async def __aenter__(self) -> Fleet:
        self._stack = contextlib.AsyncExitStack()
        try:
            for c in range(self.n_conn):
                client = aiomqtt.Client(
                    self.host, self.port, identifier=f"{self.client_prefix}-{c}", clean_session=True,
                    timeout=30,
                )  # fmt: skip
                await self._stack.enter_async_context(client)
                self._clients.append(client)
                acks = [(self._topics[self._pos(g)].ack, 1) for g in self._owned(c)]
                for i in range(0, len(acks), 200):  # several SUBSCRIBE packets of 200 filters
                    await client.subscribe(acks[i : i + 200])
                self._tasks.append(asyncio.create_task(self._listen(client)))
            self._tasks.append(asyncio.create_task(self._resend_loop()))
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._stack is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await self._stack.aclose()
        self._clients.clear()

    def _owned(self, conn: int) -> list[SimGateway]:
        return [g for j, g in enumerate(self.gateways) if j % self.n_conn == conn]

    def _pos(self, gw: SimGateway) -> int:
        return gw.index - self._first

    # -- presence --------------------------------------------------------------------

    async def birth(self) -> None:
        """Every gateway's retained ``online`` (as at each connection of its uplink)."""
        session = int(time.time() * 1000)
        await self._presence(
            lambda g: presence.birth(
                presence.Identity(g.gateway_id, VERSION, g.boot_id, self.started_ms), session
            )
        )

    async def death(self) -> None:
        """Every gateway's retained ``offline``/``stopped`` (as at a clean stop)."""
        await self._presence(
            lambda g: presence.death(
                presence.Identity(g.gateway_id, VERSION, g.boot_id, self.started_ms),
                presence.OfflineReason.STOPPED,
            )
        )

    async def _presence(self, payload_of: Any) -> None:
        async def one_connection(c: int) -> None:
            client = self._clients[c]
            for g in self._owned(c):
                await client.publish(
                    self._topics[self._pos(g)].state, payload_of(g), qos=1, retain=True
                )
                self.stats.presence_published += 1

        await asyncio.gather(*(one_connection(c) for c in range(self.n_conn)))

    # -- batches ---------------------------------------------------------------------

    async def send(self, batches: Iterable[SealedBatch]) -> None:
        """Publish ``batches`` in order, at most ``window`` of the fleet unacknowledged
        (returns when the last is published; :meth:`drain` waits for the acks)."""
        queues: list[list[SealedBatch]] = [[] for _ in range(self.n_conn)]
        for b in batches:
            queues[(b.gateway - self._first) % self.n_conn].append(b)

        async def one_connection(c: int) -> None:
            client = self._clients[c]
            for b in queues[c]:
                await self._slots.acquire()
                self._pending[(b.gateway, b.seq)] = _Pending(b, time.monotonic())
                self._idle.clear()
                await client.publish(self._topics[b.gateway - self._first].up, b.payload, qos=1)
                self.stats.published += 1

        await asyncio.gather(*(one_connection(c) for c in range(self.n_conn)))

    async def drain(self, timeout_s: float) -> None:
        """Wait until every batch sent is acknowledged; :class:`FleetError` after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            raise FleetError(
                f"{len(self._pending)} batches without an ack after {timeout_s:.0f} s"
            ) from None

    async def _listen(self, client: aiomqtt.Client) -> None:
        head = self.prefix + "/"
        async for msg in client.messages:
            topic = msg.topic.value
            gw = (
                self._by_id.get(topic[len(head) : -len("/ack")]) if topic.endswith("/ack") else None
            )
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            if gw is None:
                continue
            self._on_ack(gw, payload)

    def _on_ack(self, gw: SimGateway, payload: bytes) -> None:
        try:
            ack = parse_ack(payload)
        except AckError:
            self.stats.bad_acks += 1
            return
        p = self._pending.get((gw.index, ack.seq))
        if p is None or ack.epoch != gw.epoch:
            self.stats.unmatched_acks += 1
            return
        key = self._ack_keys.get(gw.index)
        if key is None:
            key = self._ack_keys[gw.index] = gw.ack_key
        if not verify_ack(ack, key, gateway_id=gw.gateway_id, epoch=gw.epoch, seq=ack.seq, key_id=KEY_ID,
                          digest=p.batch.digest):  # fmt: skip
            self.stats.bad_acks += 1
            return
        del self._pending[(gw.index, ack.seq)]
        self._slots.release()
        self.stats.acked += 1
        self.stats.statuses[ack.status] += 1
        if ack.holds_batch:
            self.stats.readings_acked += p.batch.readings
            self.stats.records_acked += p.batch.records
        if not self._pending:
            self._idle.set()

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout_s / 4))
            now = time.monotonic()
            late = [p for p in self._pending.values() if now - p.sent > self.ack_timeout_s]
            for p in late:
                p.sent = now
                p.tries += 1
                b = p.batch
                pos = b.gateway - self._first
                await self._conn(pos).publish(self._topics[pos].up, b.payload, qos=1)
                self.stats.retransmits += 1
