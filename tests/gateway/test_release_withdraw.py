"""`edgegw release withdraw`: a bundle's retained chunks leave the broker, others stay.

Real parts: a mosquitto of the test's own, chunks published retained by
:func:`gateway.update_transfer.publish_chunks` (what `edgegw release publish`
runs), the command line as an operator types it. Checked against what a new
subscriber is sent afterwards.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiomqtt
import pytest

from gateway.cli import main
from gateway.update_transfer import Offer, chunk_topic, offer_for, publish_chunks
from tests.harness.mosquitto import Mosquitto

PREFIX = "edgegw/v1"


def bundle_file(path: Path, size: int) -> tuple[Path, Offer]:
    path.write_bytes(os.urandom(size))
    return path, offer_for(path, version="0.0.0", chunk_size=1024)


async def retained(port: int, pattern: str, quiet_s: float = 1.0) -> dict[str, bytes]:
    """What a new subscriber to ``pattern`` is sent as retained messages."""
    got: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier="test-look") as c:
        await c.subscribe(pattern, qos=1)
        messages = aiter(c.messages)
        for _ in range(1000):
            try:
                async with asyncio.timeout(quiet_s):
                    msg = await anext(messages)
            except TimeoutError:
                break
            if msg.retain and isinstance(msg.payload, bytes) and msg.payload:
                got[msg.topic.value] = msg.payload
    return got


async def test_withdraw_clears_one_bundles_retained_chunks_and_leaves_the_others(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    a, offer_a = bundle_file(tmp_path / "a.egws", 5 * 1024 + 100)  # 6 chunks
    b, offer_b = bundle_file(tmp_path / "b.egws", 3 * 1024)  # 3 chunks
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="test-publisher") as c:
        assert await publish_chunks(c, a, offer_a, PREFIX) == 6
        assert await publish_chunks(c, b, offer_b, PREFIX) == 3
    everything = f"{PREFIX}/_software/+/+"
    before = await retained(mosquitto.port, everything)
    assert len(before) == 9
    assert before[chunk_topic(PREFIX, offer_a.sha256, 5)] == a.read_bytes()[5 * 1024 :]

    broker = ["--broker", f"127.0.0.1:{mosquitto.port}", "--quiet", "0.5"]
    rc = await asyncio.to_thread(main, ["release", "withdraw", str(a), *broker])
    assert rc == 0

    after = await retained(mosquitto.port, everything)
    assert sorted(after) == sorted(chunk_topic(PREFIX, offer_b.sha256, i) for i in range(3))
    assert after == {t: v for t, v in before.items() if offer_b.sha256 in t}

    # by digest, as the offer names it; nothing left of a: says so
    rc = await asyncio.to_thread(main, ["release", "withdraw", "--sha256", offer_a.sha256, *broker])
    assert rc == 0
    rc = await asyncio.to_thread(main, ["release", "withdraw", "--sha256", offer_b.sha256, *broker])
    assert rc == 0
    assert await retained(mosquitto.port, everything) == {}


async def test_withdraw_reports_what_it_cleared(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    a, offer_a = bundle_file(tmp_path / "a.egws", 2 * 1024)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="test-publisher") as c:
        await publish_chunks(c, a, offer_a, PREFIX)
    broker = ["--broker", f"127.0.0.1:{mosquitto.port}", "--quiet", "0.5"]
    assert await asyncio.to_thread(main, ["release", "withdraw", str(a), *broker]) == 0
    assert f"2 retained chunks cleared under {PREFIX}/_software/{offer_a.sha256}/" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["release", "withdraw", str(a), *broker]) == 0
    assert "no retained chunk under" in capsys.readouterr().out


def test_withdraw_refuses_a_bad_digest_and_ambiguous_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no broker is contacted for either: port 9 on loopback would refuse anyway
    broker = ["--broker", "127.0.0.1:9"]
    assert main(["release", "withdraw", "--sha256", "ABC", *broker]) == 1
    assert "64 lowercase hex" in capsys.readouterr().err
    f = tmp_path / "x.egws"
    f.write_bytes(b"x")
    assert main(["release", "withdraw", str(f), "--sha256", "0" * 64, *broker]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["release", "withdraw", *broker]) == 2
    assert main(["release", "withdraw", str(tmp_path / "missing.egws"), *broker]) == 1
    assert "missing.egws" in capsys.readouterr().err
