"""``edgegw central serve`` as it runs in production: a process with the API and the dispatcher.

Set up with the command line alone (keys, an account, a token), the process
takes a top-up over HTTP and publishes its signed envelope to the gateway's
command topic on a real mosquitto, where a subscriber with the gateway's
persistent session gets it; the gateway's verifier accepts it; the operator
console answers on the same listener. SIGTERM stops it with exit status 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import aiomqtt

from gateway.cli import main as edgegw
from gateway.security.envelope import authenticate
from store_forward.command_envelope import Envelope
from store_forward.command_roles import TrustStore
from store_forward.topics import Topics
from tests.harness.mosquitto import Mosquitto, free_port, wait_port

GW = "gw-serve"
ROOT = Path(__file__).resolve().parents[2]


async def test_serve_takes_a_topup_over_http_and_publishes_it(
    tmp_path: Path, mosquitto: Mosquitto, capsys: object
) -> None:
    db, keys = str(tmp_path / "central.db"), str(tmp_path / "keys")

    def cli(*args: str) -> None:  # (the commands run their own event loop)
        assert edgegw(["central", *args]) == 0

    await asyncio.to_thread(cli, "keys", "init", "--keys", keys)
    await asyncio.to_thread(cli, "account", "add", "--db", db, "--account", "acct-7", "--gateway", GW)
    await asyncio.to_thread(cli, "token", "add", "--db", db, "--name", "clerk", "--role", "billing")
    token = capsys.readouterr().out.strip().splitlines()[-1]  # type: ignore[attr-defined]
    # the gateway's session exists before anything is published (it holds what comes)
    cmd = Topics("edgegw/v1", GW).cmd
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"edgegw-{GW}", clean_session=False) as gw:
        await gw.subscribe(cmd, qos=1)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "central", "serve", "--db", db, "--keys", keys,
        "--broker", f"127.0.0.1:{mosquitto.port}", "--listen", f"127.0.0.1:{port}",
        "--console", "--timezone", "Asia/Shanghai",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_port, port, up=True, timeout_s=20)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/api/v1/topups",
                json={"account": "acct-7", "amount": "12.00", "payment_channel": "counter"},
                headers={"Authorization": f"Bearer {token}"},
            ) as r:
                assert r.status == 201, await r.text()
                sold = await r.json()
            async with aiomqtt.Client(
                "127.0.0.1", mosquitto.port, identifier=f"edgegw-{GW}", clean_session=False
            ) as gw:
                await gw.subscribe(cmd, qos=1)
                async with asyncio.timeout(15):
                    async for msg in gw.messages:
                        raw = msg.payload
                        break
            assert isinstance(raw, bytes)
            env = authenticate(raw, TrustStore.load(Path(keys) / "trust.json"))
            assert isinstance(env, Envelope), env
            assert (env.command_id, env.target, env.body["purchase_counter"]) == (sold["id"], GW, 1)
            async with http.get(
                f"http://127.0.0.1:{port}/api/v1/commands/{sold['id']}",
                headers={"Authorization": f"Bearer {token}"},
            ) as r:
                assert (await r.json())["state"] == "sent"
            async with http.get(f"http://127.0.0.1:{port}/console/login") as r:  # beside the API
                assert r.status == 200 and 'id="login-form"' in await r.text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
