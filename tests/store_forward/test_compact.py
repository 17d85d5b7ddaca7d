"""Compact documents at rest (store_forward.compact): exact round trips, the old
plain form still read, and any other bytes refused with CompactError only."""

from __future__ import annotations

import hashlib
import zlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store_forward.compact import DEFLATED, DICTIONARY, CompactError, pack, unpack

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
documents = st.dictionaries(st.text(max_size=20), json_values, max_size=8).map(
    lambda d: orjson.dumps(d, option=orjson.OPT_SORT_KEYS)
)

DEBIT = (
    b'{"account":"acct-0412","amount_micro":-16800,"body":{"apportioning":"none","ckwh":3,"end_ms":1796418845450,'
    b'"end_reading_id":"512345","lines":[{"amount_micro":16800,"ckwh":3,"price_e4":5600,"rate":"flat",'
    b'"tariff":"flat-basic@1","tier":null,"tier_period_start_ms":null}],"meter":"m0412","start_ms":1796418785450,'
    b'"start_reading_id":"509345"},"id":"debit:t1a242e7e1ea9a1b2c3d4e5f60718293a","kind":"debit","seq":77,'
    b'"time_ms":1796418845450}'
)
BILLING = b'{"m":"m0412","t":1796418845450,"ts":"system","v":{"energy_export_kwh":"0.00","energy_import_kwh":"8812.07"}}'


def test_the_dictionary_never_changes() -> None:
    # Documents stored with it inflate only with these very bytes: a new dictionary
    # is a new format byte, never an edit of this one.
    assert hashlib.sha256(DICTIONARY).hexdigest() == "47fa694dea4648ab7267054bdd61c95af86356f6aa3f0698ed285d0f0bb5354e"
    assert len(DICTIONARY) <= 32 * 1024  # deflate's window


@given(documents)
@settings(max_examples=300, deadline=None)
def test_round_trip_is_exact(doc: bytes) -> None:
    stored = pack(doc)
    assert unpack(stored) == doc
    assert len(stored) <= len(doc)  # never longer than the plain form
    assert stored[0] in (DEFLATED, ord("{"))


def test_the_gateways_documents_shrink_to_a_third() -> None:
    for doc in (DEBIT, BILLING):
        stored = pack(doc)
        assert stored[0] == DEFLATED and 3 * len(stored) < len(doc), (len(stored), len(doc))
        assert unpack(stored) == doc


def test_documents_stored_plain_before_are_read_as_they_are() -> None:
    assert unpack(DEBIT) == DEBIT
    assert unpack(b"{}") == b"{}"


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_any_bytes_either_decode_to_a_json_object_or_are_refused(blob: bytes) -> None:
    try:
        out = unpack(blob, max_bytes=4096)
    except CompactError:
        return
    assert out[:1] == b"{" and len(out) <= 4096


def _deflated(data: bytes) -> bytes:
    d = zlib.compressobj(6, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
    return bytes((DEFLATED,)) + d.compress(data) + d.flush()


@pytest.mark.parametrize(
    ("stored", "why"),
    [
        (b"", "empty document"),
        (b"\x02abc", "unknown document format 0x02"),
        (b"[1,2]", "unknown document format 0x5b"),
        (_deflated(DEBIT)[:-6], "truncated"),
        (_deflated(DEBIT) + b"\x00\x01", "2 bytes after the deflated document"),
        (_deflated(b"[1,2,3]"), "not a JSON object"),
        (bytes((DEFLATED,)) + b"\xff\xff\xff\xff", "does not inflate"),
    ],
)
def test_damaged_documents_say_what_is_wrong(stored: bytes, why: str) -> None:
    with pytest.raises(CompactError, match=why):
        unpack(stored)


def test_a_document_that_inflates_beyond_the_bound_is_refused_without_inflating_it() -> None:
    bomb = _deflated(b"{" + b" " * 5_000_000 + b"}")
    assert len(bomb) < 10_000
    with pytest.raises(CompactError, match="beyond 100000 bytes"):
        unpack(bomb, max_bytes=100_000)
    with pytest.raises(CompactError, match="more than 10 bytes"):
        unpack(b'{"a":"0123456789"}', max_bytes=10)


def test_only_json_objects_are_packed() -> None:
    with pytest.raises(CompactError, match="JSON object"):
        pack(b"[1]")
