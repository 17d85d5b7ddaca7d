"""The backlog export's format: what a technician's USB stick carries to central.

``edgegw backlog export`` (:mod:`store_forward.sneakernet`) writes, and the
headend's import (:mod:`headend.usb_import`) reads::

    DIR/manifest.json       {"format": 2, "gateway_id", "created_ms",
                             "batches": [{"epoch", "seq", "file", "bytes", "sha256", "records"}]}
    DIR/<gateway>-<epoch>-<seq:012d>.batch
                            the sealed payload, byte for byte as the uplink sends it
                            (``<gateway>-<seq:012d>.batch`` for a batch of the legacy epoch)

Exports of format 1 (made before batch epochs) are still read: their entries
carry no epoch and their batches keep the legacy one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from firmware_bridge.errors import EdgeGwError, ErrorKind
from store_forward.batch_epoch import LEGACY_EPOCH

FORMAT = 2  # 1: before batch epochs (entries without "epoch"), still imported
FORMATS = (1, 2)
MANIFEST = "manifest.json"


class SneakernetError(EdgeGwError):
    """The export or import cannot proceed (no packer, bad manifest, ...)."""

    kind = ErrorKind.INVALID


def batch_file_name(gateway_id: str, epoch: str, seq: int) -> str:
    """The file a batch is exported to."""
    epoch_part = f"-{epoch}" if epoch != LEGACY_EPOCH else ""
    return f"{gateway_id}{epoch_part}-{seq:012d}.batch"


def manifest_bytes(gateway_id: str, created_ms: int, entries: list[dict[str, Any]]) -> bytes:
    """The manifest of an export of the current format."""
    manifest = {"format": FORMAT, "gateway_id": gateway_id, "created_ms": created_ms, "batches": entries}
    return orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Manifest:
    format: int
    gateway_id: str
    entries: list[Any]  # each checked where it is used: a bad entry refuses only its batch

    def listed(self, entry: dict[str, Any]) -> tuple[Any, Any]:
        """The (epoch, seq) an entry names (format 1: the legacy epoch)."""
        epoch = entry.get("epoch", LEGACY_EPOCH) if self.format == 2 else LEGACY_EPOCH
        return epoch, entry.get("seq")


def parse_manifest(data: bytes, source: str) -> Manifest:
    """Read a manifest; raises :class:`SneakernetError` naming ``source``."""
    try:
        manifest = orjson.loads(data)
        gateway_id = str(manifest["gateway_id"])
        entries = list(manifest["batches"])
        fmt = manifest.get("format")
        if fmt not in FORMATS:
            raise SneakernetError(f"{source}: unknown format {fmt!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SneakernetError(f"{source}: unreadable manifest: {exc}") from exc
    return Manifest(fmt, gateway_id, entries)
