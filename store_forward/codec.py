"""Batch codecs: how the uplink turns outbox records into one MQTT payload.

* :class:`SealedCodec` — encoding 2 (:mod:`store_forward.wire`): columnar,
  compressed, sealed with the gateway's uplink key. What deployments use.
* :class:`JsonCodec` — encoding 1 (:mod:`store_forward.wire_json`): plain
  compressed JSON for development; a headend with a gateway registry refuses it.

Both fit as many records as the byte budget allows (the budget follows the
link, see :mod:`store_forward.pacing`) into a batch named (gateway, epoch,
seq). The headend side is :func:`decode`, which dispatches on the first byte
(the version byte: its low nibble is the encoding, its high nibble the header
revision — 0x11/0x12 carry the batch epoch, 0x01/0x02 are the older forms
without one, still decoded with the legacy epoch).

A codec also knows how the answers to its batches are authenticated:
:meth:`SealedCodec.ack_key` gives the key of the acks for a batch sealed
under a key id (:mod:`store_forward.acks`); unsealed batches have none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from firmware_bridge.errors import EdgeGwError, ErrorKind
from store_forward import acks, wire, wire_json
from store_forward.records import Record


class BatchRecord(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def created_ms(self) -> int: ...

    @property
    def body(self) -> dict[str, Any]: ...

    @property
    def cls(self) -> Any: ...


class AnyBatch(Protocol):
    """What the headend stores: ``wire.DecodedBatch`` or ``wire_json.DecodedBatch``."""

    @property
    def gateway_id(self) -> str: ...

    @property
    def seq(self) -> int: ...

    @property
    def epoch(self) -> str: ...

    @property
    def digest(self) -> bytes: ...

    @property
    def records(self) -> Sequence[BatchRecord]: ...


class BatchCodec(Protocol):
    encoding: int
    sealed: bool

    def pack(
        self, gateway_id: str, seq: int, records: Sequence[Record], max_bytes: int, *, epoch: str
    ) -> tuple[bytes, int]:
        """Payload of batch ``(gateway_id, epoch, seq)`` holding the longest prefix of
        ``records`` that fits ``max_bytes`` (at least one record, even if that one
        alone is larger), and its count."""
        ...

    def ack_key(self, key_id: int) -> bytes | None:
        """The key of acks for batches sealed under ``key_id`` (None: not known)."""
        ...


def encoding_of(payload: bytes) -> int | None:
    """1 (JSON) or 2 (sealed) for a payload of a known version byte, else None."""
    if payload and payload[0] in (wire.VERSION, wire.LEGACY_VERSION):
        return 2
    if payload and payload[0] in (wire_json.VERSION, wire_json.LEGACY_VERSION):
        return 1
    return None


def sealed_key_id(payload: bytes) -> int | None:
    """The key id in the header of a sealed payload; None for an unsealed or
    unreadable one (the gateway reads it from batches it made)."""
    if encoding_of(payload) != 2:
        return None
    try:
        return wire.batch_header(payload).key_id
    except wire.WireError:
        return None


class SealedCodec:
    """Encoding 2, sealed under the gateway's uplink key (``key_id`` in the header).

    ``older``: the keys of earlier key ids (a rotated uplink key), so that acks
    for batches sealed before a rotation can still be verified."""

    encoding = 2
    sealed = True

    def __init__(self, key_id: int, key: bytes, *, older: Mapping[int, bytes] | None = None) -> None:
        self.key_id = key_id
        self._key = key
        self._keys = dict(older or {}) | {key_id: key}
        self._ack_keys: dict[int, bytes] = {}
        self._per_record: float | None = None  # bytes per record in the last batch

    def encode(self, gateway_id: str, seq: int, records: Sequence[Record], *, epoch: str) -> bytes:
        return wire.encode_batch(
            gateway_id, seq, records, epoch=epoch, key=self._key, key_id=self.key_id
        )

    def ack_key(self, key_id: int) -> bytes | None:
        k = self._ack_keys.get(key_id)
        if k is None and key_id in self._keys:
            k = self._ack_keys[key_id] = acks.ack_key(self._keys[key_id])
        return k

    def pack(
        self, gateway_id: str, seq: int, records: Sequence[Record], max_bytes: int, *, epoch: str
    ) -> tuple[bytes, int]:
        n = len(records)
        # One encoding usually does: guess the count from the last batch's density
        # and accept when it fits and fills most of the budget (or takes everything).
        if self._per_record:
            guess = min(n, int(max_bytes * 0.93 / self._per_record))
            if guess >= 1:
                payload = self.encode(gateway_id, seq, records[:guess], epoch=epoch)
                if len(payload) <= max_bytes and (guess == n or len(payload) >= 0.8 * max_bytes):
                    self._per_record = len(payload) / guess
                    return payload, guess
        try:
            packed = wire.pack_batch(
                gateway_id,
                seq,
                records,
                epoch=epoch,
                key=self._key,
                key_id=self.key_id,
                max_bytes=max_bytes,
            )
        except wire.WireBudgetError:
            # One record larger than the budget still has to go (alone).
            payload = self.encode(gateway_id, seq, records[:1], epoch=epoch)
            return payload, 1
        self._per_record = len(packed.payload) / packed.count
        return packed.payload, packed.count


class JsonCodec:
    """Encoding 1 (development only: readable by anyone on the broker, and its acks
    cannot be authenticated)."""

    encoding = 1
    sealed = False

    def ack_key(self, key_id: int) -> bytes | None:
        return None

    def pack(
        self, gateway_id: str, seq: int, records: Sequence[Record], max_bytes: int, *, epoch: str
    ) -> tuple[bytes, int]:
        n = len(records)
        while True:
            payload = wire_json.encode(gateway_id, seq, records[:n], epoch=epoch)
            if len(payload) <= max_bytes or n == 1:
                return payload, n
            n = max(1, int(n * max_bytes / len(payload) * 0.95))


class DecodeError(EdgeGwError):
    """A payload that cannot be accepted; ``reason`` is short and loggable."""

    kind = ErrorKind.FRAME

    def __init__(self, reason: str, *, gateway_id: str | None = None, seq: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.gateway_id = gateway_id
        self.seq = seq


def decode(
    payload: bytes,
    key_lookup: Callable[[str, int], bytes | None] | None,
    *,
    allow_plain: bool,
) -> AnyBatch:
    """Decode encoding 1 or 2 (either header revision). Raises :class:`DecodeError`."""
    return _decode(payload, key_lookup, allow_plain, wire.decode_batch)


def decode_rows(
    payload: bytes,
    key_lookup: Callable[[str, int], bytes | None] | None,
    *,
    allow_plain: bool,
) -> AnyBatch | wire.DecodedRows:
    """:func:`decode`, with the readings of a sealed batch (encoding 2) as flat rows
    (:func:`store_forward.wire.decode_batch_rows`); an unsealed batch as records.
    Accepts and refuses exactly what :func:`decode` does."""
    return _decode(payload, key_lookup, allow_plain, wire.decode_batch_rows)


_B = TypeVar("_B")


def _decode(
    payload: bytes,
    key_lookup: Callable[[str, int], bytes | None] | None,
    allow_plain: bool,
    sealed: Callable[[bytes, Callable[[str, int], bytes | None]], _B],
) -> _B | AnyBatch:
    if not payload:
        raise DecodeError("empty payload")
    if encoding_of(payload) == 2:
        if key_lookup is None:
            raise DecodeError("sealed batch, but this headend has no gateway registry")
        try:
            return sealed(payload, key_lookup)
        except wire.WireKeyError as exc:
            raise DecodeError(f"unknown or revoked gateway/key: {exc}") from exc
        except wire.WireError as exc:
            raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
    if encoding_of(payload) == 1:
        if not allow_plain:
            raise DecodeError("unsealed batch (encoding 1) refused: this headend requires sealed batches")
        try:
            return wire_json.decode(payload)
        except wire_json.BatchDecodeError as exc:
            raise DecodeError(str(exc)) from exc
    raise DecodeError(f"unsupported batch encoding version {payload[0]}")
