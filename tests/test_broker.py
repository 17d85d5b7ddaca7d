"""The test bench's mosquitto starter (testbed.broker): the shipped configuration rendered
with only paths and the port changed, real brokers started, killed and restarted, and the
sessions read back from the broker's own log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from testbed.broker import (
    SHIPPED_DIR,
    BrokerError,
    Mosquitto,
    TlsFiles,
    render_shipped_config,
    wait_port,
)
from testbed.demo_pki import DemoPki, make_demo_pki

SUBSTITUTED = {
    "acl_file",
    "persistence_location",
    "log_dest",
    "listener",
    "certfile",
    "keyfile",
    "cafile",
    "crlfile",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    return make_demo_pki(tmp_path_factory.mktemp("pki"), gateway_ids=["gw-a"])


def _directive(line: str) -> str:
    return line.split(None, 1)[0] if line.strip() and not line.startswith("#") else ""


def test_the_shipped_file_is_rendered_with_only_paths_and_the_port_changed(
    tmp_path: Path, pki: DemoPki
) -> None:
    shipped = (SHIPPED_DIR / "mosquitto.conf").read_text().splitlines()
    rendered = render_shipped_config(
        "\n".join(shipped), port=4321, workdir=tmp_path, files=pki.broker_files()
    ).splitlines()
    changed = [(a, b) for a, b in zip(shipped, rendered, strict=False) if a != b]
    assert {_directive(a) for a, _ in changed} == SUBSTITUTED
    assert all(_directive(a) == _directive(b) for a, b in changed)
    extra = rendered[len(shipped) :]
    assert extra in ([], ["user root"])  # only when started as root (private temp dirs)
    assert "listener 4321 127.0.0.1" in rendered
    assert f"cafile {pki.ca}" in rendered and f"crlfile {pki.crl}" in rendered
    assert f"acl_file {tmp_path / 'edgegw.acl'}" in rendered


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda c: c.replace("\ncrlfile ", "\n#crlfile "), "'crlfile': 0"),
        (lambda c: c + "\nlistener 1883\n", "'listener': 2"),
    ],
)
def test_a_shipped_file_of_another_shape_is_refused(
    tmp_path: Path, pki: DemoPki, edit: object, fragment: str
) -> None:
    conf = edit((SHIPPED_DIR / "mosquitto.conf").read_text())  # type: ignore[operator]
    with pytest.raises(BrokerError, match=fragment):
        render_shipped_config(conf, port=1, workdir=tmp_path, files=pki.broker_files())


def test_an_override_must_name_a_shipped_directive(tmp_path: Path, pki: DemoPki) -> None:
    conf = (SHIPPED_DIR / "mosquitto.conf").read_text()
    with pytest.raises(BrokerError, match="'password_file': 0"):
        render_shipped_config(
            conf,
            port=1,
            workdir=tmp_path,
            files=pki.broker_files(),
            overrides={"password_file": "/x"},
        )
    weakened = render_shipped_config(
        conf,
        port=1,
        workdir=tmp_path,
        files=pki.broker_files(),
        overrides={"require_certificate": "false", "acl_file": None},
    )
    assert "require_certificate false" in weakened.splitlines()
    assert not any(line.startswith("acl_file") for line in weakened.splitlines())


async def test_plain_broker_stops_is_killed_and_restarts_on_its_port(tmp_path: Path) -> None:
    broker = Mosquitto.plain(tmp_path)
    async with broker:
        async with aiomqtt.Client(broker.host, broker.port, identifier="c1") as c:
            await c.subscribe("t", qos=1)
            assert broker.sessions() == {"c1": None}  # anonymous
        await asyncio.sleep(0.1)
        assert broker.sessions() == {}
        broker.kill()
        wait_port(broker.port, up=False, timeout_s=5)
        broker.restart()
        assert broker.starts == 2
        async with aiomqtt.Client(broker.host, broker.port, identifier="c2") as c:
            await c.publish("t", b"x", qos=1)
    assert broker.proc is None
    wait_port(broker.port, up=False, timeout_s=5)


async def test_shipped_broker_names_each_session_by_its_certificate(
    tmp_path: Path, pki: DemoPki
) -> None:
    async with Mosquitto.shipped(tmp_path / "b", pki.broker_files()) as broker:
        assert broker.conf == tmp_path / "b" / "mosquitto.conf"
        assert (tmp_path / "b" / "edgegw.acl").read_text() == (
            SHIPPED_DIR / "edgegw.acl"
        ).read_text()
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier="gw-session",
            tls_context=pki.client_tls_context("gw-a"),
            timeout=5,
        ) as c:
            await c.subscribe("edgegw/v1/gw-a/cmd", qos=1, timeout=5)
            # client id and username both the CN, whatever id was asked for
            assert broker.sessions() == {"gw-a": "gw-a"}
        await asyncio.sleep(0.1)
        assert broker.sessions() == {}


def test_a_broker_that_cannot_start_says_why(tmp_path: Path, pki: DemoPki) -> None:
    files = pki.broker_files()
    missing = TlsFiles(ca=files.ca, crl=files.crl, cert=tmp_path / "nope.pem", key=files.key)
    broker = Mosquitto.shipped(tmp_path / "b", missing)
    with pytest.raises(BrokerError, match="did not start") as info:
        broker.start()
    assert "nope.pem" in str(info.value)
    assert broker.proc is None
