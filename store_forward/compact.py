"""Compact JSON documents at rest: deflated against a fixed dictionary.

The gateway stores three small JSON documents for every reading (its billing
and telemetry records and, for a debit, the ledger entry's charge record) and
the ledger entry's own body. Each is a few hundred bytes of the same key names,
enumerations and digits; deflate on its own saves little on documents this
small, but deflate that starts from a dictionary of such documents stores only
what differs. On a site of a thousand meters those bytes are most of what the
database writes to the card (docs/benchmarks.md).

Format of a stored document:

* ``{`` ... — plain JSON, as every document was stored before this encoding,
  and as a document is still stored when deflating would not make it smaller;
* ``0x01`` + raw deflate (RFC 1951) with :data:`DICTIONARY` as preset
  dictionary.

The dictionary is part of the storage format: a document deflated with it can
only be inflated with the same bytes, so it never changes
(tests/store_forward/test_compact.py pins its hash). A better dictionary would
be a new format byte, beside this one.

Pure functions. :func:`unpack` raises only :class:`CompactError` (a
``ValueError``) for any input, and never inflates beyond ``max_bytes``.
"""

from __future__ import annotations

import zlib

from firmware_bridge.errors import EdgeGwError, ErrorKind

__all__ = ["DEFLATED", "DICTIONARY", "MAX_DOCUMENT_BYTES", "CompactError", "pack", "unpack"]

DEFLATED = 0x01
_PLAIN = ord("{")
MAX_DOCUMENT_BYTES = 1 << 20  # far above any record or ledger body (a few KB at most)

# Documents as the gateway writes them (keys sorted, as records.dumps and
# Entry.body_json write them), rarest first: deflate reaches the end of the
# dictionary with the shortest distances. Values are typical, not real.
_SAMPLES: tuple[bytes, ...] = (
    b'{"type":"records_damaged","ids":[1]}',
    b'{"issuer":"provisioning","reason":"opening balance from the account file"}',
    b'{"name":"service","period":"month","period_start_ms":1796417844940,"tariff":"flat-basic@1"}',
    b'{"as_of_seq":12,"authorization":{"issuer":"central","key_id":"billing-1","verified_at_ms":1796417844940},'
    b'"central_seq":3,"included_ids":["topup:sale-1"],"purchase_counter":2,"snapshot_id":"snap-1",'
    b'"tier_cumulative_ckwh":0,"tier_period_start_ms":null}',
    b'{"account":"acct-0001","amount_micro":10000000,"body":{"authorization":{"issuer":"central","key_id":"billing-1",'
    b'"verified_at_ms":1796417844940},"channel":"counter","counted_centrally":false,"counter":1,'
    b'"issued_ms":1796417844940,"overdraft_repaid_micro":0,"source":"central","topup_id":"sale-1"},'
    b'"id":"topup:sale-1","kind":"credit","seq":2,"time_ms":1796417844940}',
    b'{"m":"m0001","q":{"voltage_v":"suspect"},"t":1796417845450,"ts":"system_synced","v":{"current_a":"5.123",'
    b'"current_b_a":"5.121","current_c_a":"5.118","frequency_hz":"50.01","power_factor":"0.981","power_kw":"1.2345",'
    b'"voltage_b_v":"230.2","voltage_c_v":"229.8","voltage_v":"230.4"}}',
    b'{"m":"m0001","t":1796417845450,"ts":"system","v":{"energy_export_kwh":"0.00","energy_import_kwh":"1234.56",'
    b'"energy_import_t1_kwh":"300.10","energy_import_t2_kwh":"400.20","energy_import_t3_kwh":"500.30",'
    b'"energy_import_t4_kwh":"34.96","meter_clock_s":"1796417845","relay_open":"0"}}',
    b'{"apportioning":"linear","ckwh":2,"end_ms":1796417845450,"end_reading_id":"1623","lines":[{"amount_micro":11200,'
    b'"ckwh":2,"price_e4":5600,"rate":"peak","tariff":"tou-residential@2","tier":1,'
    b'"tier_period_start_ms":1796417844940}],"meter":"m0001","start_ms":1796417844956,"start_reading_id":"1620"}',
    b'{"m":"m0001","t":1796417845450,"ts":"system","v":{"current_a":"5.123","power_factor":"0.98","power_kw":"1.2345",'
    b'"voltage_v":"230.4"}}',
    b'{"m":"m0001","t":1796417845450,"ts":"system","v":{"energy_export_kwh":"0.00","energy_import_kwh":"1234.56"}}',
    b'{"account":"acct-0001","amount_micro":-11200,"body":{"apportioning":"none","ckwh":2,"end_ms":1796417845450,'
    b'"end_reading_id":"1623","lines":[{"amount_micro":11200,"ckwh":2,"price_e4":5600,"rate":"flat",'
    b'"tariff":"flat-basic@1","tier":null,"tier_period_start_ms":null}],"meter":"m0001","start_ms":1796417844956,'
    b'"start_reading_id":"1620"},"id":"debit:t1a242d8f8ca4120b2356dd3129bfcf7","kind":"debit","seq":1234,'
    b'"time_ms":1796417845450}',
)
DICTIONARY: bytes = b"".join(_SAMPLES)


class CompactError(EdgeGwError, ValueError):
    """A stored document that does not decode."""

    kind = ErrorKind.STORAGE


def pack(document: bytes) -> bytes:
    """``document`` (a JSON object's bytes) as stored: deflated when that is shorter."""
    if document[:1] != b"{":
        raise CompactError("only a JSON object's bytes are packed")
    # Level 6 is as small as 9 on documents this size. An 8 KiB window still reaches
    # the whole dictionary from any byte of a document of up to 5 KiB, and with it
    # and a smaller hash (memory level 5) a deflater is set up in a third of the time
    # of the defaults, which is most of the cost at this size. Any raw deflate stream
    # inflates with :func:`unpack`'s 32 KiB window.
    deflater = zlib.compressobj(6, zlib.DEFLATED, -13, 5, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
    packed = bytes((DEFLATED,)) + deflater.compress(document) + deflater.flush()
    return packed if len(packed) < len(document) else document


def unpack(stored: bytes, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The JSON document ``stored`` holds (:func:`pack`, or plain JSON as stored before)."""
    if not stored:
        raise CompactError("empty document")
    head = stored[0]
    if head == _PLAIN:
        if len(stored) > max_bytes:
            raise CompactError(f"document of {len(stored)} bytes, more than {max_bytes} bytes")
        return stored
    if head != DEFLATED:
        raise CompactError(f"unknown document format 0x{head:02x}")
    inflater = zlib.decompressobj(-15, DICTIONARY)
    try:
        out = inflater.decompress(stored[1:], max_bytes + 1)
    except zlib.error as exc:
        raise CompactError(f"deflated document does not inflate: {exc}") from None
    if len(out) > max_bytes:
        raise CompactError(f"deflated document inflates beyond {max_bytes} bytes")
    if not inflater.eof:
        raise CompactError("deflated document is truncated")
    if inflater.unused_data:
        raise CompactError(f"{len(inflater.unused_data)} bytes after the deflated document")
    if out[:1] != b"{":
        raise CompactError("deflated document is not a JSON object")
    return out
