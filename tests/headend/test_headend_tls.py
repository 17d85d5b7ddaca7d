"""The headend over TLS with its own client certificate (mutual TLS).

A real gateway :class:`Uplink` seals a backlog and publishes it through a broker
that requires client certificates; the :class:`Headend`, given a client TLS
context with the headend's certificate (``tls_context=``), stores every record
once and acks, so the gateway's outbox drains. The broker is real mosquitto
started from the shipped configuration (``examples/mosquitto``: mTLS, CN as
username, the shipped ACL), once with the transport tests' PKI and once with
the demo's (:mod:`testbed.demo_pki`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from gateway.config import BrokerSection
from headend.ingest import Headend
from headend.store import HeadendDB
from store_forward.outbox import Outbox
from store_forward.uplink import LinkState, Uplink, tls_context
from testbed.demo_pki import make_demo_pki
from tests.harness.mosquitto import Mosquitto
from tests.security.test_transport import TlsBroker
from tests.security.tls import HEADEND_CN, make_pki
from tests.store_forward.helpers import Site, running, settings, six_quantity_reading, wait_for

GW = "gw-a"


def _reading_ids(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [int(r) for (r,) in db.execute("SELECT record_id FROM readings ORDER BY record_id")]


async def _deliver(tmp_path: Path, gateway: BrokerSection, headend_tls: BrokerSection) -> Headend:
    """30 readings from a sealed uplink to a headend with a registry; both over mTLS."""
    site = Site(tmp_path / "keys")
    ks = site.gateway(GW)
    ob = await Outbox.open(tmp_path / "gw.db")
    hdb = await HeadendDB.open(tmp_path / "central.db")
    try:
        for k in range(3):
            await ob.commit_cycle(
                k, [six_quantity_reading(f"m{j}", 1_000 * k + j, k) for j in range(10)]
            )
        up = Uplink(ob, gateway_id=GW, broker=gateway, settings=settings(), codec=site.codec(ks))
        he = Headend(
            hdb,
            host=gateway.host,
            port=gateway.port,
            registry=site.registry(),
            tls_context=tls_context(headend_tls),
        )
        async with running(he.run()):
            await asyncio.wait_for(he.connected.wait(), 20)
            async with running(up.run()):

                async def drained() -> bool:
                    return (await ob.stats()).records == 0 and up.stats.state is LinkState.UP

                await wait_for(drained, 30, "backlog drained through the TLS broker")
        assert (await ob.stats()).readings_acked == 30
    finally:
        await ob.close()
        await hdb.close()
    assert len(_reading_ids(tmp_path / "central.db")) == 30
    assert he.rejected == 0
    return he


async def test_headend_with_client_certificate_ingests_through_mosquitto_mtls(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki", clients=(GW, HEADEND_CN))
    broker = TlsBroker(tmp_path / "broker", pki)
    broker.start()
    try:
        he = await _deliver(tmp_path, broker.section(GW), broker.section(HEADEND_CN))
    finally:
        broker.stop()
    assert he.batches_received >= 1


async def test_headend_with_client_certificate_ingests_with_the_demo_pki(
    tmp_path: Path,
) -> None:
    pki = make_demo_pki(tmp_path / "pki", gateway_ids=[GW])
    with Mosquitto.shipped(tmp_path / "broker", pki.broker_files()) as b:

        def section(ident: str) -> BrokerSection:
            pair = pki.client(ident)
            return BrokerSection(
                host="127.0.0.1",
                port=b.port,
                tls=True,
                ca_file=pki.ca,
                cert_file=pair.cert,
                key_file=pair.key,
                keepalive_s=10,
            )

        await _deliver(tmp_path, section(GW), section(pki.headend_id))


async def test_headend_without_a_client_certificate_gets_no_session(tmp_path: Path) -> None:
    """Server-verified TLS alone is not enough where the broker requires certificates."""
    pki = make_demo_pki(tmp_path / "pki", gateway_ids=[GW])
    no_cert = tls_context(BrokerSection(tls=True, ca_file=pki.ca))
    hdb = await HeadendDB.open(tmp_path / "central.db")
    try:
        with Mosquitto.shipped(tmp_path / "broker", pki.broker_files()) as b:
            he = Headend(hdb, host="127.0.0.1", port=b.port, tls_context=no_cert)
            async with running(he.run()):
                deadline = time.monotonic() + 20
                while "peer did not return a certificate" not in b.log_text():
                    assert time.monotonic() < deadline, "the broker saw no handshake"
                    await asyncio.sleep(0.05)
                assert not he.connected.is_set()
            assert b.sessions() == {}
    finally:
        await hdb.close()
