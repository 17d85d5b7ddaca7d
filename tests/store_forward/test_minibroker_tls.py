"""MiniBroker with TLS, mutual TLS, certificate identities and topic ACLs.

Real aiomqtt clients with the gateway's own TLS context
(:func:`store_forward.uplink.tls_context`), the real :class:`Uplink`, and
certificates from :mod:`testbed.demo_pki`, all on 127.0.0.1 free ports.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import BrokerSection, UplinkSection
from store_forward import wire_json
from store_forward.outbox import Outbox
from store_forward.topics import Topics
from store_forward.uplink import LinkState, Uplink, tls_context
from testbed.demo_pki import DemoPki, make_demo_pki
from testbed.minibroker import (
    Acl,
    AclError,
    AclRule,
    MiniBroker,
    certificate_cn,
    filter_covers,
    server_tls_context,
    topic_matches,
)
from tests.harness.mqtt_clients import collect, refused, tasks, until

HOST = "127.0.0.1"
PREFIX = "edgegw/v1"
HEADEND = "edgegw-headend"
GATEWAYS = ("gw-a", "gw-b")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_ACL = ROOT / "examples" / "mosquitto" / "edgegw.acl"
A, B = Topics(PREFIX, "gw-a"), Topics(PREFIX, "gw-b")


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test whose connection handlers leaked errors to asyncio's logger."""
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    records += caplog.get_records("teardown")
    leaked = [
        r.getMessage()
        for r in records
        if r.name == "asyncio"
        and r.levelno >= logging.ERROR
        # aiomqtt leaves a client future unretrieved when a connection drops; not ours
        and not r.getMessage().startswith("Future exception was never retrieved")
    ]
    assert not leaked, leaked


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    return make_demo_pki(tmp_path_factory.mktemp("pki"), gateway_ids=GATEWAYS)


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    """An unrelated CA issuing the same identities and host names."""
    return make_demo_pki(tmp_path_factory.mktemp("rogue"), gateway_ids=GATEWAYS)


def section(pki: DemoPki, ident: str | None, port: int, ca: Path | None = None) -> BrokerSection:
    pair = pki.client(ident) if ident is not None else None
    return BrokerSection(
        host=HOST,
        port=port,
        tls=True,
        ca_file=ca or pki.ca,
        cert_file=pair.cert if pair else None,
        key_file=pair.key if pair else None,
        keepalive_s=10,
        topic_prefix=PREFIX,
    )


def client(
    pki: DemoPki,
    ident: str | None,
    port: int,
    *,
    identifier: str | None = None,
    ca: Path | None = None,
    timeout: float = 5.0,
    **kw: Any,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        HOST,
        port,
        identifier=identifier or ident or "anonymous",
        tls_context=tls_context(section(pki, ident, port, ca)),
        timeout=timeout,
        **kw,
    )


def mtls_broker(pki: DemoPki, acl: Acl | None = None, **kw: Any) -> MiniBroker:
    ctx = server_tls_context(pki.broker.cert, pki.broker.key, ca=pki.ca)
    return MiniBroker(tls=ctx, identity_as_username=True, acl=acl, **kw)


@pytest.fixture
async def broker(pki: DemoPki) -> AsyncIterator[MiniBroker]:
    async with mtls_broker(pki, Acl.own_subtree(PREFIX, superusers=[HEADEND])) as b:
        yield b


def broker_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "testbed.minibroker")


# --------------------------------------------------------------------------- #
# Working sessions


async def test_mtls_session_delivers_both_ways_with_cn_as_username(
    broker: MiniBroker, pki: DemoPki
) -> None:
    to_head: list[tuple[str, bytes]] = []
    to_gw: list[tuple[str, bytes]] = []
    async with (
        client(pki, HEADEND, broker.port, identifier="headend-1") as head,
        client(pki, "gw-a", broker.port) as gw,
    ):
        assert broker.session_username("headend-1") == HEADEND
        assert broker.session_username("gw-a") == "gw-a"
        await head.subscribe(f"{PREFIX}/+/up", qos=1)
        await gw.subscribe(A.cmd, qos=1)
        async with tasks(collect(head, to_head), collect(gw, to_gw)):
            await gw.publish(A.up, b"batch", qos=1)
            await head.publish(A.cmd, b"command", qos=1)
            await until(lambda: bool(to_head and to_gw))
    assert to_head == [(A.up, b"batch")]
    assert to_gw == [(A.cmd, b"command")]


async def test_tls_without_client_certificates_serves_any_client(pki: DemoPki) -> None:
    """Server-authenticated TLS only (no CA given): a client without a certificate works."""
    ctx = server_tls_context(pki.broker.cert, pki.broker.key)
    assert ctx.verify_mode is ssl.CERT_NONE
    got: list[tuple[str, bytes]] = []
    async with MiniBroker(tls=ctx) as b, client(pki, None, b.port, identifier="c1") as c:
        await c.subscribe("t/#", qos=1)
        async with tasks(collect(c, got)):
            await c.publish("t/1", b"x", qos=1)
            await until(lambda: bool(got))
        assert b.session_username("c1") is None
    assert got == [("t/1", b"x")]


async def test_real_uplink_over_mtls_is_acked_and_leaves_nothing_behind(
    tmp_path: Path, pki: DemoPki
) -> None:
    """The gateway's own uplink (its TLS context, will, subscriptions) under the example ACL."""
    acl = Acl.load(EXAMPLE_ACL)
    outbox = await Outbox.open(tmp_path / "gw.db")
    await outbox.add_event(1_000, {"type": "hello", "n": 1})
    await outbox.add_event(1_001, {"type": "hello", "n": 2})
    got: list[tuple[str, bytes]] = []
    async with mtls_broker(pki, acl) as b:
        uplink = Uplink(
            outbox,
            gateway_id="gw-a",
            broker=section(pki, "gw-a", b.port),
            settings=UplinkSection(ack_timeout_s=2.0, reconnect_min_s=0.1, reconnect_max_s=0.5),
            unauthenticated_acks=True,  # unsealed batches, acked by the test's headend
        )
        async with client(pki, HEADEND, b.port, identifier="headend") as head:
            await head.subscribe(f"{PREFIX}/+/up", qos=1)
            await head.subscribe(f"{PREFIX}/+/state", qos=1)

            async def headend() -> None:  # decode and ack, as the reference headend does
                async for msg in head.messages:
                    payload = msg.payload if isinstance(msg.payload, bytes) else b""
                    got.append((msg.topic.value, payload))
                    if msg.topic.value.endswith("/up"):
                        batch = wire_json.decode(payload)
                        ack = {"seq": batch.seq, "epoch": batch.epoch, "status": "stored"}
                        await head.publish(
                            Topics(PREFIX, batch.gateway_id).ack, orjson.dumps(ack), qos=1
                        )

            async with tasks(headend(), uplink.run()):
                await until(lambda: uplink.stats.acked >= 1)
                assert uplink.stats.state is LinkState.UP
                assert (await outbox.stats()).records == 0
                users = {b.session_username(cid) for cid in b.connected_clients()}
                assert users == {"gw-a", HEADEND}
    await outbox.close()
    assert (A.state, b"online") in got
    assert A.up in [t for t, _ in got]


# --------------------------------------------------------------------------- #
# What the transport must refuse


async def test_plaintext_client_on_the_tls_port_gets_no_session(
    broker: MiniBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "testbed.minibroker")
    plain = aiomqtt.Client(HOST, broker.port, identifier="plain", timeout=2)
    await refused(plain)
    assert broker.connected_clients() == []
    assert "TLS handshake with 127.0.0.1:" in broker_log(caplog)
    assert "WRONG_VERSION_NUMBER" in broker_log(caplog)


async def test_client_without_certificate_is_refused_when_mtls_is_on(
    broker: MiniBroker, pki: DemoPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "testbed.minibroker")
    await refused(client(pki, None, broker.port, identifier="anon", timeout=2))
    assert broker.connected_clients() == []
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in broker_log(caplog)


async def test_client_certificate_from_another_ca_is_refused(
    broker: MiniBroker, pki: DemoPki, rogue: DemoPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "testbed.minibroker")
    # trusts the real broker, presents a certificate of the rogue CA with a valid-looking CN
    pair = rogue.client("gw-a")
    ctx = tls_context(
        BrokerSection(
            host=HOST,
            port=broker.port,
            tls=True,
            ca_file=pki.ca,
            cert_file=pair.cert,
            key_file=pair.key,
        )
    )
    c = aiomqtt.Client(HOST, broker.port, identifier="gw-a", tls_context=ctx, timeout=2)
    await refused(c)
    assert broker.connected_clients() == []
    assert "CERTIFICATE_VERIFY_FAILED" in broker_log(caplog)


async def test_server_certificate_from_another_ca_is_refused_by_the_client(
    pki: DemoPki, rogue: DemoPki
) -> None:
    ctx = server_tls_context(rogue.broker.cert, rogue.broker.key, ca=pki.ca)
    async with MiniBroker(tls=ctx) as b:
        err = await refused(client(pki, "gw-a", b.port))
        assert b.connected_clients() == []
    assert "CERTIFICATE_VERIFY_FAILED" in err


async def test_server_certificate_for_another_host_is_refused_by_the_client(
    tmp_path: Path,
) -> None:
    elsewhere = make_demo_pki(tmp_path, gateway_ids=["gw-a"], hosts=["broker.example.net"])
    ctx = server_tls_context(elsewhere.broker.cert, elsewhere.broker.key, ca=elsewhere.ca)
    async with MiniBroker(tls=ctx) as b:
        err = await refused(client(elsewhere, "gw-a", b.port))
        assert b.connected_clients() == []
    assert "mismatch" in err


async def test_failed_and_stalled_handshakes_close_only_their_own_connection(
    pki: DemoPki, rogue: DemoPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "testbed.minibroker")
    got: list[tuple[str, bytes]] = []
    async with mtls_broker(pki, connect_timeout=0.5) as b:
        async with client(pki, "gw-a", b.port) as good:
            await good.subscribe("t/#", qos=1)
            async with tasks(collect(good, got)):
                # a silent TCP client, a plaintext one and a rogue certificate, all at once
                silent = socket.create_connection((HOST, b.port))
                try:
                    await asyncio.gather(
                        refused(aiomqtt.Client(HOST, b.port, identifier="plain", timeout=2)),
                        refused(client(pki, None, b.port, identifier="anon", timeout=2)),
                        refused(client(rogue, "gw-b", b.port, ca=pki.ca, timeout=2)),
                    )
                    await until(lambda: "timed out" in broker_log(caplog), 5)
                    silent.settimeout(2)
                    assert silent.recv(1) == b""  # closed by the broker
                finally:
                    silent.close()
                await good.publish("t/after", b"still here", qos=1)
                await until(lambda: bool(got))
            assert b.connected_clients() == ["gw-a"]
    assert got == [("t/after", b"still here")]


def test_configuration_mistakes_are_refused(pki: DemoPki) -> None:
    with pytest.raises(ValueError, match="needs a TLS context"):
        MiniBroker(identity_as_username=True)
    one_way = server_tls_context(pki.broker.cert, pki.broker.key)
    with pytest.raises(ValueError, match="needs a TLS context"):
        MiniBroker(tls=one_way, identity_as_username=True)
    mutual = server_tls_context(pki.broker.cert, pki.broker.key, ca=pki.ca)
    with pytest.raises(ValueError, match="cannot be combined"):
        MiniBroker(tls=mutual, identity_as_username=True, users={"u": "p"})
    client_side = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises(ValueError, match="server-side"):
        MiniBroker(tls=client_side)


# --------------------------------------------------------------------------- #
# Topic rules by certificate identity


async def test_gateway_a_cannot_publish_or_subscribe_under_gateway_b(
    broker: MiniBroker, pki: DemoPki
) -> None:
    at_head: list[tuple[str, bytes]] = []
    at_a: list[tuple[str, bytes]] = []
    at_b: list[tuple[str, bytes]] = []
    async with (
        client(pki, HEADEND, broker.port, identifier="headend") as head,
        # the username in CONNECT claims gw-b; the certificate says gw-a, and wins
        client(pki, "gw-a", broker.port, username="gw-b", password="x") as a,
        client(pki, "gw-b", broker.port) as b,
    ):
        assert broker.session_username("gw-a") == "gw-a"
        await head.subscribe(f"{PREFIX}/#", qos=1)
        await b.subscribe(f"{B.base}/#", qos=1)
        for filt in (B.cmd, B.ack, f"{PREFIX}/+/cmd", f"{PREFIX}/#", "#", f"$share/g/{B.cmd}"):
            await a.subscribe(filt, qos=1)
            assert filt not in broker.session_subscriptions("gw-a"), filt
        await a.subscribe(f"{A.base}/#", qos=1)
        assert broker.session_subscriptions("gw-a") == {f"{A.base}/#": 1}
        async with tasks(collect(head, at_head), collect(a, at_a), collect(b, at_b)):
            for topic in (B.up, B.state, B.cmd, B.ack, f"{PREFIX}/other", "elsewhere"):
                await a.publish(topic, b"forged by gw-a", qos=1)  # acked, dropped
            await a.publish(A.up, b"batch of gw-a", qos=1)
            await head.publish(B.cmd, b"command for gw-b", qos=1)
            await until(lambda: len(at_head) == 2 and len(at_b) == 1 and len(at_a) == 1)
            await asyncio.sleep(0.2)  # anything forged would have arrived by now
    assert at_head == [(A.up, b"batch of gw-a"), (B.cmd, b"command for gw-b")]
    assert at_b == [(B.cmd, b"command for gw-b")]
    assert at_a == [(A.up, b"batch of gw-a")]  # its own subtree only


async def test_example_acl_confines_each_gateway_and_the_direction(pki: DemoPki) -> None:
    """examples/mosquitto/edgegw.acl, unchanged: a gateway may not even forge its own commands."""
    async with mtls_broker(pki, Acl.load(EXAMPLE_ACL)) as b:
        at_a: list[tuple[str, bytes]] = []
        at_head: list[tuple[str, bytes]] = []
        async with (
            client(pki, HEADEND, b.port, identifier="headend") as head,
            client(pki, "gw-a", b.port) as a,
        ):
            await head.subscribe(f"{PREFIX}/+/up", qos=1)
            await head.subscribe(f"{PREFIX}/+/cmd", qos=1)  # write-only for the headend
            assert list(b.session_subscriptions("headend")) == [f"{PREFIX}/+/up"]
            await a.subscribe(A.up, qos=1)  # write-only for a gateway
            await a.subscribe(A.cmd, qos=1)
            assert list(b.session_subscriptions("gw-a")) == [A.cmd]
            async with tasks(collect(a, at_a), collect(head, at_head)):
                await a.publish(A.cmd, b"self-made command", qos=1)
                await a.publish(B.up, b"as gw-b", qos=1)
                await a.publish(A.up, b"batch", qos=1)
                await head.publish(A.cmd, b"real command", qos=1)
                await until(lambda: bool(at_a and at_head))
                await asyncio.sleep(0.2)
        assert at_a == [(A.cmd, b"real command")]
        assert at_head == [(A.up, b"batch")]


async def test_another_identity_cannot_take_over_a_session(
    broker: MiniBroker, pki: DemoPki
) -> None:
    got: list[tuple[str, bytes]] = []
    async with client(pki, "gw-a", broker.port, clean_session=False) as a:
        await a.subscribe(A.cmd, qos=1)
        # gw-b's certificate with gw-a's client id: refused, gw-a stays connected
        err = await refused(client(pki, "gw-b", broker.port, identifier="gw-a", timeout=2))
        assert "code:2" in err or "dentifier" in err
        assert broker.connected_clients() == ["gw-a"]
        async with client(pki, HEADEND, broker.port, identifier="headend") as head:
            async with tasks(collect(a, got)):
                await head.publish(A.cmd, b"to gw-a", qos=1)
                await until(lambda: bool(got))
    # and gw-b cannot resume gw-a's persistent session while it is offline either
    await refused(client(pki, "gw-b", broker.port, identifier="gw-a", clean_session=False))
    assert got == [(A.cmd, b"to gw-a")]


async def test_identity_alone_protects_sessions(pki: DemoPki) -> None:
    """Without an ACL, certificate identities still own their client ids."""
    async with mtls_broker(pki) as b, client(pki, "gw-a", b.port, identifier="shared-id"):
        await refused(client(pki, "gw-b", b.port, identifier="shared-id", timeout=2))
        assert b.session_username("shared-id") == "gw-a"


async def test_will_on_a_foreign_topic_is_refused(broker: MiniBroker, pki: DemoPki) -> None:
    will = aiomqtt.Will(B.state, b"offline", qos=1, retain=True)
    await refused(client(pki, "gw-a", broker.port, will=will))
    own = aiomqtt.Will(A.state, b"offline", qos=1, retain=True)
    async with client(pki, "gw-a", broker.port, will=own) as c:
        await c.subscribe(A.cmd, qos=1)


async def test_retained_messages_follow_the_rules(broker: MiniBroker, pki: DemoPki) -> None:
    async with client(pki, "gw-b", broker.port) as b:
        await b.publish(B.state, b"online", qos=1, retain=True)
    got: list[tuple[str, bytes]] = []
    async with client(pki, "gw-a", broker.port) as a:
        await a.subscribe(f"{PREFIX}/+/state", qos=1)  # refused: would reach gw-b's
        await a.subscribe(f"{A.base}/#", qos=1)
        async with tasks(collect(a, got)):
            await asyncio.sleep(0.2)
    assert got == []
    async with client(pki, HEADEND, broker.port, identifier="h") as head:
        await head.subscribe(f"{PREFIX}/+/state", qos=1)
        async with tasks(collect(head, got)):
            await until(lambda: bool(got))
    assert got == [(B.state, b"online")]


async def test_deny_rules_hold_at_delivery_live_and_retained(pki: DemoPki) -> None:
    acl = Acl.parse("user gw-a\ntopic read x/#\ntopic deny x/secret\n", superusers=[HEADEND])
    got: list[tuple[str, bytes]] = []
    async with mtls_broker(pki, acl) as b:
        async with client(pki, HEADEND, b.port, identifier="h") as head:
            await head.publish("x/secret", b"retained secret", qos=1, retain=True)
            await head.publish("x/public", b"retained public", qos=1, retain=True)
            async with client(pki, "gw-a", b.port) as a:
                await a.subscribe("x/#", qos=1)  # allowed: x/# is readable, minus the denial
                async with tasks(collect(a, got)):
                    await until(lambda: len(got) == 1)
                    await head.publish("x/secret", b"live secret", qos=1)
                    await head.publish("x/public", b"live public", qos=1)
                    await until(lambda: len(got) == 2)
                    await asyncio.sleep(0.2)
    assert got == [("x/public", b"retained public"), ("x/public", b"live public")]


# --------------------------------------------------------------------------- #
# ACL rules (pure)


def test_parse_the_example_acl() -> None:
    acl = Acl.load(EXAMPLE_ACL)
    assert acl.anonymous == ()
    assert AclRule("write", "edgegw/v1/%u/up") in acl.patterns
    assert AclRule("read", "edgegw/v1/%u/cmd") in acl.patterns
    assert acl.users[HEADEND] == (
        AclRule("read", "edgegw/v1/+/up"),
        AclRule("read", "edgegw/v1/+/state"),
        AclRule("write", "edgegw/v1/+/ack"),
        AclRule("write", "edgegw/v1/+/cmd"),
    )
    assert acl.may_write("gw-a", "x", "edgegw/v1/gw-a/up")
    assert not acl.may_read("gw-a", "x", "edgegw/v1/gw-a/up")
    assert not acl.may_write("gw-a", "x", "edgegw/v1/gw-b/up")
    assert acl.may_write(HEADEND, "x", "edgegw/v1/gw-b/cmd")
    assert not acl.may_write(None, "x", "edgegw/v1/gw-a/up")  # no username, no pattern
    assert not acl.may_write("", "x", "edgegw/v1//up")
    # a username that is itself a wildcard or a path never widens a pattern
    for sneaky in ("+", "#", "gw-a/../gw-b", "gw-b/x"):
        assert not acl.may_write(sneaky, "x", f"edgegw/v1/{sneaky}/up")
        assert not acl.may_subscribe(sneaky, "x", f"edgegw/v1/{sneaky}/cmd")


def test_acl_syntax() -> None:
    acl = Acl.parse(
        "# comment\n"
        "topic read public/#\n"
        "pattern readwrite clients/%c/#\n"
        "user alice\n"
        "topic alice/#\n"
        "topic deny alice/secret\n",
        superusers=["root"],
    )
    assert acl.anonymous == (AclRule("read", "public/#"),)
    assert acl.users["alice"] == (AclRule("readwrite", "alice/#"), AclRule("deny", "alice/secret"))
    assert acl.may_read(None, "c1", "public/news")
    assert not acl.may_write(None, "c1", "public/news")
    assert acl.may_write(None, "c1", "clients/c1/x")
    assert acl.may_write("alice", "c2", "alice/x") and not acl.may_read(
        "alice", "c2", "alice/secret"
    )
    assert acl.may_write("root", "c3", "anything/at/all") and acl.may_subscribe("root", "c3", "#")
    for bad, fragment in [
        ("topic read a/#/b", "line 1: invalid topic filter"),
        ("user\n", "line 1: user without a name"),
        ("allow all", "line 1: unknown keyword"),
        ("\n\ntopic $share/g/x", "line 3: invalid"),
    ]:
        with pytest.raises(AclError, match=fragment):
            Acl.parse(bad)


@pytest.mark.parametrize(
    ("outer", "inner", "covered"),
    [
        ("a/#", "a/b", True),
        ("a/#", "a", True),
        ("a/#", "a/#", True),
        ("a/#", "#", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/+/c", True),
        ("a/b/c", "a/+/c", False),
        ("a/+", "a/#", False),
        ("+/x", "$SYS/x", False),
        ("#", "$SYS/x", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_filter_covers(outer: str, inner: str, covered: bool) -> None:
    assert filter_covers(outer, inner) is covered


_level = st.sampled_from(["a", "b", "$s"])
_topic = st.lists(_level, min_size=1, max_size=4).map("/".join)
_filter = st.lists(st.sampled_from(["a", "b", "$s", "+"]), min_size=1, max_size=4).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels[:-1], "#"])])
)


@settings(max_examples=300, deadline=None)
@given(outer=_filter, inner=_filter, topics=st.lists(_topic, max_size=30))
def test_a_covered_filter_never_reaches_beyond_its_cover(
    outer: str, inner: str, topics: list[str]
) -> None:
    if filter_covers(outer, inner):
        for t in topics:
            if topic_matches(inner, t):
                assert topic_matches(outer, t), (outer, inner, t)


def test_certificate_cn() -> None:
    cert = {"subject": ((("organizationName", "o"),), (("commonName", "gw-a"),))}
    assert certificate_cn(cert) == "gw-a"
    assert certificate_cn({}) is None
    assert certificate_cn(None) is None
    two = {"subject": ((("commonName", "gw-a"),), (("commonName", "gw-b"),))}
    assert certificate_cn(two) is None  # ambiguous


# --------------------------------------------------------------------------- #
# Large packets and the command line


async def test_large_message_crosses_tls_intact(broker: MiniBroker, pki: DemoPki) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB, many TLS records, past the reader's limit
    async with (
        client(pki, "gw-a", broker.port) as a,
        client(pki, HEADEND, broker.port, identifier="h") as head,
    ):
        await head.subscribe(f"{PREFIX}/+/up", qos=1)
        await a.publish(A.up, payload, qos=1)
        msg = await asyncio.wait_for(anext(head.messages), 10)
    assert msg.payload == payload


async def test_command_line_broker_with_mtls_and_acl(pki: DemoPki) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testbed.minibroker", "--port", "0",
        "--cert", str(pki.broker.cert), "--key", str(pki.broker.key), "--ca", str(pki.ca),
        "--identity-as-username", "--acl-file", str(EXAMPLE_ACL), "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("minibroker listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        await refused(aiomqtt.Client(HOST, port, identifier="plain", timeout=2))
        async with (
            client(pki, "gw-a", port) as a,
            client(pki, HEADEND, port, identifier="h") as head,
        ):
            await a.subscribe(A.cmd, qos=1)
            await head.publish(B.cmd, b"for gw-b", qos=1)
            await head.publish(A.cmd, b"for gw-a", qos=1)
            msg = await asyncio.wait_for(anext(a.messages), 5)
            assert (msg.topic.value, msg.payload) == (A.cmd, b"for gw-a")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_command_line_refuses_inconsistent_options(pki: DemoPki) -> None:
    for args, fragment in [
        (["--cert", str(pki.broker.cert)], b"--cert and --key go together"),
        (["--ca", str(pki.ca)], b"--cert and --key go together"),
        (
            [
                "--cert",
                str(pki.broker.cert),
                "--key",
                str(pki.broker.key),
                "--identity-as-username",
            ],
            b"identity_as_username needs a TLS context",
        ),
        (["--superuser", "root"], b"--superuser needs --acl-file"),
    ]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "testbed.minibroker", "--port", "0", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1, (args, out, err)
        assert fragment in err, (args, err)
