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
