"""Batch encoding 1: compressed JSON, not sealed.

The first byte of every batch payload is its version byte. Encoding 1 is
the plain, inspectable form: the version byte followed by a zlib-compressed
JSON object ``{"gw", "epoch", "seq", "records": [{"id", "kind", "cls", "t", "body"}]}``.
Version byte ``0x11`` carries the batch epoch (:mod:`store_forward.batch_epoch`);
``0x01`` is the form without one (batches numbered before epochs existed),
still decoded, with the legacy epoch, and produced for ``epoch=LEGACY_EPOCH``.
It is what a broker operator could read, so deployments use the sealed
compact encoding (see docs/wire-format.md) and keep this one for development
and interoperability tests.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from firmware_bridge.errors import EdgeGwError, ErrorKind
from store_forward.batch_epoch import LEGACY_EPOCH, EpochFormatError, check_epoch
from store_forward.records import Record, RecordClass

# The version byte: low nibble = encoding (1, JSON), high nibble = header revision.
VERSION = 0x11  # document with the batch epoch
LEGACY_VERSION = 0x01  # document without one (decoded with the legacy epoch)
MAX_DECOMPRESSED = 16 * 1024 * 1024


class BatchDecodeError(EdgeGwError, ValueError):
    """A batch payload could not be decoded; the message says why."""

    kind = ErrorKind.FRAME


@dataclass(frozen=True)
class DecodedBatch:
    """``digest``: SHA-256 of the whole payload as received (what acks are bound to)."""

    gateway_id: str
    seq: int
    records: tuple[Record, ...]
    epoch: str = LEGACY_EPOCH
    digest: bytes = b""


def encode(gateway_id: str, seq: int, records: Sequence[Record], *, epoch: str) -> bytes:
    """``epoch``: the outbox's batch epoch, or :data:`LEGACY_EPOCH` for the old form."""
    epoch = check_epoch(epoch)
    doc: dict[str, Any] = {"gw": gateway_id}
    if epoch != LEGACY_EPOCH:
        doc["epoch"] = epoch
    doc["seq"] = seq
    doc["records"] = [
        {"id": r.id, "kind": r.kind, "cls": int(r.cls), "t": r.created_ms, "body": r.body}
        for r in records
    ]
    version = LEGACY_VERSION if epoch == LEGACY_EPOCH else VERSION
    return bytes([version]) + zlib.compress(orjson.dumps(doc), 6)


def decode(payload: bytes) -> DecodedBatch:
    if not payload:
        raise BatchDecodeError("empty payload")
    if payload[0] not in (VERSION, LEGACY_VERSION):
        raise BatchDecodeError(f"unsupported batch encoding version {payload[0]}")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(payload[1:], MAX_DECOMPRESSED)
        if d.unconsumed_tail:
            raise BatchDecodeError(f"batch larger than {MAX_DECOMPRESSED} bytes uncompressed")
        doc: Any = orjson.loads(raw)
    except zlib.error as exc:
        raise BatchDecodeError(f"not zlib data: {exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise BatchDecodeError(f"not JSON: {exc}") from exc
    try:
        gw = doc["gw"]
        seq = doc["seq"]
        if not isinstance(gw, str) or not isinstance(seq, int) or seq < 1:
            raise BatchDecodeError("gw must be a string and seq a positive integer")
        if payload[0] == VERSION:
            try:
                epoch = check_epoch(doc["epoch"], legacy=False)
            except EpochFormatError as exc:
                raise BatchDecodeError(str(exc)) from exc
        elif "epoch" in doc:
            raise BatchDecodeError("an epoch in a batch of version byte 1 (which has none)")
        else:
            epoch = LEGACY_EPOCH
        records = tuple(
            Record(int(r["id"]), RecordClass(int(r["cls"])), str(r["kind"]), int(r["t"]), dict(r["body"]))
            for r in doc["records"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BatchDecodeError):
            raise
        raise BatchDecodeError(f"malformed batch document: {exc!r}") from exc
    return DecodedBatch(gw, seq, records, epoch, hashlib.sha256(payload).digest())
