"""``edgegw headend run --api --api-tokens --notify`` and ``edgegw headend api-token``
as processes: a batch published as a gateway on a real mosquitto ends as a cut
notice at a real HTTP receiver and as an event in the read API; usage errors
and a bad notice file are refused before anything starts."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import aiomqtt

from store_forward import wire_json
from store_forward.records import Record, RecordClass
from store_forward.topics import Topics
from tests.harness.mosquitto import Mosquitto, free_port
from tests.harness.sms_receiver import SmsReceiver
from tests.headend.test_headend_cli import edgegw, headend_process


def test_api_token_command(tmp_path: Path) -> None:
    r = edgegw("headend", "api-token", "billing-system", "--tokens", tmp_path / "tokens")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("edgegw-read-")
    line = (tmp_path / "tokens").read_text()
    assert line.startswith("billing-system sha256:") and token not in line
    assert (tmp_path / "tokens").stat().st_mode & 0o077 == 0
    bad = edgegw("headend", "api-token", "no spaces", "--tokens", tmp_path / "tokens")
    assert bad.returncode == 1 and "token name" in bad.stderr


def test_usage_and_a_bad_notice_file(tmp_path: Path) -> None:
    r = edgegw("headend", "run", "--broker", "127.0.0.1:1", "--db", tmp_path / "c.db", "--api", "127.0.0.1:0")
    assert r.returncode == 2 and "--api needs --api-tokens" in r.stderr
    (tmp_path / "notify.toml").write_text('[webhook]\nurl = "ftp://x"\n[defaults]\nlanguage = "fr"\n')
    r = edgegw("headend", "run", "--broker", "127.0.0.1:1", "--db", tmp_path / "c.db",
               "--notify", tmp_path / "notify.toml", timeout_s=60)  # fmt: skip
    assert r.returncode == 1
    assert "webhook.url" in r.stderr and "defaults.language" in r.stderr


async def test_headend_run_with_api_and_notices(tmp_path: Path, mosquitto: Mosquitto) -> None:
    tok = edgegw("headend", "api-token", "reader", "--tokens", tmp_path / "tokens")
    token = tok.stdout.strip().splitlines()[-1]
    api_port = free_port()
    async with SmsReceiver() as rx:
        (tmp_path / "notify.toml").write_text(
            f'[webhook]\nurl = "{rx.url}"\n[defaults]\nquiet_hours = ""\n'
            '[[customer]]\naccount = "acct-9"\nphone = "+8613800000009"\n'
        )
        with headend_process(
            tmp_path, "--broker", f"127.0.0.1:{mosquitto.port}", "--db", tmp_path / "central.db",
            "--api", f"127.0.0.1:{api_port}", "--api-tokens", tmp_path / "tokens",
            "--notify", tmp_path / "notify.toml",
        ) as h:  # fmt: skip
            now = time.time_ns() // 1_000_000
            body = {"type": "cutoff.state_change", "account": "acct-9", "time_ms": now, "from": "alarm2",
                    "to": "cutoff", "balance": "-0.02", "balance_micro": -20_000, "state": "supply cut",
                    "reason": "balance -0.02 <= cut level 0.00"}  # fmt: skip
            payload = wire_json.encode("gw-cli", 1, [Record(1, RecordClass.EVENT, "event", now, body)],
                                       epoch="00000000000000cc")  # fmt: skip
            base = f"http://127.0.0.1:{api_port}/api/v1"
            events: list[dict[str, object]] = []
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client, aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {token}"}
            ) as http:
                await client.subscribe(Topics("edgegw/v1", "gw-cli").ack, qos=1)
                for _ in range(300):  # until the headend is subscribed and has stored it (bounded)
                    await client.publish(Topics("edgegw/v1", "gw-cli").up, payload, qos=1)
                    try:
                        async with asyncio.timeout(0.5):
                            async for msg in client.messages:
                                assert isinstance(msg.payload, bytes)
                                if json.loads(msg.payload)["status"] in ("stored", "duplicate"):
                                    break
                        break
                    except TimeoutError:
                        assert h.alive(), h.stderr()
                for _ in range(200):
                    if rx.delivered:
                        break
                    await asyncio.sleep(0.1)
                async with http.get(base + "/events", params={"gateway": "gw-cli"}) as r:
                    assert r.status == 200
                    events = (await r.json())["events"]
                async with http.get(base + "/events", headers={"Authorization": "Bearer nope"}) as r:
                    assert r.status == 401
            assert h.stop() == 0, h.stderr()
        assert [m["kind"] for m in rx.delivered] == ["cutoff"], h.stderr()
        assert rx.delivered[0]["to"] == "+8613800000009" and "-0.02" in rx.delivered[0]["text"]
        assert [e["type"] for e in events] == ["cutoff.state_change"]
