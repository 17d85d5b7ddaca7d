"""The bundle container: encoding, verification order, and every tampering refused."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioning.bundle import (
    HEADER,
    MAGIC,
    SIGNATURE_LEN,
    BundleContentError,
    BundleError,
    BundleFormatError,
    BundlePolicyError,
    BundleSignatureError,
    DeviceIdentity,
    Installed,
    Target,
    check_path,
    check_policy,
    seal_manifest,
    split_bundle,
    verify_bundle,
)
from tests.provisioning.conftest import GATEWAY, NOW, SITE, MakeBundle, example_files


def assemble(manifest_bytes: bytes, signature: bytes, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(manifest_bytes)) + manifest_bytes + signature + body


def edit_manifest(data: bytes, edit) -> tuple[bytes, bytes, bytes]:  # type: ignore[no-untyped-def]
    raw = split_bundle(data)
    m = json.loads(raw.manifest_bytes)
    edit(m)
    return json.dumps(m).encode(), raw.signature, raw.body


def test_round_trip(make_bundle: MakeBundle, role_key: Ed25519PrivateKey) -> None:
    data = make_bundle(version=7)
    vb = verify_bundle(data, role_key.public_key())
    assert vb.manifest.version == 7
    assert vb.manifest.target == Target("gateway", GATEWAY)
    assert dict(vb.files) == example_files()
    assert vb.digest == hashlib.sha256(data).hexdigest()


def test_key_rotation_accepts_any_trusted_key(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey
) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    data = make_bundle()
    assert verify_bundle(data, [other, role_key.public_key()]).manifest.version == 1
    assert verify_bundle(data, lambda: [role_key.public_key()]).manifest.version == 1
    with pytest.raises(BundleSignatureError, match="no trusted provisioning key"):
        verify_bundle(data, [])


def test_wrong_key_refused(make_bundle: MakeBundle) -> None:
    data = make_bundle(key=Ed25519PrivateKey.generate())
    with pytest.raises(BundleSignatureError, match="does not verify") as e:
        verify_bundle(data, Ed25519PrivateKey.generate().public_key())
    assert e.value.code == "bad-signature"


def test_flipped_signature_bit_refused(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey
) -> None:
    data = bytearray(make_bundle())
    mlen = HEADER.unpack_from(data)[1]
    data[HEADER.size + mlen + 5] ^= 0x01
    with pytest.raises(BundleSignatureError, match="does not verify"):
        verify_bundle(bytes(data), role_key.public_key())


@pytest.mark.parametrize(
    "flag",
    [
        {"signature": None},
        {"verify": False},
        {"unsigned": True},
        {"skip_verification": True},
        {"signature_required": False},
    ],
)
def test_no_manifest_field_switches_verification_off(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, flag: dict[str, object]
) -> None:
    data = make_bundle()
    # 1. An attacker adds the flag: the signature no longer matches.
    m, sig, body = edit_manifest(data, lambda d: d.update(flag))
    with pytest.raises(BundleSignatureError, match="does not verify"):
        verify_bundle(assemble(m, sig, body), role_key.public_key())
    # 2. ... and drops the signature altogether (all zero): refused as unsigned.
    with pytest.raises(BundleSignatureError, match="unsigned"):
        verify_bundle(assemble(m, b"\0" * SIGNATURE_LEN, body), role_key.public_key())
    # 3. Even a genuinely signed manifest carrying such a field is refused (strict schema).
    with pytest.raises(BundleContentError, match="unknown key"):
        verify_bundle(seal_manifest(m, body, role_key), role_key.public_key())


def test_signature_stripped_refused(make_bundle: MakeBundle, role_key: Ed25519PrivateKey) -> None:
    raw = split_bundle(make_bundle())
    stripped = HEADER.pack(MAGIC, len(raw.manifest_bytes)) + raw.manifest_bytes + raw.body
    with pytest.raises(BundleSignatureError):
        verify_bundle(stripped, role_key.public_key())
    only_manifest = HEADER.pack(MAGIC, len(raw.manifest_bytes)) + raw.manifest_bytes
    with pytest.raises(BundleFormatError, match="ends inside the signature"):
        verify_bundle(only_manifest, role_key.public_key())


def test_hash_mismatch_refused(make_bundle: MakeBundle, role_key: Ed25519PrivateKey) -> None:
    data = bytearray(make_bundle())
    data[-1] ^= 0xFF  # last byte of the last file
    with pytest.raises(BundleContentError, match=r"SHA-256 mismatch") as e:
        verify_bundle(bytes(data), role_key.public_key())
    assert e.value.code == "hash-mismatch"


def test_swapped_files_refused(make_bundle: MakeBundle, role_key: Ed25519PrivateKey) -> None:
    files = {"a.txt": b"AAAA", "b.txt": b"BBBB"}
    raw = split_bundle(make_bundle(files=files | {"gateway.toml": b""}))
    m = json.loads(raw.manifest_bytes)
    assert [f["path"] for f in m["files"]][:2] == ["a.txt", "b.txt"]
    body = raw.body.replace(b"AAAABBBB", b"BBBBAAAA")
    with pytest.raises(BundleContentError, match=r"'a\.txt': SHA-256 mismatch"):
        verify_bundle(assemble(raw.manifest_bytes, raw.signature, body), role_key.public_key())


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_truncated_body_refused(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, cut: int
) -> None:
    data = make_bundle()
    with pytest.raises(BundleContentError, match="missing or truncated") as e:
        verify_bundle(data[:-cut], role_key.public_key())
    assert e.value.code == "truncated"


@pytest.mark.parametrize("size", [0, 5, 11, 12, 40])
def test_truncated_header_refused(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, size: int
) -> None:
    with pytest.raises(BundleFormatError, match=r"truncated|bad magic"):
        verify_bundle(make_bundle()[:size], role_key.public_key())


def test_unlisted_file_appended_refused(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey
) -> None:
    data = make_bundle() + b"#!/bin/sh\nrm -rf /\n"
    with pytest.raises(BundleContentError, match="not listed in the manifest") as e:
        verify_bundle(data, role_key.public_key())
    assert e.value.code == "unlisted-data"


def test_oversized_refused_before_anything(
    role_key: Ed25519PrivateKey, make_bundle: MakeBundle
) -> None:
    data = make_bundle(files={"gateway.toml": b"x" * 5000})
    with pytest.raises(BundleFormatError, match="larger than the limit of 4096") as e:
        verify_bundle(data, role_key.public_key(), max_bytes=4096)
    assert e.value.code == "oversized"


def test_bad_magic_and_version(make_bundle: MakeBundle, role_key: Ed25519PrivateKey) -> None:
    data = make_bundle()
    with pytest.raises(BundleFormatError, match="bad magic"):
        verify_bundle(b"PK\x03\x04" + data[4:], role_key.public_key())
    with pytest.raises(BundleFormatError, match="container version 2"):
        verify_bundle(MAGIC[:7] + b"\x02" + data[8:], role_key.public_key())


def signed_with(role_key: Ed25519PrivateKey, make_bundle: MakeBundle, edit) -> bytes:  # type: ignore[no-untyped-def]
    m, _sig, body = edit_manifest(make_bundle(), edit)
    return seal_manifest(m, body, role_key)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "absolute path"),
        ("../../etc/passwd", "contains '..'"),
        ("keys/../../x", "contains '..'"),
        ("./gateway.toml", "component '.' not allowed"),
        (".ssh/authorized_keys", "component '.ssh' not allowed"),
        ("a//b", "component '' not allowed"),
        ("a\\..\\b", "not allowed"),
        ("a/b/c/d/e/f/g", "deeper than"),
        ("", "empty path"),
    ],
)
def test_bad_paths_refused_even_when_signed(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, path: str, message: str
) -> None:
    def edit(m: dict) -> None:  # type: ignore[type-arg]
        m["files"][0]["path"] = path

    data = signed_with(role_key, make_bundle, edit)
    with pytest.raises(BundleContentError, match=message.replace(".", r"\.").replace("(", r"\(")):
        verify_bundle(data, role_key.public_key())


def test_duplicate_paths_refused(make_bundle: MakeBundle, role_key: Ed25519PrivateKey) -> None:
    def dup(m: dict) -> None:  # type: ignore[type-arg]
        m["files"][1] = dict(m["files"][0])

    with pytest.raises(BundleContentError, match="duplicate path") as e:
        verify_bundle(signed_with(role_key, make_bundle, dup), role_key.public_key())
    assert e.value.code == "duplicate-path"

    def case_dup(m: dict) -> None:  # type: ignore[type-arg]
        m["files"][1] = dict(m["files"][0], path=m["files"][0]["path"].upper())

    with pytest.raises(BundleContentError, match="duplicate path"):
        verify_bundle(signed_with(role_key, make_bundle, case_dup), role_key.public_key())


def test_file_and_directory_with_same_name_refused(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey
) -> None:
    with pytest.raises(BundleContentError, match="is a file and also a directory"):
        make_bundle(files={"keys": b"x", "keys/a.pem": b"y", "gateway.toml": b""})

    def edit(m: dict) -> None:  # type: ignore[type-arg]
        m["files"][0]["path"] = "keys"
        m["files"][1]["path"] = "keys/a.pem"

    with pytest.raises(BundleContentError, match="'keys' is a file and also a directory"):
        verify_bundle(signed_with(role_key, make_bundle, edit), role_key.public_key())


def test_duplicate_json_keys_refused(make_bundle: MakeBundle, role_key: Ed25519PrivateKey) -> None:
    raw = split_bundle(make_bundle())
    text = raw.manifest_bytes.decode()
    doubled = text[:-1] + ',"version":99}'
    data = seal_manifest(doubled.encode(), raw.body, role_key)
    with pytest.raises(BundleContentError, match="duplicate JSON key 'version'"):
        verify_bundle(data, role_key.public_key())


def test_signature_is_checked_before_the_manifest_is_parsed(role_key: Ed25519PrivateKey) -> None:
    garbage = b"{not json" * 10
    data = assemble(garbage, b"\x01" * SIGNATURE_LEN, b"")
    with pytest.raises(BundleSignatureError):
        verify_bundle(data, role_key.public_key())


def test_policy_expired_rollback_target() -> None:
    from provisioning.bundle import CarryBack, Manifest

    m = Manifest(
        bundle_id="b1",
        version=5,
        target=Target("gateway", GATEWAY),
        created=NOW - timedelta(days=2),
        expires=NOW,
        technician="t",
        carry_back=CarryBack(),
        files=(),
    )
    me = DeviceIdentity(GATEWAY, SITE)
    with pytest.raises(
        BundlePolicyError,
        match=r"expired at 2026-11-23T12:00:00Z \(gateway time 2026-11-23T12:00:00Z\)",
    ):
        check_policy(m, "d" * 64, me, None, NOW)
    earlier = NOW - timedelta(seconds=1)
    assert check_policy(m, "d" * 64, me, None, earlier) is True
    with pytest.raises(
        BundlePolicyError,
        match="rollback refused: bundle version 5 is lower than installed version 6",
    ):
        check_policy(m, "d" * 64, me, Installed(6, "e" * 64), earlier)
    assert check_policy(m, "d" * 64, me, Installed(5, "d" * 64), earlier) is False
    with pytest.raises(BundlePolicyError, match="already installed with different content"):
        check_policy(m, "d" * 64, me, Installed(5, "e" * 64), earlier)
    with pytest.raises(
        BundlePolicyError, match="bundle is for gateway 'gw-0001', this is gateway 'gw-0002'"
    ):
        check_policy(m, "d" * 64, DeviceIdentity("gw-0002", SITE), None, earlier)
    site = Manifest(**{**m.__dict__, "target": Target("site", "site-x")})
    with pytest.raises(
        BundlePolicyError, match="bundle is for site 'site-x', this gateway is in 'site-hilltop'"
    ):
        check_policy(site, "d" * 64, me, None, earlier)
    with pytest.raises(BundlePolicyError, match="no site configured"):
        check_policy(site, "d" * 64, DeviceIdentity(GATEWAY), None, earlier)


@given(st.text(max_size=80))
def test_check_path_never_accepts_escapes(path: str) -> None:
    if check_path(path) is None:
        parts = path.split("/")
        assert not path.startswith("/")
        assert all(p not in ("", ".", "..") and not p.startswith(".") for p in parts)
        assert "\\" not in path and "\0" not in path


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_single_byte_corruption_is_refused(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, data: st.DataObject
) -> None:
    bundle = make_bundle(files={"gateway.toml": b"[gateway]\n", "keys/a.pem": b"k" * 40})
    i = data.draw(st.integers(0, len(bundle) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(bundle)
    bad[i] ^= flip
    with pytest.raises(BundleError):
        verify_bundle(bytes(bad), role_key.public_key())
