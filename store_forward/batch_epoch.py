"""Batch epochs: the part of a batch's identity that makes sequence numbers unique for good.

A batch is named by ``(gateway id, epoch, seq)``. Every outbox database takes
a random epoch id when it makes its first batch (and a new one whenever it is
recreated or recovered after a fault, see :meth:`store_forward.outbox.Outbox.start_batch_epoch`),
so a database that starts numbering again at 1 never names a batch the
headend already holds under the old database's epoch.

An epoch is 8 random bytes, written as 16 lowercase hex digits in JSON, SQL
and file names, and as the 8 raw bytes in the sealed header. Two epochs of one
gateway collide with probability about n²/2⁶⁵ for n epochs (negligible for
the few a gateway ever has). :data:`LEGACY_EPOCH` (the empty string) is the
epoch of batches in the encodings without one (version bytes 1 and 2); they
keep the identity ``(gateway id, seq)`` they always had.

Pure: no I/O besides the system's random source in :func:`new_epoch`.
"""

from __future__ import annotations

import os
import re

from firmware_bridge.errors import EdgeGwError, ErrorKind

__all__ = ["EPOCH_BYTES", "LEGACY_EPOCH", "EpochFormatError", "check_epoch", "epoch_bytes", "epoch_text", "new_epoch"]

EPOCH_BYTES = 8
LEGACY_EPOCH = ""

_EPOCH_RE = re.compile(r"[0-9a-f]{16}")


class EpochFormatError(EdgeGwError, ValueError):
    """Not an epoch: 16 lowercase hex digits (or the legacy empty string where allowed)."""

    kind = ErrorKind.INVALID


def new_epoch() -> str:
    """A fresh random epoch id (16 lowercase hex digits)."""
    return os.urandom(EPOCH_BYTES).hex()


def check_epoch(epoch: object, *, legacy: bool = True) -> str:
    """``epoch`` if it is a valid epoch id (or, with ``legacy``, :data:`LEGACY_EPOCH`)."""
    if isinstance(epoch, str) and (_EPOCH_RE.fullmatch(epoch) or (legacy and epoch == LEGACY_EPOCH)):
        return epoch
    raise EpochFormatError(f"batch epoch must be 16 lowercase hex digits, got {epoch!r}")


def epoch_bytes(epoch: str) -> bytes:
    """The raw bytes of an epoch id (empty for the legacy epoch)."""
    return bytes.fromhex(check_epoch(epoch))


def epoch_text(raw: bytes) -> str:
    """The epoch id of raw epoch bytes (8 bytes, or none for the legacy epoch)."""
    if len(raw) not in (0, EPOCH_BYTES):
        raise EpochFormatError(f"a batch epoch is {EPOCH_BYTES} bytes, got {len(raw)}")
    return raw.hex()
