from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
[gateway]
id = "gw-1"
site = "test"

[storage]
path = "gw.db"

[[bus]]
name = "rs485-1"
type = "serial"
device = "/dev/ttyUSB0"
baud = 2400
parity = "E"

[[bus]]
name = "lan"
type = "tcp"
host = "127.0.0.1"

[[meter]]
id = "m-1"
bus = "rs485-1"
protocol = "dlt645"
address = "000001020304"
account = "a-1"

[[meter]]
id = "m-2"
bus = "lan"
protocol = "modbus"
unit_id = 7
profile = "sdm120"
[meter.relay]
kind = "coil"
address = 16
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_good_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.storage.path == tmp_path / "gw.db"
    assert cfg.bus("rs485-1").baud == 2400 and cfg.bus("rs485-1").parity == "E"
    assert [m.id for m in cfg.meters_on("lan")] == ["m-2"]
    relay = cfg.meters[1].relay
    assert relay is not None and relay.kind == "coil" and relay.address == 16


def test_each_problem_reported_once_with_file_and_key_path(tmp_path: Path) -> None:
    text = (
        GOOD.replace('baud = 2400', 'baud = "2400"')
        .replace('bus = "lan"', 'bus = "lan-9"')
        .replace('site = "test"', 'site = "test"\ncolour = "blue"')
    )
    got = problems(tmp_path, text)
    f = tmp_path / "site.toml"
    assert got == [
        f"{f}:5: gateway.colour: unknown key (allowed: health_interval_s, heartbeat_file, id, poll_interval_s, site, timezone)",
        f"{f}:14: bus[rs485-1].baud: must be an integer, got str '2400'",
        f"{f}:31: meter[m-2].bus: unknown bus 'lan-9' (known: lan, rs485-1)",
    ]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (('id = "gw-1"', 'id = "gw 1"'), "gateway.id: 'gw 1' is not a valid identifier"),
        (('unit_id = 7', 'unit_id = 300'), ":32: meter[m-2].unit_id: must be a Modbus unit id 1..247, got 300"),
        (('address = "000001020304"', 'address = "12AB"'), ":25: meter[m-1].address: must be 12 decimal digits"),
        (('profile = "sdm120"', 'profile = "sdm999"'), ":33: meter[m-2].profile: unknown profile 'sdm999'"),
        (('parity = "E"', 'parity = true'), ":14: bus[rs485-1].parity: must be a string, got bool True"),
        (('kind = "coil"', 'kind = "magic"'), ":35: meter[m-2].relay.kind: must be one of"),
        (('id = "m-2"', 'id = "m-1"'), ":29: meter[m-1].id: duplicate meter id 'm-1' (first at line 21)"),
        (('device = "/dev/ttyUSB0"', ''), ":9: bus[rs485-1].device: required for a serial bus"),
        (('id = "m-2"', 'id = "m 2"'), ":29: meter[#2].id: 'm 2' is not a valid identifier"),
    ],
)
def test_specific_messages(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    """One mistake, one line: no follow-on "required" for a value that is present
    but wrong, no list of every valid value."""
    got = problems(tmp_path, GOOD.replace(*edit))
    assert len(got) == 1 and expected in got[0], got
    assert len(got[0]) < 200, got


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    assert "TOML syntax error" in problems(tmp_path, "[gateway\nid=1")[0]
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "nope.toml")


def test_tls_without_ca_is_refused(tmp_path: Path) -> None:
    got = problems(tmp_path, GOOD + "\n[broker]\ntls = true\n")
    assert any("broker.ca_file: required when broker.tls = true" in p for p in got)


def test_cli_config_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import pty

    master, slave = pty.openpty()  # the serial device must exist: a pseudo-terminal stands in
    try:
        text = GOOD.replace("/dev/ttyUSB0", os.ttyname(slave))
        assert main(["config", "check", str(write(tmp_path, text))]) == 0
        assert main(["config", "check", str(write(tmp_path, GOOD.replace("/dev/ttyUSB0", "/dev/ttyNOPE7")))]) == 2
        assert "bus[rs485-1].device: /dev/ttyNOPE7: does not exist" in capsys.readouterr().err
    finally:
        os.close(master)
        os.close(slave)
    assert main(["config", "check", str(ROOT / "examples" / "broken.toml")]) != 0
    err = capsys.readouterr().err
    assert "gateway.poll_interval_s: must be a number, got str 'fast'" in err
    assert "storage.compress: unknown key" in err
    assert "broken.toml:18: meter[m-1].bus: unknown bus 'rs485-9' (known: rs485-1)" in err


def test_shipped_examples_are_valid() -> None:
    for example in sorted((ROOT / "examples").glob("site-*.toml")):
        load_config(example)


def test_serial_defaults_follow_the_protocol(tmp_path: Path) -> None:
    text = GOOD.replace("baud = 2400\n", "").replace('parity = "E"\n', "")
    cfg = load_config(write(tmp_path, text))
    assert (cfg.bus("rs485-1").baud, cfg.bus("rs485-1").parity) == (2400, "E")  # DL/T 645 bus


def test_dlt645_meter_password_operator_and_quantities(tmp_path: Path) -> None:
    text = GOOD.replace(
        'account = "a-1"',
        'account = "a-1"\npassword = "02123456"\noperator = "00000001"\n'
        'quantities = ["energy_import_kwh", "relay_open"]',
    )
    m = load_config(write(tmp_path, text)).meters[0]
    assert (m.password, m.operator) == ("02123456", "00000001")
    assert m.quantities == ("energy_import_kwh", "relay_open")
    got = problems(tmp_path, text.replace('"02123456"', '"0212"').replace('"relay_open"', '"relay"'))
    assert any("meter[m-1].password: must be 8 hex digits (4 bytes)" in p for p in got), got
    assert any("meter[m-1].quantities: unknown quantities ['relay']" in p for p in got), got


def test_prepaid_accounts_are_loaded_and_checked(tmp_path: Path) -> None:
    import shutil

    shutil.copy(ROOT / "examples" / "accounts" / "household.toml", tmp_path / "household.toml")
    shutil.copy(ROOT / "examples" / "tariffs" / "flat.toml", tmp_path / "flat.toml")
    text = GOOD.replace('account = "a-1"', 'account = "acc-0001"') + (
        '\n[[account]]\nid = "acc-0001"\nsettings = "household.toml"\ntariffs = ["flat.toml"]\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.accounts[0].settings == tmp_path / "household.toml"
    got = problems(tmp_path, text.replace('account = "acc-0001"', 'account = "acc-9"'))
    assert any("meter[m-1].account: unknown account 'acc-9' (known: acc-0001)" in p for p in got), got
    (tmp_path / "flat.toml").write_text((tmp_path / "flat.toml").read_text().replace("price = ", "prize = ", 1))
    got = problems(tmp_path, text)
    assert any(str(tmp_path / "flat.toml") in p for p in got), got
