"""MiniBroker against real MQTT clients (aiomqtt/paho, mosquitto tools) and raw sockets."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.minibroker import (
    PUBLISH,
    Message,
    MiniBroker,
    PacketReader,
    ProtocolError,
    encode_publish,
    parse_publish,
    split_shared,
    topic_matches,
    valid_topic_filter,
)

HOST = "127.0.0.1"
WAIT = 5.0  # upper bound for anything that should happen "now"


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


@pytest.fixture
async def broker() -> AsyncIterator[MiniBroker]:
    async with MiniBroker() as b:
        yield b


def client(b: MiniBroker, ident: str, **kw: object) -> aiomqtt.Client:
    return aiomqtt.Client(HOST, b.port, identifier=ident, **kw)  # type: ignore[arg-type]


async def next_message(c: aiomqtt.Client, wait: float = WAIT) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(c.messages), wait)


async def no_message(c: aiomqtt.Client, within: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        msg = await asyncio.wait_for(anext(c.messages), within)
        pytest.fail(f"unexpected message on {msg.topic}: {msg.payload!r}")


# --- a hand-written raw client, independent of the broker's own encoder ---- #


def _s(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([first, len(body)]) + body


def raw_connect(
    client_id: str,
    *,
    clean: bool = True,
    keepalive: int = 0,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    flags = 0x02 if clean else 0x00
    payload = _s(client_id.encode())
    if will is not None:
        flags |= 0x04 | (1 << 3)  # will, QoS 1
        payload += _s(will[0].encode()) + _s(will[1])
    body = _s(b"MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return _packet(0x10, body)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte, body) of one packet whose remaining length fits one byte."""
    first, length = await asyncio.wait_for(reader.readexactly(2), WAIT)
    assert length < 128
    return first, await asyncio.wait_for(reader.readexactly(length), WAIT)


async def raw_session(
    port: int, client_id: str, **kw: object
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(raw_connect(client_id, **kw))  # type: ignore[arg-type]
    first, body = await read_packet(reader)
    assert first == 0x20
    return reader, writer, body


async def closed_by_peer(reader: asyncio.StreamReader, wait: float = WAIT) -> bool:
    try:
        while await asyncio.wait_for(reader.read(4096), wait):
            pass
    except ConnectionResetError:
        pass
    return True


# --- pure parts ------------------------------------------------------------ #


@pytest.mark.parametrize(
    ("filt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "/x", True),
        ("+", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/B", False),
    ],
)
def test_topic_matches(filt: str, topic: str, expected: bool) -> None:
    assert topic_matches(filt, topic) is expected


@pytest.mark.parametrize("filt", ["a/#/b", "a#", "a/b+", "", "#/a"])
def test_invalid_filters(filt: str) -> None:
    assert not valid_topic_filter(filt)


def test_split_shared() -> None:
    assert split_shared("$share/g/a/+") == ("g", "a/+")
    assert split_shared("a/b") == (None, "a/b")
    with pytest.raises(ValueError, match="malformed"):
        split_shared("$share/g")
    with pytest.raises(ValueError, match="malformed"):
        split_shared("$share//a")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=20))
def test_reader_on_garbage_only_raises_protocol_error(data: bytes, step: int) -> None:
    reader = PacketReader(max_packet_size=256)
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    topic=st.text(
        alphabet=st.characters(blacklist_characters="+#\x00", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=40,
    ),
    payload=st.binary(max_size=400),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    packet_id=st.integers(1, 65535),
    step=st.integers(1, 64),
)
def test_publish_roundtrip_in_pieces(
    topic: str, payload: bytes, qos: int, retain: bool, packet_id: int, step: int
) -> None:
    msg = Message(topic, payload, qos, retain)
    wire = encode_publish(msg, packet_id if qos else None, dup=bool(qos))
    reader = PacketReader(max_packet_size=1 << 20)
    packets = [p for i in range(0, len(wire), step) for p in reader.feed(wire[i : i + step])]
    assert len(packets) == 1 and packets[0].type == PUBLISH
    assert parse_publish(packets[0].flags, packets[0].body) == (
        msg,
        packet_id if qos else None,
        bool(qos),
    )


# --- real clients ----------------------------------------------------------- #


async def test_pubsub_qos0_and_qos1(broker: MiniBroker) -> None:
    async with client(broker, "sub") as sub, client(broker, "pub") as pub:
        await sub.subscribe("meters/+/energy", qos=1)
        await pub.publish("meters/m1/energy", b"q0", qos=0)
        await pub.publish("meters/m1/energy", b"q1", qos=1)
        await pub.publish("meters/m1/power", b"other", qos=1)
        first, second = await next_message(sub), await next_message(sub)
        assert (first.payload, first.qos) == (b"q0", 0)
        assert (second.payload, second.qos) == (b"q1", 1)
        assert str(second.topic) == "meters/m1/energy"
        await no_message(sub)


async def test_subscription_qos_caps_delivery(broker: MiniBroker) -> None:
    async with client(broker, "sub") as sub, client(broker, "pub") as pub:
        await sub.subscribe("t", qos=0)
        await pub.publish("t", b"x", qos=1)
        assert (await next_message(sub)).qos == 0


async def test_qos2_publish_is_delivered_once_at_qos1(broker: MiniBroker) -> None:
    async with client(broker, "sub") as sub, client(broker, "pub") as pub:
        result = await sub.subscribe("t/#", qos=2)
        assert list(result) == [1]  # granted QoS 1
        await pub.publish("t/x", b"exactly", qos=2)
        msg = await next_message(sub)
        assert (msg.payload, msg.qos) == (b"exactly", 1)
        await no_message(sub)


async def test_wildcards(broker: MiniBroker) -> None:
    async with client(broker, "sub") as sub, client(broker, "pub") as pub:
        await sub.subscribe("a/#", qos=1)
        await sub.subscribe("+/b/c", qos=1)
        for topic in ["a", "a/x/y", "z/b/c", "z/b", "a/b/c", "$SYS/b/c"]:
            await pub.publish(topic, topic.encode(), qos=1)
        got = [str((await next_message(sub)).topic) for _ in range(4)]
        # a/b/c matches both filters and is delivered once (overlapping subscriptions)
        assert got == ["a", "a/x/y", "z/b/c", "a/b/c"]
        await no_message(sub)


async def test_unsubscribe(broker: MiniBroker) -> None:
    async with client(broker, "sub") as sub, client(broker, "pub") as pub:
        await sub.subscribe("t", qos=1)
        await pub.publish("t", b"1", qos=1)
        assert (await next_message(sub)).payload == b"1"
        await sub.unsubscribe("t")
        await pub.publish("t", b"2", qos=1)
        await no_message(sub)


async def test_shared_subscription_round_robin(broker: MiniBroker) -> None:
    async with (
        client(broker, "w1") as w1,
        client(broker, "w2") as w2,
        client(broker, "all") as everyone,
        client(broker, "pub") as pub,
    ):
        await w1.subscribe("$share/workers/up/#", qos=1)
        await w2.subscribe("$share/workers/up/#", qos=1)
        await everyone.subscribe("up/#", qos=1)
        for i in range(10):
            await pub.publish(f"up/m{i}", str(i).encode(), qos=1)
        got1 = [int((await next_message(w1)).payload) for _ in range(5)]
        got2 = [int((await next_message(w2)).payload) for _ in range(5)]
        assert sorted(got1 + got2) == list(range(10))
        assert {g % 2 for g in got1} == {0} and {g % 2 for g in got2} == {1}
        assert [int((await next_message(everyone)).payload) for _ in range(10)] == list(range(10))
        await no_message(w1, 0.2)
        await no_message(w2, 0.2)


async def test_shared_subscription_skips_offline_member(broker: MiniBroker) -> None:
    async with client(broker, "w1") as w1, client(broker, "pub") as pub:
        await w1.subscribe("$share/g/t", qos=1)
        async with client(broker, "w2", clean_session=False) as w2:
            await w2.subscribe("$share/g/t", qos=1)
        for i in range(4):
            await pub.publish("t", str(i).encode(), qos=1)
        assert [int((await next_message(w1)).payload) for _ in range(4)] == [0, 1, 2, 3]
        assert broker.session_queue_length("w2") == 0


async def test_retained(broker: MiniBroker) -> None:
    async with client(broker, "pub") as pub:
        await pub.publish("status/gw1", b"online", qos=1, retain=True)
        async with client(broker, "late") as late:
            await late.subscribe("status/#", qos=1)
            msg = await next_message(late)
            assert (msg.payload, msg.retain) == (b"online", True)
            await pub.publish("status/gw1", b"live", qos=1, retain=True)
            msg = await next_message(late)
            assert (msg.payload, msg.retain) == (b"live", False)  # live delivery
        await pub.publish("status/gw1", b"", qos=1, retain=True)  # clears it
        async with client(broker, "later") as later:
            await later.subscribe("status/#", qos=1)
            await no_message(later)


async def test_will_on_abrupt_disconnect_not_on_clean_one(broker: MiniBroker) -> None:
    async with client(broker, "watch") as watch:
        await watch.subscribe("will/#", qos=1)
        reader, writer, _ = await raw_session(broker.port, "gw-abrupt", will=("will/gw", b"gone"))
        writer.transport.abort()  # no DISCONNECT
        msg = await next_message(watch)
        assert (str(msg.topic), msg.payload) == ("will/gw", b"gone")

        reader, writer, _ = await raw_session(broker.port, "gw-polite", will=("will/gw", b"x"))
        writer.write(b"\xe0\x00")  # DISCONNECT
        await writer.drain()
        assert await closed_by_peer(reader)
        writer.close()
        await no_message(watch)

        will = aiomqtt.Will("will/aiomqtt", b"lost", qos=1)
        async with client(broker, "gw-lib", will=will):
            pass  # aiomqtt sends DISCONNECT: no will
        await no_message(watch)


async def test_keepalive_expiry_closes_and_publishes_will(broker: MiniBroker) -> None:
    async with client(broker, "watch") as watch:
        await watch.subscribe("will/#", qos=1)
        loop = asyncio.get_running_loop()
        reader, writer, _ = await raw_session(
            broker.port, "silent", keepalive=1, will=("will/silent", b"timeout")
        )
        t0 = loop.time()
        assert await closed_by_peer(reader, wait=4.0)
        elapsed = loop.time() - t0
        assert 1.3 <= elapsed <= 3.0, elapsed
        assert (await next_message(watch)).payload == b"timeout"
        writer.close()


async def test_persistent_session_gets_messages_published_while_offline(
    broker: MiniBroker,
) -> None:
    async with client(broker, "headend", clean_session=False) as he:
        await he.subscribe("up/#", qos=1)
    async with client(broker, "gw") as gw:
        for i in range(3):
            await gw.publish(f"up/{i}", str(i).encode(), qos=1)
        await gw.publish("up/q0", b"qos0 is not queued", qos=0)
    assert broker.session_queue_length("headend") == 3
    async with client(broker, "headend", clean_session=False) as he:
        got = [(await next_message(he)).payload for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
        await no_message(he)
    # a clean session discards the stored one
    async with client(broker, "headend", clean_session=True):
        pass
    async with client(broker, "gw") as gw:
        await gw.publish("up/9", b"9", qos=1)
    assert broker.session_queue_length("headend") == 0


async def test_unacked_qos1_redelivered_with_dup_on_reconnect(broker: MiniBroker) -> None:
    reader, writer, connack = await raw_session(broker.port, "raw", clean=False)
    assert connack == b"\x00\x00"
    writer.write(_packet(0x82, b"\x00\x01" + _s(b"cmd/#") + b"\x01"))  # SUBSCRIBE
    assert await read_packet(reader) == (0x90, b"\x00\x01\x01")
    async with client(broker, "central") as central:
        await central.publish("cmd/relay", b"trip", qos=1)
    first, body = await read_packet(reader)
    assert first == 0x32  # PUBLISH QoS 1, no DUP
    packet_id = body[11:13]
    writer.transport.abort()  # never acked

    reader, writer, connack = await raw_session(broker.port, "raw", clean=False)
    assert connack == b"\x01\x00"  # session present
    first, body = await read_packet(reader)
    assert first == 0x3A  # PUBLISH QoS 1 with DUP
    assert body == _s(b"cmd/relay") + packet_id + b"trip"
    writer.write(_packet(0x40, packet_id))  # PUBACK
    writer.write(b"\xe0\x00")
    await writer.drain()
    assert await closed_by_peer(reader)
    writer.close()
    assert broker.session_queue_length("raw") == 0


async def test_offline_queue_is_bounded() -> None:
    async with MiniBroker(max_queued=5) as b:
        async with client(b, "slow", clean_session=False) as slow:
            await slow.subscribe("t", qos=1)
        async with client(b, "pub") as pub:
            for i in range(12):
                await pub.publish("t", str(i).encode(), qos=1)
        assert b.session_queue_length("slow") == 5
        async with client(b, "slow", clean_session=False) as slow:
            assert [int((await next_message(slow)).payload) for _ in range(5)] == list(range(5))


async def test_qos1_flow_control_window() -> None:
    async with MiniBroker(max_inflight=3) as b:
        reader, writer, _ = await raw_session(b.port, "slow-acker", clean=False)
        writer.write(_packet(0x82, b"\x00\x01" + _s(b"w") + b"\x01"))
        assert (await read_packet(reader))[0] == 0x90
        async with client(b, "pub") as pub:
            for i in range(5):
                await pub.publish("w", str(i).encode(), qos=1)
        packet_ids = []
        for i in range(3):
            first, body = await read_packet(reader)
            assert first == 0x32 and body.endswith(str(i).encode())
            packet_ids.append(body[3:5])
        with pytest.raises(TimeoutError):  # window full: nothing more until an ack
            await asyncio.wait_for(reader.read(1), 0.3)
        assert b.session_queue_length("slow-acker") == 5
        writer.write(_packet(0x40, packet_ids[0]) + _packet(0x40, packet_ids[1]))
        for i in (3, 4):
            first, body = await read_packet(reader)
            assert first == 0x32 and body.endswith(str(i).encode())
        writer.close()


async def test_qos0_to_a_client_that_does_not_read_is_dropped_not_buffered() -> None:
    async with MiniBroker(max_write_buffer=256 * 1024) as b:
        reader, writer, _ = await raw_session(b.port, "stuck")
        writer.write(_packet(0x82, b"\x00\x01" + _s(b"flood") + b"\x00"))
        assert (await read_packet(reader))[0] == 0x90  # then never reads again
        async with client(b, "ok") as ok, client(b, "pub") as pub:
            await ok.subscribe("flood", qos=0)
            blob = b"x" * 100_000
            for _ in range(300):  # 30 MB, more than the socket buffers hold
                await pub.publish("flood", blob, qos=0)
                await asyncio.sleep(0)
                if b.dropped_messages("stuck"):
                    break
            assert b.dropped_messages("stuck") > 0
            await pub.publish("flood", b"end", qos=1)
            for _ in range(400):  # the reading client got everything up to the end
                if (await next_message(ok)).payload == b"end":
                    break
        writer.close()


async def test_restart_keeps_sessions_and_retained() -> None:
    b = MiniBroker()
    await b.start()
    async with client(b, "he", clean_session=False) as he:
        await he.subscribe("up", qos=1)
    async with client(b, "pub") as pub:
        await pub.publish("up", b"queued", qos=1)
        await pub.publish("state", b"kept", qos=1, retain=True)
    port = b.port
    await b.stop()
    await b.start(port=port)
    try:
        async with client(b, "he", clean_session=False) as he:
            assert (await next_message(he)).payload == b"queued"
            await he.subscribe("state", qos=1)
            assert (await next_message(he)).payload == b"kept"
    finally:
        await b.stop()


async def test_session_takeover(broker: MiniBroker) -> None:
    reader, writer, _ = await raw_session(broker.port, "dup-id")
    async with client(broker, "dup-id"):
        assert await closed_by_peer(reader)
        assert broker.connected_clients() == ["dup-id"]
    writer.close()


async def test_authentication() -> None:
    async with MiniBroker(users={"gw": "secret"}) as b:
        async with client(b, "ok", username="gw", password="secret") as ok:
            await ok.publish("t", b"x", qos=1)
        with pytest.raises(aiomqtt.MqttCodeError) as bad:
            async with client(b, "bad", username="gw", password="wrong"):
                pass
        assert str(bad.value.rc) == "Bad user name or password"  # CONNACK code 4
        with pytest.raises(aiomqtt.MqttCodeError) as anon:
            async with client(b, "anon"):
                pass
        assert str(anon.value.rc) == "Not authorized"  # CONNACK code 5


GARBAGE = [
    pytest.param(b"\xff" * 16, id="reserved-type"),
    pytest.param(b"\x30\x02\x00\x01", id="publish-before-connect"),
    pytest.param(b"\x10\xff\xff\xff\xff\x7f", id="length-too-long"),
    pytest.param(b"\x10\xff\xff\xff\x7f", id="too-large"),
    pytest.param(_packet(0x10, _s(b"XYZW") + b"\x04\x02\x00\x00" + _s(b"x")), id="bad-protocol"),
    pytest.param(raw_connect("g") + b"\x36\x05\x00\x01a\x00\x01", id="publish-qos3"),
    pytest.param(
        raw_connect("g") + _packet(0x80, b"\x00\x01" + _s(b"a") + b"\x00"), id="sub-flags"
    ),
    pytest.param(raw_connect("g") + _packet(0x30, _s(b"a/+") + b"x"), id="wildcard-topic"),
    pytest.param(raw_connect("g") + _packet(0x30, b"\x00\x02\xc3\x28"), id="bad-utf8"),
    pytest.param(raw_connect("g") + raw_connect("g"), id="second-connect"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_malformed_input_closes_only_that_connection(
    broker: MiniBroker, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.minibroker")
    async with client(broker, "sub") as sub, client(broker, "pub") as pub:
        await sub.subscribe("t", qos=1)
        reader, writer = await asyncio.open_connection(HOST, broker.port)
        writer.write(garbage)
        await writer.drain()
        assert await closed_by_peer(reader)
        writer.close()
        await pub.publish("t", b"still fine", qos=1)
        assert (await next_message(sub)).payload == b"still fine"
    assert any("protocol error" in r.getMessage() for r in caplog.records)


async def test_connection_without_connect_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.minibroker")
    async with MiniBroker(connect_timeout=0.3) as b:
        reader, writer = await asyncio.open_connection(HOST, b.port)
        assert await closed_by_peer(reader)
        writer.close()
    assert any("no CONNECT in time" in r.getMessage() for r in caplog.records)


async def test_unsupported_protocol_level_gets_connack_1(broker: MiniBroker) -> None:
    reader, writer = await asyncio.open_connection(HOST, broker.port)
    writer.write(_packet(0x10, _s(b"MQTT") + b"\x05\x02\x00\x00" + _s(b"v5")))
    assert await read_packet(reader) == (0x20, b"\x00\x01")
    assert await closed_by_peer(reader)
    writer.close()


async def test_oversized_publish_drops_only_its_sender(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.minibroker")
    async with MiniBroker(max_packet_size=1024) as b:
        async with client(b, "sub") as sub, client(b, "pub") as pub:
            await sub.subscribe("t", qos=1)
            with pytest.raises(aiomqtt.MqttError):
                await pub.publish("t", b"x" * 2000, qos=1, timeout=1)
            assert any("exceeds limit 1024" in r.getMessage() for r in caplog.records)
            async with client(b, "pub2") as pub2:
                await pub2.publish("t", b"small", qos=1)
            assert (await next_message(sub)).payload == b"small"


@pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto_pub/mosquitto_sub command-line clients are not installed",
)
async def test_interop_with_mosquitto_clients(broker: MiniBroker) -> None:
    port = str(broker.port)
    # mosquitto_pub -> aiomqtt, at every QoS (QoS 2 exercises PUBREC/PUBREL/PUBCOMP)
    async with client(broker, "sub") as sub:
        await sub.subscribe("interop/#", qos=1)
        for qos in ("0", "1", "2"):
            proc = await asyncio.create_subprocess_exec(
                "mosquitto_pub", "-h", HOST, "-p", port, "-q", qos,
                "-t", f"interop/q{qos}", "-m", f"hello {qos}",
            )  # fmt: skip
            assert await asyncio.wait_for(proc.wait(), WAIT) == 0
            msg = await next_message(sub)
            assert (str(msg.topic), msg.payload) == (f"interop/q{qos}", f"hello {qos}".encode())
    # aiomqtt -> mosquitto_sub (persistent session, QoS 2 requested, granted 1)
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", HOST, "-p", port, "-q", "2", "-c", "-i", "msub",
        "-t", "down/#", "-C", "3", "-W", "10", "-v",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with client(broker, "pub") as pub:
        for _ in range(100):  # until mosquitto_sub has subscribed
            if "msub" in broker.connected_clients() and broker.session_subscriptions("msub"):
                break
            await asyncio.sleep(0.05)
        for i in range(3):
            await pub.publish(f"down/{i}", f"m{i}".encode(), qos=1)
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT + 10)
    assert proc.returncode == 0
    assert out.decode().splitlines() == ["down/0 m0", "down/1 m1", "down/2 m2"]


async def test_command_line_broker_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testbed.minibroker", "--port", "0", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("minibroker listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        async with (
            aiomqtt.Client(HOST, port, identifier="a") as a,
            aiomqtt.Client(HOST, port, identifier="b") as b,
        ):
            await a.subscribe("x", qos=1)
            await b.publish("x", b"via cli", qos=1)
            assert (await next_message(a)).payload == b"via cli"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
