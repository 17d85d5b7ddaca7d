"""The USB flow's file logic on a directory standing in for the mounted stick.

Mounting needs a block device and privileges, so the mount/unmount wrapper is
not exercised here; everything between (selection, size cap, copy-off,
process, carry-back onto the stick, audit spool) is.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.release_check import RULES
from provisioning.apply import current_release
from provisioning.bundle import DeviceIdentity
from provisioning.usb import (
    MAX_BUNDLES,
    audit_spool_writer,
    copy_bundles_to_spool,
    copy_out,
    drain_audit_spool,
    gateway_identity,
    process_spool,
    select_bundles,
)
from tests.provisioning.conftest import GATEWAY, NOW, SITE, MakeBundle


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    d = tmp_path / "stick"
    (d / "edgegw").mkdir(parents=True)
    return d


def test_selection_is_bounded_and_ordered(stick: Path) -> None:
    for i in range(MAX_BUNDLES + 5):
        (stick / "edgegw" / f"b{i:03d}.EGWB").write_bytes(b"x")
    (stick / "edgegw" / "notes.txt").write_text("x")
    found = select_bundles(stick)
    assert len(found) == MAX_BUNDLES
    assert [p.name for p in found] == sorted(p.name for p in found)
    assert select_bundles(stick / "nonexistent") == []


async def test_stick_to_carry_back(
    tmp_path: Path, stick: Path, make_bundle: MakeBundle, role_key: Ed25519PrivateKey
) -> None:
    (stick / "edgegw" / "01-gw.egwb").write_bytes(make_bundle(version=4, backlog=True))
    (stick / "edgegw" / "02-other.egwb").write_bytes(make_bundle(version=4, target="gw-0777"))
    (stick / "edgegw" / "03-big.egwb").write_bytes(b"\0" * 5000)
    os.symlink("/etc/passwd", stick / "edgegw" / "04-link.egwb")
    spool = tmp_path / "spool"
    spool.mkdir()  # the unit's RuntimeDirectory
    req = copy_bundles_to_spool(stick, spool, max_bytes=4096)
    assert req["bundles"] == ["00-01-gw.egwb", "01-02-other.egwb"]
    assert {s["file"]: s["code"] for s in req["skipped"]} == {
        "03-big.egwb": "oversized",
        "04-link.egwb": "link",
    }
    assert req["technician_asked_backlog"] is False

    state = tmp_path / "state" / "provisioning"
    state.mkdir(parents=True)
    audit = audit_spool_writer(state / "audit-spool.jsonl")
    exported: list[Path] = []

    async def export(d: Path) -> dict[str, Any]:
        exported.append(d)
        (d / "backlog.sealed").write_bytes(b"sealed")
        return {"records": 3}

    results = await process_spool(
        spool, state_dir=state, verify_key=role_key.public_key(), identity=DeviceIdentity(GATEWAY, SITE),
        check=RULES.check_release, audit=audit, software_version="0.1.0", serial="SN1", enrollment=lambda: {"identity_ed25519": "AAAA"},
        export_backlog=export, now=NOW,
    )  # fmt: skip
    assert [(r.source, r.outcome, r.code) for r in results] == [
        ("00-01-gw.egwb", "accepted", "ok"),
        ("01-02-other.egwb", "refused", "wrong-target"),
        ("03-big.egwb", "refused", "oversized"),
        ("04-link.egwb", "refused", "link"),
    ]
    rel = current_release(state)
    assert rel is not None and rel.version == 4
    assert exported == [spool / "out" / "backlog"]

    dest = copy_out(spool / "out", stick, GATEWAY, NOW)
    assert dest.parent == stick / "edgegw" / "results"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "backlog", "backlog/backlog.sealed", "enrollment.json", "result.json",
    ]  # fmt: skip
    doc = json.loads((dest / "result.json").read_text())
    assert [r["outcome"] for r in doc["results"]] == ["accepted", "refused", "refused", "refused"]
    # A second visit never overwrites the first one's results.
    dest2 = copy_out(spool / "out", stick, GATEWAY, NOW)
    assert dest2 != dest and dest.exists()

    # Every attempt is in the audit spool; the daemon drains it into the real log.
    got: list[tuple[str, dict[str, Any]]] = []

    async def real_audit(kind: str, detail: dict[str, Any]) -> None:
        got.append((kind, detail))

    assert await drain_audit_spool(state / "audit-spool.jsonl", real_audit) == 4
    assert [d["outcome"] for _, d in got] == ["accepted", "refused", "refused", "refused"]
    assert not (state / "audit-spool.jsonl").exists()
    assert await drain_audit_spool(state / "audit-spool.jsonl", real_audit) == 0


async def test_drain_keeps_undelivered_records(tmp_path: Path) -> None:
    spool = tmp_path / "audit-spool.jsonl"
    w = audit_spool_writer(spool)
    for i in range(3):
        await w("provisioning.apply", {"n": i})
    seen: list[int] = []

    async def flaky(kind: str, detail: dict[str, Any]) -> None:
        if detail["n"] == 1 and not seen.count(-1):
            seen.append(-1)
            raise RuntimeError("database busy")
        seen.append(detail["n"])

    with pytest.raises(RuntimeError):
        await drain_audit_spool(spool, flaky)
    await w("provisioning.apply", {"n": 3})
    assert await drain_audit_spool(spool, flaky) == 2  # the retained 1, 2
    assert await drain_audit_spool(spool, flaky) == 1  # then the new 3
    assert [n for n in seen if n >= 0] == [0, 1, 2, 3]


async def test_no_identity_refuses_everything(
    tmp_path: Path, stick: Path, make_bundle: MakeBundle, role_key: Ed25519PrivateKey
) -> None:
    (stick / "edgegw" / "a.egwb").write_bytes(make_bundle())
    (stick / "edgegw" / "export-backlog").write_text("")
    spool = tmp_path / "spool"
    spool.mkdir()  # the unit's RuntimeDirectory
    req = copy_bundles_to_spool(stick, spool)
    assert req["technician_asked_backlog"] is True
    state = tmp_path / "state"
    assert gateway_identity(state, None, RULES.installed_identity) is None
    results = await process_spool(
        spool, state_dir=state, verify_key=role_key.public_key(), identity=None, check=RULES.check_release,
        audit=None, software_version="x", now=NOW + timedelta(seconds=1),
    )  # fmt: skip
    assert [r.code for r in results] == ["no-identity"]
    doc = json.loads((spool / "out" / "result.json").read_text())
    assert doc["backlog_export"] == {
        "requested": True, "status": "failed", "error": "no backlog exporter is available on this gateway",
    }  # fmt: skip


def test_process_step_with_keystore_and_trust_store(
    tmp_path: Path, stick: Path, make_bundle: MakeBundle, role_key: Ed25519PrivateKey,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The unit's unprivileged step as a command: identity and enrollment from the keystore,
    the provisioning key from the central trust store."""
    import base64

    from cryptography.hazmat.primitives import serialization

    from gateway.provision_usb import main
    from provisioning.keys import Keystore

    Keystore.init(tmp_path / "keys", GATEWAY)
    raw = role_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps({
        "format": 1,
        "keys": [{"key_id": "prov-1", "role": "provisioning", "public_key": base64.b64encode(raw).decode()}],
        "revoked": [],
    }))  # fmt: skip
    (stick / "edgegw" / "a.egwb").write_bytes(make_bundle(version=9))
    spool = tmp_path / "spool"
    spool.mkdir()  # the unit's RuntimeDirectory
    copy_bundles_to_spool(stick, spool)
    state = tmp_path / "state" / "provisioning"
    rc = main(["process", "--spool", str(spool), "--state-dir", str(state),
               "--trust-store", str(trust), "--keystore", str(tmp_path / "keys"), "--serial", "SN9"])  # fmt: skip
    assert rc == 0
    assert "00-a.egwb: accepted (ok)" in capsys.readouterr().out
    rel = current_release(state)
    assert rel is not None and rel.version == 9
    enrol = json.loads((spool / "out" / "enrollment.json").read_text())
    assert enrol["gateway_id"] == GATEWAY and enrol["serial"] == "SN9"
    assert enrol["public_keys"]["identity_fingerprint"]
    spooled = (state / "audit-spool.jsonl").read_text().splitlines()
    assert json.loads(spooled[0])["detail"]["outcome"] == "accepted"


def test_privileged_steps_do_not_follow_links_in_the_spool(tmp_path: Path, stick: Path) -> None:
    """The spool belongs to the service user; the root steps must not be steered by it."""
    secret = tmp_path / "secret"
    secret.write_text("root only")
    out = tmp_path / "spool" / "out"
    (out / "backlog").mkdir(parents=True)
    (out / "result.json").write_text('{"gateway_id": "gw-0001", "results": []}')
    os.symlink(secret, out / "stolen.txt")
    os.symlink(secret.parent, out / "backlog" / "dir-link")
    os.mkfifo(out / "fifo")
    dest = copy_out(out, stick, GATEWAY, NOW)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "backlog",
        "result.json",
    ]

    # import refuses a spool that already has an 'in' (it could be a link to anywhere)
    spool2 = tmp_path / "spool2"
    spool2.mkdir()
    os.symlink(tmp_path / "elsewhere", spool2 / "in")
    with pytest.raises(FileExistsError):
        copy_bundles_to_spool(stick, spool2)
    assert not (tmp_path / "elsewhere").exists()
