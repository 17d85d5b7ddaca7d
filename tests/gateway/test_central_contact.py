"""Contact with central, as the running daemon's cutoff policy sees it, counts only
authenticated messages: junk or forgeries on the ack and command topics leave
out-of-contact protection in force; a signed command or a verified ack lifts it.

Real parts: the daemon (sealed uplink, command handler) polling a Modbus
simulator, real mosquitto, the real headend with a gateway registry.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt

from gateway.billing.cutoff import CutoffConfig, Pending, protection
from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.security.roles import CommandType
from headend.ingest import Headend
from headend.registry import headend_public_b64
from headend.store import HeadendDB
from store_forward.acks import encode_ack
from store_forward.topics import Topics
from store_forward.uplink import LinkState
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.mosquitto import Mosquitto
from tests.harness.site import gateway_config, meter
from tests.security.conftest import GATEWAY, Central
from tests.store_forward.helpers import Site, wait_for

# Trips wait while central has not been heard from for a minute.
POLICY = CutoffConfig(alarm1_micro=2_000_000, alarm2_micro=1_000_000, contact_protect_after_ms=60_000)


def site_config(tmp: Path, site: Site, central: Central, broker_port: int, modbus_port: int) -> Path:
    keys = tmp / f"keys-{GATEWAY}"
    site.gateway(GATEWAY)  # keystore made and enrolled at the headend
    (tmp / "trust.json").write_text(json.dumps(central.trust().to_dict()))
    return gateway_config(
        tmp,
        GATEWAY,
        modbus_port=modbus_port,
        broker={"port": broker_port, "keepalive_s": 5},
        uplink={
            "headend_public_key": headend_public_b64(site.headend_key_path),
            "ack_timeout_s": 2.0,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
        },
        security={"trust_file": "trust.json", "keystore": str(keys)},
        meters=[meter()],
        name="gateway.toml",
    )


async def test_only_authenticated_messages_lift_out_of_contact_protection(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    central = Central()
    site = Site(tmp_path)
    topics = Topics("edgegw/v1", GATEWAY)
    async with ModbusSimulator(units=[1]) as sim:
        cfg = load_config(site_config(tmp_path, site, central, mosquitto.port, sim.port))
        daemon = Daemon(cfg)
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            up, commands = daemon.uplink, daemon.commands
            assert up is not None and commands is not None and up.codec.sealed
            await until(lambda: up.stats.state is LinkState.UP and up.stats.published >= 1, 10, "batch sent")
            outbox = daemon.outbox
            assert outbox is not None
            epoch = await outbox.batch_epoch()
            seq = (await outbox.pending_batches())[0]

            def contact_lost() -> bool:
                return protection(daemon.clock_ms(), daemon.contact(), POLICY) is Pending.CONTACT_LOST

            assert contact_lost()  # never heard from central since start
            now = daemon.clock_ms()
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="intruder") as intruder:
                for junk in (
                    b"junk",
                    b'{"seq": 1, "status": "stored"}',
                    encode_ack(seq=seq, epoch=epoch, status="stored", mac=bytes(32)),
                ):
                    await intruder.publish(topics.ack, junk, qos=1)
                impostor = Central()  # keys the gateway does not trust
                for junk in (
                    b"\x00junk",
                    impostor.cmd(CommandType.TIME_SYNC, {"time_ms": now}, issued_at=now, expires_at=now + 60_000),
                    central.cmd(
                        CommandType.TIME_SYNC,
                        {"time_ms": now},
                        target="gw-other",
                        issued_at=now,
                        expires_at=now + 60_000,
                    ),
                ):
                    await intruder.publish(topics.cmd, junk, qos=1)
                await until(
                    lambda: sum(up.stats.acks_refused.values()) >= 3 and commands.stats.rejected >= 3,
                    10,
                    "junk handled",
                )
            assert daemon.contact().last_contact_ms is None and contact_lost()
            assert seq in await outbox.pending_batches()  # no forged ack deleted anything

            # A command whose signature verifies is central speaking: contact.
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="central") as c:
                now = daemon.clock_ms()
                sync = central.cmd(CommandType.TIME_SYNC, {"time_ms": now}, issued_at=now, expires_at=now + 60_000)
                await c.publish(topics.cmd, sync, qos=1)
                await until(lambda: commands.stats.applied == 1, 10, "signed command applied")
            assert up.stats.last_contact_source == "command" and not contact_lost()

            # The headend's acks verify: contact from acks, and the batches are deleted.
            by_command = daemon.contact().last_contact_ms
            assert by_command is not None
            hdb = await HeadendDB.open(tmp_path / "central.db")
            headend = asyncio.create_task(
                Headend(hdb, host="127.0.0.1", port=mosquitto.port, registry=site.registry()).run()
            )
            try:
                await until(lambda: up.stats.acked >= 1, 15, "a verified ack")
                assert up.stats.last_contact_source == "ack" and not contact_lost()
                assert (daemon.contact().last_contact_ms or 0) >= by_command


                async def deleted() -> bool:
                    return seq not in await outbox.pending_batches()  # type: ignore[union-attr]

                await wait_for(deleted, 15, "the batch deleted on its verified ack")
            finally:
                headend.cancel()
                await asyncio.gather(headend, return_exceptions=True)
                await hdb.close()
            stop.set()
            await asyncio.wait_for(run, 20)
        finally:
            stop.set()
            await asyncio.gather(run, return_exceptions=True)
