"""Batch encoding 1: compressed JSON, not sealed.

The first byte of every batch payload is its encoding version. Version 1 is
the plain, inspectable form: ``0x01`` followed by a zlib-compressed JSON
object ``{"gw", "seq", "records": [{"id", "kind", "cls", "t", "body"}]}``.
It is what a broker operator could read, so deployments use the sealed
compact encoding (see docs/wire-format.md) and keep this one for development
and interoperability tests.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from store_forward.records import Record, RecordClass

VERSION = 1
MAX_DECOMPRESSED = 16 * 1024 * 1024


class BatchDecodeError(ValueError):
    """A batch payload could not be decoded; the message says why."""


@dataclass(frozen=True)
class DecodedBatch:
    gateway_id: str
    seq: int
    records: tuple[Record, ...]


def encode(gateway_id: str, seq: int, records: Sequence[Record]) -> bytes:
    doc = {
        "gw": gateway_id,
        "seq": seq,
        "records": [
            {"id": r.id, "kind": r.kind, "cls": int(r.cls), "t": r.created_ms, "body": r.body}
            for r in records
        ],
    }
    return bytes([VERSION]) + zlib.compress(orjson.dumps(doc), 6)


def decode(payload: bytes) -> DecodedBatch:
    if not payload:
        raise BatchDecodeError("empty payload")
    if payload[0] != VERSION:
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
        records = tuple(
            Record(int(r["id"]), RecordClass(int(r["cls"])), str(r["kind"]), int(r["t"]), dict(r["body"]))
            for r in doc["records"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BatchDecodeError):
            raise
        raise BatchDecodeError(f"malformed batch document: {exc!r}") from exc
    return DecodedBatch(gw, seq, records)
