"""Sneakernet: the sealed backlog on a technician's USB stick.

``export_backlog`` numbers every record still in the outbox into batches
(exactly as the uplink would: same codec, same sealed bytes, stored with the
batch) and writes each batch to ``DIR`` as its own file, plus a manifest
(:mod:`store_forward.backlog_format`).

Nothing is deleted on the gateway: the batches stay until their ack. When the
link returns, the uplink sends them (the same bytes) and the headend — having
imported them from the stick meanwhile (:mod:`headend.usb_import`) — answers
``duplicate``; the gateway then deletes them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from pathlib import Path
from typing import Any

from firmware_bridge.durable import fsync_dir, write_atomic
from store_forward.backlog_format import (
    MANIFEST,
    SneakernetError,
    batch_file_name,
    manifest_bytes,
)
from store_forward.outbox import Outbox, Packer

__all__ = ["SneakernetError", "export_backlog"]

PackFn = Packer

# Each file durable in itself; the directory is fsynced once, after the manifest.
# No chmod: the directory may be on a FAT-formatted stick.
_write_file = functools.partial(write_atomic, mode=0o600, sync_dir=False, chmod=False)


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
        payload = batch.payload  # with a packer, next_batch always has the stored bytes
        assert payload is not None
        name = batch_file_name(gateway_id, batch.epoch, batch.seq)
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
    data = manifest_bytes(gateway_id, now, entries)
    await asyncio.to_thread(_write_file, d / MANIFEST, data)
    await asyncio.to_thread(fsync_dir, d)
    return len(entries)
