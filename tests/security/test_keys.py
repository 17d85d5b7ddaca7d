"""Keystore on real files: generation, permissions, derivation, rotation, CLI."""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisioning import keys_cli
from provisioning.keys import (
    EXCHANGE_FILE,
    IDENTITY_FILE,
    MANIFEST,
    ROOT_FILE,
    KeyPermissionError,
    Keystore,
    KeystoreError,
    derive_purpose_key,
)
from store_forward.uplink_keys import fingerprint


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_private_files_0600_and_dir_0700(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    Keystore.init(d, "gw-0001")
    assert _mode(d) == 0o700
    for name in (IDENTITY_FILE, EXCHANGE_FILE, ROOT_FILE, MANIFEST):
        assert _mode(d / name) == 0o600, name
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_init_is_exact_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Keystore.init(tmp_path / "k", "gw-1")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k" / ROOT_FILE) == 0o600


def test_each_gateway_gets_its_own_keys(tmp_path: Path) -> None:
    a = Keystore.init(tmp_path / "a", "gw-a")
    b = Keystore.init(tmp_path / "b", "gw-a")  # even with the same id
    assert a.identity_public_bytes() != b.identity_public_bytes()
    assert a.exchange_public_bytes() != b.exchange_public_bytes()
    assert a.purpose_key("storage") != b.purpose_key("storage")


def test_reopen_gives_same_keys_and_signatures_verify(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "k", "gw-1")
    again = Keystore.open(tmp_path / "k")
    assert again.gateway_id == "gw-1"
    assert again.identity_public_bytes() == ks.identity_public_bytes()
    assert again.purpose_key("uplink-seal") == ks.purpose_key("uplink-seal")
    sig = again.sign(b"hello")
    Ed25519PublicKey.from_public_bytes(ks.identity_public_bytes()).verify(sig, b"hello")


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "k", "gw-1")
    with pytest.raises(KeystoreError, match="already exists"):
        Keystore.init(tmp_path / "k", "gw-1")
    assert Keystore.open(tmp_path / "k").identity_public_bytes() == ks.identity_public_bytes()


@pytest.mark.parametrize("name", [IDENTITY_FILE, EXCHANGE_FILE, ROOT_FILE])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_open_refuses_private_file_readable_by_others(tmp_path: Path, name: str, mode: int) -> None:
    Keystore.init(tmp_path / "k", "gw-1")
    os.chmod(tmp_path / "k" / name, mode)
    with pytest.raises(KeyPermissionError) as err:
        Keystore.open(tmp_path / "k")
    assert name in str(err.value)
    assert "chmod 600" in str(err.value)


def test_open_refuses_open_directory(tmp_path: Path) -> None:
    Keystore.init(tmp_path / "k", "gw-1")
    os.chmod(tmp_path / "k", 0o755)
    with pytest.raises(KeyPermissionError, match="chmod 700"):
        Keystore.open(tmp_path / "k")


def test_open_reports_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="does not exist"):
        Keystore.open(tmp_path / "nope")
    Keystore.init(tmp_path / "k", "gw-1")
    (tmp_path / "k" / ROOT_FILE).unlink()
    with pytest.raises(KeystoreError, match="missing"):
        Keystore.open(tmp_path / "k")
    Keystore.init(tmp_path / "m", "gw-1")
    (tmp_path / "m" / MANIFEST).write_bytes(b"{not json")
    with pytest.raises(KeystoreError, match="not valid JSON"):
        Keystore.open(tmp_path / "m")


def test_purpose_keys_hkdf_vector_and_domain_separation(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "k", "gw-1")
    root = (tmp_path / "k" / ROOT_FILE).read_bytes()
    v, key = ks.purpose_key("storage")
    assert v == 1 and len(key) == 32
    assert key == derive_purpose_key(root, "gw-1", "storage", 1)
    assert key != ks.purpose_key("uplink-seal")[1]
    assert key != derive_purpose_key(root, "gw-2", "storage", 1)
    # independent RFC 5869 computation with hmac: the derivation must never drift
    # silently, because data buffered under a version depends on it
    info = b"edgegw purpose=storage version=1 gateway=gw-1"
    prk = hmac.new(b"edgegw/keystore/v1", root, hashlib.sha256).digest()
    okm = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    assert key == okm


def test_rotation_keeps_old_versions_and_persists(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "k", "gw-1")
    v1 = ks.purpose_key("storage")
    assert ks.rotate("storage") == 2
    v2 = ks.purpose_key("storage")
    assert v2[0] == 2 and v2[1] != v1[1]
    assert ks.purpose_key("storage", version=1) == v1
    again = Keystore.open(tmp_path / "k")
    assert again.versions()["storage"] == 2
    assert again.purpose_key("storage") == v2
    assert again.purpose_key("storage", 1) == v1
    assert again.purpose_key("uplink-seal")[0] == 1
    with pytest.raises(KeystoreError, match="does not exist"):
        again.purpose_key("storage", 3)
    with pytest.raises(KeystoreError, match="does not exist"):
        again.purpose_key("storage", 0)
    with pytest.raises(KeystoreError, match="unknown key purpose"):
        again.purpose_key("backup")
    with pytest.raises(KeystoreError, match="invalid purpose"):
        again.purpose_key("../etc")


def test_x25519_exchange_agrees_with_peer(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "k", "gw-1")
    peer = X25519PrivateKey.generate()
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    peer_pub = peer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = ks.exchange(peer_pub)
    assert shared == peer.exchange(X25519PublicKey.from_public_bytes(ks.exchange_public_bytes()))


def test_export_public_contains_no_secret(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "k", "gw-1")
    pub = ks.export_public()
    assert pub["gateway_id"] == "gw-1"
    ident = base64.b64decode(pub["identity_ed25519"])
    assert ident == ks.identity_public_bytes()
    assert pub["identity_fingerprint"] == fingerprint(ident)
    assert pub["key_versions"] == {"storage": 1, "uplink-seal": 1}
    text = orjson.dumps(pub)
    root = (tmp_path / "k" / ROOT_FILE).read_bytes()
    assert base64.b64encode(root) not in text and root.hex().encode() not in text
    assert b"PRIVATE" not in text


def test_invalid_gateway_id_refused(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="invalid gateway id"):
        Keystore.init(tmp_path / "k", "../evil")
    assert not (tmp_path / "k").exists()


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgegw")
    sub = parser.add_subparsers(dest="command", required=True)
    keys_cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_init_show_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "k")
    assert _cli(["keys", "init", "--dir", d, "--gateway-id", "gw-9"]) == 0
    assert "gw-9" in capsys.readouterr().out
    assert _cli(["keys", "init", "--dir", d, "--gateway-id", "gw-9"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert _cli(["keys", "show", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert "purpose    storage v1" in out
    assert _cli(["keys", "export-public", "--dir", d]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["gateway_id"] == "gw-9"
    out_file = tmp_path / "pub.json"
    assert _cli(["keys", "export-public", "--dir", d, "--out", str(out_file)]) == 0
    assert orjson.loads(out_file.read_bytes()) == doc
    os.chmod(Path(d) / ROOT_FILE, 0o644)
    assert _cli(["keys", "show", "--dir", d]) == 1
    assert "chmod 600" in capsys.readouterr().err
