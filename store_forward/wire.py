"""Uplink wire encoding v2: compact, columnar, compressed, sealed end to end.

One uplink message (a *batch*) carries many outbox records of one gateway.
Readings are stored column by column, per meter and quantity — timestamps as
deviations from the meter's polling interval, values as scaled integers with
a per-column decimal exponent and deltas (current predicted from power,
voltage and power factor where that is cheaper), bit-packed at the width the
column needs — so that the bytes left are mostly the real information in the
data; the whole plaintext is then compressed and sealed with AES-GCM. The cleartext header (version, compression, key id,
gateway id, batch epoch, batch sequence) is the associated data of the seal,
so a broker operator can neither read nor alter any part of a batch without
detection.

A batch is named by (gateway id, epoch, seq) (:mod:`store_forward.batch_epoch`).
Version byte ``0x12`` carries the epoch; version byte ``0x02`` is the same
encoding without one (batches made before epochs existed): it is still
decoded, with the legacy epoch, and is what ``epoch=LEGACY_EPOCH`` produces.

Everything here is pure: bytes and values in, bytes and values out. The
byte-level layout, limits and measured sizes are in docs/wire-format.md.

Decoding never raises anything but :class:`WireError` subclasses for any
input (exceptions raised by the caller's ``key_lookup`` propagate as they
are), and never allocates or loops beyond bounds that are fixed by the input
length and the limits below.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
import lzma
import os
import re
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from itertools import repeat
from operator import add, itemgetter
from typing import Any, NamedTuple, Protocol, TypeVar

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.reading import CODE_QUANTITIES, QUANTITY_CODES, Quantity
from store_forward.batch_epoch import (
    EPOCH_BYTES,
    LEGACY_EPOCH,
    EpochFormatError,
    epoch_bytes,
    epoch_text,
)

__all__ = [
    "LEGACY_VERSION",
    "MAX_PLAINTEXT_BYTES",
    "MAX_RECORDS",
    "VERSION",
    "BatchHeader",
    "Compression",
    "DecodedBatch",
    "DecodedRows",
    "PackedBatch",
    "RecordLike",
    "WireAuthError",
    "WireBudgetError",
    "WireEncodeError",
    "WireError",
    "WireFormatError",
    "WireKeyError",
    "WireRecord",
    "WireVersionError",
    "batch_header",
    "decode_batch",
    "decode_batch_rows",
    "encode_batch",
    "pack_batch",
]

# The version byte: low nibble = encoding (2, sealed columnar), high nibble = header revision.
VERSION = 0x12  # header with the batch epoch
LEGACY_VERSION = 0x02  # header without an epoch (decoded with the legacy epoch)
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = (16, 24, 32)
MAX_GATEWAY_ID_BYTES = 64
MAX_KEY_ID = 0xFFFF_FFFF
MAX_SEQ = (1 << 64) - 1
MAX_RECORDS = 100_000
MAX_PLAINTEXT_BYTES = 8 << 20
MAX_STRING_BYTES = 4096
MAX_BODY_BYTES = 1 << 20
# Decimal limits for the columnar form (anything outside goes the generic way).
_MAX_ABS_EXPONENT = 64
_MAX_EXPONENT_SPREAD = 24
_MAX_SCALED = 1 << 62
_MAX_TIME = 1 << 62
_MAX_PACKED_WIDTH = 72

_CODE_BY_NAME: dict[object, int] = {q.value: code for q, code in QUANTITY_CODES.items()}

_AAD_LABEL = b"edgegw/uplink\x00"
_KIND_READING = "reading"
_READING_KEYS = frozenset({"m", "t", "ts", "v"})
_READING_KEYS_Q = frozenset({"m", "t", "ts", "v", "q"})
# Plaintexts above this are compressed with LZMA, smaller ones with DEFLATE (the
# encoder's default; measured in docs/benchmarks.md, "Flash wear and CPU").
LZMA_FROM_BYTES = 512
_LZMA_FILTERS: list[dict[str, Any]] = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 20}]


# --------------------------------------------------------------------------- errors


class WireError(EdgeGwError):
    """Base of every error raised by this module."""

    kind = ErrorKind.FRAME


class WireEncodeError(WireError, ValueError):
    """The records (or arguments) cannot be encoded as a v2 batch."""

    kind = ErrorKind.INVALID


class WireBudgetError(WireEncodeError):
    """Not even one record fits in the byte budget."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


class WireFormatError(WireError):
    """The payload is truncated, malformed or exceeds a limit."""


class WireVersionError(WireFormatError):
    """The first byte names an encoding version this decoder does not know."""

    kind = ErrorKind.UNSUPPORTED


class WireKeyError(WireError):
    """No usable key for the (gateway id, key id) named in the header."""

    kind = ErrorKind.AUTH


class WireAuthError(WireError):
    """The seal does not verify: the payload was altered or the key is wrong."""

    kind = ErrorKind.AUTH


# --------------------------------------------------------------------------- values


class Compression(enum.IntEnum):
    NONE = 0
    ZLIB = 1  # raw DEFLATE (RFC 1951), level 9
    LZMA = 2  # raw LZMA2, preset 9, 1 MiB dictionary


@dataclass(frozen=True, slots=True)
class WireRecord:
    """One outbox record as carried on the wire.

    ``cls`` is the record's priority class (``store_forward.records.RecordClass``
    value, 0..255); it comes back as a plain int.
    """

    id: int
    kind: str
    created_ms: int
    body: dict[str, Any]
    cls: int = 0


class RecordLike(Protocol):
    """What the encoder reads from a record (``cls`` is optional, default 0);
    :class:`WireRecord` and the outbox's ``Record`` both qualify."""

    @property
    def id(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def created_ms(self) -> int: ...

    @property
    def body(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """``epoch`` is :data:`LEGACY_EPOCH` for a version-2 batch; ``digest`` is the
    SHA-256 of the whole payload as received (what acks are bound to)."""

    gateway_id: str
    seq: int
    key_id: int
    records: tuple[WireRecord, ...]
    epoch: str = LEGACY_EPOCH
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class DecodedRows:
    """A batch decoded with its readings as flat rows (:func:`decode_batch_rows`).

    ``reading_rows``: one tuple per reading, in batch order: ``(gateway id, record
    id, meter id, time, time source, values JSON, quality JSON or None, batch seq,
    epoch)`` (the JSON texts with sorted keys, as ``store_forward.records.dumps``
    writes them; an empty quality map is None); ``reading_classes``: each
    reading's record class; ``others``: the records that are not readings, each
    with its position in the batch; ``n_records``: readings and others."""

    gateway_id: str
    seq: int
    key_id: int
    n_records: int
    reading_rows: list[tuple[Any, ...]]
    reading_classes: list[int]
    others: tuple[tuple[int, WireRecord], ...]
    epoch: str = LEGACY_EPOCH
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The cleartext header of a sealed batch (authenticated only once the batch is opened)."""

    version: int
    key_id: int
    gateway_id: str
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A sealed batch holding the first ``count`` of the offered records."""

    payload: bytes
    count: int


# --------------------------------------------------------------------------- varints


def _put_uvarint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(n: int) -> int:
    return (n << 1) if n >= 0 else ((-n << 1) - 1)


def _put_svarint(out: bytearray, n: int) -> None:
    _put_uvarint(out, _zigzag(n))


def _put_bytes(out: bytearray, data: bytes) -> None:
    _put_uvarint(out, len(data))
    out += data


_VARINT = re.compile(rb"[\x80-\xff]*[\x00-\x7f]")  # one varint's bytes


class _Reader:
    """Bounds-checked cursor over a byte string; raises WireFormatError only."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise WireFormatError(f"truncated at byte {self.pos}")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if n < 0 or n > len(self.buf) - self.pos:
            raise WireFormatError(f"truncated: need {n} bytes at {self.pos}")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def uvarint(self) -> int:
        result = 0
        shift = 0
        buf = self.buf
        pos = self.pos
        end = len(buf)
        while True:
            if pos >= end:
                raise WireFormatError(f"truncated varint at byte {self.pos}")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise WireFormatError(f"varint longer than 10 bytes at byte {self.pos}")
        self.pos = pos
        return result

    def uvarints(self, n: int) -> list[int]:
        """``n`` varints in a row (at once where each is one byte)."""
        chunk = self.buf[self.pos : self.pos + n]
        if len(chunk) == n and (not chunk or max(chunk) < 0x80):
            self.pos += n
            return list(chunk)
        # each varint's bytes: continuation bytes, then one below 0x80
        out: list[int] = []
        for m in _VARINT.finditer(self.buf, self.pos):
            if len(out) == n:
                break
            raw = m.group()
            if len(raw) > 10:
                self.uvarint()  # raises: longer than 10 bytes
            v = raw[-1]
            for byte in raw[-2::-1]:
                v = v << 7 | (byte & 0x7F)
            out.append(v)
            self.pos = m.end()
        if len(out) < n:
            out += [self.uvarint() for _ in range(n - len(out))]  # raises: truncated
        return out

    def svarint(self) -> int:
        z = self.uvarint()
        return (z >> 1) if not z & 1 else -((z + 1) >> 1)

    def count(self, what: str, limit: int, min_item_bytes: int = 1) -> int:
        n = self.uvarint()
        if n > limit:
            raise WireFormatError(f"{what} count {n} exceeds limit {limit}")
        if n * min_item_bytes > self.remaining():
            raise WireFormatError(f"{what} count {n} exceeds the remaining payload")
        return n

    def string(self, what: str) -> str:
        n = self.uvarint()
        if n > MAX_STRING_BYTES:
            raise WireFormatError(f"{what} of {n} bytes exceeds limit {MAX_STRING_BYTES}")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireFormatError(f"{what} is not valid UTF-8") from exc


# --------------------------------------------------------------------------- analysis


# The encoder's rows are named tuples: a few are made per record of every batch,
# and a tuple is several times cheaper to build than a frozen dataclass.
class _Value(NamedTuple):
    code: int
    coef: int
    exp: int


class _Reading(NamedTuple):
    id: int
    created_ms: int
    cls: int
    meter: str
    t: int
    ts: str
    has_q: bool
    values: tuple[_Value, ...]
    quality: Mapping[int, str]  # quantity code -> quality string
    record: RecordLike  # for the generic fallback


class _Generic(NamedTuple):
    id: int
    created_ms: int
    cls: int
    kind: str
    body_json: bytes


_Row = _Reading | _Generic
_NO_MARKS: Mapping[Any, str] = {}  # (shared, never written: a reading without quality marks)


_PLAIN_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.([0-9]+))?")


# Values already analysed, one memo per quantity name: value text -> its _Value, or
# None where the text has no exact columnar form. The same values recur batch after
# batch (a meter's energy register between its steps, a voltage, a frequency, a relay
# state); with a memo per quantity, the ever-new texts of one (power, current) do not
# push out the others'. Each memo is cleared when full.
_VALUE_MEMO: dict[str, dict[str, _Value | None]] = {q.value: {} for q in QUANTITY_CODES}
_VALUE_MEMO_MAX = 1024  # per quantity (meters report a handful of quantities)
_UNSEEN = object()  # (not in a memo)


def _quantity_value(name: str, text: object) -> _Value | None:
    """The value ``text`` of the quantity ``name`` as (code, coefficient, exponent)
    that reproduce it exactly; None for an unknown quantity or a text that has no
    such form. What :func:`_as_reading` looks up in :data:`_VALUE_MEMO`."""
    memo = _VALUE_MEMO.get(name)
    if memo is None:
        return None
    if type(text) is not str:
        parts = _split_decimal(text)
        return None if parts is None else _Value(_CODE_BY_NAME[name], *parts)
    value = memo.get(text, _UNSEEN)
    if value is _UNSEEN:
        parts = _split_decimal(text)
        value = None if parts is None else _Value(_CODE_BY_NAME[name], *parts)
        if len(memo) >= _VALUE_MEMO_MAX:
            memo.clear()
        memo[text] = value
    return value  # type: ignore[return-value]


def _split_decimal(text: object) -> tuple[int, int] | None:
    """(coefficient, exponent) that reproduce ``text`` exactly, or None."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    m = _PLAIN_DECIMAL.fullmatch(text)
    if m is not None:
        # Plain notation: str(Decimal(text)) == text unless it is a negative
        # zero or small enough for Decimal to print it in E notation.
        frac = m.group(1)
        exp = -len(frac) if frac else 0
        coef = int(text.replace(".", "", 1))
        if coef == 0 and text[0] == "-":
            return None
        if len(str(abs(coef))) - 1 + exp < -6 or abs(coef) >= _MAX_SCALED:
            return None
        if exp < -_MAX_ABS_EXPONENT:
            return None
        return coef, exp
    try:
        d = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    if not d.is_finite():
        return None
    sign, digits, dexp = d.as_tuple()
    assert isinstance(dexp, int)
    if abs(dexp) > _MAX_ABS_EXPONENT:
        return None
    coef = int("".join(map(str, digits)))
    if sign:
        coef = -coef
    if abs(coef) >= _MAX_SCALED or _decimal_text(coef, dexp) != text:
        return None
    return coef, dexp


def _utf8_len(text: str) -> int | None:
    """UTF-8 length, or None for text that cannot be encoded (lone surrogates)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _short_text(text: object) -> bool:
    if not isinstance(text, str):
        return False
    if text.isascii():  # (meter ids, time sources, kinds: one byte a character)
        return len(text) <= MAX_STRING_BYTES
    n = _utf8_len(text)
    return n is not None and n <= MAX_STRING_BYTES


def _decimal_text(coef: int, exp: int) -> str:
    """``str(Decimal(coef * 10**exp))`` keeping the exponent, i.e. what
    ``str(Decimal(f"{coef}E{exp}"))`` gives; without building the Decimal where
    the text is plain notation (exponent <= 0, adjusted exponent >= -6: every
    meter value seen in practice)."""
    if exp == 0:
        return str(coef)
    if exp < 0:
        digits = str(-coef if coef < 0 else coef)
        n = len(digits)
        if n + exp > -6:  # adjusted exponent n - 1 + exp >= -6
            sign = "-" if coef < 0 else ""
            if n > -exp:
                return f"{sign}{digits[:exp]}.{digits[exp:]}"
            return f"{sign}0.{digits.zfill(-exp)}"
    return str(Decimal(f"{coef}E{exp}"))


def _decimal_texts(coefs: list[int], exp: int) -> list[str]:
    """``[_decimal_text(c, exp) for c in coefs]``, a column at a time: for values that
    are not negative, with an exponent from -6 to 0, the text is the digits with a
    point put in (or ``0.`` and the digits padded)."""
    if exp == 0:
        return [str(c) for c in coefs]
    if -6 <= exp < 0 and coefs and (least := min(coefs)) >= 0:
        w = -exp
        unit = 10**w
        if least >= unit:  # (the usual column: every value at least 1)
            return [f"{d[:exp]}.{d[exp:]}" for d in map(str, coefs)]
        return [
            f"{d[:exp]}.{d[exp:]}" if c >= unit else f"0.{d.zfill(w)}"
            for c, d in zip(coefs, map(str, coefs), strict=True)
        ]
    return [_decimal_text(c, exp) for c in coefs]


def _as_reading(rec: RecordLike, cls: int) -> _Reading | None:
    body = rec.body
    if rec.kind != _KIND_READING or not isinstance(body, dict):
        return None
    keys = body.keys()
    if keys != _READING_KEYS and keys != _READING_KEYS_Q:
        return None
    meter, t, ts, v = body["m"], body["t"], body["ts"], body["v"]
    q = body.get("q", _NO_MARKS)
    if not (_short_text(meter) and _short_text(ts)):
        return None
    if type(t) is not int or not -_MAX_TIME < t < _MAX_TIME:
        return None
    if not isinstance(v, dict) or not isinstance(q, dict):
        return None
    values: list[_Value] = []
    memos = _VALUE_MEMO
    for name, text in v.items():
        # _quantity_value(name, text), with its usual case (a text seen before) inline
        memo = memos.get(name)
        value = memo.get(text, _UNSEEN) if memo is not None and type(text) is str else _UNSEEN
        if value is _UNSEEN:
            value = _quantity_value(name, text)
        if value is None:
            return None
        values.append(value)  # type: ignore[arg-type]
    quality: Mapping[int, str] = _NO_MARKS
    if q:
        quality = {}
        for name, qual in q.items():
            if name not in v or not _short_text(qual):
                return None
            quality[_CODE_BY_NAME[name]] = qual
    return _Reading(
        rec.id, rec.created_ms, cls, meter, t, ts, "q" in body, tuple(values), quality, rec
    )


def _generic(rec: RecordLike, cls: int) -> _Generic:
    try:
        body_json = orjson.dumps(rec.body)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise WireEncodeError(f"record {rec.id}: body is not JSON-able: {exc}") from exc
    if len(body_json) > MAX_BODY_BYTES:
        raise WireEncodeError(f"record {rec.id}: body of {len(body_json)} bytes exceeds limit")
    return _Generic(rec.id, rec.created_ms, cls, rec.kind, body_json)


def _column_fits(values: Sequence[_Value]) -> bool:
    """Whether one meter's column can share a base exponent within limits."""
    base = min(v.exp for v in values)
    return all(
        v.exp - base <= _MAX_EXPONENT_SPREAD and abs(v.coef) * 10 ** (v.exp - base) < _MAX_SCALED
        for v in values
    )


def _demote_unfit(rows: Sequence[_Row]) -> Sequence[_Row]:
    """Send readings whose column (per meter) cannot be scaled to one
    exponent within limits the generic way; the rest stay columnar."""
    # A column of values that share one exponent always fits (every coefficient is
    # below the limit already): only columns of mixed exponents are checked. A
    # meter's first reading is only looked at once it has a second one (a meter
    # read once in the batch has no mixed column).
    first_reading: dict[str, _Reading] = {}
    first_exps: dict[str, dict[int, int]] = {}  # per meter: the first exponent in each column
    mixed: set[tuple[str, int]] = set()
    for row in rows:
        if isinstance(row, _Reading):
            meter = row.meter
            exps = first_exps.get(meter)
            if exps is None:
                first = first_reading.setdefault(meter, row)
                if first is row:
                    continue
                exps = first_exps[meter] = {v.code: v.exp for v in first.values}
            for v in row.values:
                if exps.setdefault(v.code, v.exp) != v.exp:
                    mixed.add((meter, v.code))
    if not mixed:
        return rows
    columns: dict[tuple[str, int], list[_Value]] = {key: [] for key in mixed}
    for row in rows:
        if isinstance(row, _Reading):
            for v in row.values:
                column = columns.get((row.meter, v.code))
                if column is not None:
                    column.append(v)
    bad = {key for key, column in columns.items() if not _column_fits(column)}
    if not bad:
        return rows
    return [
        _generic(row.record, row.cls)
        if isinstance(row, _Reading) and any((row.meter, v.code) in bad for v in row.values)
        else row
        for row in rows
    ]


def _analyse(rec: RecordLike) -> _Row:
    rid, created_ms = rec.id, rec.created_ms
    if type(rid) is not int or not -_MAX_TIME < rid < _MAX_TIME:
        raise WireEncodeError(f"record id must be an int below 2**62, got {rid!r}")
    if type(created_ms) is not int or not -_MAX_TIME < created_ms < _MAX_TIME:
        raise WireEncodeError(f"record {rid}: created_ms must be an int below 2**62")
    if not _short_text(rec.kind):
        raise WireEncodeError(f"record {rid}: kind must be a string of 0..4096 UTF-8 bytes")
    if not isinstance(rec.body, dict):
        raise WireEncodeError(f"record {rid}: body must be a dict")
    cls = getattr(rec, "cls", 0)
    if not isinstance(cls, int) or isinstance(cls, bool) or not 0 <= cls <= 255:
        raise WireEncodeError(f"record {rid}: class must be an int in 0..255, got {cls!r}")
    cls = int(cls)  # (the outbox's records carry a RecordClass)
    reading = _as_reading(rec, cls)
    return reading if reading is not None else _generic(rec, cls)


# --------------------------------------------------------------------------- plaintext


class _Strings:
    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def ref(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.index)
        return i


def _choose_width(zs: Sequence[int]) -> int:
    """Bit width that (approximately) minimises packed size plus escapes.

    The cost of width ``w`` is ``n * w`` bits plus 8 bits per escaped byte,
    counted per bit length ``b`` above ``w`` as ``count * (b + 6) // 7``; at the
    widest width, the values of that length are counted as escaping (all ones).
    Of equally cheap widths the widest wins. Below the widest, only a width equal
    to a bit length some value has (or 1) can be cheapest: the escapes stay the
    same down to the next shorter length, and a narrower width costs less; so
    only those widths are tried.
    """
    if not zs:
        return 0
    lengths = sorted(map(int.bit_length, zs))
    top = lengths[-1]
    if top == 0:
        return 0
    n = len(lengths)
    best_w, best_cost = top, n * top + 8 * (n - bisect.bisect_left(lengths, top))
    escaped_bytes = 0
    hi = n
    while hi:  # each bit length b, longest first: lengths[lo:hi] are the values of length b
        b = lengths[hi - 1]
        lo = bisect.bisect_left(lengths, b, 0, hi)
        escaped_bytes += (hi - lo) * (b + 6) // 7  # they escape at any width below b
        w = max(lengths[lo - 1], 1) if lo else 1  # the narrowest width with these escapes
        if w < b:
            cost = n * w + 8 * escaped_bytes
            if cost < best_cost:
                best_w, best_cost = w, cost
        hi = lo
    return best_w


def _put_packed(out: bytearray, values: Sequence[int], *, signed: bool) -> None:
    """A column of ints: if signed, a svarint centre (the median) and the
    values as zigzag offsets from it; a width byte ``w``, the values
    bit-packed LSB first at ``w`` bits, then for each value that was written
    as the all-ones escape a varint of the excess, in order."""
    if signed:
        ordered = sorted(values)
        center = ordered[len(values) // 2] if values else 0
        _put_svarint(out, center)
        if not values or ordered[0] == ordered[-1]:
            out.append(0)  # every value is the centre: width 0, nothing packed
            return
        # _zigzag(v - center), inline: a column is packed a few dozen times per batch
        zs = [(v - center) << 1 if v >= center else ((center - v) << 1) - 1 for v in values]
    else:
        zs = list(values)
    width = _choose_width(zs)
    out.append(width)
    if not width:
        return
    marker = (1 << width) - 1
    acc = 0
    shift = 0
    if max(zs) < marker:  # (the usual column: nothing escapes)
        for z in zs:
            acc |= z << shift
            shift += width
        out += acc.to_bytes((shift + 7) // 8, "little")
        return
    overflow = bytearray()
    for z in zs:
        if z >= marker:
            _put_uvarint(overflow, z - marker)
            z = marker
        acc |= z << shift
        shift += width
    out += acc.to_bytes((shift + 7) // 8, "little")
    out += overflow


# _BIT_TABLES[j]: byte -> its bit j (a column of width 1 read a bit position at a time)
_BIT_TABLES = [bytes((b >> j) & 1 for b in range(256)) for j in range(8)]


def _get_packed(r: _Reader, n: int, *, signed: bool) -> list[int]:
    center = r.svarint() if signed else 0
    width = r.byte()
    if width > _MAX_PACKED_WIDTH:
        raise WireFormatError(f"packed column width {width} exceeds {_MAX_PACKED_WIDTH}")
    if width == 0 or n == 0:
        return [center] * n
    raw = r.take((n * width + 7) // 8)
    mask = (1 << width) - 1
    out: list[int]
    if width == 8:
        out = list(raw)
    elif width == 1:  # bit j of every byte at once
        out = [0] * (8 * len(raw))
        for j, table in enumerate(_BIT_TABLES):
            out[j::8] = raw.translate(table)
    else:
        # Eight values fill ``width`` bytes: read each such group as one little-endian int.
        out = []
        extend = out.extend
        from_bytes = int.from_bytes
        shifts = range(0, 8 * width, width)
        for j in range(0, len(raw), width):
            g = from_bytes(raw[j : j + width], "little")
            extend([(g >> s) & mask for s in shifts])
    tail = (n * width) % 8  # the bits after the n-th value, in the last byte, are zero
    if tail and raw[-1] >> tail:
        raise WireFormatError("packed column has stray bits")
    del out[n:]
    if mask in out:  # escaped: the value goes on in a varint after the column
        escaped = [j for j, z in enumerate(out) if z == mask]
        for j, extra in zip(escaped, r.uvarints(len(escaped)), strict=True):
            out[j] = mask + extra
    if signed:
        return [center + ((z >> 1) ^ -(z & 1)) for z in out]
    return out


def _created_columns(rows: Sequence[_Row]) -> tuple[int, bytearray]:
    """Pick the cheaper predictor for created_ms: the previous record's
    created_ms (mode 0), or for readings their own t (mode 1); returns the
    mode and its column, packed."""
    by_prev: list[int] = []
    by_t: list[int] = []
    prev = 0
    for row in rows:
        d = row.created_ms - prev
        by_prev.append(d)
        by_t.append(row.created_ms - row.t if isinstance(row, _Reading) else d)
        prev = row.created_ms
    packed_t = bytearray()
    _put_packed(packed_t, by_t, signed=True)
    if len(packed_t) <= 2 and min(by_prev, default=0) != max(by_prev, default=0):
        # by_t is a one-byte centre and width 0, the least a column takes; by_prev's
        # values differ, so it needs a width above 0 and takes more
        return 1, packed_t
    packed_prev = bytearray()
    _put_packed(packed_prev, by_prev, signed=True)
    return (1, packed_t) if len(packed_t) < len(packed_prev) else (0, packed_prev)


def _deltas(values: Sequence[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(values)]


_ColumnSpec = tuple[int, int, int]  # (quantity code, base exponent, flags)
_PRESENCE = 1  # flag: presence bitmap per meter
_SPREAD = 2  # flag: per-value exponent offsets
_PREDICTED = 4  # flag: current predicted from power / (voltage * power factor)
_FLAGS = _PRESENCE | _SPREAD | _PREDICTED
_CURRENT = QUANTITY_CODES[Quantity.CURRENT]
_POWER = QUANTITY_CODES[Quantity.POWER]
_VOLTAGE = QUANTITY_CODES[Quantity.VOLTAGE]
_PF = QUANTITY_CODES[Quantity.POWER_FACTOR]
_PREDICTOR_INPUTS = frozenset({_POWER, _VOLTAGE, _PF})
_QUANTITY_NAMES = {code: q.value for code, q in CODE_QUANTITIES.items()}


def _predict_current(
    power: tuple[int, int], volts: tuple[int, int], pf: tuple[int, int], base: int
) -> int:
    """round(P[kW] * 1000 / (V * PF)) in units of 10**base A, exact integer
    arithmetic on (coefficient, exponent) pairs; half rounds up; 0 if V*PF is 0."""
    return _predict_parts(*power, *volts, *pf, base)


def _predict_parts(cp: int, ep: int, cv: int, ev: int, cf: int, ef: int, base: int) -> int:
    """:func:`_predict_current` on the coefficients and exponents themselves."""
    k = ep + 3 - ev - ef - base
    num, den = cp, cv * cf
    if k >= 0:
        num *= 10**k
    else:
        den *= 10**-k
    if den == 0:
        return 0
    if den < 0:
        num, den = -num, -den
    return (2 * num + den) // (2 * den)


def _bits(values: Sequence[int]) -> int:
    return sum(_zigzag(v).bit_length() for v in values)


def _current_residuals(
    readings: Sequence[_Reading], entries: Sequence[tuple[int, _Value]], base: int
) -> list[int] | None:
    """Residuals of the current column against P/(V*PF), when every reading
    that has a current also has the three inputs and the residuals are
    cheaper than plain deltas; else None."""
    residuals: list[int] = []
    scaled: list[int] = []
    for i, v in entries:
        inputs = {x.code: (x.coef, x.exp) for x in readings[i].values}
        if _POWER not in inputs or _VOLTAGE not in inputs or _PF not in inputs:
            return None
        s = v.coef * 10 ** (v.exp - base)
        res = s - _predict_current(inputs[_POWER], inputs[_VOLTAGE], inputs[_PF], base)
        if abs(res) >= _MAX_SCALED:
            return None
        residuals.append(res)
        scaled.append(s)
    if _bits(residuals) >= _bits([scaled[0], *_deltas(scaled)]):
        return None
    return residuals


# per quantity code: (base exponent, flags, numbers) of each meter's column, in meter
# order; the numbers are the values scaled to the base exponent or, for a predicted
# current, its residuals
_Holders = dict[int, list[tuple[int, int, list[int]]]]


def _columns_of(
    readings: Sequence[_Reading], holders: _Holders, layout: bytearray
) -> tuple[_ColumnSpec, ...]:
    """One meter's column schema; each column's numbers go to ``holders``, and the
    meter's presence bitmaps and exponent offsets to ``layout``, in column order."""
    columns: dict[int, list[tuple[int, _Value]]] = {}
    for i, rd in enumerate(readings):
        for val in rd.values:
            columns.setdefault(val.code, []).append((i, val))
    spec: list[_ColumnSpec] = []
    for code, entries in columns.items():
        if len(entries) == 1:  # (a meter read once in the batch: no spread)
            base = entries[0][1].exp
            flags = _PRESENCE if len(readings) != 1 else 0
        else:
            base = min(v.exp for _, v in entries)
            flags = (_PRESENCE if len(entries) != len(readings) else 0) | (
                _SPREAD if any(v.exp != base for _, v in entries) else 0
            )
        guess = _current_residuals(readings, entries, base) if code == _CURRENT else None
        if guess is not None:
            flags |= _PREDICTED
            column = guess
        else:
            column = [v.coef * 10 ** (v.exp - base) for _, v in entries]
        spec.append((code, base, flags))
        holders.setdefault(code, []).append((base, flags, column))
        if flags & _PRESENCE:
            bitmap = bytearray((len(readings) + 7) // 8)
            for i, _ in entries:
                bitmap[i >> 3] |= 1 << (i & 7)
            layout += bitmap
        if flags & _SPREAD:
            _put_packed(layout, [v.exp - base for _, v in entries], signed=False)
    return tuple(spec)


def _columns_of_one(reading: _Reading, holders: _Holders) -> tuple[_ColumnSpec, ...]:
    """:func:`_columns_of` a meter read once in the batch (every meter of a batch of
    one poll cycle), with less work: each of its columns is one value at its own
    exponent, present, without offsets (nothing goes to the layout)."""
    spec: list[_ColumnSpec] = []
    for v in reading.values:
        code, base, flags, column = v.code, v.exp, 0, [v.coef]
        if code == _CURRENT:
            guess = _current_residuals((reading,), [(0, v)], base)
            if guess is not None:
                flags, column = _PREDICTED, guess
        spec.append((code, base, flags))
        holders.setdefault(code, []).append((base, flags, column))
    return tuple(spec)


def _encode_plaintext(rows: Sequence[_Row]) -> bytes:
    rows = _demote_unfit(rows)
    strings = _Strings()
    meter_index: dict[str, int] = {}
    meters: list[list[_Reading]] = []
    tags: list[int] = []
    generics: list[_Generic] = []
    for row in rows:
        if isinstance(row, _Reading):
            k = meter_index.get(row.meter)
            if k is None:
                k = meter_index[row.meter] = len(meters)
                meters.append([])
            meters[k].append(row)
            tags.append(k + 1)
        else:
            generics.append(row)
            tags.append(0)

    body = bytearray()
    # 1. Records in order: tags, ids, created times.
    _put_packed(body, tags, signed=False)
    ids = [row.id for row in rows]
    _put_packed(body, [ids[0], *_deltas(ids)] if ids else [], signed=True)
    created_mode, created = _created_columns(rows)
    body.append(created_mode)
    body += created
    _put_packed(body, [row.cls for row in rows], signed=True)  # centred: constant is free
    # 2. Generic records.
    for g in generics:
        _put_uvarint(body, strings.ref(g.kind))
        _put_bytes(body, g.body_json)
    # 3. Column schemas per meter, then each meter's presence bitmaps and exponent
    # offsets (``layout``); each column's numbers are kept for 5. in ``holders``.
    schemas: dict[tuple[_ColumnSpec, ...], int] = {}
    meter_schema: list[int] = []
    layout = bytearray()
    holders: _Holders = {}
    for readings in meters:
        if len(readings) == 1:  # (every meter of a batch of one poll cycle)
            spec = _columns_of_one(readings[0], holders)
        else:
            spec = _columns_of(readings, holders, layout)
        meter_schema.append(schemas.setdefault(spec, len(schemas)))
    _put_uvarint(body, len(schemas))
    for key in schemas:
        _put_uvarint(body, len(key))
        for code, base, flags in key:
            _put_uvarint(body, code)
            _put_svarint(body, base)
            body.append(flags)
    _put_packed(body, meter_schema, signed=False)
    body += layout
    # 4. Reading shapes and times, meter-major.
    _put_packed(
        body,
        [(strings.ref(rd.ts) << 1) | int(rd.has_q) for readings in meters for rd in readings],
        signed=False,
    )
    firsts: list[int] = []
    intervals: list[int] = []
    residuals: list[int] = []
    for readings in meters:
        if len(readings) == 1:  # no steps: interval 0, no residuals
            firsts.append(readings[0].t)
            intervals.append(0)
            continue
        times = [rd.t for rd in readings]
        steps = _deltas(times)
        interval = sorted(steps)[len(steps) // 2] if steps else 0
        firsts.append(times[0])
        intervals.append(interval)
        residuals.extend(s - interval for s in steps)
    _put_packed(body, firsts[:1] + _deltas(firsts), signed=True)
    _put_packed(body, intervals[:1] + _deltas(intervals), signed=True)
    _put_packed(body, residuals, signed=True)
    # 5. Values, quantity by quantity across meters.
    for code in sorted(holders):
        col_firsts: list[int] = []
        col_deltas: list[int] = []
        col_residuals: list[int] = []
        prev_base: int | None = None
        prev_first = 0
        for base, flags, column in holders[code]:
            if flags & _PREDICTED:
                col_residuals += column
                continue
            first = column[0]
            col_firsts.append(first - prev_first if base == prev_base else first)
            prev_base, prev_first = base, first
            if len(column) > 1:
                col_deltas += _deltas(column)
        _put_packed(body, col_firsts, signed=True)
        _put_packed(body, col_deltas, signed=True)
        if code == _CURRENT:
            _put_packed(body, col_residuals, signed=True)
    # 6. Quality marks (sparse), by global reading index in meter-major order.
    marks: list[tuple[int, int, int]] = []
    index = 0
    for readings in meters:
        for rd in readings:
            for code, qual in rd.quality.items():
                marks.append((index, code, strings.ref(qual)))
            index += 1
    _put_uvarint(body, len(marks))
    prev_index = 0
    for index, code, si in marks:
        _put_uvarint(body, index - prev_index)
        _put_uvarint(body, code)
        _put_uvarint(body, si)
        prev_index = index

    head = bytearray()
    _put_uvarint(head, len(rows))
    _put_uvarint(head, len(strings.index))
    for s in strings.index:
        _put_bytes(head, s.encode())
    _put_uvarint(head, len(meters))
    for readings in meters:
        _put_bytes(head, readings[0].meter.encode())
    return bytes(head + body)


def _string_ref(strings: list[str], i: int) -> str:
    if i >= len(strings):
        raise WireFormatError(f"string reference {i} outside table of {len(strings)}")
    return strings[i]


def _undelta(first: int, deltas: Sequence[int]) -> list[int]:
    out = [first]
    for d in deltas:
        first += d
        out.append(first)
    return out


@dataclass(slots=True)
class _Columns:
    """A batch's plaintext decoded into its columns, every check done: what
    :func:`_records` makes the records of and :func:`_reading_rows` the rows of."""

    tags: list[int]  # per record: 0 generic, else 1 + its meter
    ids: list[int]
    created_mode: int
    created_raw: list[int]
    classes: list[int]
    generics: list[tuple[str, dict[str, Any]]]
    meter_ids: list[str]
    times: list[list[int]]  # per meter, its readings' times
    shapes: list[list[tuple[str, bool]]]  # per meter, (time source, has a quality map)
    # per meter, (quantity name, reading indexes, value texts), in insertion order
    texts: list[list[tuple[str, list[int], list[str]]]]
    marks: list[tuple[int, int, str, str]]  # (meter, reading index, quantity name, quality)


def _decode_plaintext(data: bytes) -> tuple[WireRecord, ...]:
    return _records(_columns(data))


def _columns(data: bytes) -> _Columns:
    r = _Reader(data)
    n_records = r.count("record", MAX_RECORDS)
    strings = [r.string("string") for _ in range(r.count("string", MAX_RECORDS))]
    meter_ids = [r.string("meter id") for _ in range(r.count("meter", n_records))]
    n_meters = len(meter_ids)
    if len(set(meter_ids)) != n_meters:
        raise WireFormatError("meter table repeats a meter id")
    # 1. Records in order.
    tags = _get_packed(r, n_records, signed=False)
    counts = [0] * n_meters
    n_generic = 0
    for tag in tags:
        if tag == 0:
            n_generic += 1
        elif tag <= n_meters:
            counts[tag - 1] += 1
        else:
            raise WireFormatError(f"record tag {tag} names no meter")
    if any(c == 0 for c in counts):
        raise WireFormatError("a meter in the table has no readings")
    id_deltas = _get_packed(r, n_records, signed=True)
    ids = _undelta(id_deltas[0], id_deltas[1:]) if n_records else []
    created_mode = r.byte()
    if created_mode > 1:
        raise WireFormatError(f"unknown created-time mode {created_mode}")
    created_raw = _get_packed(r, n_records, signed=True)
    classes = _get_packed(r, n_records, signed=True)
    if any(not 0 <= c <= 255 for c in classes):
        raise WireFormatError("record class out of range")
    # 2. Generic records.
    generics: list[tuple[str, dict[str, Any]]] = []
    for _ in range(n_generic):
        kind = _string_ref(strings, r.uvarint())
        size = r.uvarint()
        if size > MAX_BODY_BYTES:
            raise WireFormatError(f"record body of {size} bytes exceeds limit")
        raw = r.take(size)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise WireFormatError(f"record body is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise WireFormatError("record body is not a JSON object")
        generics.append((kind, obj))
    # 3. Schemas.
    schemas: list[list[_ColumnSpec]] = []
    for _ in range(r.count("schema", max(n_meters, 0))):
        spec: list[_ColumnSpec] = []
        seen: set[int] = set()
        for _ in range(r.count("column", len(QUANTITY_CODES), 3)):
            code = r.uvarint()
            if code not in CODE_QUANTITIES or code in seen:
                raise WireFormatError(f"unknown or repeated quantity code {code}")
            seen.add(code)
            base = r.svarint()
            if abs(base) > _MAX_ABS_EXPONENT:
                raise WireFormatError(f"column exponent {base} out of range")
            flags = r.byte()
            if flags & ~_FLAGS or (flags & _PREDICTED and code != _CURRENT):
                raise WireFormatError(f"invalid column flags {flags}")
            spec.append((code, base, flags))
        if any(f & _PREDICTED for _, _, f in spec) and not {_POWER, _VOLTAGE, _PF} <= seen:
            raise WireFormatError("predicted current without its input columns")
        schemas.append(spec)
    meter_schema = _get_packed(r, n_meters, signed=False)
    if any(s >= len(schemas) for s in meter_schema):
        raise WireFormatError("meter names an unknown schema")
    # layout[k][code] = (base exponent, flags, reading indexes, exponent offsets)
    layout: list[dict[int, tuple[int, int, list[int], list[int]]]] = []
    for k in range(n_meters):
        n = counts[k]
        bitmaps: dict[bytes, list[int]] = {}
        cols: dict[int, tuple[int, int, list[int], list[int]]] = {}
        for code, base, flags in schemas[meter_schema[k]]:
            if flags & _PRESENCE:
                bitmap = r.take((n + 7) // 8)
                present = bitmaps.get(bitmap)  # (a meter's columns often share one)
                if present is None:
                    present = [i for i in range(n) if bitmap[i >> 3] >> (i & 7) & 1]
                    if not present or ((n & 7) and bitmap[-1] >> (n & 7)):
                        raise WireFormatError("presence bitmap is empty or has stray bits")
                    bitmaps[bitmap] = present
            else:
                present = list(range(n))
            if flags & _SPREAD:
                offsets = _get_packed(r, len(present), signed=False)
                if any(o > _MAX_EXPONENT_SPREAD for o in offsets):
                    raise WireFormatError("per-value exponent offset out of range")
            else:
                offsets = [0] * len(present)
            cols[code] = (base, flags, present, offsets)
        layout.append(cols)
    # 4. Shapes and times.
    total = sum(counts)
    shape_codes = _get_packed(r, total, signed=False)
    if shape_codes and max(shape_codes) >> 1 >= len(strings):
        _string_ref(strings, max(shape_codes) >> 1)  # raises
    shapes = [(strings[s >> 1], bool(s & 1)) for s in shape_codes]
    first_d = _get_packed(r, n_meters, signed=True)
    interval_d = _get_packed(r, n_meters, signed=True)
    residuals = _get_packed(r, total - n_meters, signed=True)
    firsts = _undelta(first_d[0], first_d[1:]) if n_meters else []
    intervals = _undelta(interval_d[0], interval_d[1:]) if n_meters else []
    meter_times: list[list[int]] = []
    meter_shapes: list[list[tuple[str, bool]]] = []
    g = 0
    pos = 0
    for k in range(n_meters):
        n = counts[k]
        step = intervals[k]
        meter_times.append(
            list(itertools.accumulate(map(add, residuals[pos : pos + n - 1], repeat(step)), initial=firsts[k]))
        )
        pos += n - 1
        meter_shapes.append(shapes[g : g + n])
        g += n
    # 5. Values: each meter's column as one list (coefficients, exponents, texts), then
    # each reading's value map in one go where the meter has every value of its columns.
    # nums[k][code] = (reading indexes, coefficients, exponents): the inputs of the
    # current predictor, for the meters whose current is predicted
    nums: list[dict[int, tuple[list[int], list[int], list[int]]]] = [{} for _ in range(n_meters)]
    predicts = {k for k in range(n_meters) if layout[k].get(_CURRENT, (0, 0))[1] & _PREDICTED}
    # texts[k] = [(quantity name, reading indexes, value texts)], in insertion order
    texts: list[list[tuple[str, list[int], list[str]]]] = [[] for _ in range(n_meters)]
    limit = 1 << 80

    # exponent -> [(texts to fill, scaled values)] of the columns without offsets
    plain_texts: dict[int, list[tuple[list[str], list[int]]]] = {}

    def column(
        k: int, code: int, present: list[int], scaled: list[int], base: int, offsets: list[int]
    ) -> None:
        if scaled and (max(scaled) >= limit or min(scaled) <= -limit):
            raise WireFormatError("column value out of range")
        if any(offsets):
            coefs, exps = [], []
            for v, off in zip(scaled, offsets, strict=True):
                coef, rem = divmod(v, 10**off)
                if rem:
                    raise WireFormatError("value not representable at its own exponent")
                coefs.append(coef)
                exps.append(base + off)
            out = [_decimal_text(c, e) for c, e in zip(coefs, exps, strict=True)]
        else:
            coefs, exps = scaled, [base] * len(scaled) if k in predicts else []
            out = []  # filled below, with every column of this exponent at once
            plain_texts.setdefault(base, []).append((out, scaled))
        if code in _PREDICTOR_INPUTS and k in predicts:
            nums[k][code] = (present, coefs, exps)
        texts[k].append((_QUANTITY_NAMES[code], present, out))

    texts_at = plain_texts.setdefault
    names = _QUANTITY_NAMES
    pending: list[tuple[int, int, list[int], list[int], list[int]]] = []
    all_codes = sorted({code for k in range(n_meters) for code in layout[k]})
    for code in all_codes:
        holders = [k for k in range(n_meters) if code in layout[k]]
        plain = [k for k in holders if not layout[k][code][1] & _PREDICTED]
        col_firsts = _get_packed(r, len(plain), signed=True)
        n_deltas = sum(len(layout[k][code][2]) - 1 for k in plain)
        col_deltas = _get_packed(r, n_deltas, signed=True)
        prev_base: int | None = None
        prev_first = 0
        dpos = 0
        for h, k in enumerate(plain):
            base, col_flags, present, offsets = layout[k][code]
            first = col_firsts[h] + (prev_first if base == prev_base else 0)
            prev_base, prev_first = base, first
            n = len(present)
            scaled = list(itertools.accumulate(col_deltas[dpos : dpos + n - 1], initial=first))
            dpos += n - 1
            if col_flags & _SPREAD or k in predicts:
                column(k, code, present, scaled, base, offsets)
                continue
            # column() without offsets or predictor inputs, inline (the usual column)
            if max(scaled) >= limit or min(scaled) <= -limit:
                raise WireFormatError("column value out of range")
            out: list[str] = []
            texts_at(base, []).append((out, scaled))
            texts[k].append((names[code], present, out))
        if code == _CURRENT:
            guessed = [k for k in holders if layout[k][code][1] & _PREDICTED]
            col_residuals = _get_packed(
                r, sum(len(layout[k][code][2]) for k in guessed), signed=True
            )
            rpos = 0
            for k in guessed:
                base, col_flags, present, offsets = layout[k][code]
                part = col_residuals[rpos : rpos + len(present)]
                rpos += len(present)
                pending.append((k, base, present, offsets, part))
    for k, base, present, offsets, part in pending:
        inputs = nums[k]
        if not {_POWER, _VOLTAGE, _PF} <= inputs.keys():
            raise WireFormatError("predicted current lacks an input value")
        p, v, f = inputs[_POWER], inputs[_VOLTAGE], inputs[_PF]
        if p[0] == v[0] == f[0] == present:  # the usual case: every value in each column
            scaled = [
                _predict_parts(cp, ep, cv, ev, cf, ef, base) + res
                for cp, ep, cv, ev, cf, ef, res in zip(
                    p[1], p[2], v[1], v[2], f[1], f[2], part, strict=True
                )
            ]
        else:
            by_i = [dict(zip(c[0], zip(c[1], c[2], strict=True), strict=True)) for c in (p, v, f)]
            try:
                scaled = [
                    _predict_current(by_i[0][i], by_i[1][i], by_i[2][i], base) + res
                    for i, res in zip(present, part, strict=True)
                ]
            except KeyError as exc:
                raise WireFormatError("predicted current lacks an input value") from exc
        column(k, _CURRENT, present, scaled, base, offsets)
    for base, parts in plain_texts.items():
        flat = _decimal_texts(list(itertools.chain.from_iterable(sc for _, sc in parts)), base)
        start = 0
        for out, sc in parts:
            out += flat[start : start + len(sc)]
            start += len(sc)
    # 6. Quality marks.
    marks: list[tuple[int, int, str, str]] = []
    starts = list(itertools.accumulate(counts, initial=0))
    g = 0
    for _ in range(r.count("quality mark", max(total, 0) * len(QUANTITY_CODES), 3)):
        g += r.uvarint()
        if g >= total:
            raise WireFormatError("quality mark past the last reading")
        q_code = r.uvarint()
        quantity = CODE_QUANTITIES.get(q_code)
        k = bisect.bisect_right(starts, g) - 1
        i = g - starts[k]
        if quantity is None or not meter_shapes[k][i][1] or not _has_value(texts[k], quantity.value, i):
            raise WireFormatError("quality mark for an absent value or quality map")
        marks.append((k, i, quantity.value, _string_ref(strings, r.uvarint())))
    if r.remaining():
        raise WireFormatError(f"{r.remaining()} trailing bytes after the last column")
    return _Columns(
        tags, ids, created_mode, created_raw, classes, generics, meter_ids, meter_times, meter_shapes, texts, marks
    )


def _has_value(cols: list[tuple[str, list[int], list[str]]], name: str, i: int) -> bool:
    """Whether reading ``i`` of a meter has a value of quantity ``name``."""
    return any(c[0] == name and i in c[1] for c in cols)


def _records(c: _Columns) -> tuple[WireRecord, ...]:
    """The records of a decoded plaintext, in batch order."""
    bodies: list[list[dict[str, Any]]] = []
    for meter, times, shapes_k in zip(c.meter_ids, c.times, c.shapes, strict=True):
        rows_k: list[dict[str, Any]] = [
            {"m": meter, "t": t, "ts": ts, "v": {}} for t, (ts, _) in zip(times, shapes_k, strict=True)
        ]
        for b, (_, has_q) in zip(rows_k, shapes_k, strict=True):
            if has_q:
                b["q"] = {}
        bodies.append(rows_k)
    for readings_k, cols_k in zip(bodies, c.texts, strict=True):
        if not cols_k:
            continue
        if all(len(col[1]) == len(readings_k) for col in cols_k):
            names = [col[0] for col in cols_k]
            by_reading = zip(*(col[2] for col in cols_k), strict=True)
            for b, values in zip(readings_k, by_reading, strict=True):
                b["v"] = dict(zip(names, values, strict=True))
        else:
            for name, present, out in cols_k:
                for i, text in zip(present, out, strict=True):
                    readings_k[i]["v"][name] = text
    for k, i, name, quality in c.marks:
        bodies[k][i]["q"][name] = quality

    records: list[WireRecord] = []
    cursors = [0] * len(bodies)
    gi = 0
    prev_created = 0
    ids, created_raw, classes, generics = c.ids, c.created_raw, c.classes, c.generics
    by_poll_time = c.created_mode == 1
    for idx, tag in enumerate(c.tags):
        body: dict[str, Any]
        if tag == 0:
            kind, body = generics[gi]
            gi += 1
            created = prev_created + created_raw[idx]
        else:
            k = tag - 1
            body = bodies[k][cursors[k]]
            cursors[k] += 1
            kind = _KIND_READING
            base_ms = body["t"] if by_poll_time else prev_created
            created = base_ms + created_raw[idx]
        prev_created = created
        records.append(WireRecord(ids[idx], kind, created, body, classes[idx]))
    return tuple(records)


_SORTED = orjson.OPT_SORT_KEYS


def _value_texts(cols: list[tuple[str, list[int], list[str]]]) -> list[str]:
    """The values JSON of the readings that hold every one of ``cols`` (and no other
    column), keys sorted: one template filled per reading."""
    ordered = sorted(cols, key=lambda col: col[0])
    template = "{" + ",".join(f'"{col[0]}":"%s"' for col in ordered) + "}"
    return [template % v for v in zip(*(col[2] for col in ordered), strict=True)]


def _by_presence(
    cols: list[tuple[str, list[int], list[str]]],
) -> list[tuple[list[int], list[tuple[str, list[int], list[str]]]]] | None:
    """A meter's columns grouped by the readings they are present in, where those
    sets do not overlap (each reading then holds exactly its group's columns);
    None where they do."""
    groups: dict[tuple[int, ...], list[tuple[str, list[int], list[str]]]] = {}
    for col in cols:
        groups.setdefault(tuple(col[1]), []).append(col)
    if len(groups) > 8:
        return None
    seen: set[int] = set()
    for key in groups:
        seen.update(key)
    if len(seen) != sum(len(key) for key in groups):
        return None
    return [(group[0][1], group) for group in groups.values()]


def _reading_rows(
    c: _Columns, gateway_id: str, seq: int, epoch: str
) -> tuple[list[tuple[Any, ...]], list[int], list[tuple[int, WireRecord]]]:
    """The readings of a decoded plaintext as flat rows, without a record object or a
    body per reading, and its other records: (rows in batch order, their classes,
    [(position in the batch, record)] of the records that are not readings).

    A row is ``(gateway id, record id, meter id, time, time source, values JSON,
    quality JSON or None, batch seq, epoch)``; the JSON texts are exactly what
    ``orjson.dumps(body["v"] / body["q"], option=OPT_SORT_KEYS)`` gives for the
    body :func:`_records` makes (an empty quality map: None)."""
    tags, ids, classes = c.tags, c.ids, c.classes
    n_meters = len(c.meter_ids)
    where: list[list[int]] = [[] for _ in range(n_meters)]  # positions of each meter's readings
    others: list[int] = []
    for idx, tag in enumerate(tags):
        (where[tag - 1] if tag else others).append(idx)
    rows: list[Any] = [None] * len(tags)
    qmaps: dict[int, dict[int, dict[str, str]]] = {}  # meter -> reading index -> quality map
    for k, i, name, mark in c.marks:
        qmaps.setdefault(k, {}).setdefault(i, {})[name] = mark
    for k in range(n_meters):
        times, shapes_k, cols = c.times[k], c.shapes[k], c.texts[k]
        n = len(times)
        if all(len(col[1]) == n for col in cols):
            values = _value_texts(cols) if cols else ["{}"] * n
        elif (grouped := _by_presence(cols)) is not None:
            # readings of a few shapes (a meter's billing and telemetry readings):
            # each shape's columns cover exactly its readings
            values = ["{}"] * n
            for present, group in grouped:
                for i, text in zip(present, _value_texts(group), strict=True):
                    values[i] = text
        else:  # irregular gaps: the value maps built as the records' are
            maps: list[dict[str, str]] = [{} for _ in range(n)]
            for name, present, out in cols:
                for i, text in zip(present, out, strict=True):
                    maps[i][name] = text
            values = [orjson.dumps(m, option=_SORTED).decode() for m in maps]
        quality: list[str | None] = [None] * n
        for i, qm in qmaps.get(k, {}).items():
            quality[i] = orjson.dumps(qm, option=_SORTED).decode()
        positions = where[k]
        made = zip(
            repeat(gateway_id),
            map(ids.__getitem__, positions),
            repeat(c.meter_ids[k]),
            times,
            map(itemgetter(0), shapes_k),
            values,
            quality,
            repeat(seq),
            repeat(epoch),
        )
        deque(map(rows.__setitem__, positions, made), maxlen=0)  # rows[p] = row, in C
    if not others:
        return rows, classes, []
    generic: list[tuple[int, WireRecord]] = []
    raw = c.created_raw
    # created times as _records chains them: each the one before plus its delta, a
    # reading's from its own time in created-time mode 1
    chained = list(itertools.accumulate(raw)) if c.created_mode == 0 else None
    for j, p in enumerate(others):
        if chained is not None:
            created = chained[p]
        elif p == 0:
            created = raw[p]
        elif tags[p - 1]:
            created = rows[p - 1][3] + raw[p - 1] + raw[p]
        else:
            created = generic[-1][1].created_ms + raw[p]
        kind, body = c.generics[j]
        generic.append((p, WireRecord(ids[p], kind, created, body, classes[p])))
    reading_rows = [row for row in rows if row is not None]
    reading_classes = [cl for cl, tag in zip(classes, tags, strict=True) if tag]
    return reading_rows, reading_classes, generic


# --------------------------------------------------------------------------- compression


def _compress(data: bytes, method: Compression) -> bytes:
    if method is Compression.ZLIB:
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        return c.compress(data) + c.flush()
    if method is Compression.LZMA:
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return data


def _decompress(data: bytes, method: int) -> bytes:
    limit = MAX_PLAINTEXT_BYTES
    if method == Compression.NONE:
        if len(data) > limit:
            raise WireFormatError("plaintext exceeds limit")
        return data
    try:
        if method == Compression.ZLIB:
            z = zlib.decompressobj(-15)
            out = z.decompress(data, limit + 1)
            if len(out) > limit or z.unconsumed_tail:
                raise WireFormatError(f"decompressed batch exceeds {limit} bytes")
            if not z.eof or z.unused_data:
                raise WireFormatError("compressed stream truncated or followed by junk")
            return out
        if method == Compression.LZMA:
            x = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            out = x.decompress(data, limit + 1)
            if len(out) > limit:
                raise WireFormatError(f"decompressed batch exceeds {limit} bytes")
            if not x.eof or x.unused_data:
                raise WireFormatError("compressed stream truncated or followed by junk")
            return out
    except (zlib.error, lzma.LZMAError) as exc:
        raise WireFormatError(f"compressed stream is corrupt: {exc}") from exc
    raise WireFormatError(f"unknown compression {method}")


# --------------------------------------------------------------------------- envelope


def _epoch_raw(epoch: object) -> bytes:
    try:
        return epoch_bytes(epoch)  # type: ignore[arg-type]
    except (EpochFormatError, TypeError) as exc:
        raise WireEncodeError(str(exc)) from exc


def _header(gateway_id: str, epoch: str, seq: int, key_id: int, compression: Compression) -> bytes:
    gw_len = _utf8_len(gateway_id) if isinstance(gateway_id, str) else None
    if gw_len is None or not 1 <= gw_len <= MAX_GATEWAY_ID_BYTES:
        raise WireEncodeError(f"gateway id must be 1..{MAX_GATEWAY_ID_BYTES} UTF-8 bytes")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise WireEncodeError(f"batch seq must be an int in 0..2**64-1, got {seq!r}")
    if type(key_id) is not int or not 0 <= key_id <= MAX_KEY_ID:
        raise WireEncodeError(f"key id must be an int in 0..2**32-1, got {key_id!r}")
    raw_epoch = _epoch_raw(epoch)
    out = bytearray((VERSION if raw_epoch else LEGACY_VERSION, int(compression)))
    _put_uvarint(out, key_id)
    gw = gateway_id.encode("utf-8")
    out.append(len(gw))
    out += gw
    out += raw_epoch
    _put_uvarint(out, seq)
    return bytes(out)


def _seal(
    gateway_id: str,
    seq: int,
    plaintext: bytes,
    *,
    epoch: str,
    key: bytes,
    key_id: int,
    compression: Compression | None,
    nonce: bytes | None,
) -> bytes:
    _epoch_raw(epoch)  # a bad epoch fails before any compression work
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise WireEncodeError(f"batch plaintext of {len(plaintext)} bytes exceeds limit")
    if not isinstance(key, bytes | bytearray) or len(key) not in KEY_BYTES:
        raise WireEncodeError("key must be 16, 24 or 32 bytes")
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise WireEncodeError(f"nonce must be {NONCE_BYTES} bytes")
    if compression is None:
        # One compression, chosen by size (docs/wire-format.md, §4): DEFLATE for a
        # batch of a few records, where LZMA's set-up costs more than it saves.
        m = Compression.LZMA if len(plaintext) > LZMA_FROM_BYTES else Compression.ZLIB
        candidates = [(_compress(plaintext, m), m), (plaintext, Compression.NONE)]
        body, method = min(candidates, key=lambda c: (len(c[0]), c[1]))
    else:
        method = Compression(compression)
        body = _compress(plaintext, method)
    header = _header(gateway_id, epoch, seq, key_id, method)
    sealed = AESGCM(bytes(key)).encrypt(nonce, body, _AAD_LABEL + header)
    return header + nonce + sealed


def encode_batch(
    gateway_id: str,
    seq: int,
    records: Sequence[RecordLike],
    *,
    epoch: str,
    key: bytes,
    key_id: int,
    compression: Compression | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Encode and seal ``records`` as one uplink batch ``(gateway_id, epoch, seq)``.

    ``epoch``: the outbox's batch epoch (16 hex digits; version byte 0x12), or
    :data:`LEGACY_EPOCH` for the header without one (version byte 0x02, for
    batches numbered before epochs existed). ``compression=None`` compresses a plaintext
    above :data:`LZMA_FROM_BYTES` with LZMA, a smaller one with DEFLATE, once (none
    when that does not help). ``nonce=None`` draws a fresh random 96-bit nonce;
    pass a nonce only from a source that never repeats one for this key
    (see docs/wire-format.md, "Nonces"). Raises :class:`WireEncodeError`.
    """
    if len(records) > MAX_RECORDS:
        raise WireEncodeError(f"{len(records)} records exceed the batch limit {MAX_RECORDS}")
    rows = [_analyse(rec) for rec in records]
    return _seal(
        gateway_id,
        seq,
        _encode_plaintext(rows),
        epoch=epoch,
        key=key,
        key_id=key_id,
        compression=compression,
        nonce=nonce,
    )


def _read_header(r: _Reader) -> tuple[BatchHeader, int]:
    """The header fields and the compression byte; the reader ends at the nonce."""
    version = r.byte()
    if version not in (VERSION, LEGACY_VERSION):
        raise WireVersionError(f"unsupported wire encoding version {version}")
    method = r.byte()
    if method not in tuple(Compression):
        raise WireFormatError(f"unknown compression {method}")
    key_id = r.uvarint()
    if key_id > MAX_KEY_ID:
        raise WireFormatError(f"key id {key_id} out of range")
    gw_len = r.byte()
    if not 1 <= gw_len <= MAX_GATEWAY_ID_BYTES:
        raise WireFormatError(f"gateway id length {gw_len} out of range")
    try:
        gateway_id = r.take(gw_len).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError("gateway id is not valid UTF-8") from exc
    epoch = epoch_text(r.take(EPOCH_BYTES)) if version == VERSION else LEGACY_EPOCH
    seq = r.uvarint()
    if seq > MAX_SEQ:
        raise WireFormatError(f"batch seq {seq} out of range")
    return BatchHeader(version, key_id, gateway_id, epoch, seq), method


def batch_header(payload: bytes) -> BatchHeader:
    """The cleartext header of a sealed batch, without opening it (the gateway reads
    the key id of a batch it made; nothing here is authenticated). Raises
    :class:`WireFormatError`."""
    return _read_header(_Reader(bytes(payload)))[0]


def decode_batch(payload: bytes, key_lookup: Callable[[str, int], bytes | None]) -> DecodedBatch:
    """Verify, decrypt and decode one batch (version byte 0x12, or legacy 0x02).

    ``key_lookup(gateway_id, key_id)`` returns the key or None when unknown.
    Raises only :class:`WireError` subclasses (plus whatever ``key_lookup``
    itself raises).
    """
    head, plaintext, digest = _open(payload, key_lookup)
    records = _guarded(lambda: _records(_columns(plaintext)))
    return DecodedBatch(head.gateway_id, head.seq, head.key_id, records, head.epoch, digest)


def decode_batch_rows(payload: bytes, key_lookup: Callable[[str, int], bytes | None]) -> DecodedRows:
    """:func:`decode_batch`, with the readings as flat rows instead of records
    (:class:`DecodedRows`): what a store that keeps readings as rows needs, without
    a record object, body and value map per reading. Checks and raises exactly as
    :func:`decode_batch` does."""
    head, plaintext, digest = _open(payload, key_lookup)
    gw, seq, epoch = head.gateway_id, head.seq, head.epoch
    c = _guarded(lambda: _columns(plaintext))
    rows, classes, others = _guarded(lambda: _reading_rows(c, gw, seq, epoch))
    return DecodedRows(gw, seq, head.key_id, len(c.tags), rows, classes, tuple(others), epoch, digest)


_T = TypeVar("_T")


def _guarded(step: Callable[[], _T]) -> _T:
    try:
        return step()
    except WireError:
        raise
    except (
        ArithmeticError,
        IndexError,
        KeyError,
        MemoryError,
        RecursionError,
        StopIteration,
        TypeError,
        ValueError,
    ) as exc:  # defensive: the checks should leave nothing to land here
        raise WireFormatError(f"undecodable batch body: {exc!r}") from exc


def _open(payload: bytes, key_lookup: Callable[[str, int], bytes | None]) -> tuple[BatchHeader, bytes, bytes]:
    """The header, the decrypted and decompressed plaintext and the digest of a batch."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise WireFormatError("payload must be bytes")
    payload = bytes(payload)
    r = _Reader(payload)
    head, method = _read_header(r)
    key_id, gateway_id, seq = head.key_id, head.gateway_id, head.seq
    header = payload[: r.pos]
    nonce = r.take(NONCE_BYTES)
    sealed = payload[r.pos :]
    if len(sealed) < TAG_BYTES:
        raise WireFormatError("payload shorter than the authentication tag")
    if len(sealed) > MAX_PLAINTEXT_BYTES + TAG_BYTES:
        raise WireFormatError("payload exceeds the size limit")
    key = key_lookup(gateway_id, key_id)
    if key is None:
        raise WireKeyError(f"no key {key_id} for gateway {gateway_id!r}")
    if not isinstance(key, bytes | bytearray) or len(key) not in KEY_BYTES:
        raise WireKeyError(f"key {key_id} for gateway {gateway_id!r} is not an AES key")
    try:
        body = AESGCM(bytes(key)).decrypt(nonce, sealed, _AAD_LABEL + header)
    except InvalidTag as exc:
        raise WireAuthError(
            f"batch {seq} from {gateway_id!r} failed authentication (altered or wrong key)"
        ) from exc
    return head, _decompress(body, method), hashlib.sha256(payload).digest()


# --------------------------------------------------------------------------- packing


def pack_batch(
    gateway_id: str,
    seq: int,
    records: Sequence[RecordLike],
    *,
    epoch: str,
    key: bytes,
    key_id: int,
    max_bytes: int,
    compression: Compression | None = None,
) -> PackedBatch:
    """Seal the longest prefix of ``records`` whose batch fits in ``max_bytes``.

    The returned payload was measured, so ``len(payload) <= max_bytes`` holds.
    The count is the largest prefix that fits, found by a search that assumes
    the size grows with the count (compression can make it wobble by a few
    bytes, so the count may be a record or two short of the true maximum).
    Raises :class:`WireBudgetError` when not even one record fits and
    ``records`` is not empty. At most :data:`MAX_RECORDS` records are taken.
    Typically costs 3–6 trial encodings (secant guesses with a bisection
    fallback, so never more than about 2·log2(len(records))).
    """
    if len(records) > MAX_RECORDS:
        records = records[:MAX_RECORDS]
    rows = [_analyse(rec) for rec in records]

    def seal(n: int) -> bytes:
        return _seal(
            gateway_id,
            seq,
            _encode_plaintext(rows[:n]),
            epoch=epoch,
            key=key,
            key_id=key_id,
            compression=compression,
            nonce=None,
        )

    full = seal(len(rows))
    if len(full) <= max_bytes:
        return PackedBatch(full, len(rows))
    # Bracket: lo fits (0 records always "fits" for the search), hi does not.
    lo, lo_size, lo_payload = 0, len(seal(0)), b""
    hi, hi_size = len(rows), len(full)
    bisect_next = False
    while hi - lo > 1:
        width = hi - lo
        if bisect_next:
            mid = (lo + hi) // 2
        else:
            # Secant guess of the largest count that fits; sizes are close to
            # linear in the count, so this usually lands within a record or two.
            per_record = max(hi_size - lo_size, 1) / width
            mid = lo + int((max_bytes - lo_size) / per_record)
            mid = min(max(mid, lo + 1), hi - 1)
        payload = seal(mid)
        if len(payload) <= max_bytes:
            lo, lo_size, lo_payload = mid, len(payload), payload
        else:
            hi, hi_size = mid, len(payload)
        if not bisect_next and hi - lo > 1:
            # Probe just past a fitting guess (or just below a failing one)
            # to close the bracket from the other side.
            per_record = max(hi_size - lo_size, 1) / (hi - lo)
            if lo == mid:
                probe = min(hi - 1, lo + 1 + int((max_bytes - lo_size) / per_record))
            else:
                probe = max(lo + 1, hi - 1 - int((hi_size - max_bytes) / per_record))
            payload = seal(probe)
            if len(payload) <= max_bytes:
                lo, lo_size, lo_payload = probe, len(payload), payload
            else:
                hi, hi_size = probe, len(payload)
        bisect_next = hi - lo > width // 2
    if lo == 0:
        needed = len(seal(1))
        raise WireBudgetError(
            f"one record needs {needed} bytes, budget is {max_bytes}", needed=needed
        )
    return PackedBatch(lo_payload, lo)
