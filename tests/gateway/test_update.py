"""Software updates of a running gateway, end to end, with real releases.

Real parts: releases built from this tree and installed by the product's
installer (a virtualenv each, from a signed bundle's wheelhouse, no index:
tests/harness/releases.py, built once per session), the daemon run from
``<root>/current/bin/edgegw`` and restarted the way systemd does, a Modbus TCP
simulator, a real mosquitto, the USB unit's import and process steps, the
updater with its health gate reading the daemon's health file. Checked: an
update by USB commits once the new release is healthy, on the database the
old release made; a release whose entry point fails is rolled back without a
person and not tried again; the version floor refuses the older release unless
a signed operations-role offer allows it; a SIGKILL of the updater at each
step of the switch, followed by the recovery (the same boot, or a boot after
a power cut), leaves a complete release running.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.security.roles import CommandType, Role
from gateway.update import Updater, UpdateSettings, health_verdict, read_boot_id, read_heartbeat
from gateway.update_transfer import offer_for
from provisioning.keyfiles import load_public_key
from provisioning.usb import copy_bundles_to_spool
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import site_config, until
from tests.harness.mosquitto import Mosquitto
from tests.harness.releases import REPO, Kit, Supervisor, kit
from tests.security.conftest import Central

GW = "gw-update"


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return kit(tmp_path_factory)


@dataclass
class Site:
    tmp: Path
    root: Path
    config: Path
    db: Path
    health: Path
    audit: Path
    spool: Path
    supervisor: Supervisor
    kit: Kit

    def settings(self, **kw: object) -> UpdateSettings:
        s = UpdateSettings(
            root=self.root,
            heartbeat_file=self.health,
            restart=self.supervisor.restart,
            verify_key=load_public_key(self.kit.pubkey),
            health_timeout_s=40.0,
            settle_s=1.0,
            poll_s=0.1,
            audit_spool=self.audit,
        )
        for k, v in kw.items():
            setattr(s, k, v)
        return s

    def healthy(self, version: str) -> bool:
        why = health_verdict(read_heartbeat(self.health), version=version, boot=read_boot_id())  # fmt: skip
        return why is None

    async def wait_healthy(self, version: str, timeout_s: float = 40.0) -> None:
        await until(lambda: self.healthy(version), timeout_s,
                    f"release {version} healthy; log:\n{self.supervisor.tail()}")  # fmt: skip

    def records(self) -> int:
        with sqlite3.connect(self.db) as db:
            kv = dict(db.execute("SELECT key, value FROM kv"))
        return int(kv.get("readings_committed", 0))

    def audit_records(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]


@pytest.fixture
async def site(
    tmp_path: Path, releases: Kit, mosquitto: Mosquitto
) -> AsyncIterator[Site]:
    async with ModbusSimulator(units=[1, 2]) as sim:
        root = releases.root(tmp_path / "opt", releases.old, releases.new, releases.broken)
        db = tmp_path / "gw.db"
        config = site_config(tmp_path / "gateway.toml", gateway_id=GW, db=db,
                             broker_port=mosquitto.port, modbus_port=sim.port, units=[1, 2])  # fmt: skip
        health = tmp_path / "run" / "heartbeat.json"
        sup = Supervisor(root, config, health, tmp_path / "daemon.log")
        sup.start()
        s = Site(tmp_path, root, config, db, health, tmp_path / "prov" / "audit-spool.jsonl",
                 tmp_path / "updates", sup, releases)  # fmt: skip
        try:
            await s.wait_healthy(releases.old)
            yield s
        finally:
            await asyncio.to_thread(s.supervisor.stop)


async def test_a_bundle_from_a_usb_stick_updates_the_running_gateway(
    site: Site, releases: Kit
) -> None:
    # The technician's stick: the new release, and a copy with one byte changed.
    stick = site.tmp / "stick"
    (stick / "edgegw").mkdir(parents=True)
    shutil.copy(releases.bundle(releases.new), stick / "edgegw" / "edgegw-new.egws")
    bad = bytearray(releases.bundle(releases.new).read_bytes())
    bad[-100] ^= 0x01
    (stick / "edgegw" / "edgegw-tampered.egws").write_bytes(bad)
    usb = site.tmp / "usb-spool"
    usb.mkdir()
    # Step 1 (import, privileged) and step 2 (process, as the service user, from
    # the committed release) of edgegw-usb@.service.
    copy_bundles_to_spool(stick, usb)
    committed = site.root / "committed" / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = await asyncio.to_thread(subprocess.run, [str(committed / "edgegw"), "keys", "init", "--dir", str(site.tmp / "keys"),
                        "--gateway-id", GW], capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = await asyncio.to_thread(
        subprocess.run,
        [str(committed / "python"), "-m", "gateway.provision_usb", "process", "--spool", str(usb),
         "--state-dir", str(site.tmp / "prov"), "--pubkey", str(releases.pubkey),
         "--keystore", str(site.tmp / "keys"), "--update-spool", str(site.spool)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((usb / "out" / "result.json").read_text())["results"]
    outcomes = {x["source"].split("-", 1)[1]: (x["outcome"], x["code"]) for x in result}
    assert outcomes == {
        "edgegw-new.egws": ("queued", "software-queued"),
        "edgegw-tampered.egws": ("refused", "hash-mismatch"),
    }, result
    ready = list((site.spool / "ready").iterdir())
    assert [p.name for p in ready] == [f"{result[0]['bundle_sha256']}.egws"]

    # edgegw-update.path would start the updater now; it installs the release
    # (a fresh venv: the template's copy is removed first), switches and judges it.
    shutil.rmtree(site.root / "releases" / releases.new)
    before = site.records()
    up = Updater(site.settings())
    (res,) = await asyncio.to_thread(up.apply_spool, site.spool)
    assert (res.outcome, res.code) == ("committed", "ok"), (res, site.supervisor.tail())
    assert os.readlink(site.root / "current") == f"releases/{releases.new}"
    assert os.readlink(site.root / "committed") == f"releases/{releases.new}"
    assert site.healthy(releases.new)
    assert not list((site.spool / "ready").iterdir()), "the bundle leaves the spool"
    # The new release opened the old release's database and goes on committing into it.
    await until(lambda: site.records() > before + 4, 20, "readings committed by the new release")
    assert up.status()["floor"] == releases.new
    assert site.audit_records()[-1]["detail"]["outcome"] == "committed"  # type: ignore[index]

    # The same bundle again changes nothing; the older release is below the floor.
    again = await asyncio.to_thread(up.apply, releases.bundle(releases.new))
    assert (again.outcome, again.code) == ("noop", "already-installed")
    older = await asyncio.to_thread(up.apply, releases.bundle(releases.old))
    assert (older.outcome, older.code) == ("refused", "below-floor"), older
    assert os.readlink(site.root / "current") == f"releases/{releases.new}"

    # A signed operations-role offer with allow_downgrade lets exactly that bundle in.
    central = Central()
    trust = central.trust()
    body = offer_for(releases.bundle(releases.old), version=releases.old).to_json()
    now = int(time.time() * 1000)
    forged = central.cmd(CommandType.SOFTWARE_OFFER, {**body, "allow_downgrade": True},
                         target=GW, role=Role.OPERATIONS, key=central.keys[Role.BILLING],
                         issued_at=now - 1000, expires_at=now + 3_600_000)  # fmt: skip
    permit = central.cmd(CommandType.SOFTWARE_OFFER, {**body, "allow_downgrade": True},
                         target=GW, issued_at=now - 1000, expires_at=now + 3_600_000)  # fmt: skip
    up = Updater(site.settings(trust=trust, gateway_id=GW))
    refused = await asyncio.to_thread(
        up.apply, releases.bundle(releases.old), permit=forged
    )
    assert refused.code == "below-floor", "a permit signed with the wrong key allows nothing"
    down = await asyncio.to_thread(up.apply, releases.bundle(releases.old), permit=permit)
    assert (down.outcome, down.running) == ("committed", releases.old), (down, site.supervisor.tail())
    assert up.status()["floor"] == releases.old
    assert site.healthy(releases.old)


async def test_a_broken_release_is_rolled_back_without_a_person(site: Site, releases: Kit) -> None:
    up = Updater(site.settings(health_timeout_s=8.0))
    res = await asyncio.to_thread(up.apply, releases.bundle(releases.broken))
    assert (res.outcome, res.code) == ("rolled-back", "unhealthy"), res
    assert res.running == releases.old
    assert "not healthy in time" in res.reason
    assert os.readlink(site.root / "current") == f"releases/{releases.old}"
    assert os.readlink(site.root / "committed") == f"releases/{releases.old}"
    # The broken release did run (and exit 3) while it was current.
    assert 3 in site.supervisor.exits, site.supervisor.tail()
    await site.wait_healthy(releases.old, 30)
    rec = site.audit_records()[-1]["detail"]
    assert rec["outcome"] == "rolled-back" and rec["version"] == releases.broken  # type: ignore[index]
    # Never tried again by itself.
    again = await asyncio.to_thread(up.apply, releases.bundle(releases.broken))
    assert (again.outcome, again.code) == ("refused", "failed-before")
    assert os.readlink(site.root / "current") == f"releases/{releases.old}"


def test_the_release_commands_build_verify_and_offer_a_bundle(
    releases: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main
    from gateway.update_transfer import parse_offer

    out = tmp_path / "b.egws"
    wh = releases.wheelhouse(releases.new)
    assert main(["release", "build", "--wheelhouse", str(wh), "--lock", str(REPO / "requirements.lock"),
                 "--key", str(releases.key), "--out", str(out)]) == 0  # fmt: skip
    assert f"edge-gateway {releases.new} (floor {releases.new})" in capsys.readouterr().out
    assert main(["release", "verify", str(out), "--pubkey", str(releases.pubkey)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["release", "offer", str(out), "--allow-downgrade"]) == 0
    offer = parse_offer(json.loads(capsys.readouterr().out))
    assert offer.allow_downgrade and offer.version == releases.new
    # A wheelhouse missing a locked wheel is refused; so is another key's bundle.
    broken = tmp_path / "wh"
    shutil.copytree(wh, broken)
    next(broken.glob("orjson-*.whl")).unlink()
    assert main(["release", "build", "--wheelhouse", str(broken), "--lock", str(REPO / "requirements.lock"),
                 "--key", str(releases.key), "--out", str(tmp_path / "c.egws")]) == 2  # fmt: skip
    assert "orjson==" in capsys.readouterr().err and not (tmp_path / "c.egws").exists()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    assert main(["release", "verify", str(out), "--pubkey", str(other)]) == 1
    assert "bad-signature" in capsys.readouterr().err


# -- power cuts --------------------------------------------------------------

CHILD = """
import os, signal, sys
from pathlib import Path
from gateway.update import Updater, UpdateSettings, restart_command
from provisioning.keyfiles import load_public_key
root, health, pub, bundle, kill_at, restart = sys.argv[1:7]
def step(label):
    print("step", label, flush=True)
    if label == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
s = UpdateSettings(root=Path(root), heartbeat_file=Path(health), verify_key=load_public_key(Path(pub)),
                   restart=restart_command(["sh", "-c", restart]), settle_s=1.0, poll_s=0.1,
                   health_timeout_s=40.0)
r = Updater(s, step=step).apply(Path(bundle))
print("result", r.outcome, r.code, flush=True)
"""

STEPS = [
    "install-started", "venv-made", "installed", "switching", "current-link-made",
    "current-swapped", "trial", "restarted", "committing", "committed-link-made",
    "committed-swapped", "idle",
]  # fmt: skip
QUICK = ["switching", "current-swapped", "restarted", "committing"]


def _kill_cases(long_run: bool) -> Iterator[tuple[str, bool]]:
    for step in STEPS if long_run else QUICK:
        yield step, False  # the updater is killed, the machine stays up
    yield "restarted", True  # a power cut during the trial: recovery at the next boot


@pytest.mark.parametrize("step,reboot", list(_kill_cases(False)))
async def test_a_power_cut_at_each_step_of_the_switch_leaves_a_release(
    site: Site, releases: Kit, step: str, reboot: bool
) -> None:
    await _power_cut(site, releases, step, reboot)


@pytest.mark.long
@pytest.mark.parametrize("step", [s for s in STEPS if s not in QUICK])
async def test_a_power_cut_at_every_other_step(site: Site, releases: Kit, step: str) -> None:
    await _power_cut(site, releases, step, False)


async def _power_cut(site: Site, releases: Kit, step: str, reboot: bool) -> None:
    if step in ("install-started", "venv-made", "installed"):
        shutil.rmtree(site.root / "releases" / releases.new)  # the install itself is cut
    env = dict(os.environ, PYTHONPATH=str(REPO))
    restart = " ".join(site.supervisor.restart_argv()[2:])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(site.root), str(site.health), str(releases.pubkey),
        str(releases.bundle(releases.new)), step, restart, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == -9, out.decode()
    assert f"step {step}" in out.decode()
    # Whatever it was cut at, `current` names a complete release.
    current = os.readlink(site.root / "current").split("/")[1]
    up = Updater(site.settings(boot_id="another-boot" if reboot else read_boot_id()))
    assert up.info(current) is not None
    if reboot:
        # The daemon died with the machine; the boot-time recovery runs before it starts.
        await asyncio.to_thread(site.supervisor.stop)
    result = await asyncio.to_thread(up.recover, restart=not reboot)
    state = up.state()
    assert state["phase"] == "idle", state
    running = os.readlink(site.root / "current").split("/")[1]
    assert up.info(running) is not None and up.info(up.link("committed")) is not None
    if reboot or step in ("install-started", "venv-made", "installed", "switching",
                          "current-link-made", "current-swapped"):  # fmt: skip
        # Not yet judged: the old release is back (an interrupted switch is tried again).
        assert running == releases.old, (step, result)
        if step not in ("install-started", "venv-made", "installed"):
            assert result is not None and result.outcome == "interrupted"
    else:
        # The trial had begun in this boot: the recovery judged it and kept the new one.
        assert running == releases.new, (step, result, site.supervisor.tail())
        assert os.readlink(site.root / "committed") == f"releases/{releases.new}"
    if reboot:
        sup = Supervisor(site.root, site.config, site.health, site.tmp / "daemon-after.log")
        site.supervisor = sup
        sup.start()
    await site.wait_healthy(running)
