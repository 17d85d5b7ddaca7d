"""`edgegw config check` as a pre-flight: the machine's problems with a file,
reported in the same pass as the file's own, each with its key and line.

Real files throughout: certificates from a throw-away CA (testbed.demo_pki),
a real keystore and storage key, a pseudo-terminal as a serial device; access
as another user is checked by really dropping to that user (needs root).
"""

from __future__ import annotations

import datetime as dt
import os
import pty
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import check_config
from gateway.preflight import (
    HIDDEN_BY_PROTECT_HOME,
    PRIVATE_TMP,
    SERIAL_DRIVERS,
    SERVICE_USER,
    STATE_DIRECTORY,
    TEXTFILE_DIRECTORIES,
    Account,
    account_for,
    preflight,
)
from provisioning.keys import Keystore
from store_forward.sealing import create_storage_key
from testbed.demo_pki import make_demo_pki

ROOT = Path(__file__).resolve().parents[2]


def me() -> Account:
    return account_for(None) if os.geteuid() != 0 else Account("root", 0, 0, (0,), False, False)


def site(tmp_path: Path, *, broker: str = "", security: str = "", storage: str = "", bus: str = "") -> Path:
    text = f"""\
[gateway]
id = "gw-1"
site = "test"

[storage]
path = "var/gw.db"
{storage}
[broker]
{broker}
[security]
{security}
[[bus]]
name = "lan"
type = "tcp"
host = "127.0.0.1"
{bus}
[[meter]]
id = "m-1"
bus = "lan"
protocol = "modbus"
unit_id = 1
profile = "sdm120"
"""
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def run_check(path: Path, account: Account | None = None, now: dt.datetime | None = None) -> tuple[list[str], list[str]]:
    report = check_config(path)
    found = preflight(report, account or me(), now=now)
    return report.problems + found.problems, found.warnings


def test_a_healthy_site_passes(tmp_path: Path) -> None:
    pki = make_demo_pki(tmp_path / "pki", gateway_ids=["gw-1"], valid_for=dt.timedelta(days=365))
    pair = pki.client("gw-1")
    Keystore.init(tmp_path / "keys", "gw-1")
    create_storage_key(tmp_path / "storage.key")
    (tmp_path / "trust.json").write_text('{"format": 1, "keys": []}')
    path = site(
        tmp_path,
        broker=f'tls = true\nca_file = "{pki.ca}"\ncert_file = "{pair.cert}"\nkey_file = "{pair.key}"\n',
        security='trust_file = "trust.json"\nkeystore = "keys"\n',
        storage='key_file = "storage.key"\n',
    )
    problems, warnings = run_check(path)
    assert problems == [] and warnings == []
    assert not (tmp_path / "var").exists()  # the check creates nothing


def test_every_machine_problem_and_file_problem_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = make_demo_pki(tmp_path / "pki", gateway_ids=["gw-1", "gw-2"], valid_for=dt.timedelta(days=365))
    (tmp_path / "trust.json").write_text('{"format": 1, "keys": [{"role": "nobody"}]}')
    Keystore.init(tmp_path / "keys", "gw-9")
    (tmp_path / "not-a-dir").write_text("")
    path = site(
        tmp_path,
        broker=(
            f'tls = true\nca_file = "missing-ca.pem"\ncert_file = "{pki.client("gw-1").cert}"\n'
            f'key_file = "{pki.client("gw-2").key}"\nkeepalive_s = 70000\n'
        ),
        security='trust_file = "trust.json"\nkeystore = "keys"\n',
        storage='key_file = "nope.key"\n',
    ).read_text()
    path = tmp_path / "site.toml"
    path.write_text(
        path.read_text().replace('path = "var/gw.db"', 'path = "not-a-dir/gw.db"').replace("unit_id = 1", "unit_id = 300")
        + '\n[[bus]]\nname = "rs485"\ntype = "serial"\ndevice = "/dev/ttyNOPE9"\n'
    )
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    f = str(path)
    expected = [
        f"{f}:14: broker.keepalive_s: must be 5..240 s",
        f"{f}:29: meter[m-1].unit_id: must be a Modbus unit id 1..247, got 300",
        f"{f}:6: storage.path: {tmp_path}/not-a-dir: cannot be created ({tmp_path}/not-a-dir is not a directory)",
        f"{f}:11: broker.ca_file: {tmp_path}/missing-ca.pem: does not exist",
        f"{f}:7: storage.key_file: {tmp_path}/nope.key: does not exist",
        f"{f}:35: bus[rs485].device: /dev/ttyNOPE9: does not exist",
        f"{f}:13: broker.key_file: {pki.client('gw-2').key}: does not match the certificate {pki.client('gw-1').cert}",
        f"{f}:17: security.trust_file: {tmp_path}/trust.json: keys[0].role: must be one of",
        f"{f}:18: security.keystore: {tmp_path}/keys: belongs to gateway 'gw-9', not 'gw-1'",
    ]
    lines = err.splitlines()
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, err)
    assert lines[-1].startswith(f"{f}: {len(expected)} problem(s); files checked as")


def test_certificate_validity_and_an_encrypted_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    now = dt.datetime.now(dt.UTC)
    old = make_demo_pki(tmp_path / "old", gateway_ids=["gw-1"], now=now - dt.timedelta(days=400), valid_for=dt.timedelta(days=30))
    soon = make_demo_pki(tmp_path / "soon", gateway_ids=["gw-1"], now=now, valid_for=dt.timedelta(days=10))
    key = serialization.load_pem_private_key(soon.client("gw-1").key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    ))
    expired = site(tmp_path, broker=f'tls = true\nca_file = "{old.ca}"\n')
    problems, _ = run_check(expired)
    assert len(problems) == 1 and "broker.ca_file" in problems[0] and "expired at" in problems[0], problems
    near = site(
        tmp_path,
        broker=f'tls = true\nca_file = "{soon.ca}"\ncert_file = "{soon.client("gw-1").cert}"\nkey_file = "{locked}"\n',
    )
    problems, warnings = run_check(near)
    assert len(problems) == 1 and "the key is encrypted; the daemon cannot enter a pass phrase" in problems[0]
    assert any("broker.cert_file" in w and "expires at" in w for w in warnings), warnings
    problems, _ = run_check(near, now=now - dt.timedelta(days=2))  # this machine's clock is behind
    assert any("is valid only from" in p and "this machine's clock says" in p for p in problems), problems


def test_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("hello")
    problems, _ = run_check(site(tmp_path, broker='tls = true\nca_file = "ca.pem"\n'))
    assert len(problems) == 1 and re.search(r":\d+: broker.ca_file: .*ca.pem: not a PEM certificate", problems[0]), problems


def test_storage_without_free_space_above_the_reserve(tmp_path: Path) -> None:
    problems, _ = run_check(site(tmp_path, storage=f"reserve_bytes = {1 << 40}\n"))
    assert len(problems) == 1 and "not more than storage.reserve_bytes (1048576.0 MiB)" in problems[0], problems


def test_serial_device_that_is_not_a_character_device(tmp_path: Path) -> None:
    (tmp_path / "ttyFAKE").write_text("")
    problems, _ = run_check(site(tmp_path, bus=f'\n[[bus]]\nname = "rs485"\ntype = "serial"\ndevice = "{tmp_path}/ttyFAKE"\n'))
    assert len(problems) == 1 and "bus[rs485].device" in problems[0] and "not a character device" in problems[0]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can search (pytest's own is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="edgegw-preflight-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user needs root")
def test_files_are_checked_as_the_service_user(open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As root, `--as-user` drops a child process to that user: a key only root can
    read is reported, as is a storage directory it cannot create."""
    tmp_path = open_dir
    pki = make_demo_pki(tmp_path / "pki", gateway_ids=["gw-1"], valid_for=dt.timedelta(days=365))
    (tmp_path / "pki").chmod(0o755)
    pki.ca.chmod(0o644)
    pki.client("gw-1").cert.chmod(0o644)
    pki.client("gw-1").key.chmod(0o600)  # root's
    path = site(
        tmp_path,
        broker=f'tls = true\nca_file = "{pki.ca}"\ncert_file = "{pki.client("gw-1").cert}"\nkey_file = "{pki.client("gw-1").key}"\n',
    )
    path.chmod(0o644)
    assert main(["config", "check", "--as-user", "nobody", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"broker.key_file: {pki.client('gw-1').key}: cannot be read by user 'nobody': permission denied" in err
    assert f"storage.path: {tmp_path}/var: cannot be created by user 'nobody': {tmp_path}: permission denied" in err
    assert "broker.ca_file" not in err  # readable by everyone
    assert "files checked as user 'nobody', by a process running as it" in err
    assert main(["config", "check", str(path)]) == 0  # as root, for whom every file is readable
    out = capsys.readouterr().out
    assert "files checked as 'root'" in out or f"as user {SERVICE_USER!r}" in out


def test_the_service_sandbox_hides_what_the_unit_hides(tmp_path: Path) -> None:
    """For the service user, paths the unit's sandbox hides are problems even if
    the permissions would allow them."""
    master, slave = pty.openpty()
    try:
        device = os.ttyname(slave)
        path = site(
            tmp_path,
            security='trust_file = "/root/trust.json"\n',
            bus=f'\n[[bus]]\nname = "rs485"\ntype = "serial"\ndevice = "{device}"\n',
        )
        service = Account(SERVICE_USER, os.geteuid(), os.getegid(), (), False, True)
        problems, _ = run_check(path, service)
    finally:
        os.close(master)
        os.close(slave)
    text = "\n".join(problems)
    assert "security.trust_file: /root/trust.json: the service cannot see /root (ProtectHome=yes" in text
    assert f"storage.path: {tmp_path}: the service has a private /tmp (PrivateTmp=yes)" in text
    assert f"bus[rs485].device: {device}: a pts device; the service may open only ttyUSB, ttyACM" in text


def test_sandbox_constants_agree_with_the_unit_file() -> None:
    unit: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / "edgegw.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            unit.setdefault(k.strip(), []).append(v.strip())
    assert unit["User"] == [SERVICE_USER]
    assert unit["StateDirectory"] == [STATE_DIRECTORY.name] and STATE_DIRECTORY.parent == Path("/var/lib")
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == [" ".join(f"-{d}" for d in TEXTFILE_DIRECTORIES)]
    assert unit["ProtectHome"] == ["yes"] and HIDDEN_BY_PROTECT_HOME == (Path("/home"), Path("/root"), Path("/run/user"))
    assert unit["PrivateTmp"] == ["yes"] and PRIVATE_TMP == (Path("/tmp"), Path("/var/tmp"))
    assert unit["DevicePolicy"] == ["closed"]
    assert sorted(v.split()[0].removeprefix("char-") for v in unit["DeviceAllow"]) == sorted(SERIAL_DRIVERS)
    assert unit["SupplementaryGroups"] == ["dialout"]
