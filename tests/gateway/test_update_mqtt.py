"""A software bundle over MQTT: a signed offer, chunks that resume after a link
drop, the updater, the new release running.

Real parts: the releases of tests/harness/releases.py, the daemon run from the
releases root the way systemd runs it, a real mosquitto (killed and started
again mid-transfer: its retained chunks are gone with it, central publishes
them again), a Modbus TCP simulator, envelopes signed with real role keys.
Checked: an offer signed by a key of the wrong role is refused and nothing is
fetched; the gateway fetches the chunks central has published, survives the
link drop, asks only for the chunks it lacks (every chunk fetched once), checks
each chunk and the whole bundle, and hands it to the updater, which installs
and commits it; the daemon then runs the new release on the old database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from gateway.security.roles import CommandType, Role
from gateway.update import Updater, UpdateSettings, health_verdict, read_boot_id, read_heartbeat
from gateway.update_transfer import Offer, chunk_topic, offer_for
from provisioning.keyfiles import load_public_key
from store_forward.topics import Topics
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import site_config, until
from tests.harness.mosquitto import Mosquitto
from tests.harness.releases import Kit, Supervisor, kit
from tests.security.conftest import Central

GW = "gw-mqtt"
PREFIX = "edgegw/v1"


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return kit(tmp_path_factory)


async def publish(port: int, bundle: Path, offer: Offer, indexes: range) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="central-publisher") as c:
        with bundle.open("rb") as fh:
            for i in indexes:
                fh.seek(i * offer.chunk_size)
                data = fh.read(offer.chunk_size)
                await c.publish(chunk_topic(PREFIX, offer.sha256, i), data, qos=1, retain=True)


async def send(port: int, raw: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="central-commands") as c:
        await c.publish(Topics(PREFIX, GW).cmd, raw, qos=1)


def audit_actions(db: Path, prefix: str) -> list[tuple[str, dict[str, object]]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT action, details FROM audit_log WHERE action LIKE ? ORDER BY seq", (prefix + "%",)
        ).fetchall()
    return [(str(a), json.loads(d)) for a, d in rows]


def part_chunks(part: Path, offer: Offer) -> int:
    """Chunks on disk with the hash the offer lists."""
    import hashlib

    if not part.exists():
        return 0
    data = part.read_bytes()
    return sum(
        hashlib.sha256(data[i * offer.chunk_size : (i + 1) * offer.chunk_size]).hexdigest() == h
        for i, h in enumerate(offer.chunks)
    )


@pytest.fixture
async def gateway(tmp_path: Path, releases: Kit, mosquitto: Mosquitto) -> AsyncIterator[tuple[Path, Supervisor, Central]]:
    central = Central()
    async with ModbusSimulator(units=[1]) as sim:
        root = releases.root(tmp_path / "opt", releases.old, releases.new)
        config = site_config(tmp_path / "gateway.toml", gateway_id=GW, db=tmp_path / "gw.db",
                             broker_port=mosquitto.port, modbus_port=sim.port, units=[1])  # fmt: skip
        (tmp_path / "trust.json").write_text(json.dumps(central.trust().to_dict()))
        config.write_text(config.read_text() + '\n[security]\ntrust_file = "trust.json"\n')
        sup = Supervisor(root, config, tmp_path / "run" / "heartbeat.json", tmp_path / "daemon.log")
        sup.start()
        try:
            yield tmp_path, sup, central
        finally:
            await asyncio.to_thread(sup.stop)


async def test_a_bundle_offered_over_mqtt_resumes_after_a_link_drop_and_is_installed(
    gateway: tuple[Path, Supervisor, Central], releases: Kit, mosquitto: Mosquitto
) -> None:
    tmp, sup, central = gateway
    health = tmp / "run" / "heartbeat.json"

    def healthy(version: str) -> bool:
        return health_verdict(read_heartbeat(health), version=version, boot=read_boot_id()) is None  # fmt: skip

    await until(lambda: healthy(releases.old), 40, f"old release healthy:\n{sup.tail()}")
    bundle = releases.bundle(releases.new)
    offer = offer_for(bundle, version=releases.new)
    total = len(offer.chunks)
    assert total > 20, "a bundle of many chunks"
    spool = tmp / "updates"
    part = spool / "incoming" / f"{offer.sha256}.part"
    now = int(time.time() * 1000)
    half = total // 2

    # Central publishes half of the chunks (retained), then offers the bundle.
    await publish(mosquitto.port, bundle, offer, range(half))
    wrong_role = central.cmd(CommandType.SOFTWARE_OFFER, offer.to_json(), target=GW,
                             role=Role.OPERATIONS, key=central.keys[Role.BILLING],
                             issued_at=now - 1000, expires_at=now + 3_600_000)  # fmt: skip
    await send(mosquitto.port, wrong_role)
    good = central.cmd(CommandType.SOFTWARE_OFFER, offer.to_json(), target=GW,
                       issued_at=now - 1000, expires_at=now + 3_600_000)  # fmt: skip
    await until(lambda: any(d.get("outcome") == "rejected" for _, d in
                            audit_actions(tmp / "gw.db", "command.")), 20,
                "the forged offer is refused")  # fmt: skip
    assert not (spool / "offers").exists() or not list((spool / "offers").iterdir())
    await send(mosquitto.port, good)
    await until(lambda: part_chunks(part, offer) == half, 40,
                f"the published half fetched:\n{sup.tail()}")  # fmt: skip

    # The link drops: the broker dies with its retained chunks; central publishes
    # every chunk again once it is back.
    await asyncio.to_thread(mosquitto.restart)
    await publish(mosquitto.port, bundle, offer, range(total))
    ready = spool / "ready" / f"{offer.sha256}.egws"

    def downloaded() -> list[dict[str, object]]:
        return [d for a, d in audit_actions(tmp / "gw.db", "software.") if a == "software.downloaded"]

    # the bundle is handed over first, then the download is recorded
    await until(lambda: ready.exists() and downloaded() != [], 90,
                f"the whole bundle downloaded and recorded:\n{sup.tail()}")  # fmt: skip
    assert ready.read_bytes() == bundle.read_bytes()
    assert not part.exists() and not list((spool / "offers").iterdir())
    done = downloaded()
    assert len(done) == 1 and done[0]["chunks_fetched"] == total, done  # none fetched twice

    # edgegw-update.path starts the updater on the spool.
    up = Updater(UpdateSettings(root=tmp / "opt", heartbeat_file=health, restart=sup.restart,
                                verify_key=load_public_key(releases.pubkey), settle_s=1.0,
                                poll_s=0.1, health_timeout_s=40.0,
                                audit_spool=tmp / "prov" / "audit-spool.jsonl"))  # fmt: skip
    (res,) = await asyncio.to_thread(up.apply_spool, spool)
    assert (res.outcome, res.running) == ("committed", releases.new), (res, sup.tail())
    assert os.readlink(tmp / "opt" / "current") == f"releases/{releases.new}"
    assert healthy(releases.new)
