"""Two meter entries that reach one device are refused wherever a configuration is accepted.

Real files through the real loader (``load_config``, ``parse_config``), the
``edgegw config check`` and ``edgegw meters`` commands, and provisioning's
release check. The rules and the configuration from central are tested in
tests/firmware_bridge/test_addressing.py and tests/gateway/test_remote_config.py.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config, parse_config
from gateway.release_check import check_release
from provisioning.bundle import Target

HEAD = """\
[gateway]
id = "gw-1"
site = "test"

[storage]
path = "/var/lib/edgegw/gw.db"

[[bus]]
name = "rs485-1"
type = "serial"
device = "/dev/ttyUSB0"

[[bus]]
name = "rs485-2"
type = "serial"
device = "/dev/ttyUSB1"

[[bus]]
name = "lan"
type = "tcp"
host = "127.0.0.1"
port = 5020

[[bus]]
name = "lan-2"
type = "tcp"
host = "127.0.0.1"
port = 5021
"""


def dlt(mid: str, bus: str, address: str) -> str:
    return f'\n[[meter]]\nid = "{mid}"\nbus = "{bus}"\nprotocol = "dlt645"\naddress = "{address}"\n'


def modbus(mid: str, bus: str, unit: int, profile: str = "sdm120") -> str:
    return f'\n[[meter]]\nid = "{mid}"\nbus = "{bus}"\nprotocol = "modbus"\nunit_id = {unit}\nprofile = "{profile}"\n'


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def refused(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def line_of(path: Path, text: str) -> int:
    return path.read_text().splitlines().index(text) + 1


def test_a_dlt645_address_twice_on_one_bus_is_refused_on_the_second_entry(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + dlt("d-1", "rs485-1", "000001020304") + dlt("d-2", "rs485-1", "000001020304"))
    first = line_of(path, 'id = "d-1"') - 1  # the [[meter]] header of the first entry
    second = line_of(path, 'id = "d-2"') + 3  # the second entry's address key
    assert refused(path) == [
        f"{path}:{second}: meter[d-2].address: address 000001020304 on bus rs485-1 is already meter d-1's"
        f" (first at line {first}): both entries would read that one device, billing its energy twice,"
        " and the meter meant to be here would never be read"
    ]


def test_a_modbus_unit_twice_on_one_bus_is_refused_naming_the_bus_the_unit_and_the_first_entry(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, HEAD + modbus("m-1", "lan", 3) + modbus("m-2", "lan", 7) + modbus("m-3", "lan", 3))
    (problem,) = refused(path)
    unit_line, first = line_of(path, 'id = "m-3"') + 3, line_of(path, 'id = "m-1"') - 1
    assert f"{path}:{unit_line}: meter[m-3].unit_id: " in problem
    assert "unit id 3 on bus lan is already meter m-1's" in problem
    assert f"(first at line {first})" in problem
    assert "billing its energy twice" in problem


def test_the_same_unit_with_another_profile_is_one_device_too(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + modbus("m-1", "lan", 3) + modbus("m-2", "lan", 3, "ddsu666"))
    (problem,) = refused(path)
    assert "meter[m-2].unit_id: unit id 3 on bus lan is already meter m-1's" in problem
    assert "with profile sdm120: one unit id is one device whatever the profile" in problem
    assert "no multi-channel devices" in problem


def test_every_further_entry_at_one_address_names_the_first(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEAD + dlt("d-1", "rs485-1", "000000000001") + dlt("d-2", "rs485-1", "000000000001")
        + dlt("d-3", "rs485-1", "000000000001"),
    )
    got = refused(path)
    assert [p.split(": ")[1] for p in got] == ["meter[d-2].address", "meter[d-3].address"]
    assert all("is already meter d-1's" in p for p in got), got


def test_the_same_addresses_on_different_lines_are_accepted(tmp_path: Path) -> None:
    text = (
        HEAD
        + dlt("d-1", "rs485-1", "000001020304") + dlt("d-2", "rs485-2", "000001020304")
        + modbus("m-1", "lan", 1) + modbus("m-2", "lan-2", 1)
    )
    cfg = load_config(write(tmp_path, text))
    assert [(m.id, m.bus) for m in cfg.meters] == [("d-1", "rs485-1"), ("d-2", "rs485-2"), ("m-1", "lan"), ("m-2", "lan-2")]


def test_two_tcp_buses_to_one_endpoint_are_one_address_space(tmp_path: Path) -> None:
    """Meters have no host of their own: a tcp bus is its host and port, and two
    buses naming the same endpoint reach the same unit ids."""
    same = HEAD.replace("port = 5021", "port = 5020")
    path = write(tmp_path, same + modbus("m-1", "lan", 1) + modbus("m-2", "lan-2", 1))
    (problem,) = refused(path)
    assert "meter[m-2].unit_id: unit id 1 on bus lan-2 (127.0.0.1:5020, the same line as bus lan)" in problem
    assert "is already meter m-1's" in problem
    # a serial server's other port is another line
    load_config(write(tmp_path, HEAD + modbus("m-1", "lan", 1) + modbus("m-2", "lan-2", 1), "other.toml"))


def test_the_broadcast_address_is_not_a_meter_address(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + dlt("d-1", "rs485-1", "999999999999"))
    (problem,) = refused(path)
    assert "meter[d-1].address: 999999999999 is the broadcast address" in problem
    assert "no meter answers it" in problem
    # wildcards are not addresses either (12 decimal digits)
    (problem,) = refused(write(tmp_path, HEAD + dlt("d-1", "rs485-1", "AAAAAA000123"), "w.toml"))
    assert "meter[d-1].address: must be 12 decimal digits" in problem


def test_a_document_without_lines_still_names_the_first_entry(tmp_path: Path) -> None:
    raw = tomllib.loads(HEAD + modbus("m-1", "lan", 9) + modbus("m-2", "lan", 9))
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "central.toml")
    (problem,) = info.value.problems
    assert problem.startswith(f"{tmp_path / 'central.toml'}: meter[m-2].unit_id: unit id 9 on bus lan is already meter m-1's:")


def test_config_check_and_the_commissioning_commands_refuse_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, HEAD + modbus("m-1", "lan", 4) + modbus("m-2", "lan", 4))
    assert main(["config", "check", str(path)]) != 0
    assert "meter[m-2].unit_id: unit id 4 on bus lan is already meter m-1's" in capsys.readouterr().err
    assert main(["meters", "read", "--config", str(path)]) != 0
    assert "meter[m-2].unit_id: unit id 4 on bus lan is already meter m-1's" in capsys.readouterr().err


def test_provisioning_refuses_a_release_with_it(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    write(files, HEAD + dlt("d-1", "rs485-1", "000000000042") + dlt("d-2", "rs485-1", "000000000042"), "gateway.toml")
    check = check_release(files, Target("gateway", "gw-1"), None, now=dt.datetime.now(dt.UTC))
    assert any("meter[d-2].address: address 000000000042 on bus rs485-1 is already meter d-1's" in p
               for p in check.problems), check.problems


def relay(kind: str, address: int, unit: int | None = None) -> str:
    at = "" if unit is None else f"unit_id = {unit}\n"
    return f'\n[meter.relay]\nkind = "{kind}"\naddress = {address}\n{at}'


def test_two_meters_with_one_relay_are_refused_on_the_second(tmp_path: Path) -> None:
    """A separate relay module at unit 10: two meters naming its coil 0 would cut each
    other's supply."""
    path = write(
        tmp_path,
        HEAD + modbus("m-1", "lan", 1) + relay("coil", 0, 10) + modbus("m-2", "lan", 2) + relay("coil", 0, 10),
    )
    (problem,) = refused(path)
    first = line_of(path, 'id = "m-1"') - 1
    assert "meter[m-2].relay.address: relay coil 0 at unit id 10 on bus lan is already meter m-1's relay" in problem
    assert f"(first at line {first}): tripping either account would cut the other's supply too" in problem


def test_a_relay_at_another_meters_unit_is_that_meters_relay(tmp_path: Path) -> None:
    """m-2's relay names unit 1 explicitly; m-1's is at its own unit 1: the same coil."""
    path = write(
        tmp_path, HEAD + modbus("m-1", "lan", 1) + relay("coil", 5) + modbus("m-2", "lan", 2) + relay("coil", 5, 1)
    )
    (problem,) = refused(path)
    assert "meter[m-2].relay.address: relay coil 5 at unit id 1 on bus lan is already meter m-1's relay" in problem


def test_distinct_relays_are_accepted(tmp_path: Path) -> None:
    text = (
        HEAD
        # each meter's own coil 0
        + modbus("m-1", "lan", 1) + relay("coil", 0) + modbus("m-2", "lan", 2) + relay("coil", 0)
        # one relay module, two coils; and a holding register at the same number (another address space)
        + modbus("m-3", "lan", 3) + relay("coil", 0, 10) + modbus("m-4", "lan", 4) + relay("coil", 1, 10)
        + modbus("m-5", "lan", 5) + relay("register", 0, 10)
        # the same relay address on another line
        + modbus("m-6", "lan-2", 6) + relay("coil", 0, 10)
    )
    cfg = load_config(write(tmp_path, text))
    assert [m.id for m in cfg.meters if m.relay is not None] == ["m-1", "m-2", "m-3", "m-4", "m-5", "m-6"]
