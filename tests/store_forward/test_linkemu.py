"""LinkEmulator with real sockets: rate, latency, stalls, outages, resets, counters, MQTT."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from testbed.linkemu import LinkEmulator, TokenBucket, stall_windows
from tests.harness.mosquitto import Mosquitto

HOST = "127.0.0.1"
WAIT = 5.0


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


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, HOST, 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), WAIT) == data
    return loop.time() - t0


async def is_dropped(reader: asyncio.StreamReader) -> bool:
    """True when the peer reset or closed the connection."""
    try:
        return await asyncio.wait_for(reader.read(100), WAIT) == b""
    except ConnectionResetError:
        return True


# --- pure parts ------------------------------------------------------------ #


def test_periodic_stall_windows() -> None:
    windows = list(itertools.islice(stall_windows(7, 2.0, 0.5, randomized=False), 3))
    assert windows == [(2.0, 2.5), (4.0, 4.5), (6.0, 6.5)]


def test_random_stall_windows_are_seeded() -> None:
    def first(seed: int) -> list[tuple[float, float]]:
        return list(itertools.islice(stall_windows(seed, 1.0, 0.1, randomized=True), 200))

    a, b = first(1), first(1)
    assert a == b and a != first(2)
    gaps = [s2 - e1 for (_, e1), (s2, _) in itertools.pairwise(a)]
    assert all(g >= 0 for g in gaps)
    assert 0.8 <= sum(gaps) / len(gaps) <= 1.2  # exponential with mean 1 s
    assert all(round(e - s, 9) == 0.1 for s, e in a)


def test_token_bucket_paces_to_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=100, now=0.0)
    assert bucket.reserve(100, 0.0) == 0.0  # the burst is free
    assert bucket.reserve(100, 0.0) == pytest.approx(0.1)
    assert bucket.reserve(100, 0.0) == pytest.approx(0.2)  # queued behind the previous
    assert bucket.reserve(50, 10.0) == 0.0  # refilled, capped at burst
    assert bucket.tokens == pytest.approx(50)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="rate_bps"):
        LinkEmulator(HOST, 1, rate_bps=0)
    with pytest.raises(ValueError, match="loss_stall_prob"):
        LinkEmulator(HOST, 1, loss_stall_prob=1.5)
    with pytest.raises(ValueError, match="latency"):
        LinkEmulator(HOST, 1, latency_s=-1)


# --- sockets ---------------------------------------------------------------- #


async def test_rate_ceiling_per_direction_bulk_transfer() -> None:
    rate_bps = 800_000  # 100 kB/s each way
    total = 120_000
    loop = asyncio.get_running_loop()
    done_at: dict[str, float] = {}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"d" * total)  # downlink bulk, concurrent with the uplink bulk
        await reader.readexactly(total)
        done_at["up"] = loop.time()
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(server, HOST, 0)
    async with srv, LinkEmulator(HOST, srv.sockets[0].getsockname()[1], rate_bps=rate_bps) as link:
        reader, writer = await asyncio.open_connection(HOST, link.port)
        t0 = loop.time()
        writer.write(b"u" * total)
        await asyncio.wait_for(reader.readexactly(total), WAIT)
        done_at["down"] = loop.time()
        for _ in range(100):
            if "up" in done_at:
                break
            await asyncio.sleep(0.02)
        writer.close()
        burst = max(1460, rate_bps // 8 // 50)
        expected = (total - burst) / (rate_bps / 8)  # 1.18 s
        for direction in ("up", "down"):
            elapsed = done_at[direction] - t0
            assert 0.9 * expected <= elapsed <= 1.3 * expected, (direction, elapsed)
        assert (link.stats.up_bytes, link.stats.down_bytes) == (total, total)


async def test_unlimited_link_is_fast(echo_port: int) -> None:
    async with LinkEmulator(HOST, echo_port) as link:
        reader, writer = await asyncio.open_connection(HOST, link.port)
        assert await roundtrip(reader, writer, b"z" * 1_000_000) < 1.0
        writer.close()


async def test_latency_is_added_and_order_kept(echo_port: int) -> None:
    async with LinkEmulator(HOST, echo_port, latency_s=0.1) as link:
        reader, writer = await asyncio.open_connection(HOST, link.port)
        for _ in range(3):
            rtt = await roundtrip(reader, writer, b"ping")
            assert 0.2 <= rtt <= 0.45, rtt
        # many small writes arrive complete and in order
        blob = b"".join(i.to_bytes(4, "big") for i in range(2000))
        for i in range(0, len(blob), 40):
            writer.write(blob[i : i + 40])
            await asyncio.sleep(0)
        assert await asyncio.wait_for(reader.readexactly(len(blob)), WAIT) == blob
        link.set_latency(0.0)
        assert await roundtrip(reader, writer, b"fast") < 0.1
        writer.close()


async def test_byte_counters(echo_port: int) -> None:
    async with LinkEmulator(HOST, echo_port) as link:
        assert link.stats.up_bytes == link.stats.down_bytes == 0
        reader, writer = await asyncio.open_connection(HOST, link.port)
        await roundtrip(reader, writer, b"a" * 1234)
        await roundtrip(reader, writer, b"b" * 766)
        assert (link.stats.up_bytes, link.stats.down_bytes) == (2000, 2000)
        assert link.stats.connections == 1
        writer.close()


async def test_down_drops_and_refuses_then_up_restores(echo_port: int) -> None:
    async with LinkEmulator(HOST, echo_port) as link:
        reader, writer = await asyncio.open_connection(HOST, link.port)
        await roundtrip(reader, writer, b"hello")
        link.set_up(False)
        assert not link.is_up
        assert await is_dropped(reader)
        writer.close()
        r2, w2 = await asyncio.open_connection(HOST, link.port)
        w2.write(b"anyone?")
        assert await is_dropped(r2)
        w2.close()
        assert link.stats.refused == 1 and link.stats.resets == 1
        link.set_up(True)
        r3, w3 = await asyncio.open_connection(HOST, link.port)
        await roundtrip(r3, w3, b"back")
        w3.close()


async def test_blackhole_holds_bytes_and_connections(echo_port: int) -> None:
    async with LinkEmulator(HOST, echo_port) as link:
        reader, writer = await asyncio.open_connection(HOST, link.port)
        await roundtrip(reader, writer, b"1")
        link.set_up(False, blackhole=True)
        writer.write(b"held")
        r2, w2 = await asyncio.open_connection(HOST, link.port)
        w2.write(b"new")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r2.read(10), 0.05)
        assert link.stats.connections == 1
        link.set_up(True)
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"held"
        assert await asyncio.wait_for(r2.readexactly(3), WAIT) == b"new"
        writer.close()
        w2.close()


async def test_reset_all(echo_port: int) -> None:
    async with LinkEmulator(HOST, echo_port) as link:
        conns = [await asyncio.open_connection(HOST, link.port) for _ in range(2)]
        for r, w in conns:
            await roundtrip(r, w, b"x")
        assert link.reset_all() == 2
        for r, w in conns:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(10), WAIT)
            w.close()
        assert link.stats.resets == 2
        r, w = await asyncio.open_connection(HOST, link.port)  # still usable
        await roundtrip(r, w, b"y")
        w.close()


async def test_periodic_stalls_slow_a_transfer() -> None:
    rate_bps, total = 800_000, 60_000  # 0.58 s unstalled at 100 kB/s
    received = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(total)
        received.set()
        writer.close()

    srv = await asyncio.start_server(sink, HOST, 0)
    port = srv.sockets[0].getsockname()[1]
    async with (
        srv,
        LinkEmulator(
            HOST, port, rate_bps=rate_bps, stall_every_s=0.2, stall_duration_s=0.1
        ) as link,
    ):
        loop = asyncio.get_running_loop()
        _, writer = await asyncio.open_connection(HOST, link.port)
        t0 = loop.time()
        writer.write(b"s" * total)
        await asyncio.wait_for(received.wait(), WAIT)
        elapsed = loop.time() - t0
        writer.close()
    # link idle half of the time after 0.2 s: about 0.2 + 2 × 0.38 = 0.96 s
    assert 0.82 <= elapsed <= 1.4, elapsed


async def test_loss_stalls_are_deterministic_per_seed(echo_port: int) -> None:
    async def pattern(seed: int) -> list[int]:
        counts = []
        async with LinkEmulator(
            HOST, echo_port, loss_stall_prob=0.3, loss_stall_s=0.01, seed=seed
        ) as link:
            reader, writer = await asyncio.open_connection(HOST, link.port)
            for i in range(20):
                await roundtrip(reader, writer, f"m{i:02d}".encode())
                counts.append(link.stats.loss_stalls)
            writer.close()
        return counts

    first = await pattern(11)
    assert first == await pattern(11)
    assert 0 < first[-1] < 40
    assert first != await pattern(12)


async def test_target_down_resets_client() -> None:
    srv = await asyncio.start_server(_echo, HOST, 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    async with LinkEmulator(HOST, port) as link:
        reader, writer = await asyncio.open_connection(HOST, link.port)
        assert await is_dropped(reader)
        writer.close()
        assert link.stats.connect_failures == 1


# --- MQTT over the emulated link -------------------------------------------- #


async def test_mqtt_through_link_survives_reset_and_outage(tmp_path: Path) -> None:
    async with (
        Mosquitto(tmp_path) as broker,
        LinkEmulator(HOST, broker.port, rate_bps=200_000, latency_s=0.02) as link,
        aiomqtt.Client(HOST, broker.port, identifier="central") as central,
    ):
        gw = aiomqtt.Client(HOST, link.port, identifier="gw", clean_session=False)
        async with gw:
            await gw.subscribe("cmd/gw", qos=1)
            up_before = link.stats.up_bytes
            await gw.publish("up/gw", b"r" * 5000, qos=1)
            assert link.stats.up_bytes - up_before >= 5000
            await central.publish("cmd/gw", b"c1", qos=1)
            msg = await asyncio.wait_for(anext(gw.messages), WAIT)
            assert msg.payload == b"c1"
            # until the PUBACK for c1 has crossed the link: the client sent it before this
            # publish on the same connection, so the broker has it once it acks this one
            await asyncio.wait_for(gw.publish("up/gw", b"sync", qos=1), WAIT)

            link.reset_all()
            with pytest.raises(aiomqtt.MqttError):
                await asyncio.wait_for(anext(gw.messages), WAIT)

        link.set_up(False)
        await central.publish("cmd/gw", b"while down", qos=1)
        reader, writer = await asyncio.open_connection(HOST, link.port)
        writer.write(b"\x10")  # the start of a CONNECT goes nowhere
        assert await is_dropped(reader)
        writer.close()
        link.set_up(True)
        async with aiomqtt.Client(HOST, link.port, identifier="gw", clean_session=False) as gw2:
            msg = await asyncio.wait_for(anext(gw2.messages), WAIT)
            assert msg.payload == b"while down"
        assert link.stats.resets >= 1 and link.stats.refused >= 1


def _mqtt_packet(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([first, len(body)]) + body


def _mqtt_str(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


async def _read_mqtt(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte, body) of one packet sent by the broker."""
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


async def test_qos1_persistent_session_survives_resets_and_outages(
    tmp_path: Path, long_run: bool
) -> None:
    """At-least-once end to end while the link keeps failing under the subscriber.

    The subscriber is a minimal raw client that PUBACKs a message only after it
    has recorded it, so every loss would be the broker's or the link's.
    """
    total = 5000 if long_run else 400
    received: set[int] = set()
    subscribed = asyncio.Event()  # the sink's SUBACK arrived: its session has the subscription
    connect = _mqtt_packet(
        0x10, _mqtt_str(b"MQTT") + b"\x04\x00\x00\x00" + _mqtt_str(b"sink")
    )  # clean session 0, keepalive 0
    subscribe = _mqtt_packet(0x82, b"\x00\x01" + _mqtt_str(b"chaos/#") + b"\x01")
    async with (
        Mosquitto(tmp_path, extra_conf=f"max_queued_messages {total}\n") as broker,
        LinkEmulator(
            HOST, broker.port, latency_s=0.005, loss_stall_prob=0.05, loss_stall_s=0.02, seed=3
        ) as link,
    ):

        async def sink() -> None:
            for _ in range(100 * total):  # connection attempts, bounded
                try:
                    reader, writer = await asyncio.open_connection(HOST, link.port)
                    writer.write(connect + subscribe)
                    while len(received) < total:
                        first, body = await asyncio.wait_for(_read_mqtt(reader), WAIT)
                        if first >> 4 == 3:  # PUBLISH, QoS 1
                            assert first & 0b0110 == 0b0010
                            n = int.from_bytes(body[:2], "big")
                            received.add(int(body[2 + n + 2 :]))
                            writer.write(_mqtt_packet(0x40, body[2 + n : 2 + n + 2]))
                        elif first >> 4 == 9:  # SUBACK
                            subscribed.set()
                    writer.close()
                    return
                except (OSError, asyncio.IncompleteReadError):
                    await asyncio.sleep(0.01)

        async def chaos() -> None:
            for k in itertools.count():
                await asyncio.sleep(0.1)
                if len(received) == total:
                    return
                if k % 5 == 4:
                    link.set_up(False)
                    await asyncio.sleep(0.1)
                    link.set_up(True)
                else:
                    link.reset_all()

        async with aiomqtt.Client(HOST, broker.port, identifier="src") as src:
            async with asyncio.timeout(120 if long_run else 20), asyncio.TaskGroup() as tg:
                sink_task = tg.create_task(sink())
                tg.create_task(chaos())
                await asyncio.wait_for(subscribed.wait(), 10)  # the sink's session exists
                for i in range(total):
                    await src.publish(f"chaos/{i % 7}", str(i).encode(), qos=1)
                    if i % 20 == 0:
                        await asyncio.sleep(0.01)
                await sink_task
        assert received == set(range(total))
        assert link.stats.resets > 0


async def test_command_line_link_emulator(echo_port: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testbed.linkemu", "--target", f"{HOST}:{echo_port}",
        "--latency", "0.05", "--rate-bps", "1000000",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("link emulator listening on 127.0.0.1:"), line
        port = int(line.split()[4].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection(HOST, port)
        assert 0.1 <= await roundtrip(reader, writer, b"via cli") < 1.0
        writer.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 0
        assert "up_bytes=7, down_bytes=7" in out.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
