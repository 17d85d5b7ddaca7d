"""`edgegw demo` end to end over mutual TLS with a sealed uplink, and its refusal checks.

The whole demo runs once (a subprocess, as a user runs it); its report must
state what was observed on the wire, and the files it leaves must show the same
set-up. The refusal checks the demo runs are also tried against a broker (the
shipped mosquitto configuration with its protections switched off) and a
headend configured without those protections, where each check must report
"not refused" — so a check that always answered "refused" would fail here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from gateway.config import BrokerSection, load_config
from headend.ingest import Headend
from headend.store import HeadendDB
from store_forward.uplink import tls_context
from testbed import demo
from testbed.demo_pki import make_demo_pki
from tests.harness.mosquitto import Mosquitto
from tests.store_forward.helpers import running

ROOT = Path(__file__).resolve().parents[2]
GW = demo.GATEWAY_ID


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:  # type: ignore[type-arg]
    tmp = tmp_path_factory.mktemp("demo")
    report = tmp / "report.json"
    workdir = tmp / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "demo",
            "--duration",
            "9",
            "--meters",
            "2",
            "--dlt645-meters",
            "1",
            "--report",
            str(report),
            "--workdir",
            str(workdir),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(report.read_text()), workdir, proc.stdout


def test_demo_delivers_sealed_over_mutual_tls(demo_run: tuple[dict, Path, str]) -> None:  # type: ignore[type-arg]
    r, _, stdout = demo_run
    assert "result: OK — every reading delivered exactly once, sealed, over mutual TLS" in stdout
    assert r["readings_polled"] > 0 and r["readings_acked"] == r["readings_polled"]
    assert r["duplicates"] == 0 and r["lost"] == 0 and r["balances_match"] is True

    t = r["transport"]
    assert t["broker"] == demo.LOCAL_BROKER == "mosquitto, shipped configuration (examples/mosquitto)"
    assert t["tls"] is True and t["client_auth"] is True
    assert t["tls_version"] in ("TLSv1.2", "TLSv1.3")
    # the broker named every session by its certificate's CN, as client id and
    # username (use_username_as_clientid): the gateway's, the headend's and central's
    assert t["identities"][GW] == GW
    assert all(cid == user for cid, user in t["identities"].items())
    assert {GW, "edgegw-headend"} <= set(t["identities"]) <= {GW, "edgegw-headend", "edgegw-central"}
    assert t["acl"].startswith("each client only under edgegw/v1/<its CN>/")
    # every batch the headend took was sealed; it accepts this gateway only
    assert set(t["uplink_encodings"]) == {"2"} and t["uplink_encodings"]["2"] > 0
    assert t["headend_registry"] == [GW]
    # the one batch it refused is the demo's unsealed probe
    assert t["headend_rejected"] == {"unsealed batch (encoding 1) refused": 1}
    # the genuine top-up applied; the forged one refused for its signature
    assert t["commands"] == {"demo-sale-0001": "applied"}
    assert t["unauthenticated_commands"] == ["rejected (bad_signature)"]
    assert t["refused"] == {
        "client without a certificate": True,
        "plain MQTT on the broker's port": True,
        "demo-gw-02 subscribing to demo-gw-01's commands": True,
        "unsealed batch (encoding 1) sent with demo-gw-01's certificate": True,
        "top-up signed with a key the gateway does not trust": True,
    }
    story = "\n".join(r["prepaid_story"])
    assert "command demo-sale-0001 (topup): applied" in story
    assert "command (unauthenticated): rejected bad_signature" in story
    assert "relay close on meter-01: ok" in story


def test_demo_files_show_the_same_set_up(demo_run: tuple[dict, Path, str]) -> None:  # type: ignore[type-arg]
    _, workdir, _ = demo_run
    # the gateway ran from the provisioned release: broker credentials from the bundle,
    # its own keystore, the headend's public key
    cfg = load_config(
        workdir / "gateway-state" / "provisioning" / "current" / "files" / "gateway.toml"
    )
    release = cfg.source.parent
    assert cfg.broker.tls is True
    assert cfg.broker.ca_file == release / "certs" / "ca.pem"
    assert cfg.broker.cert_file == release / "certs" / "client.pem"
    assert cfg.broker.key_file == release / "certs" / "client.key"
    assert (cfg.broker.key_file.stat().st_mode & 0o077) == 0
    assert cfg.security.keystore == workdir / "gateway-state" / "keys"
    assert cfg.uplink.headend_public_key
    # central enrolled the gateway's public keys from the carry-back on the stick
    [enrollment] = (workdir / "usb-stick" / "edgegw" / "results").glob("*/enrollment.json")
    registry = json.loads((workdir / "central-headend" / "registry" / f"{GW}.json").read_text())
    assert registry == json.loads(enrollment.read_text())["public_keys"]
    # both protocols reached central
    with sqlite3.connect(workdir / "central.db") as db:
        meters = {m for (m,) in db.execute("SELECT DISTINCT meter_id FROM readings")}
    assert {"meter-01", "meter-02", "dlt-01"} <= meters


async def test_refusal_checks_report_what_an_open_set_up_lets_through(tmp_path: Path) -> None:
    """Server-only TLS, no ACL, a headend without a registry: every probe says "not refused"."""
    pki = make_demo_pki(tmp_path / "pki", gateway_ids=[GW, demo.NEIGHBOUR_ID])
    open_tls = Mosquitto.shipped(
        tmp_path / "broker",
        pki.broker_files(),
        overrides={
            "allow_anonymous": "true",
            "require_certificate": "false",
            "use_identity_as_username": "false",
            "use_username_as_clientid": "false",
            "acl_file": None,
        },
    )
    hdb = await HeadendDB.open(tmp_path / "central.db")

    async def command_traffic() -> None:  # what the demo's forged top-up is: a publish on cmd
        async with aiomqtt.Client(
            open_tls.host,
            open_tls.port,
            identifier="central",
            tls_context=pki.client_tls_context(pki.headend_id),
            timeout=10,
        ) as central:
            await central.publish(f"edgegw/v1/{GW}/cmd", b"a command", qos=1)

    try:
        with open_tls as broker:
            headend = Headend(
                hdb,
                host=broker.host,
                port=broker.port,
                tls_context=tls_context(BrokerSection(tls=True, ca_file=pki.ca)),
            )
            async with running(headend.run()):
                await asyncio.wait_for(headend.connected.wait(), 20)
                got = await demo._probe_refusals(broker, pki, headend, command_traffic)
    finally:
        await hdb.close()
    assert got == {
        "client without a certificate": False,
        "plain MQTT on the broker's port": True,  # still a TLS-only port
        "demo-gw-02 subscribing to demo-gw-01's commands": False,
        "unsealed batch (encoding 1) sent with demo-gw-01's certificate": False,
    }


async def test_demo_broker_serves_certified_clients_and_refuses_others(tmp_path: Path) -> None:
    pki = make_demo_pki(tmp_path / "pki", gateway_ids=[GW])
    args = argparse.Namespace(broker=None)
    async with demo._broker(args, pki, tmp_path) as (host, port, broker):
        assert broker is not None
        assert await demo._refused(host, port, pki.client_tls_context(GW), "c1") is False
        no_cert = tls_context(BrokerSection(tls=True, ca_file=pki.ca))
        assert await demo._refused(host, port, no_cert, "c2") is True
        assert await demo._refused(host, port, None, "c3") is True
        # the same certificate that connects, on an MQTT session of a real client
        async with aiomqtt.Client(
            host, port, identifier="c4", tls_context=pki.client_tls_context(GW), timeout=10
        ) as c:
            await c.subscribe(f"edgegw/v1/{GW}/cmd", qos=1, timeout=10)
            # named by the certificate's CN, not the client id it asked for
            assert broker.sessions()[GW] == GW
    # the broker ran the shipped configuration (paths and port substituted)
    assert broker.conf == tmp_path / "mosquitto" / "mosquitto.conf"
    assert broker.settings()["require_certificate"] == ["true"]
    assert broker.settings()["acl_file"] == [str(tmp_path / "mosquitto" / "edgegw.acl")]
