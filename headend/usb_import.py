"""USB backlog import: a gateway's export from a technician's stick, into central's store.

The export (``edgegw backlog export``, format in
:mod:`store_forward.backlog_format`) holds the sealed batches byte for byte as
the uplink sends them. Import runs the headend's own verification and
de-duplication on (gateway, epoch, seq), so importing twice, or importing
after the batches arrived online, stores nothing twice; when the gateway's
link returns, its uplink sends the same batches and the headend answers
``duplicate``, so the gateway deletes them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from headend.store import HeadendStore
from store_forward.backlog_format import MANIFEST, SneakernetError, parse_manifest
from store_forward.codec import DecodeError, decode

__all__ = ["ImportResult", "SneakernetError", "import_backlog"]


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
        data = await asyncio.to_thread((d / MANIFEST).read_bytes)
    except OSError as exc:
        raise SneakernetError(f"{d / MANIFEST}: unreadable manifest: {exc}") from exc
    manifest = parse_manifest(data, str(d / MANIFEST))
    gateway_id = manifest.gateway_id
    result = ImportResult()
    for e in manifest.entries:
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
        listed = manifest.listed(e)
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
