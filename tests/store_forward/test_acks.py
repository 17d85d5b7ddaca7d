"""Acks bound to the batch (pure): the MAC, the document, and the batch epoch's forms."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store_forward import wire_json
from store_forward.acks import (
    ACK_STATUSES,
    Ack,
    AckError,
    ack_key,
    ack_mac,
    encode_ack,
    parse_ack,
    verify_ack,
)
from store_forward.batch_epoch import (
    LEGACY_EPOCH,
    EpochFormatError,
    check_epoch,
    epoch_bytes,
    epoch_text,
    new_epoch,
)
from store_forward.records import Record, RecordClass

epochs = st.one_of(st.just(LEGACY_EPOCH), st.binary(min_size=8, max_size=8).map(bytes.hex))
fields = st.fixed_dictionaries(
    {
        "gateway_id": st.text(
            st.characters(codec="utf-8"), min_size=1, max_size=40
        ),
        "epoch": epochs,
        "seq": st.integers(0, (1 << 64) - 1),
        "key_id": st.integers(0, 0xFFFF_FFFF),
        "status": st.sampled_from(sorted(ACK_STATUSES)),
        "digest": st.binary(min_size=32, max_size=32),
    }
)


def _ack(f: dict[str, Any], key: bytes) -> Ack:
    mac = ack_mac(key, **f)
    return parse_ack(encode_ack(seq=f["seq"], epoch=f["epoch"], status=f["status"], records=3, mac=mac))


def _verify(ack: Ack, key: bytes, f: dict[str, Any]) -> bool:
    return verify_ack(
        ack,
        key,
        gateway_id=f["gateway_id"],
        epoch=f["epoch"],
        seq=f["seq"],
        key_id=f["key_id"],
        digest=f["digest"],
    )


@settings(max_examples=300, deadline=None)
@given(f=fields, batch_key=st.binary(min_size=32, max_size=32), data=st.data())
def test_an_ack_verifies_for_its_batch_only(
    f: dict[str, Any], batch_key: bytes, data: st.DataObject
) -> None:
    key = ack_key(batch_key)
    ack = _ack(f, key)
    assert _verify(ack, key, f)
    # Any other batch, key id, payload or status: the MAC no longer verifies.
    name = data.draw(st.sampled_from(sorted(f)))
    other = dict(f)
    other[name] = data.draw(fields)[name]
    if other[name] != f[name]:
        if name == "status":  # the ack claims another status than the one MAC'd
            forged = Ack(ack.seq, ack.epoch, other["status"], ack.records, None, ack.mac)
            assert not _verify(forged, key, f)
        else:
            assert not _verify(ack, key, other)
    # ... and so does the right batch under any other key.
    other_key = ack_key(data.draw(st.binary(min_size=32, max_size=32).filter(lambda k: k != batch_key)))
    assert not _verify(ack, other_key, f)


@settings(max_examples=200, deadline=None)
@given(f=fields, flip=st.integers(0, 255))
def test_a_changed_mac_bit_or_a_missing_mac_is_refused(f: dict[str, Any], flip: int) -> None:
    key = ack_key(bytes(32))
    ack = _ack(f, key)
    assert ack.mac is not None
    bad = bytearray(ack.mac)
    bad[flip // 8] ^= 1 << (flip % 8)
    assert not _verify(Ack(ack.seq, ack.epoch, ack.status, mac=bytes(bad)), key, f)
    assert not _verify(Ack(ack.seq, ack.epoch, ack.status), key, f)


def test_the_ack_key_is_derived_not_the_batch_key_itself() -> None:
    batch_key = bytes(range(32))
    assert ack_key(batch_key) == ack_key(batch_key) != batch_key
    assert len(ack_key(batch_key)) == 32
    # A known answer, so the construction documented in docs/protocol.md cannot drift.
    mac = ack_mac(
        ack_key(batch_key),
        gateway_id="gw-0017",
        epoch="0123456789abcdef",
        seq=42,
        key_id=1,
        status="stored",
        digest=hashlib.sha256(b"batch").digest(),
    )
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    k = HKDFExpand(algorithm=hashes.SHA256(), length=32, info=b"edgegw/ack-key/v1").derive(batch_key)
    msg = (
        b"edgegw/ack/v1\x00"
        + b"\x07gw-0017"
        + b"\x08" + bytes.fromhex("0123456789abcdef")
        + (42).to_bytes(8, "big")
        + (1).to_bytes(4, "big")
        + b"\x06stored"
        + hashlib.sha256(b"batch").digest()
    )
    assert mac == hmac.new(k, msg, hashlib.sha256).digest()


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(0, (1 << 64) - 1),
    epoch=epochs,
    status=st.sampled_from(sorted(ACK_STATUSES)),
    records=st.one_of(st.none(), st.integers(0, 10**6)),
    reason=st.one_of(st.none(), st.text(max_size=100)),
    mac=st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
)
def test_ack_documents_round_trip(
    seq: int, epoch: str, status: str, records: int | None, reason: str | None, mac: bytes | None
) -> None:
    doc = encode_ack(seq=seq, epoch=epoch, status=status, records=records, reason=reason, mac=mac)
    assert parse_ack(doc) == Ack(seq, epoch, status, records, reason, mac)


def test_an_ack_from_a_headend_before_epochs_names_the_legacy_epoch() -> None:
    assert parse_ack(b'{"seq": 7, "status": "stored", "records": 2}') == Ack(7, "", "stored", 2)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"junk",
        b"[1, 2]",
        b'{"status": "stored"}',
        b'{"seq": "1", "status": "stored"}',
        b'{"seq": -1, "status": "stored"}',
        b'{"seq": 1.0, "status": "stored"}',
        b'{"seq": true, "status": "stored"}',
        b'{"seq": 1, "status": "deleted"}',
        b'{"seq": 1, "status": "stored", "epoch": "XYZ"}',
        b'{"seq": 1, "status": "stored", "epoch": 5}',
        b'{"seq": 1, "status": "stored", "mac": "00"}',
        b'{"seq": 1, "status": "stored", "mac": 5}',
        b'{"seq": 1, "status": "stored", "records": -2}',
        b'{"seq": 1, "status": "rejected", "reason": {"x": 1}}',
        b'{"seq": 1, "status": "stored", "pad": "' + b"x" * 5000 + b'"}',
        "not bytes",
        None,
    ],
)
def test_malformed_acks_are_refused_with_their_cause(payload: Any) -> None:
    with pytest.raises(AckError) as exc:
        parse_ack(payload)
    assert exc.value.cause == "malformed"


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(1 << 63), (1 << 64) - 1)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.sampled_from(["stored", "duplicate", "rejected", "conflict", "0123456789abcdef", "00" * 32])
            | st.text(st.characters(codec="utf-8"), max_size=20),
            lambda c: st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(["seq", "status", "epoch", "mac", "records", "reason"]), c, max_size=6
            ),
            max_leaves=12,
        ).map(orjson.dumps),
    )
)
def test_parse_ack_raises_nothing_but_ack_errors(payload: bytes) -> None:
    try:
        ack = parse_ack(payload)
    except AckError:
        return
    assert ack.status in ACK_STATUSES and 0 <= ack.seq < 1 << 64


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(min_size=8, max_size=8))
def test_epoch_forms_round_trip(raw: bytes) -> None:
    text = epoch_text(raw)
    assert check_epoch(text, legacy=False) == text and epoch_bytes(text) == raw
    assert epoch_text(b"") == LEGACY_EPOCH and epoch_bytes(LEGACY_EPOCH) == b""


def test_epochs_are_random_and_checked() -> None:
    assert len({new_epoch() for _ in range(100)}) == 100
    for bad in ("", "0123456789ABCDEF", "0123", "g123456789abcdef", None, 5):
        with pytest.raises(EpochFormatError):
            check_epoch(bad, legacy=False)
    with pytest.raises(EpochFormatError):
        epoch_text(b"1234")


@settings(max_examples=100, deadline=None)
@given(epoch=epochs, seq=st.integers(1, 1 << 40), n=st.integers(0, 5))
def test_the_json_encoding_carries_the_epoch(epoch: str, seq: int, n: int) -> None:
    records = [Record(i + 1, RecordClass.EVENT, "event", i, {"type": "x", "i": i}) for i in range(n)]
    payload = wire_json.encode("gw-j", seq, records, epoch=epoch)
    assert payload[0] == (wire_json.VERSION if epoch else wire_json.LEGACY_VERSION)
    batch = wire_json.decode(payload)
    assert (batch.gateway_id, batch.epoch, batch.seq, list(batch.records)) == ("gw-j", epoch, seq, records)
    assert batch.digest == hashlib.sha256(payload).digest()


def test_a_json_batch_from_before_epochs_still_decodes() -> None:
    # Encoding 1 as made before batch epochs existed (version byte 0x01), byte for byte.
    legacy = bytes.fromhex(
        "01789c5d8bdb0ac3201044ff659e4d517b09f82ba584348a95546d551244fcf76ea14f9d87619973b6c1ee505483"
        "361b18b279439d19925962d219eadae034d4c8b0ba40079159bb60c95d9ec40543a11ef92f421e19ee5157a806"
        "4fbe1fb8c09f44a185be916b2ec613dfbebe0926d93a39ff8aa94cebfe2043487e399c247aefb7fe01ff0231ee"
    )
    batch = wire_json.decode(legacy)
    assert (batch.gateway_id, batch.epoch, batch.seq) == ("gw-dev", LEGACY_EPOCH, 5)
    assert [r.id for r in batch.records] == [7]
    assert wire_json.encode("gw-dev", 5, list(batch.records), epoch=LEGACY_EPOCH) == legacy
    # A new-form document must carry a valid epoch; an old-form one must not carry one.
    import zlib

    for version, doc in (
        (wire_json.VERSION, {"gw": "g", "seq": 1, "records": []}),
        (wire_json.VERSION, {"gw": "g", "seq": 1, "epoch": "zz", "records": []}),
        (wire_json.LEGACY_VERSION, {"gw": "g", "seq": 1, "epoch": new_epoch(), "records": []}),
    ):
        with pytest.raises(wire_json.BatchDecodeError):
            wire_json.decode(bytes([version]) + zlib.compress(orjson.dumps(doc)))
