"""Software bundles: the signed container, the strict manifest, the version
floor, the lock file (pure parts; the installs are in tests/gateway/test_update*.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from gateway.commands.bodies import CommandRefused
from gateway.heartbeat import Heartbeat, Phase, Process
from gateway.update import health_verdict
from gateway.update_transfer import offer_for, parse_offer
from provisioning.bundle import HEADER, BundleError, verify_bundle
from provisioning.software_bundle import (
    MAGIC,
    SIGNING_CONTEXT,
    InstalledSoftware,
    SoftwarePolicyError,
    Version,
    decide,
    match_wheelhouse,
    open_bundle,
    parse_lock,
    write_bundle,
)

REPO = Path(__file__).resolve().parents[2]
KEY = Ed25519PrivateKey.generate()
T = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def make(tmp: Path, version: str = "1.2.0", min_version: str | None = None) -> Path:
    wheels = []
    for name, data in [
        (f"edge_gateway-{version}-py3-none-any.whl", b"project " * 100),
        ("pip-26.3-py3-none-any.whl", b"pip " * 50),
        ("cffi-2.1.1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", b"\0" * 3000),
    ]:
        p = tmp / name
        p.write_bytes(data)
        wheels.append(p)
    out = tmp / f"b-{version}.egws"
    write_bundle(out, version=version, min_version=min_version, requirements=b"pip==26.3\n",
                 wheels=wheels, key=KEY, python="3.11", machine="x86_64", created=T)  # fmt: skip
    return out


def test_a_bundle_verifies_and_extracts_what_was_signed(tmp_path: Path) -> None:
    b = make(tmp_path)
    out = tmp_path / "x"
    vs = open_bundle(b, KEY.public_key(), extract_to=out)
    assert vs.digest == hashlib.sha256(b.read_bytes()).hexdigest()
    assert vs.manifest.version == Version.parse("1.2") and vs.manifest.min_version.text == "1.2.0"
    assert (out / "requirements.txt").read_bytes() == b"pip==26.3\n"
    names = sorted(p.name for p in (out / "wheels").iterdir())
    assert names[0].startswith("cffi-") and len(names) == 3
    assert vs.manifest.project_wheel == "wheels/edge_gateway-1.2.0-py3-none-any.whl"


@pytest.mark.parametrize(
    "where,code",
    [("magic", "magic"), ("manifest", "bad-signature"), ("signature", "bad-signature"),
     ("body", "hash-mismatch"), ("truncate", "truncated"), ("append", "unlisted-data")],
)  # fmt: skip
def test_every_changed_byte_is_refused_and_nothing_is_left(tmp_path: Path, where: str, code: str) -> None:
    b = make(tmp_path)
    data = bytearray(b.read_bytes())
    mlen = int.from_bytes(data[8:12], "big")
    if where == "magic":
        data[0] ^= 0xFF
    elif where == "manifest":
        data[HEADER.size + 5] ^= 0x01
    elif where == "signature":
        data[HEADER.size + mlen + 3] ^= 0x01
    elif where == "body":
        data[-10] ^= 0x01
    elif where == "truncate":
        del data[-1]
    else:
        data += b"x"
    b.write_bytes(bytes(data))
    with pytest.raises(BundleError) as exc:
        open_bundle(b, KEY.public_key(), extract_to=tmp_path / "x")
    assert exc.value.code == code, exc.value
    assert not (tmp_path / "x").exists()


def test_another_key_and_the_other_kind_of_bundle_are_refused(tmp_path: Path) -> None:
    b = make(tmp_path)
    with pytest.raises(BundleError) as exc:
        open_bundle(b, Ed25519PrivateKey.generate().public_key())
    assert exc.value.code == "bad-signature"
    # The same bytes relabelled as a provisioning bundle: the signing contexts differ.
    data = b.read_bytes()
    with pytest.raises(BundleError) as exc:
        verify_bundle(b"EGWBNDL\x01" + data[8:], KEY.public_key())
    assert exc.value.code == "bad-signature"


def test_a_signed_manifest_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    doc = {"format": 1, "bundle_id": "x", "version": "1", "min_version": "1",
           "created": "2026-11-23T12:00:00Z", "python": "3.11", "machine": "x86_64",
           "files": [], "verify": False}  # fmt: skip
    raw = json.dumps(doc).encode()
    header = HEADER.pack(MAGIC, len(raw))
    p = tmp_path / "u.egws"
    p.write_bytes(header + raw + KEY.sign(SIGNING_CONTEXT + header + raw))
    with pytest.raises(BundleError) as exc:
        open_bundle(p, KEY.public_key())
    assert exc.value.code == "manifest" and "verify" in str(exc.value)


def test_the_project_wheel_must_carry_the_bundle_version(tmp_path: Path) -> None:
    (tmp_path / "edge_gateway-1.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"wheel is version 1\.0"):
        write_bundle(tmp_path / "o.egws", version="2.0", min_version=None, requirements=b"",
                     wheels=[tmp_path / "edge_gateway-1.0-py3-none-any.whl"], key=KEY,
                     python="3.11", machine="x86_64")  # fmt: skip
    assert not (tmp_path / "o.egws").exists()


versions = st.lists(st.integers(0, 10**6), min_size=1, max_size=4).map(
    lambda parts: ".".join(map(str, parts))
)


@given(versions, versions)
def test_versions_compare_as_numbers(a: str, b: str) -> None:
    va, vb = Version.parse(a), Version.parse(b)
    pad = lambda s: tuple(map(int, s.split("."))) + (0,) * (4 - len(s.split(".")))  # noqa: E731
    assert (va < vb) == (pad(a) < pad(b)) and (va == vb) == (pad(a) == pad(b))
    assert str(va) == a


@given(versions, versions, versions, st.booleans(), st.booleans())
def test_the_floor_is_never_crossed_without_a_permit(
    new: str, installed: str, floor: str, permit: bool, same_digest: bool
) -> None:
    from provisioning.software_bundle import FileEntry, SoftwareManifest

    m = SoftwareManifest("b", Version.parse(new), Version.parse(new), T, "3.11", "x86_64",
                         (FileEntry("requirements.txt", "0" * 64, 0),))  # fmt: skip
    inst = InstalledSoftware(Version.parse(installed), "a" * 64, Version.parse(floor))
    digest = "a" * 64 if same_digest else "b" * 64
    try:
        go = decide(m, digest, inst, python="3.11", machine="x86_64", downgrade_allowed=permit)
    except SoftwarePolicyError as exc:
        if exc.code == "below-floor":
            assert Version.parse(new) < Version.parse(floor) and not permit
        else:
            assert exc.code == "version-conflict" and Version.parse(new) == Version.parse(installed)
        return
    if Version.parse(new) == Version.parse(installed):
        assert not go and same_digest
    else:
        assert go and (permit or Version.parse(new) >= Version.parse(floor))
    with pytest.raises(SoftwarePolicyError, match=r"runs Python 3\.12"):
        decide(m, digest, inst, python="3.12", machine="x86_64")


def test_the_lock_file_is_hash_locked_and_matches_the_project() -> None:
    pins = parse_lock((REPO / "requirements.lock").read_text())
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        name = d.split(">")[0].split("<")[0].split("=")[0].strip().lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not pinned in requirements.lock"
    assert "pip" in pins and all(p.hashes for p in pins.values())
    with pytest.raises(ValueError, match="no --hash"):
        parse_lock("orjson==3.13.0\n")
    with pytest.raises(ValueError, match="name==version"):
        parse_lock("orjson>=3 --hash=sha256:" + "0" * 64)


def test_a_wheelhouse_must_hold_a_locked_wheel_of_every_pin() -> None:
    h = "1" * 64
    pins = parse_lock(f"aiosqlite==0.22.1 --hash=sha256:{h}\npip==26.3 --hash=sha256:{'2' * 64}\n")
    wheels = {"aiosqlite-0.22.1-py3-none-any.whl": h, "pip-26.3-py3-none-any.whl": "2" * 64,
              "other-1-py3-none-any.whl": "3" * 64}  # fmt: skip
    assert match_wheelhouse(pins, wheels) == [
        "aiosqlite-0.22.1-py3-none-any.whl", "pip-26.3-py3-none-any.whl"
    ]
    with pytest.raises(ValueError, match=r"aiosqlite==0\.22\.1: no wheel"):
        match_wheelhouse(pins, {**wheels, "aiosqlite-0.22.1-py3-none-any.whl": "9" * 64})


def test_an_offer_lists_every_chunk_hash(tmp_path: Path) -> None:
    b = make(tmp_path)
    offer = offer_for(b, version="1.2.0", chunk_size=1024)
    assert parse_offer(offer.to_json()) == offer
    assert len(offer.chunks) == -(-b.stat().st_size // 1024)
    for bad in ({**offer.to_json(), "chunks": offer.chunks[:-1]},
                {**offer.to_json(), "sha256": "X" * 64},
                {**offer.to_json(), "chunk_size": 10},
                {**offer.to_json(), "version": "1.x"},
                {**offer.to_json(), "url": "http://elsewhere"}):  # fmt: skip
        with pytest.raises(CommandRefused):
            parse_offer(bad)


def test_the_health_verdict_needs_every_milestone_of_the_new_release() -> None:
    alive = lambda pid: Process(True, 77)  # noqa: E731
    good = Heartbeat(pid=9, proc_start=77, boot_id="b", version="2", started_ms=1,
                     phase=Phase.RUNNING, updated_ms=2, interval_s=5.0,
                     health={"buses": 1, "poll_cycles": 1, "readings": 3, "acks": 0})  # fmt: skip
    ok = {"version": "2", "boot": "b", "process": alive}
    assert health_verdict(good, **ok) is None  # type: ignore[arg-type]
    for change, why in [({"version": "1"}, "runs version"), ({"boot_id": "a"}, "another boot"),
                        ({"phase": Phase.STARTING}, "starting"),
                        ({"health": {"buses": 1}}, "no poll cycle")]:  # fmt: skip
        assert why in (health_verdict(replace(good, **change), **ok) or ""), change  # type: ignore[arg-type]
    assert "acknowledged" in (health_verdict(good, require=frozenset({"uplink"}), **ok) or "")  # type: ignore[arg-type]
    assert health_verdict(None, **ok) == "no heartbeat yet"  # type: ignore[arg-type]
    assert "before the switch" in (health_verdict(good, before=(9, 77), **ok) or "")  # type: ignore[arg-type]
    gone = {**ok, "process": lambda pid: Process(False)}
    assert "not running" in (health_verdict(good, **gone) or "")  # type: ignore[arg-type]
    recycled = {**ok, "process": lambda pid: Process(True, 78)}
    assert "not running" in (health_verdict(good, **recycled) or "")  # type: ignore[arg-type]
    # A site without buses has no poll cycle to wait for.
    assert health_verdict(replace(good, health={"buses": 0}), **ok) is None  # type: ignore[arg-type]
