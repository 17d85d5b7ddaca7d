"""The encoding-2 test vectors in docs/vectors/encoding2.json: what the encoder makes
today, and every one decodes with the real decoder to the JSON it records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from store_forward import wire
from store_forward.acks import ack_key, parse_ack, verify_ack
from store_forward.codec import decode
from store_forward.uplink_keys import derive_uplink_key, fingerprint
from testbed import wire_vectors

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "docs" / "vectors" / "encoding2.json"
DOC = json.loads(VECTORS.read_text())


def test_the_file_is_what_the_encoder_makes_today() -> None:
    # regenerate with: python -m testbed.wire_vectors docs/vectors/encoding2.json
    assert VECTORS.read_bytes() == wire_vectors.render(wire_vectors.build())


def _lookup(v: dict[str, Any]) -> Any:
    key = bytes.fromhex(v["key_hex"])
    gw = v["decoded"]["gateway_id"] if "decoded" in v else v["gateway_id"]
    return lambda g, k: key if (g, k) == (gw, v["key_id"]) else None


@pytest.mark.parametrize("v", DOC["vectors"], ids=[v["name"] for v in DOC["vectors"]])
def test_every_vector_decodes_to_its_json(v: dict[str, Any]) -> None:
    payload = bytes.fromhex(v["payload_hex"])
    batch = wire.decode_batch(payload, _lookup(v))
    got = {
        "gateway_id": batch.gateway_id, "epoch": batch.epoch, "seq": batch.seq, "key_id": batch.key_id,
        "records": [wire_vectors.record_json(r) for r in batch.records],
    }
    # through JSON, as another implementation would compare it
    assert json.loads(json.dumps(got)) == v["decoded"]
    assert batch.digest.hex() == v["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    h = wire.batch_header(payload)
    assert [h.version, h.key_id, h.gateway_id, h.epoch, h.seq] == [
        v["header"][k] for k in ("version", "key_id", "gateway_id", "epoch", "seq")
    ]
    assert payload[1] == wire.Compression[v["compression"].upper()]
    assert payload[v["header"]["length"] : v["header"]["length"] + 12].hex() == v["nonce_hex"]
    # the plaintext recorded is what decryption and decompression give
    assert wire_vectors._decompress(
        wire_vectors._open(payload, bytes.fromhex(v["key_hex"]), v["header"]["length"]),
        wire.Compression(payload[1]),
    ).hex() == v["plaintext_hex"]
    # and the headend's decoder takes it the same way
    assert decode(payload, _lookup(v), allow_plain=False).records == batch.records


def test_the_vectors_cover_the_format() -> None:
    vs = DOC["vectors"]
    assert {v["compression"] for v in vs} == {"none", "zlib", "lzma"}
    kinds = {r["kind"] for v in vs for r in v["decoded"]["records"]}
    assert kinds == {"reading", "event", "charge"}
    assert {r["cls"] for v in vs for r in v["decoded"]["records"]} == {0, 1, 2}
    assert {v["header"]["version"] for v in vs} == {wire.VERSION, wire.LEGACY_VERSION}
    assert any(not v["decoded"]["records"] for v in vs)
    assert any(len(v["key_hex"]) == 32 for v in vs)  # AES-128 as well as AES-256
    assert any("q" in r["body"] for v in vs for r in v["decoded"]["records"])


@pytest.mark.parametrize("bad", DOC["invalid"], ids=[b["name"] for b in DOC["invalid"]])
def test_every_invalid_vector_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(getattr(wire, bad["error"])):
        wire.decode_batch(bytes.fromhex(bad["payload_hex"]), _lookup(bad))


def test_key_derivation_and_ack() -> None:
    kdf = DOC["key_derivation"]
    gw = X25519PrivateKey.from_private_bytes(bytes.fromhex(kdf["gateway_private_hex"]))
    he = X25519PrivateKey.from_private_bytes(bytes.fromhex(kdf["headend_private_hex"]))
    he_pub = he.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert he_pub.hex() == kdf["headend_public_hex"]
    assert gw.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex() == kdf["gateway_public_hex"]
    shared = he.exchange(gw.public_key())
    assert shared.hex() == kdf["shared_secret_hex"]
    assert fingerprint(he_pub) == kdf["headend_fingerprint"] and kdf["headend_fingerprint"] in kdf["info"]
    key = derive_uplink_key(shared, kdf["gateway_id"], he_pub, kdf["key_id"])
    assert key.hex() == kdf["key_hex"]
    derived = next(v for v in DOC["vectors"] if v["name"] == kdf["vector"])
    assert derived["key_hex"] == kdf["key_hex"]

    a = DOC["ack"]
    v = next(v for v in DOC["vectors"] if v["name"] == a["vector"])
    assert ack_key(bytes.fromhex(v["key_hex"])).hex() == a["ack_key_hex"]
    ack = parse_ack(json.dumps(a["ack_json"]).encode())
    assert ack.mac is not None and ack.mac.hex() == a["mac_hex"]
    assert verify_ack(
        ack, bytes.fromhex(a["ack_key_hex"]), gateway_id=v["header"]["gateway_id"],
        epoch=v["header"]["epoch"], seq=v["header"]["seq"], key_id=v["key_id"],
        digest=bytes.fromhex(v["payload_sha256"]),
    )
