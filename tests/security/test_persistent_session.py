"""The gateways' persistent MQTT sessions under the shipped broker configuration.

A gateway keeps a session (clean session off) so the broker queues central's
commands while it is offline. The broker names every session by the client
certificate's CN, whatever client id is asked for (``use_username_as_clientid``,
examples/mosquitto/README.md): this checks that a holder of *another* gateway's
certificate connecting under the gateway's client id while commands wait for
it gets none of them, and leaves them queued for the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from gateway.config import BrokerSection
from store_forward.topics import Topics
from store_forward.uplink import tls_context
from tests.harness.mosquitto import Mosquitto, TlsFiles
from tests.security.tls import HEADEND_CN, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("gw-a", "gw-b", HEADEND_CN))


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    b = Mosquitto.shipped(tmp_path / "broker", TlsFiles(ca=pki.ca, crl=pki.crl, cert=pki.server.cert, key=pki.server.key))
    b.start()
    try:
        yield b
    finally:
        b.stop()


def client(pki: Pki, broker: Mosquitto, cn: str, identifier: str, *, clean: bool) -> aiomqtt.Client:
    pair = pki.clients[cn]
    section = BrokerSection(
        host="127.0.0.1", port=broker.port, tls=True, ca_file=pki.ca, cert_file=pair.cert, key_file=pair.key
    )
    return aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=identifier, tls_context=tls_context(section),
        clean_session=clean, timeout=5,
    )  # fmt: skip


async def received(c: aiomqtt.Client, within_s: float) -> list[bytes]:
    got: list[bytes] = []
    try:
        async with asyncio.timeout(within_s):
            async for m in c.messages:
                got.append(bytes(m.payload) if isinstance(m.payload, bytes) else b"")
    except TimeoutError:
        pass
    return got


async def test_commands_wait_for_the_gateway_and_another_certificate_under_its_client_id_gets_none(
    pki: Pki, broker: Mosquitto
) -> None:
    cmd = Topics("edgegw/v1", "gw-a").cmd
    # the gateway's session, subscribed, then offline
    async with client(pki, broker, "gw-a", "edgegw-gw-a", clean=False) as gw:
        await gw.subscribe(cmd, qos=1)
    async with client(pki, broker, HEADEND_CN, "central", clean=True) as central:
        await central.publish(cmd, b"command 1", qos=1)
    # the broker kept it for the gateway
    async with client(pki, broker, "gw-a", "edgegw-gw-a", clean=False) as gw:
        assert await received(gw, 2.0) == [b"command 1"]
    async with client(pki, broker, HEADEND_CN, "central", clean=True) as central:
        await central.publish(cmd, b"command 2", qos=1)
    # gw-b's certificate under gw-a's client ids (the old one and the CN): its own session
    for claimed in ("edgegw-gw-a", "gw-a"):
        async with client(pki, broker, "gw-b", claimed, clean=True) as thief:
            await thief.subscribe(cmd, qos=1)  # granted, but the ACL delivers nothing on it
            assert await received(thief, 1.0) == []
    # the gateway's session kept command 2 for it
    async with client(pki, broker, "gw-a", "edgegw-gw-a", clean=False) as gw:
        assert await received(gw, 2.0) == [b"command 2"]
    assert "as gw-b (" in broker.log_text()
