"""Acks bound to the batch: what central answers, and how the gateway knows it was central.

The headend answers every batch it opened on ``{prefix}/{gw}/ack``::

    {"seq": 42, "epoch": "9f3ac0d1e2b4a6c8", "status": "stored", "records": 100, "mac": "<64 hex>"}

For a sealed batch the ``mac`` authenticates the answer for exactly that
batch (docs/protocol.md, "Acks"):

    ack_key = HKDF-Expand-SHA256(batch_key, info = "edgegw/ack-key/v1", L = 32)
    mac     = HMAC-SHA256(ack_key, "edgegw/ack/v1" 0x00
                                   ‖ u8 len(gateway id) ‖ gateway id (UTF-8)
                                   ‖ u8 len(epoch) ‖ epoch (8 raw bytes; none for the legacy epoch)
                                   ‖ u64 seq ‖ u32 key id
                                   ‖ u8 len(status) ‖ status (ASCII)
                                   ‖ SHA-256(batch payload))

``batch_key`` is the key the batch was sealed under, which only the gateway
and the headend holding its X25519 private key can derive; the payload
digest ties the answer to the very bytes the gateway stored and sent. A
party that cannot open the batch cannot produce a valid ack for it; an ack
replayed later names a batch that really was answered so, and a batch's
identity (gateway, epoch, seq) is never reused.

Unsealed batches (encoding 1) have no secret: their acks carry no ``mac``
and a gateway accepts them only where its configuration says so
(``uplink.allow_unauthenticated_acks``, development only).

Everything here is pure.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from firmware_bridge.errors import EdgeGwError, ErrorKind
from store_forward.batch_epoch import EpochFormatError, check_epoch, epoch_bytes

__all__ = [
    "ACK_STATUSES",
    "Ack",
    "AckError",
    "ack_key",
    "ack_mac",
    "encode_ack",
    "parse_ack",
    "verify_ack",
]

# stored / duplicate: central holds the batch (delete it); rejected: central cannot
# take it; conflict: central holds *other* bytes under this batch's identity.
ACK_STATUSES = frozenset({"stored", "duplicate", "rejected", "conflict"})
MAX_ACK_BYTES = 4096
MAC_BYTES = 32
MAX_SEQ = (1 << 64) - 1
MAX_KEY_ID = 0xFFFF_FFFF

_KEY_INFO = b"edgegw/ack-key/v1"
_MAC_LABEL = b"edgegw/ack/v1\x00"
_MAC_RE = re.compile(r"[0-9a-f]{64}")


class AckError(EdgeGwError, ValueError):
    """An ack that cannot be used; ``cause`` is a short stable name for counting."""

    kind = ErrorKind.FRAME

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


@dataclass(frozen=True)
class Ack:
    seq: int
    epoch: str
    status: str
    records: int | None = None
    reason: str | None = None
    mac: bytes | None = None

    @property
    def holds_batch(self) -> bool:
        """Central has the batch (``stored`` or ``duplicate``): the gateway may delete it."""
        return self.status in ("stored", "duplicate")


def ack_key(batch_key: bytes) -> bytes:
    """The MAC key of acks for batches sealed under ``batch_key``."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=_KEY_INFO).derive(bytes(batch_key))


def _mac_input(gateway_id: str, epoch: str, seq: int, key_id: int, status: str, digest: bytes) -> bytes:
    gw = gateway_id.encode("utf-8")
    raw_epoch = epoch_bytes(epoch)
    st = status.encode("ascii")
    if not (len(gw) <= 255 and len(st) <= 255 and len(digest) == 32):
        raise ValueError("gateway id or status too long, or digest not 32 bytes")
    if not (0 <= seq <= MAX_SEQ and 0 <= key_id <= MAX_KEY_ID):
        raise ValueError("seq or key id out of range")
    return b"".join(
        (
            _MAC_LABEL,
            bytes((len(gw),)),
            gw,
            bytes((len(raw_epoch),)),
            raw_epoch,
            struct.pack(">QI", seq, key_id),
            bytes((len(st),)),
            st,
            digest,
        )
    )


def ack_mac(
    key: bytes, *, gateway_id: str, epoch: str, seq: int, key_id: int, status: str, digest: bytes
) -> bytes:
    """HMAC-SHA256 of the ack fields under ``key`` (an :func:`ack_key`)."""
    msg = _mac_input(gateway_id, epoch, seq, key_id, status, digest)
    return hmac.new(key, msg, hashlib.sha256).digest()


def encode_ack(
    *,
    seq: int,
    epoch: str,
    status: str,
    records: int | None = None,
    reason: str | None = None,
    mac: bytes | None = None,
) -> bytes:
    """The JSON ack document (``mac`` as hex when given)."""
    doc: dict[str, Any] = {"seq": seq, "epoch": epoch, "status": status}
    if records is not None:
        doc["records"] = records
    if reason is not None:
        doc["reason"] = reason
    if mac is not None:
        doc["mac"] = mac.hex()
    return orjson.dumps(doc)


def parse_ack(payload: object) -> Ack:
    """Parse an ack document. Raises :class:`AckError` (cause ``malformed``) for
    anything that is not a well-formed ack; never anything else."""
    if not isinstance(payload, bytes | bytearray):
        raise AckError("malformed", "payload is not bytes")
    if len(payload) > MAX_ACK_BYTES:
        raise AckError("malformed", f"{len(payload)} bytes, more than an ack")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise AckError("malformed", f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise AckError("malformed", "not a JSON object")
    seq, status = doc.get("seq"), doc.get("status")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise AckError("malformed", f"seq must be an integer in 0..2**64-1, got {seq!r}")
    if not isinstance(status, str) or status not in ACK_STATUSES:
        raise AckError("malformed", f"unknown status {status!r}")
    try:
        # An ack without an epoch (an older headend) names a batch of the legacy epoch.
        epoch = check_epoch(doc.get("epoch", ""))
    except EpochFormatError as exc:
        raise AckError("malformed", str(exc)) from exc
    records = doc.get("records")
    if records is not None and (type(records) is not int or records < 0):
        raise AckError("malformed", f"records must be a non-negative integer, got {records!r}")
    reason = doc.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise AckError("malformed", "reason must be a string")
    mac_hex = doc.get("mac")
    mac = None
    if mac_hex is not None:
        if not isinstance(mac_hex, str) or not _MAC_RE.fullmatch(mac_hex):
            raise AckError("malformed", "mac must be 64 lowercase hex digits")
        mac = bytes.fromhex(mac_hex)
    return Ack(seq, epoch, status, records, reason[:500] if reason else reason, mac)


def verify_ack(
    ack: Ack, key: bytes, *, gateway_id: str, epoch: str, seq: int, key_id: int, digest: bytes
) -> bool:
    """Whether ``ack`` answers the batch ``(gateway_id, epoch, seq)``, sealed under
    ``key_id`` with payload digest ``digest``, with a valid MAC under ``key``."""
    if ack.mac is None or ack.epoch != epoch or ack.seq != seq:
        return False
    try:
        want = ack_mac(
            key,
            gateway_id=gateway_id,
            epoch=epoch,
            seq=seq,
            key_id=key_id,
            status=ack.status,
            digest=digest,
        )
    except (ValueError, UnicodeError):
        return False
    return hmac.compare_digest(want, ack.mac)
