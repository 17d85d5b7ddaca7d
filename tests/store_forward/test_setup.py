"""The daemon's wiring helpers pick keys, policy and codec from a config."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from gateway.storage_setup import max_bytes_per_s, storage_keys, storage_policy, uplink_codec
from headend.registry import generate_headend_key
from provisioning.keys import Keystore
from store_forward.codec import SealedCodec


def cfg(tmp_path: Path, **uplink: object) -> SimpleNamespace:
    return SimpleNamespace(
        gateway=SimpleNamespace(id="gw-1", keystore=tmp_path / "keys"),
        storage=SimpleNamespace(path=tmp_path / "gw.db", key_file=None, max_bytes=10_000_000, reserve_bytes=1_000),
        uplink=SimpleNamespace(**uplink),
    )


def test_without_keystore_falls_back_to_a_key_beside_the_database(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    keys = storage_keys(c)
    assert keys.source.endswith("gw.db.key") and (tmp_path / "gw.db.key").exists()
    assert uplink_codec(c) is None
    assert storage_policy(c).max_bytes == 10_000_000 and storage_policy(c).reserve_bytes == 1_000
    assert max_bytes_per_s(c) is None


def test_keystore_gives_storage_and_uplink_keys(tmp_path: Path) -> None:
    import base64

    ks = Keystore.init(tmp_path / "keys", "gw-1")
    pub = base64.b64encode(generate_headend_key(tmp_path / "h.pem")).decode()
    c = cfg(tmp_path, headend_public_key=pub, max_bytes_per_s=4000)
    keys = storage_keys(c)
    assert keys.current == 1 and keys.keys[1] == ks.purpose_key("storage")[1]
    codec = uplink_codec(c)
    assert isinstance(codec, SealedCodec) and codec.key_id == 1
    assert max_bytes_per_s(c) == 4000.0
