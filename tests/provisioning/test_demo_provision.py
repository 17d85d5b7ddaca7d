"""The demo's provisioning, with real files: keygen, make, stick, apply, carry-back.

The site files are the ones ``edgegw demo`` generates (its own config text,
trust file, account and tariff), so these tests also prove that the demo's
configuration satisfies the gateway's apply rules.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.release_check import check_release
from provisioning.apply import apply_bundle, current_release, previous_release
from provisioning.bundle import HEADER, DeviceIdentity, split_bundle, verify_bundle
from provisioning.keyfiles import load_public_key
from provisioning.keys import Keystore
from testbed import demo
from testbed import demo_story as story
from testbed.demo_provision import DemoProvisionError, ProvisionedSite, provision_demo_site
from testbed.simulators.dlt645 import Simulator as Dlt645Simulator
from testbed.simulators.dlt645 import make_meters
from testbed.simulators.modbus import ModbusSimulator
from tests.harness.mosquitto import free_port

GW = demo.GATEWAY_ID


def demo_files(
    workdir: Path,
    *,
    storage: str | None = None,
    modbus_port: int = 5020,
    tty: str = "/dev/ttyDEMO0",
    dlt_addresses: tuple[str, ...] = ("000000000001",),
) -> dict[str, bytes]:
    """The four files ``edgegw demo`` writes, keyed by their path in the bundle."""
    plan = story.make_plan(60.0, int(time.time() * 1000))
    gen = workdir / "generated"
    gen.mkdir(parents=True, exist_ok=True)
    demo.Central(gen)  # writes trust.json with central's billing key
    config = demo._config_text(workdir, free_port(), modbus_port, [1, 2], tty, list(dlt_addresses))
    if storage is not None:
        old = f'path = "{workdir / "gateway.db"}"'
        assert old in config
        config = config.replace(old, f'path = "{storage}"')
    return {
        "gateway.toml": config.encode(),
        "trust.json": (gen / "trust.json").read_bytes(),
        "household-01.toml": story.account_text(plan).encode(),
        "tariff-demo-flat.toml": story.tariff_text().encode(),
    }


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: symlink target, file hash, or 'dir'."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


async def reapply(site: ProvisionedSite, source: Path) -> tuple[str, str, str]:
    r = await apply_bundle(
        source,
        root=site.state_dir,
        verify_key=load_public_key(site.public_key),
        identity=DeviceIdentity(GW),
        check=check_release,
    )
    return r.outcome, r.code, r.reason


async def test_fresh_state_dir_is_provisioned(tmp_path: Path) -> None:
    files = demo_files(tmp_path)
    site = await provision_demo_site(tmp_path, files, gateway_id=GW)

    assert site.outcome == "accepted"
    assert site.line().startswith(f"provisioned: bundle {site.bundle_id} version {site.version}")
    # The daemon's configuration is the release in force, reached through `current`.
    assert site.config_path == site.state_dir / "current" / "files" / "gateway.toml"
    rel = current_release(site.state_dir)
    assert rel is not None and rel.name == site.release and rel.version == site.version
    assert previous_release(site.state_dir) is None
    for path, data in files.items():
        assert (site.config_path.parent / path).read_bytes() == data
    cfg = load_config(site.config_path)
    assert cfg.gateway.id == GW
    assert cfg.storage.path == tmp_path / "gateway.db"  # outside the release
    assert cfg.security.trust_file == site.config_path.parent / "trust.json"

    # The stick holds the signed bundle, verifiable with central's public key.
    data = site.bundle_path.read_bytes()
    assert site.bundle_path.parent == site.stick / "edgegw"
    assert hashlib.sha256(data).hexdigest() == site.bundle_sha256
    vb = verify_bundle(data, load_public_key(site.public_key))
    assert vb.manifest.bundle_id == site.bundle_id
    assert str(vb.manifest.target) == f"gateway:{GW}"
    assert dict(vb.files) == files

    # ...and the carry-back: the result of this bundle and the gateway's enrollment.
    result = json.loads((site.carry_back / "result.json").read_text())
    assert result["gateway_id"] == GW
    [r] = result["results"]
    assert (r["outcome"], r["code"], r["bundle_sha256"], r["version"]) == (
        "accepted",
        "ok",
        site.bundle_sha256,
        site.version,
    )
    assert r["authenticated"] is True
    enrollment = json.loads((site.carry_back / "enrollment.json").read_text())
    keystore = Keystore.open(tmp_path / "gateway-state" / "keys")
    assert enrollment["gateway_id"] == GW
    assert enrollment["public_keys"] == keystore.export_public()


async def test_tampered_copy_on_the_stick_is_refused_and_state_untouched(tmp_path: Path) -> None:
    site = await provision_demo_site(tmp_path, demo_files(tmp_path), gateway_id=GW)
    before = snapshot(site.state_dir)
    good = site.bundle_path.read_bytes()

    # One byte of a file body changed (the last file in the body is trust.json).
    body = bytearray(good)
    body[-2] ^= 0x01
    tampered = site.stick / "edgegw" / "tampered-body.egwb"
    tampered.write_bytes(bytes(body))
    outcome, code, reason = await reapply(site, tampered)
    assert (outcome, code) == ("refused", "hash-mismatch")
    assert reason.startswith("file 'trust.json': SHA-256 mismatch (manifest ")
    assert snapshot(site.state_dir) == before

    # One byte of the signed manifest changed: the signature no longer verifies.
    raw = split_bundle(good)
    manifest = bytearray(good)
    at = HEADER.size + raw.manifest_bytes.index(b'"technician":"') + len(b'"technician":"')
    manifest[at] ^= 0x01
    tampered = site.stick / "edgegw" / "tampered-manifest.egwb"
    tampered.write_bytes(bytes(manifest))
    outcome, code, reason = await reapply(site, tampered)
    assert (outcome, code) == ("refused", "bad-signature")
    assert reason == "signature does not verify with any of the 1 trusted provisioning key(s)"
    assert snapshot(site.state_dir) == before

    # The untampered bundle is still the release in force and still loads.
    assert load_config(site.config_path).gateway.id == GW


async def test_same_bundle_again_is_a_noop(tmp_path: Path) -> None:
    site = await provision_demo_site(tmp_path, demo_files(tmp_path), gateway_id=GW)
    before = snapshot(site.state_dir)
    outcome, code, reason = await reapply(site, site.bundle_path)
    assert (outcome, code) == ("noop", "already-installed")
    assert reason == f"bundle version {site.version} is already installed"
    assert snapshot(site.state_dir) == before


async def test_second_provisioning_upgrades_and_keeps_previous(tmp_path: Path) -> None:
    first = await provision_demo_site(tmp_path, demo_files(tmp_path), gateway_id=GW)
    second = await provision_demo_site(tmp_path, demo_files(tmp_path), gateway_id=GW)
    assert second.version > first.version
    assert second.release != first.release
    prev = previous_release(second.state_dir)
    assert prev is not None and prev.name == first.release
    # Only the new bundle was carried; each visit left its own carry-back.
    assert sorted(p.name for p in (second.stick / "edgegw").glob("*.egwb")) == [
        second.bundle_path.name
    ]
    assert first.carry_back != second.carry_back
    assert (first.carry_back / "result.json").is_file()
    # The gateway's keys were made once and are enrolled unchanged.
    e1 = json.loads((first.carry_back / "enrollment.json").read_text())["public_keys"]
    e2 = json.loads((second.carry_back / "enrollment.json").read_text())["public_keys"]
    assert e1 == e2


async def test_relative_storage_path_is_refused_before_signing(tmp_path: Path) -> None:
    """`provision make` runs the checks the gateway's apply runs: a bundle the
    gateway would refuse is never signed, so it never reaches the stick."""
    files = demo_files(tmp_path, storage="gateway.db")
    with pytest.raises(DemoProvisionError) as err:
        await provision_demo_site(tmp_path, files, gateway_id=GW)
    msg = str(err.value)
    assert "edgegw provision make failed (exit 1): bundle would be refused by the gateway" in msg
    assert "gateway.toml: storage.path must be an absolute path outside the configuration" in msg
    assert current_release(tmp_path / "gateway-state" / "provisioning") is None
    assert not list((tmp_path / "usb-stick").rglob("*.egwb"))


async def test_wrong_gateway_and_missing_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        DemoProvisionError, match=r"must carry the configuration as 'gateway\.toml'"
    ):
        await provision_demo_site(
            tmp_path, {"site.toml": demo_files(tmp_path)["gateway.toml"]}, gateway_id=GW
        )
    with pytest.raises(DemoProvisionError) as err:
        await provision_demo_site(tmp_path / "other", demo_files(tmp_path), gateway_id="gw-other")
    assert f"gateway.id is {GW!r} but this gateway is 'gw-other'" in str(err.value)


async def test_daemon_runs_from_the_provisioned_configuration(tmp_path: Path) -> None:
    """The demo's meters, its config signed and applied, the real daemon started from
    ``current/files/gateway.toml``: both buses are polled into the database outside
    the release, and central's trust file in the release is in force."""
    dlt_meters = make_meters(1)
    dlt_sim = Dlt645Simulator(dlt_meters)
    async with ModbusSimulator(units=[1, 2]) as sim:
        tty = await dlt_sim.start_pty()
        try:
            files = demo_files(
                tmp_path,
                modbus_port=sim.port,
                tty=tty,
                dlt_addresses=tuple(m.address for m in dlt_meters),
            )
            site = await provision_demo_site(tmp_path, files, gateway_id=GW)
            daemon = Daemon(load_config(site.config_path))
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop))
            try:
                await asyncio.wait_for(daemon.ready.wait(), 15)
                assert daemon.commands is not None  # the trust file from the release loaded
                deadline = time.monotonic() + 10
                while daemon.stats.readings < 6 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert daemon.stats.readings >= 6, daemon.stats
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
        finally:
            await dlt_sim.stop()
    assert (tmp_path / "gateway.db").is_file()
    assert not list(site.state_dir.rglob("*.db"))  # nothing of the database in a release
    with sqlite3.connect(f"file:{tmp_path / 'gateway.db'}?mode=ro", uri=True) as db:
        meters = {m for (m,) in db.execute("SELECT meter_id FROM meter_status")}
    assert meters == {"meter-01", "meter-02", "dlt-01"}
