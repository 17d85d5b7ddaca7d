"""Software bundles over MQTT: the signed offer, the chunked transfer, the spool.

Central publishes a software bundle once for the whole fleet, as **retained**
messages, one per chunk::

    {prefix}/_software/{bundle sha256}/{chunk index}     payload: the chunk's bytes

(``_software`` can never be a gateway id, which starts with a letter or a
digit) and offers it to each gateway with a signed operations-role command
``software.offer`` (:func:`gateway.commands.bodies.parse_offer`)::

    {"version": "0.2.0", "sha256": "<bundle>", "size": 7712345,
     "chunk_size": 65536, "chunks": ["<sha256 of chunk 0>", ...],
     "allow_downgrade": false}

The command path stores the offer (``<spool>/offers/<sha256>.json``; with
``allow_downgrade`` also the signed envelope as the updater's downgrade permit,
``<spool>/permits/<sha256>.json``) in the command's transaction. The
downloader (:class:`SoftwareDownloads`, a task of the daemon) then fetches the
chunks it lacks over the uplink's connection (the broker gives a gateway's
certificate one session, :meth:`store_forward.uplink.Uplink.subscribe_extra`):
it subscribes to a few missing chunks' topics at a time, so the broker sends
their retained copies; a chunk
is written (``pwrite`` + ``fdatasync``) into ``<spool>/incoming/<sha256>.part``
only if its SHA-256 is the one the signed offer lists. What is on disk is its
own progress record: after a link drop, a restart or a power cut the part file
is read back and every chunk whose hash matches counts as received, so the
transfer resumes where it stopped. When every chunk is there, the whole
file's SHA-256 must be the offer's; the bundle is renamed into
``<spool>/ready/``, where the privileged updater (``edgegw update apply``,
started by ``edgegw-update.path``) verifies its signature and installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
import aiosqlite

from firmware_bridge.backoff import backoff_delay
from firmware_bridge.durable import fsync_dir, write_atomic
from gateway.commands.bodies import MAX_CHUNKS, CommandRefused, Offer, parse_offer
from gateway.security.envelope import Envelope, encode_wire
from provisioning.software_bundle import SUFFIX
from store_forward.uplink import Delivery

log = logging.getLogger(__name__)

TOPIC_LEVEL = "_software"
DEFAULT_CHUNK = 64 * 1024
WINDOW = 8  # chunks asked for at once
_DIGEST = re.compile(r"[0-9a-f]{64}")

ReportFn = Callable[[str, dict[str, Any]], Awaitable[None]]


class Subscriptions(Protocol):
    """Where chunks come from: subscriptions on the gateway's one MQTT connection
    (:class:`store_forward.uplink.Uplink`)."""

    async def subscribe_extra(self, topic: str, sink: asyncio.Queue[Delivery]) -> None: ...

    async def unsubscribe_extra(self, topic: str) -> None: ...


def update_spool(db_path: Path) -> Path:
    """The update spool of a gateway: ``updates/`` beside its database
    (``/var/lib/edgegw/updates``), written by the daemon, read by the updater."""
    return db_path.parent / "updates"


def chunk_topic(prefix: str, digest: str, index: int) -> str:
    return f"{prefix}/{TOPIC_LEVEL}/{digest}/{index}"


def offer_for(bundle: Path, *, version: str, chunk_size: int | None = None) -> Offer:
    """Central: the offer body of a bundle file (its chunks' hashes)."""
    size = bundle.stat().st_size
    chunk = chunk_size or max(DEFAULT_CHUNK, 1 << max(0, math.ceil(math.log2(size / MAX_CHUNKS))))
    whole = hashlib.sha256()
    chunks = []
    with bundle.open("rb") as fh:
        while data := fh.read(chunk):
            whole.update(data)
            chunks.append(hashlib.sha256(data).hexdigest())
    return Offer(version, whole.hexdigest(), size, chunk, tuple(chunks))


async def publish_chunks(client: aiomqtt.Client, bundle: Path, offer: Offer, prefix: str) -> int:
    """Central: publish every chunk retained (QoS 1). Returns the number published."""
    n = 0
    with bundle.open("rb") as fh:
        for i in range(len(offer.chunks)):
            data = fh.read(offer.chunk_size)
            await client.publish(chunk_topic(prefix, offer.sha256, i), data, qos=1, retain=True)
            n += 1
    return n


def check_digest(digest: str) -> str:
    """``digest`` if it is a bundle's SHA-256 as offers name it, else ValueError."""
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"bundle digest {digest!r}: 64 lowercase hex expected")
    return digest


async def withdraw_chunks(
    client: aiomqtt.Client, prefix: str, digest: str, *, quiet_s: float = 2.0, limit_s: float = 60.0
) -> int:
    """Central: clear a bundle's retained chunks from the broker. Returns how many it held.

    Subscribes to the bundle's chunk topics, so that the broker sends the
    retained copies it holds (whatever chunk size they were published with),
    collects their topics until none has come for ``quiet_s`` (at most
    ``limit_s`` in all), then publishes an empty retained message (QoS 1) to
    each, which deletes it. Gateways still fetching the bundle wait for chunks
    that no longer come and try again later: withdraw once the fleet has it, or
    to stop an offer.
    """
    check_digest(digest)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    pattern = f"{prefix}/{TOPIC_LEVEL}/{digest}/+"
    held: set[str] = set()
    await client.subscribe(pattern, qos=1)
    try:
        messages = aiter(client.messages)
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(min(quiet_s, left)):
                    msg = await anext(messages)
            except TimeoutError:
                break
            if msg.retain and msg.payload and msg.topic.matches(pattern):
                held.add(msg.topic.value)
    finally:
        await client.unsubscribe(pattern)
    for topic in sorted(held):
        await client.publish(topic, b"", qos=1, retain=True)
    return len(held)


# ---------------------------------------------------------------------------
# The gateway side


class SoftwareDownloads:
    """The command path's software port and the downloader (see the module docstring)."""

    def __init__(
        self,
        spool: Path,
        *,
        prefix: str,
        window: int = WINDOW,
        chunk_wait_s: float = 60.0,
        backoff: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        self.spool = spool
        self.prefix = prefix  # the broker's topic prefix (chunk topics are under it)
        self.window = window
        self.chunk_wait_s = chunk_wait_s
        self.backoff = backoff
        # the uplink, once the daemon has made it: chunks arrive on its connection
        self.link: Subscriptions | None = None
        self.chunks_received = 0
        self.chunks_refused = 0
        self._wake = asyncio.Event()

    # -- the port ------------------------------------------------------------------

    async def offer_in(
        self, db: aiosqlite.Connection, env: Envelope, *, command_id: str, now_ms: int
    ) -> dict[str, Any]:
        """Store a verified offer (in the command's transaction: a refusal keeps nothing)."""
        offer = parse_offer(env.body)
        doc = {**offer.to_json(), "command_id": command_id, "received_ms": now_ms}

        def store() -> None:
            for sub in ("offers", "permits", "incoming", "ready"):
                (self.spool / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            if offer.allow_downgrade:
                write_atomic(
                    self.spool / "permits" / f"{offer.sha256}.json",
                    encode_wire(env.payload, env.signature),
                    0o644,
                )
                # a bundle the updater held back (below the floor) may go now
                held = self.spool / "held" / f"{offer.sha256}{SUFFIX}"
                if held.exists():
                    os.replace(held, self.spool / "ready" / held.name)
                    fsync_dir(self.spool / "ready")
            write_atomic(
                self.spool / "offers" / f"{offer.sha256}.json", json.dumps(doc).encode(), 0o600
            )

        await asyncio.to_thread(store)
        return {
            "version": offer.version,
            "sha256": offer.sha256,
            "chunks": len(offer.chunks),
            "state": "downloading",
        }

    async def after_commit(self) -> None:
        self._wake.set()

    # -- the downloader ---------------------------------------------------------

    def pending(self) -> list[Offer]:
        out: list[Offer] = []
        d = self.spool / "offers"
        if not d.is_dir():
            return out
        for p in sorted(d.glob("*.json")):
            try:
                out.append(parse_offer({k: v for k, v in json.loads(p.read_bytes()).items()
                                        if k not in ("command_id", "received_ms")}))  # fmt: skip
            except (OSError, ValueError, CommandRefused) as exc:
                log.error("software offer %s unreadable, dropped: %s", p.name, exc)
                with contextlib.suppress(OSError):
                    p.unlink()
        return out

    def missing(self, offer: Offer) -> list[int]:
        """Chunks not yet on disk with the hash the offer lists (the part file is the
        progress record)."""
        part = self.spool / "incoming" / f"{offer.sha256}.part"
        try:
            fh = part.open("rb")
        except FileNotFoundError:
            return list(range(len(offer.chunks)))
        with fh:
            out: list[int] = []
            for i, want in enumerate(offer.chunks):
                data = fh.read(offer.chunk_len(i))
                if hashlib.sha256(data).hexdigest() != want:
                    out.append(i)
            return out

    async def run(self, report: ReportFn) -> None:
        """Forever: download what is offered; retry after failures with back-off."""
        attempt = 0
        rng = random.Random()
        while True:
            offers = await asyncio.to_thread(self.pending)
            if not offers:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30.0):
                        await self._wake.wait()
                continue
            try:
                for offer in offers:
                    await self.download(offer, report)
                attempt = 0
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                delay = backoff_delay(attempt, *self.backoff, rng)
                attempt += 1
                log.warning("software download interrupted (%s); again in %.0f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                self._wake.clear()

    async def download(self, offer: Offer, report: ReportFn) -> bool:
        """Fetch the missing chunks of ``offer``, then hand the bundle to the updater."""
        incoming = self.spool / "incoming"
        ready = self.spool / "ready"
        await asyncio.to_thread(incoming.mkdir, mode=0o700, parents=True, exist_ok=True)
        await asyncio.to_thread(ready.mkdir, mode=0o700, parents=True, exist_ok=True)
        part = incoming / f"{offer.sha256}.part"
        missing = await asyncio.to_thread(self.missing, offer)
        if missing:
            if len(missing) == len(offer.chunks):
                await report("software.download_started", {"version": offer.version,
                             "sha256": offer.sha256, "chunks": len(offer.chunks)})  # fmt: skip
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                await self._fetch(offer, missing, fd)
            finally:
                os.close(fd)
        whole = await asyncio.to_thread(_sha256_file, part, offer.size)
        if whole != offer.sha256:
            await asyncio.to_thread(part.unlink)
            await asyncio.to_thread(self._drop_offer, offer)
            await report("software.download_failed", {"version": offer.version,
                         "sha256": offer.sha256, "reason": f"whole file hashes to {whole}"})  # fmt: skip
            return False

        def hand_over() -> None:
            os.truncate(part, offer.size)
            os.replace(part, ready / f"{offer.sha256}{SUFFIX}")
            fsync_dir(ready)
            fsync_dir(incoming)
            self._drop_offer(offer)

        await asyncio.to_thread(hand_over)
        log.info("software %s (%s) downloaded: ready to install", offer.version, offer.sha256[:16])
        await report("software.downloaded", {"version": offer.version, "sha256": offer.sha256,
                     "size": offer.size, "chunks": len(offer.chunks),
                     "chunks_fetched": self.chunks_received})  # fmt: skip
        return True

    def _drop_offer(self, offer: Offer) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.spool / "offers" / f"{offer.sha256}.json").unlink()
        fsync_dir(self.spool / "offers")

    async def _fetch(self, offer: Offer, missing: list[int], fd: int) -> None:
        link = self.link
        if link is None:
            raise aiomqtt.MqttError("no uplink connection to fetch software chunks on")
        todo = list(missing)
        while todo:
            window = todo[: self.window]
            topics = {chunk_topic(self.prefix, offer.sha256, i): i for i in window}
            inbox: asyncio.Queue[Delivery] = asyncio.Queue()
            try:
                for t in topics:
                    await link.subscribe_extra(t, inbox)
                wanted = set(window)
                async with asyncio.timeout(self.chunk_wait_s):
                    while wanted:
                        got = await inbox.get()
                        if got is None:
                            raise aiomqtt.MqttError("the uplink's connection ended")
                        topic, data = got
                        i = topics.get(topic)
                        if i is None or i not in wanted:
                            continue
                        if hashlib.sha256(data).hexdigest() != offer.chunks[i]:
                            self.chunks_refused += 1
                            log.warning("software chunk %d of %s refused: hash mismatch", i,
                                        offer.sha256[:16])  # fmt: skip
                            continue
                        await asyncio.to_thread(_write_chunk, fd, data, i * offer.chunk_size)
                        self.chunks_received += 1
                        wanted.discard(i)
            finally:
                for t in topics:
                    await link.unsubscribe_extra(t)
            todo = todo[len(window) :]


def _write_chunk(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    os.fdatasync(fd)


def _sha256_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    left = size
    with path.open("rb") as fh:
        while left > 0 and (data := fh.read(min(left, 1 << 20))):
            h.update(data)
            left -= len(data)
    return h.hexdigest()
