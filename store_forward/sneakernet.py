"""Sneakernet: the sealed backlog on a technician's USB stick, and back in at central.

``export_backlog`` numbers every record still in the outbox into batches
(exactly as the uplink would: same codec, same sealed bytes, stored with the
batch) and writes each batch to ``DIR`` as its own file, plus a manifest::

    DIR/manifest.json       {"format": 2, "gateway_id",
                             "batches": [{"epoch", "seq", "file", "bytes", "sha256", "records"}]}
    DIR/<gateway>-<epoch>-<seq:012d>.batch
                            the sealed payload, byte for byte as the uplink sends it
                            (``<gateway>-<seq:012d>.batch`` for a batch of the legacy epoch)

Nothing is deleted on the gateway: the batches stay until their ack. When the
link returns, the uplink sends them (the same bytes) and the headend — having
imported them from the stick meanwhile — answers ``duplicate``; the gateway
then deletes them. Import runs the headend's own verification and
de-duplication on (gateway, epoch, seq), so importing twice, or importing
after the batches arrived online, stores nothing twice. Exports of format 1
(made before batch epochs) are still imported: their batches carry no epoch
and keep the legacy one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from provisioning.keys import fsync_dir
from store_forward.batch_epoch import LEGACY_EPOCH
from store_forward.codec import DecodeError, decode
from store_forward.headend import HeadendStore
from store_forward.outbox import Outbox, Packer

FORMAT = 2  # 1: before batch epochs (entries without "epoch"), still imported
FORMATS = (1, 2)
MANIFEST = "manifest.json"

PackFn = Packer


class SneakernetError(Exception):
    """The export or import cannot proceed (no packer, bad manifest, ...)."""


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


async def export_backlog(
    outbox: Outbox,
    directory: str | Path,
    *,
    pack: PackFn | None = None,
    gateway_id: str | None = None,
    max_records: int = 5000,
    max_bytes: int = 256 * 1024,
    now_ms: int | None = None,
) -> int:
    """Write every unacknowledged batch (numbering the rest) to ``directory``.

    ``pack``/``gateway_id`` default to those the gateway's :class:`Uplink`
    registered on the outbox (so the provisioning carry-back can call
    ``export_backlog(outbox, dir)``). Returns the number of batch files written.
    """
    pack = pack or outbox.packer
    gateway_id = gateway_id or outbox.gateway_id
    if pack is None or gateway_id is None:
        raise SneakernetError("no uplink codec registered on this outbox; cannot seal an export")
    d = Path(directory)
    await asyncio.to_thread(d.mkdir, mode=0o700, parents=True, exist_ok=True)
    now = outbox.clock_ms() if now_ms is None else now_ms
    seen: list[int] = []
    entries: list[dict[str, Any]] = []
    while True:
        batch = await outbox.next_batch(
            now, exclude=seen, max_records=max_records, max_bytes=max_bytes, pack=pack
        )
        if batch is None:
            break
        seen.append(batch.seq)
        payload = batch.payload
        if payload is None:  # numbered without a stored payload: seal it once and keep it
            payload, n = pack(batch.seq, batch.records, 1 << 30, epoch=batch.epoch)
            if n != len(batch.records):
                raise SneakernetError(f"batch {batch.seq} does not fit one payload")
            payload = await outbox.keep_payload(batch.seq, payload)
        epoch_part = f"-{batch.epoch}" if batch.epoch != LEGACY_EPOCH else ""
        name = f"{gateway_id}{epoch_part}-{batch.seq:012d}.batch"
        await asyncio.to_thread(_write_file, d / name, payload)
        entries.append(
            {
                "epoch": batch.epoch,
                "seq": batch.seq,
                "file": name,
                "bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
                "records": len(batch.records),
            }
        )
    manifest = {"format": FORMAT, "gateway_id": gateway_id, "created_ms": now, "batches": entries}
    data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    await asyncio.to_thread(_write_file, d / MANIFEST, data)
    await asyncio.to_thread(fsync_dir, d)
    return len(entries)


@dataclass
class ImportResult:
    stored: int = 0
    duplicate: int = 0
    records_new: int = 0
    refused: list[str] = field(default_factory=list)  # conflicts included


async def import_backlog(
    store: HeadendStore,
    directory: str | Path,
    *,
    key_lookup: Callable[[str, int], bytes | None] | None,
    allow_plain: bool = False,
    now_ms: int,
) -> ImportResult:
    """Verify and store every batch file of an export; de-duplicated like online delivery.

    Batch files are checked against the manifest's SHA-256 (a damaged stick is
    reported per file); each batch must open under its gateway's key and name
    the gateway, epoch and seq of the manifest. A batch whose identity central
    already holds with other bytes is refused as a conflict.
    """
    d = Path(directory)
    try:
        manifest = orjson.loads(await asyncio.to_thread((d / MANIFEST).read_bytes))
        gateway_id = str(manifest["gateway_id"])
        entries = list(manifest["batches"])
        fmt = manifest.get("format")
        if fmt not in FORMATS:
            raise SneakernetError(f"{d / MANIFEST}: unknown format {fmt!r}")
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SneakernetError(f"{d / MANIFEST}: unreadable manifest: {exc}") from exc
    result = ImportResult()
    for e in entries:
        if not isinstance(e, dict):
            result.refused.append(f"manifest entry {e!r}: not an object")
            continue
        name = str(e.get("file", ""))
        if "/" in name or name.startswith("."):
            result.refused.append(f"{name}: bad file name")
            continue
        try:
            payload = await asyncio.to_thread((d / name).read_bytes)
        except OSError as exc:
            result.refused.append(f"{name}: {exc}")
            continue
        if hashlib.sha256(payload).hexdigest() != e.get("sha256"):
            result.refused.append(f"{name}: checksum mismatch (damaged file)")
            continue
        try:
            batch = decode(payload, key_lookup, allow_plain=allow_plain)
        except DecodeError as exc:
            result.refused.append(f"{name}: {exc.reason}")
            continue
        if batch.gateway_id != gateway_id:
            result.refused.append(f"{name}: batch of {batch.gateway_id!r} in {gateway_id!r}'s export")
            continue
        listed = (e.get("epoch", LEGACY_EPOCH) if fmt == 2 else LEGACY_EPOCH, e.get("seq"))
        if listed != (batch.epoch, batch.seq):
            result.refused.append(
                f"{name}: holds batch (epoch {batch.epoch!r}, seq {batch.seq}),"
                f" the manifest lists (epoch {listed[0]!r}, seq {listed[1]!r})"
            )
            continue
        r = await store.store(batch, now_ms)
        if r.status == "duplicate":
            result.duplicate += 1
        elif r.status == "conflict":
            result.refused.append(
                f"{name}: central holds other bytes under batch (epoch {batch.epoch!r}, seq {batch.seq})"
            )
        else:
            result.stored += 1
            result.records_new += r.records_new
    return result
