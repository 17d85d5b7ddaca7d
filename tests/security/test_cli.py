"""``edgegw command verify``: checking a signed envelope on a USB stick, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest

from gateway.security import cli as security_cli
from gateway.security.roles import CommandType, Role
from tests.security.conftest import GATEWAY, Central


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgegw")
    sub = parser.add_subparsers(dest="command", required=True)
    security_cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_command_verify(
    tmp_path: Path, central: Central, capsys: pytest.CaptureFixture[str]
) -> None:
    trust = tmp_path / "central_keys.json"
    trust.write_bytes(orjson.dumps(central.trust().to_dict()))
    cmd = tmp_path / "topup.json"
    cmd.write_bytes(central.cmd(CommandType.TOPUP, command_id="usb-1") + b"\n")
    base = ["command", "verify", "--file", str(cmd), "--trust", str(trust)]
    assert _cli([*base, "--gateway-id", GATEWAY]) == 0
    out = capsys.readouterr().out
    assert "AUTHENTIC topup id=usb-1 issuer=billing-k1" in out and '"payment_channel"' in out
    assert _cli([*base, "--gateway-id", "gw-0002"]) == 1
    assert "wrong_target" in capsys.readouterr().out
    cmd.write_bytes(central.cmd(CommandType.TOPUP, role=Role.OPERATIONS))
    assert _cli([*base, "--gateway-id", GATEWAY]) == 1
    assert "REFUSED wrong_role" in capsys.readouterr().out
    trust.write_text("{}")
    assert _cli([*base, "--gateway-id", GATEWAY]) == 2
    assert "unsupported format" in capsys.readouterr().err


async def test_keygen_sign_verify_and_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import stat

    import aiosqlite

    from gateway.security.envelope import Outcome, create_schema, process_command
    from gateway.security.roles import TrustStore
    from tests.security.conftest import T0

    trust = tmp_path / "central_keys.json"
    key = tmp_path / "billing.pem"
    gen = ["command", "keygen", "--role", "billing", "--key-id", "billing-2026a"]
    assert _cli([*gen, "--private-out", str(key), "--trust", str(trust)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _cli([*gen, "--private-out", str(key), "--trust", str(trust)]) == 1  # no overwrite
    assert "refusing to overwrite" in capsys.readouterr().err
    ops = ["command", "keygen", "--role", "operations", "--key-id", "billing-2026a"]
    assert _cli([*ops, "--private-out", str(tmp_path / "o.pem"), "--trust", str(trust)]) == 1
    assert "already bound" in capsys.readouterr().err

    cmd = tmp_path / "topup.json"
    sign = [
        "command", "sign", "--key", str(key), "--issuer", "billing-2026a", "--target", GATEWAY,
        "--type", "topup", "--id", "pay-1", "--counter", "1", "--issued-at-ms", str(T0),
        "--body",
        '{"account":"acct-1","amount_micro":20000000,"purchase_counter":3,"payment_channel":"agent"}',
    ]  # fmt: skip
    assert _cli([*sign, "--out", str(cmd)]) == 0
    assert _cli(["command", "verify", "--file", str(cmd), "--trust", str(trust),
                 "--gateway-id", GATEWAY]) == 0  # fmt: skip
    assert "AUTHENTIC topup id=pay-1" in capsys.readouterr().out

    async with aiosqlite.connect(tmp_path / "gw.db") as conn:
        await create_schema(conn)
        res = await process_command(
            conn,
            cmd.read_bytes().strip(),
            trust=TrustStore.load(trust),
            gateway_id=GATEWAY,
            now_ms=T0 + 1000,
            channel="usb",
        )
        assert res.outcome is Outcome.APPLIED
        assert res.envelope is not None and res.envelope.body["payment_channel"] == "agent"

    bad = [*sign[:-1], '{"account":"acct-1","amount_micro":2.5}']
    assert _cli(bad) == 1
    assert "floats" in capsys.readouterr().err
    os.chmod(key, 0o644)
    assert _cli(sign) == 1
    assert "chmod 600" in capsys.readouterr().err
