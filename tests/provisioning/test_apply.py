"""Applying bundles: accepted, refused with nothing applied, overlay, rollback, carry-back."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.release_check import check_release
from provisioning.apply import (
    AUDIT_KIND,
    ApplyResult,
    Release,
    apply_bundle,
    current_release,
    previous_release,
    recover,
    rollback,
    write_carry_back,
)
from provisioning.bundle import DeviceIdentity, split_bundle
from tests.provisioning.conftest import GATEWAY, NOW, MakeBundle, config_text, example_files


class Recorder:
    def __init__(self) -> None:
        self.audit: list[tuple[str, dict[str, Any]]] = []
        self.reloads: list[Release] = []

    async def record(self, kind: str, detail: dict[str, Any]) -> None:
        self.audit.append((kind, detail))

    async def reload(self, release: Release) -> None:
        self.reloads.append(release)


def snapshot(root: Path) -> dict[str, Any]:
    """Everything a reader of the provisioning root could observe."""
    out: dict[str, Any] = {}
    for link in ("current", "previous"):
        out[link] = os.readlink(root / link) if (root / link).is_symlink() else None
    cur = root / "current" / "files"
    out["files"] = (
        {
            p.relative_to(cur).as_posix(): p.read_bytes()
            for p in sorted(cur.rglob("*"))
            if p.is_file()
        }
        if cur.exists()
        else None
    )
    out["releases"] = (
        sorted(p.name for p in (root / "releases").iterdir())
        if (root / "releases").exists()
        else []
    )
    return out


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    d = tmp_path / "stick"
    d.mkdir()
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state" / "provisioning"


async def run(
    data: bytes | None,
    stick: Path,
    root: Path,
    key: Ed25519PrivateKey,
    rec: Recorder,
    *,
    name: str = "b.egwb",
    identity: DeviceIdentity | None = None,
    **kw: Any,
) -> ApplyResult:
    src = stick / name
    if data is not None:
        src.write_bytes(data)
    return await apply_bundle(
        src,
        root=root,
        verify_key=key.public_key(),
        identity=identity or DeviceIdentity(GATEWAY, "site-hilltop"),
        check=check_release,
        now=kw.pop("now", NOW),
        audit=rec.record,
        reload=rec.reload,
        **kw,
    )


async def test_accepted_then_noop(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    data = make_bundle(version=3)
    r = await run(data, stick, root, role_key, rec)
    assert r.outcome == "accepted", r.reason
    snap = snapshot(root)
    assert snap["files"] == example_files()
    assert snap["previous"] is None
    cur = current_release(root)
    assert cur is not None and cur.version == 3 and cur.config_path.is_file()
    assert [x.name for x in rec.reloads] == [cur.name]
    kind, detail = rec.audit[-1]
    assert kind == AUDIT_KIND
    assert (
        detail["outcome"] == "accepted"
        and detail["version"] == 3
        and detail["technician"] == "tech-07"
    )
    assert detail["authenticated"] is True

    r2 = await run(data, stick, root, role_key, rec)
    assert (r2.outcome, r2.code) == ("noop", "already-installed")
    assert snapshot(root) == snap
    assert len(rec.reloads) == 1 and len(rec.audit) == 2


async def test_files_are_private(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    assert (await run(make_bundle(), stick, root, role_key, rec)).ok
    for p in (root / "current" / "files").rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"


def _tamper_cases(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey
) -> dict[str, tuple[bytes, str, str]]:
    good = make_bundle(version=5)
    raw = split_bundle(good)
    m = json.loads(raw.manifest_bytes)
    m["verify"] = False
    from provisioning.bundle import HEADER, MAGIC

    forged = json.dumps(m).encode()
    return {
        "bad signature": (
            make_bundle(version=5, key=Ed25519PrivateKey.generate()),
            "bad-signature",
            "does not verify",
        ),
        "hash mismatch": (good[:-1] + bytes([good[-1] ^ 1]), "hash-mismatch", "SHA-256 mismatch"),
        "truncated": (good[:-7], "truncated", "missing or truncated"),
        "extra file": (good + b"EXTRA", "unlisted-data", "not listed in the manifest"),
        "verify=false": (
            HEADER.pack(MAGIC, len(forged)) + forged + raw.signature + raw.body,
            "bad-signature",
            "does not verify",
        ),
        "unsigned": (
            HEADER.pack(MAGIC, len(forged)) + forged + b"\0" * 64 + raw.body,
            "unsigned",
            "unsigned",
        ),
        "expired": (
            make_bundle(version=5, expires=NOW),
            "expired",
            "expired at 2026-11-23T12:00:00Z",
        ),
        "wrong target": (
            make_bundle(version=5, target="gw-0099"),
            "wrong-target",
            "bundle is for gateway 'gw-0099', this is gateway 'gw-0001'",
        ),
        "wrong site": (
            make_bundle(version=5, target="site:elsewhere"),
            "wrong-target",
            "bundle is for site 'elsewhere'",
        ),
        "rollback": (
            make_bundle(version=1),
            "rollback",
            "bundle version 1 is lower than installed version 2",
        ),
        "same version, other content": (
            make_bundle(version=2, files={**example_files(), "x.txt": b"x"}),
            "version-conflict",
            "already installed with different content",
        ),
        "bad config": (
            make_bundle(
                version=5,
                files={
                    **example_files(),
                    "gateway.toml": config_text(
                        extra='\n[[meter]]\nid = "m2"\nbus = "rs485-9"\nprotocol = "dlt645"\naddress = "000001020305"\n'
                    ),
                },
            ),
            "config",
            "gateway.toml:36: meter[m2].bus: unknown bus 'rs485-9' (known: rs485-1)",
        ),
        "config for another gateway": (
            make_bundle(
                version=5, files={**example_files(), "gateway.toml": config_text(gateway="gw-0002")}
            ),
            "config",
            "gateway.id is 'gw-0002' but this gateway is 'gw-0001'",
        ),
        "broker CA missing": (
            make_bundle(
                version=5,
                files={
                    "gateway.toml": config_text().replace(b'"certs/ca.pem"', b'"certs/other.pem"')
                },
            ),
            "config",
            "broker.ca_file = 'certs/other.pem' is not in the bundle",
        ),
        "broker CA outside the release": (
            make_bundle(
                version=5,
                files={
                    "gateway.toml": config_text().replace(
                        b'"certs/ca.pem"', b'"../../../../etc/ssl/x.pem"'
                    )
                },
            ),
            "config",
            "broker.ca_file = '../../../../etc/ssl/x.pem' points outside the release",
        ),
        "database inside the release": (
            make_bundle(
                version=5,
                files={
                    "gateway.toml": config_text().replace(
                        b'"/var/lib/edgegw/gateway.db"', b'"gateway.db"'
                    )
                },
            ),
            "config",
            "storage.path must be an absolute path outside the configuration",
        ),
    }


CASES = [
    "bad signature", "hash mismatch", "truncated", "extra file", "verify=false", "unsigned", "expired",
    "wrong target", "wrong site", "rollback", "same version, other content", "bad config",
    "config for another gateway", "broker CA missing", "broker CA outside the release",
    "database inside the release",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
async def test_refused_and_nothing_applied(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path, case: str
) -> None:
    rec = Recorder()
    assert (await run(make_bundle(version=2), stick, root, role_key, rec, name="base.egwb")).ok
    before = snapshot(root)
    data, code, message = _tamper_cases(make_bundle, role_key)[case]
    r = await run(data, stick, root, role_key, rec)
    assert r.outcome == "refused"
    assert r.code == code, r.reason
    assert message in r.reason
    assert snapshot(root) == before, "a refused bundle changed the installed state"
    assert len(rec.reloads) == 1
    kind, detail = rec.audit[-1]
    assert kind == AUDIT_KIND and detail["outcome"] == "refused" and detail["code"] == code
    assert message in detail["reason"]


async def test_first_bundle_must_carry_config(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    r = await run(make_bundle(files={"tariffs/a.toml": b"x=1\n"}), stick, root, role_key, rec)
    assert (r.outcome, r.code) == ("refused", "config")
    assert "a first bundle must carry the gateway configuration" in r.reason
    assert current_release(root) is None
    assert snapshot(root)["releases"] == []


@pytest.mark.parametrize("kind", ["symlink", "fifo", "chardev", "directory", "missing"])
async def test_source_must_be_a_regular_file(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path, kind: str
) -> None:
    rec = Recorder()
    src = stick / "b.egwb"
    real = stick / "real.egwb"
    real.write_bytes(make_bundle())
    if kind == "symlink":
        src.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(src)
    elif kind == "chardev":
        src.symlink_to("/dev/zero")  # a link to a device: refused as a link
    elif kind == "directory":
        src.mkdir()
    r = await run(None, stick, root, role_key, rec)
    assert r.outcome == "refused"
    expected = {
        "symlink": "is a symbolic link",
        "fifo": "is a FIFO",
        "chardev": "is a symbolic link",
        "directory": "is a directory",
        "missing": "cannot open",
    }[kind]
    assert expected in r.reason
    assert current_release(root) is None
    assert rec.audit[-1][1]["outcome"] == "refused"


async def test_device_file_refused(stick: Path, root: Path, role_key: Ed25519PrivateKey) -> None:
    rec = Recorder()
    r = await apply_bundle(
        Path("/dev/zero"), root=root, verify_key=role_key.public_key(),
        identity=DeviceIdentity(GATEWAY), check=check_release, now=NOW, audit=rec.record,
    )  # fmt: skip
    assert (r.outcome, r.code) == ("refused", "not-regular")
    assert "is a character device" in r.reason


async def test_oversized_source_refused(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    data = make_bundle()
    r = await run(data, stick, root, role_key, rec, max_bytes=len(data) - 1)
    assert (r.outcome, r.code) == ("refused", "oversized")
    assert f"{len(data)} bytes, larger than the limit of {len(data) - 1}" in r.reason
    assert r.manifest is None and rec.audit[-1][1]["authenticated"] is False


async def test_overlay_keeps_config_and_drops_topups(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    first = {**example_files(), "topups/0001.json": b"{}"}
    assert (await run(make_bundle(version=1, files=first), stick, root, role_key, rec)).ok
    r = await run(
        make_bundle(
            version=2, target="site:site-hilltop", files={"tariffs/residential.toml": b"new\n"}
        ),
        stick,
        root,
        role_key,
        rec,
    )
    assert r.outcome == "accepted", r.reason
    files = snapshot(root)["files"]
    assert files["tariffs/residential.toml"] == b"new\n"
    assert files["gateway.toml"] == example_files()["gateway.toml"]
    assert "topups/0001.json" not in files
    prev = previous_release(root)
    assert prev is not None and prev.version == 1


async def test_reload_failure_restores_previous(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    assert (await run(make_bundle(version=1), stick, root, role_key, rec)).ok
    before = snapshot(root)

    async def broken(release: Release) -> None:
        raise RuntimeError("broker unreachable")

    (stick / "b.egwb").write_bytes(make_bundle(version=2))
    r = await apply_bundle(
        stick / "b.egwb", root=root, verify_key=role_key.public_key(),
        identity=DeviceIdentity(GATEWAY), check=check_release, now=NOW, audit=rec.record,
        reload=broken,
    )  # fmt: skip
    assert (r.outcome, r.code) == ("refused", "reload-failed")
    assert "broker unreachable" in r.reason
    assert snapshot(root) == before


async def test_rollback_and_recover(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    assert (await run(make_bundle(version=1), stick, root, role_key, rec)).ok
    v1 = snapshot(root)
    extra = {**example_files(), "tariffs/residential.toml": b"v2\n"}
    assert (await run(make_bundle(version=2, files=extra), stick, root, role_key, rec)).ok
    assert snapshot(root)["files"]["tariffs/residential.toml"] == b"v2\n"
    rel = rollback(root)
    assert rel.version == 1
    after = snapshot(root)
    assert after["files"] == v1["files"] and after["current"] == v1["current"]
    assert after["previous"] is None
    # Leftovers of an interrupted apply are cleaned, the release in force is not touched.
    (root / "releases" / ".staging-dead").mkdir()
    (root / "releases" / "v0000000000000009-orphan").mkdir()
    os.symlink("releases/x", root / "current.tmp")
    assert sorted(recover(root)) == [
        "current.tmp",
        "releases/.staging-dead",
        "releases/v0000000000000009-orphan",
    ]
    assert snapshot(root) == after


async def test_carry_back(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path, tmp_path: Path
) -> None:
    rec = Recorder()
    r1 = await run(make_bundle(version=1, backlog=True), stick, root, role_key, rec)
    r2 = await run(
        make_bundle(version=1, target="gw-0099"), stick, root, role_key, rec, name="other.egwb"
    )
    calls: list[Path] = []

    async def export(d: Path) -> dict[str, int]:
        calls.append(d)
        (d / "backlog-0001.sealed").write_bytes(b"sealed")
        return {"records": 12}

    out = tmp_path / "out" / "gw-0001"
    written = await write_carry_back(
        out, [r1, r2], identity=DeviceIdentity(GATEWAY, "site-hilltop"), software_version="0.1.0",
        serial="SN123", enrollment=lambda: {"identity": "ed25519:abcd"}, export_backlog=export, now=NOW,
    )  # fmt: skip
    assert calls == [out / "backlog"]
    assert {p.name for p in written} == {"backlog", "enrollment.json", "result.json"}
    result = json.loads((out / "result.json").read_text())
    assert [x["outcome"] for x in result["results"]] == ["accepted", "refused"]
    assert result["results"][1]["code"] == "wrong-target"
    assert result["backlog_export"] == {
        "requested": True,
        "status": "written",
        "info": {"records": 12},
    }
    enrol = json.loads((out / "enrollment.json").read_text())
    assert enrol["public_keys"] == {"identity": "ed25519:abcd"} and enrol["serial"] == "SN123"


async def test_carry_back_backlog_only_when_asked(
    tmp_path: Path, make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    # A refused bundle (other gateway) asking for the backlog does not trigger an export here.
    r = await run(make_bundle(target="gw-0099", backlog=True), stick, root, role_key, rec)
    called = False

    async def export(d: Path) -> None:
        nonlocal called
        called = True

    await write_carry_back(
        tmp_path / "a",
        [r],
        identity=DeviceIdentity(GATEWAY),
        software_version="x",
        export_backlog=export,
        now=NOW,
    )
    assert not called
    assert json.loads((tmp_path / "a" / "result.json").read_text())["backlog_export"] == {
        "requested": False
    }
    # The technician's own request does.
    await write_carry_back(
        tmp_path / "b",
        [],
        identity=DeviceIdentity(GATEWAY),
        software_version="x",
        export_backlog=export,
        technician_asked_backlog=True,
        now=NOW,
    )
    assert called


async def test_expiry_uses_given_time(
    make_bundle: MakeBundle, role_key: Ed25519PrivateKey, stick: Path, root: Path
) -> None:
    rec = Recorder()
    data = make_bundle(expires=NOW + timedelta(hours=1))
    r = await run(data, stick, root, role_key, rec, now=NOW + timedelta(hours=2))
    assert r.code == "expired"
    r = await run(data, stick, root, role_key, rec, now=NOW)
    assert r.outcome == "accepted"
