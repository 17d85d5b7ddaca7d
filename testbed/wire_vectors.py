"""Encoding-2 test vectors for decoders written outside this project.

``python -m testbed.wire_vectors docs/vectors/encoding2.json`` writes the
file from the real encoder (:func:`store_forward.wire.encode_batch`) with
fixed keys, nonces and compressions, so the output is the same on every run
(tests/store_forward/test_wire_vectors.py checks that the file in docs/ is
what this module makes, and decodes every vector with the real decoder).

Each vector holds the sealed batch (``payload_hex``), the key it opens under,
the plaintext after decryption and decompression (``plaintext_hex``: the
columnar stage of docs/wire-format.md §3, to debug a parser apart from the
crypto), and the decoded batch as JSON. ``invalid`` vectors are payloads a
decoder must refuse, with the error class the reference decoder raises.
``key_derivation`` derives an uplink key from two X25519 keys
(:mod:`store_forward.uplink_keys`) and ``ack`` computes an ack MAC
(:mod:`store_forward.acks`) for one of the vectors. docs/integration.md
explains how to use them.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firmware_bridge.reading import QUANTITY_CODES
from store_forward import wire
from store_forward.acks import ack_key, ack_mac
from store_forward.batch_epoch import LEGACY_EPOCH
from store_forward.uplink_keys import derive_uplink_key, fingerprint
from store_forward.wire import Compression, WireRecord

FORMAT = "edgegw-encoding2-vectors/1"
AAD_LABEL = b"edgegw/uplink\x00"

KEY_256 = bytes(range(32))  # 000102…1f
KEY_128 = bytes.fromhex("c0ffee00112233445566778899aabbcc")
EPOCH = "0123456789abcdef"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _nonce(i: int) -> bytes:
    """A distinct fixed nonce per vector (the encoder draws random ones in use)."""
    return bytes.fromhex("a0a1a2a3a4a5a6a7") + i.to_bytes(4, "big")


def _reading(rid: int, meter: str, t: int, values: dict[str, str], *, ts: str = "system_synced",
             q: dict[str, str] | None = None, cls: int = 1, lag_ms: int = 40) -> WireRecord:
    body: dict[str, Any] = {"m": meter, "t": t, "ts": ts, "v": values}
    if q:
        body["q"] = q
    return WireRecord(rid, "reading", t + lag_ms, body, cls)


def _event(rid: int, created: int, body: dict[str, Any]) -> WireRecord:
    return WireRecord(rid, "event", created, body, 0)


def _charge(rid: int, created: int, body: dict[str, Any]) -> WireRecord:
    return WireRecord(rid, "charge", created, body, 1)


def _one_meter() -> list[WireRecord]:
    return [
        _reading(1 + i, "m001", T0 + i * 900_000, {"energy_import_kwh": f"{1206.42 + i * 0.37:.2f}"})
        for i in range(3)
    ]


def _three_meters() -> list[WireRecord]:
    out: list[WireRecord] = []
    rid = 100
    for cycle in range(3):
        for k, meter in enumerate(("000001020304", "000001020305", "000001020306")):
            base = 5000 + 1000 * k + 13 * cycle + k
            vals = {
                "energy_import_kwh": f"{base}.{(17 * cycle + 3 * k) % 100:02d}",
                "energy_import_t1_kwh": f"{base // 4}.{(5 * cycle + k) % 100:02d}",
                "energy_import_t2_kwh": f"{base // 3}.{(7 * cycle) % 100:02d}",
                "energy_import_t3_kwh": f"{base // 5}.{(11 * cycle + k) % 100:02d}",
                "energy_import_t4_kwh": f"{base // 6}.{(3 * cycle) % 100:02d}",
                "relay_open": "0",
            }
            q = {"energy_import_t2_kwh": "suspect"} if (cycle, k) == (1, 2) else None
            ts = "meter" if k == 1 else "system_synced"
            out.append(_reading(rid, meter, T0 + cycle * 60_000 + k * 180 + cycle * 7, vals, ts=ts, q=q))
            rid += 1
    return out


def _telemetry() -> list[WireRecord]:
    """Single-phase telemetry whose current follows P / (V·PF): the predicted column."""
    out = []
    for i in range(6):
        p = 1.2345 + 0.0311 * i  # kW
        v = 229.8 + 0.3 * (i % 3)
        pf = 0.912 + 0.007 * (i % 2)
        current = p * 1000 / (v * pf)
        vals = {
            "power_kw": f"{p:.4f}",
            "voltage_v": f"{v:.1f}",
            "power_factor": f"{pf:.3f}",
            "current_a": f"{current:.3f}",
            "frequency_hz": f"{50 + 0.01 * (i % 4 - 1):.2f}",
        }
        out.append(_reading(500 + i, "m007", T0 + 15_000 * i, vals, ts="system", cls=2))
    return out


def _mixed() -> list[WireRecord]:
    """Events, charges and readings interleaved, as the gateway's outbox sends them."""
    t = T0 + 3_600_000
    return [
        _event(9001, t, {
            "type": "cutoff.state_change", "account": "acct-001", "time_ms": t, "from": "normal",
            "to": "alarm1", "state": "supply on: low balance (alarm 1 at 10.00)",
            "balance_micro": 9_870_000, "balance": "9.87",
            "reason": "balance 9.87 <= alarm 1 level 10.00",
        }),
        _charge(9002, t, {
            "id": "d-m001-1767229200000", "account": "acct-001", "seq": 412, "kind": "debit",
            "amount_micro": -123_456, "time_ms": t,
            "body": {"meter": "m001", "kwh": "0.22", "rate": "T3", "price": "0.5612"},
        }),
        _reading(9003, "m001", t, {"energy_import_kwh": "1210.06", "relay_open": "0"}),
        _event(9004, t + 5_000, {
            "type": "command_result", "command_id": "topup-7f3a", "outcome": "applied",
            "command_type": "topup", "issuer": "billing-1", "channel": "mqtt",
            "effect": {"status": "applied", "account": "acct-001", "balance_after_micro": 59_870_000,
                       "message": "credited 50.00", "overdraft_repaid_micro": 0},
            "at_ms": t + 5_000,
        }),
        _charge(9005, t + 5_000, {
            "id": "topup-7f3a", "account": "acct-001", "seq": 413, "kind": "credit",
            "amount_micro": 50_000_000, "time_ms": t + 5_000, "body": {"channel": "counter", "counter": 8},
        }),
        _event(9006, t + 5_000, {
            "type": "cutoff.state_change", "account": "acct-001", "time_ms": t + 5_000, "from": "alarm1",
            "to": "normal", "state": "supply on", "balance_micro": 59_870_000, "balance": "59.87",
            "reason": "balance 59.87 > alarm 1 level 10.00",
        }),
        _event(9007, t + 6_000, {"type": "meter.offline", "meter": "m002", "time_ms": t + 6_000,
                                 "error": "timeout after 0.5 s", "bus": "rs485-1"}),
        _reading(9008, "m001", t + 60_000, {"energy_import_kwh": "1210.08", "relay_open": "0"}),
    ]


def _edges() -> list[WireRecord]:
    """Exponent spread in a column, negative and zero values, an id jump and a long
    gap (escapes in packed columns), a value absent from some readings (presence
    bitmap), and reading bodies the columnar form cannot carry (sent as JSON)."""
    t = T0 + 86_400_000
    return [
        _reading(10, "m-edge", t, {"energy_import_kwh": "1206.4", "energy_export_kwh": "0",
                                   "power_kw": "-0.0125"}, cls=1),
        _reading(11, "m-edge", t + 1_000, {"energy_import_kwh": "1206.42", "power_kw": "0.0000"}, cls=1),
        _reading(12, "m-edge", t + 2_000, {"energy_import_kwh": "1206.425", "energy_export_kwh": "0.01",
                                           "power_kw": "-3.5"}, cls=1),
        # an id far ahead and a poll after 40 days away: both escape their packed widths
        _reading(1_000_000_012, "m-edge", t + 40 * 86_400_000,
                 {"energy_import_kwh": "99999999.99", "power_kw": "12"}, ts="central", cls=1),
        # not columnar: an unknown quantity name, a value str(Decimal) does not reproduce,
        # an extra key in the body
        _reading(1_000_000_013, "m-edge", t + 40 * 86_400_000 + 10,
                 {"energy_import_kwh": "1.0e3"}, cls=1),
        WireRecord(1_000_000_014, "reading", t + 40 * 86_400_000 + 20,
                   {"m": "m-edge", "t": t, "ts": "system", "v": {"vendor_register_x": "17"}}, 1),
        WireRecord(1_000_000_015, "reading", t + 40 * 86_400_000 + 30,
                   {"m": "m-edge", "t": t, "ts": "system", "v": {"energy_import_kwh": "5"}, "note": "x"}, 1),
    ]


def _unicode() -> list[WireRecord]:
    t = T0 + 2 * 86_400_000
    return [
        _reading(2**40 + 1, "表计-一号", t, {"energy_import_kwh": "12.34"}, ts="meter",
                 q={"energy_import_kwh": "invalid"}),
        _event(2**40 + 2, t + 1, {"type": "risk.tamper", "meter": "表计-一号", "note": "表盖打开 (cover open)"}),
    ]


def _vector(name: str, description: str, records: Sequence[WireRecord], *, index: int,
            gateway_id: str = "gw-0017", epoch: str = EPOCH, seq: int = 42, key: bytes = KEY_256,
            key_id: int = 1, compression: Compression | None) -> dict[str, Any]:
    nonce = _nonce(index)
    payload = wire.encode_batch(gateway_id, seq, records, epoch=epoch, key=key, key_id=key_id,
                                compression=compression, nonce=nonce)
    header = wire.batch_header(payload)
    decoded = wire.decode_batch(payload, lambda g, k: key if (g, k) == (gateway_id, key_id) else None)
    assert decoded.records == tuple(records), name  # the encoder's round trip, to the byte
    method = Compression(payload[1])
    head_len = _header_length(header)
    assert payload[head_len:head_len + 12] == nonce, name
    plain = _open(payload, key, head_len)
    return {
        "name": name,
        "description": description,
        "key_hex": key.hex(),
        "key_id": key_id,
        "nonce_hex": nonce.hex(),
        "compression": method.name.lower(),
        "header": {
            "version": header.version, "key_id": header.key_id, "gateway_id": header.gateway_id,
            "epoch": header.epoch, "seq": header.seq, "length": head_len,
        },
        "payload_hex": payload.hex(),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "plaintext_hex": _decompress(plain, method).hex(),
        "decoded": {
            "gateway_id": decoded.gateway_id, "epoch": decoded.epoch, "seq": decoded.seq,
            "key_id": decoded.key_id,
            "records": [record_json(r) for r in decoded.records],
        },
    }


def record_json(r: WireRecord) -> dict[str, Any]:
    return {"id": r.id, "kind": r.kind, "cls": r.cls, "created_ms": r.created_ms, "body": r.body}


def _uvarint_length(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _header_length(h: wire.BatchHeader) -> int:
    """Bytes before the nonce (docs/wire-format.md §2), counted from the fields."""
    epoch = 8 if h.version == wire.VERSION else 0
    return 2 + _uvarint_length(h.key_id) + 1 + len(h.gateway_id.encode()) + epoch + _uvarint_length(h.seq)


def _open(payload: bytes, key: bytes, head_len: int) -> bytes:
    """Decrypt independently of the decoder: AES-GCM with the documented AAD."""
    nonce = payload[head_len:head_len + 12]
    return AESGCM(key).decrypt(nonce, payload[head_len + 12:], AAD_LABEL + payload[:head_len])


def _decompress(data: bytes, method: Compression) -> bytes:
    if method is Compression.ZLIB:
        return zlib.decompress(data, -15)
    if method is Compression.LZMA:
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 20}]
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=filters)
    return data


def _invalid(valid: dict[str, Any]) -> list[dict[str, Any]]:
    payload = bytes.fromhex(valid["payload_hex"])
    flipped_tag = payload[:-1] + bytes((payload[-1] ^ 0x01,))
    head = valid["header"]["length"]
    flipped_seq = bytearray(payload)
    flipped_seq[head - 1] ^= 0x01  # the last byte of the seq varint (header is authenticated)
    base = {"key_hex": valid["key_hex"], "key_id": valid["key_id"],
            "gateway_id": valid["header"]["gateway_id"]}
    return [
        {**base, "name": "tag-bit-flipped", "error": "WireAuthError",
         "description": f"{valid['name']} with the lowest bit of the last tag byte flipped",
         "payload_hex": flipped_tag.hex()},
        {**base, "name": "header-bit-flipped", "error": "WireAuthError",
         "description": f"{valid['name']} with its batch seq changed (the header is associated data)",
         "payload_hex": bytes(flipped_seq).hex()},
        {**base, "name": "wrong-key", "error": "WireAuthError",
         "description": f"{valid['name']} opened under another key",
         "payload_hex": valid["payload_hex"], "key_hex": bytes(32).hex()},
        {**base, "name": "truncated", "error": "WireFormatError",
         "description": f"{valid['name']} cut inside the header",
         "payload_hex": payload[:head - 3].hex()},
        {**base, "name": "unknown-version", "error": "WireVersionError",
         "description": "first byte 0x13: no such encoding",
         "payload_hex": (b"\x13" + payload[1:]).hex()},
    ]


def _key_derivation() -> tuple[dict[str, Any], bytes]:
    gw_priv = X25519PrivateKey.from_private_bytes(bytes.fromhex("11" * 32))
    he_priv = X25519PrivateKey.from_private_bytes(bytes.fromhex("22" * 32))
    he_pub = he_priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    gw_pub = gw_priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = gw_priv.exchange(he_priv.public_key())
    assert shared == he_priv.exchange(gw_priv.public_key())
    key_id = 3
    gateway = "gw-kdf"
    key = derive_uplink_key(shared, gateway, he_pub, key_id)
    return {
        "description": "the batch key from the gateway's and the headend's X25519 keys: "
        "HKDF-SHA256(ikm = X25519 shared secret, salt, info)",
        "gateway_id": gateway,
        "key_id": key_id,
        "gateway_private_hex": "11" * 32,
        "gateway_public_hex": gw_pub.hex(),
        "headend_private_hex": "22" * 32,
        "headend_public_hex": he_pub.hex(),
        "headend_fingerprint": fingerprint(he_pub),
        "shared_secret_hex": shared.hex(),
        "salt": "edgegw/uplink-key/v1",
        "info": f"gateway={gateway} key_id={key_id} headend={fingerprint(he_pub)}",
        "key_hex": key.hex(),
        "vector": "derived-key",
    }, key


def build() -> dict[str, Any]:
    kdf, derived = _key_derivation()
    vectors = [
        _vector("one-meter-none", "three register readings of one meter, no compression (the "
                "plaintext is the decrypted body)", _one_meter(), index=1, compression=Compression.NONE),
        _vector("three-meters-zlib", "three meters × three poll cycles: energy total and four rate "
                "registers, relay state, a suspect mark, two time sources; raw DEFLATE",
                _three_meters(), index=2, compression=Compression.ZLIB),
        _vector("telemetry-predicted-current-lzma", "telemetry (class 2) of a single-phase meter: "
                "current carried as residuals against P/(V·PF); raw LZMA2", _telemetry(), index=3,
                compression=Compression.LZMA),
        _vector("events-charges-readings", "cutoff and meter events, a command result, a debit and a "
                "credit (generic records, JSON bodies) between readings; the encoder's own choice of "
                "compression", _mixed(), index=4, compression=None),
        _vector("edge-cases", "exponent spread within a column, negative and zero values, an optional "
                "column (presence bitmap), a 10^9 id jump and a 40-day gap (packed-column escapes), "
                "reading bodies sent as JSON", _edges(), index=5, compression=Compression.NONE, seq=2**40 + 7),
        _vector("unicode-aes128", "UTF-8 gateway and meter ids, an invalid-quality mark, ids above "
                "2^40, an AES-128 key and key id 4294967295", _unicode(), index=6,
                gateway_id="网关-07", key=KEY_128, key_id=0xFFFF_FFFF, compression=Compression.NONE),
        _vector("legacy-no-epoch", "version byte 0x02: the header without a batch epoch (decoded with "
                "the legacy epoch \"\")", _one_meter(), index=7, epoch=LEGACY_EPOCH, seq=7,
                compression=Compression.NONE),
        _vector("empty", "a batch of no records", [], index=8, seq=0, compression=Compression.NONE),
        _vector("derived-key", "sealed under the key of key_derivation", _one_meter()[:1], index=9,
                gateway_id=kdf["gateway_id"], key=derived, key_id=kdf["key_id"], seq=1,
                compression=Compression.NONE),
    ]
    acked = vectors[3]
    digest = bytes.fromhex(acked["payload_sha256"])
    akey = ack_key(bytes.fromhex(acked["key_hex"]))
    mac = ack_mac(akey, gateway_id=acked["header"]["gateway_id"], epoch=acked["header"]["epoch"],
                  seq=acked["header"]["seq"], key_id=acked["key_id"], status="stored", digest=digest)
    return {
        "format": FORMAT,
        "generated_by": "python -m testbed.wire_vectors docs/vectors/encoding2.json",
        "spec": "docs/wire-format.md; docs/integration.md, \"Encoding-2 test vectors\"",
        "aad_label_hex": AAD_LABEL.hex(),
        "quantity_codes": {q.value: code for q, code in QUANTITY_CODES.items()},
        "vectors": vectors,
        "invalid": _invalid(vectors[0]),
        "key_derivation": kdf,
        "ack": {
            "description": "the headend's ack MAC for vector events-charges-readings, status stored",
            "vector": acked["name"],
            "status": "stored",
            "ack_key_hex": akey.hex(),
            "mac_hex": mac.hex(),
            "ack_json": orjson.loads(
                orjson.dumps({"seq": acked["header"]["seq"], "epoch": acked["header"]["epoch"],
                              "status": "stored", "records": len(acked["decoded"]["records"]),
                              "mac": mac.hex()})
            ),
        },
    }


def render(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write the encoding-2 test vectors")
    ap.add_argument("out", type=Path, help="e.g. docs/vectors/encoding2.json")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(render(build()))
    print(f"{args.out}: {len(build()['vectors'])} vectors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
