"""systemd/install.sh into a temporary root: installs everything, twice changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.software_bundle import normalize_name, parse_lock
from tests.harness.mosquitto import free_port
from tests.harness.releases import kit as releases_kit
from tests.systemd._tools import require_tool

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "systemd" / "install.sh"


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path below root with type, mode, owner and content (or link target)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if rel.startswith("etc/") and rel.endswith(("-", ".pwd.lock")):
                continue  # backup copies and lock file written by the user database tools
            if p.is_symlink():
                body: object = os.readlink(p)
            elif p.is_file():
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, body)
    return out


@pytest.fixture
def target(tmp_path: Path) -> Path:
    for tool in ("systemd-sysusers", "systemd-tmpfiles", "systemctl"):
        require_tool(tool)
    if os.geteuid() != 0:
        pytest.skip("install.sh --root sets owners: needs root (as on the CI machine)")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # A Debian base: root and the dialout group that owns serial ports.
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\ndialout:x:20:\n")
    return root


@pytest.fixture
def pubkey(tmp_path: Path) -> Path:
    p = tmp_path / "prov.pub"
    p.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return p


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=120
    )


def test_dry_run_changes_nothing(target: Path, pubkey: Path) -> None:
    before = tree(target)
    r = run("--root", str(target), "--dry-run", "--no-venv", "--provisioning-pubkey", str(pubkey))
    assert r.returncode == 0, r.stderr
    assert "would install /etc/systemd/system/edgegw.service" in r.stdout
    assert "would create user edgegw" in r.stdout
    assert tree(target) == before


def test_install_twice_is_idempotent(target: Path, pubkey: Path) -> None:
    args = ("--root", str(target), "--no-venv", "--provisioning-pubkey", str(pubkey))
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert "change(s) made" in first.stdout
    after_first = tree(target)

    for rel, src in [
        ("etc/systemd/system/edgegw.service", "edgegw.service"),
        ("etc/systemd/system/edgegw-usb@.service", "edgegw-usb@.service"),
        ("etc/udev/rules.d/99-edgegw-usb.rules", "99-edgegw-usb.rules"),
        ("etc/sysctl.d/60-edgegw-writeback.conf", "60-edgegw-writeback.conf"),
    ]:
        assert (target / rel).read_bytes() == (REPO / "systemd" / src).read_bytes()
        assert (target / rel).stat().st_mode & 0o777 == 0o644
    assert (target / "etc/edgegw/provisioning.pub").read_bytes() == pubkey.read_bytes()
    passwd = (target / "etc/passwd").read_text()
    uid = next(
        int(line.split(":")[2]) for line in passwd.splitlines() if line.startswith("edgegw:")
    )
    assert "dialout:x:20:edgegw" in (target / "etc/group").read_text()
    for d in ("var/lib/edgegw", "var/lib/edgegw/provisioning"):
        st = (target / d).stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, uid)
    wants = target / "etc/systemd/system/multi-user.target.wants/edgegw.service"
    assert wants.is_symlink()

    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert "nothing to do: already installed" in second.stdout
    assert tree(target) == after_first

    # A changed unit file is put back; nothing else is touched.
    (target / "etc/systemd/system/edgegw.service").write_text("[Service]\n")
    third = run(*args)
    assert "install /etc/systemd/system/edgegw.service" in third.stdout
    assert "1 change(s) made" in third.stdout
    assert tree(target) == after_first


def test_rejects_unknown_option_and_bad_key(target: Path, tmp_path: Path) -> None:
    assert run("--bogus").returncode == 2
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    r = run("--root", str(target), "--no-venv", "--provisioning-pubkey", str(bad))
    assert r.returncode == 2 and "not a PEM public key" in r.stderr
    assert not (target / "etc/systemd").exists(), "inputs are checked before anything is installed"


def test_software_needs_a_wheelhouse(target: Path, pubkey: Path) -> None:
    r = run("--root", str(target), "--provisioning-pubkey", str(pubkey))
    assert r.returncode == 2 and "--wheelhouse DIR is required" in r.stderr
    assert not (target / "etc/systemd").exists()


def test_release_installs_from_the_wheelhouse_with_no_network(
    target: Path, pubkey: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """install.sh makes the release from a local wheelhouse alone: pip gets no index
    (its index and find-links point at a closed loopback port, and install.sh must
    ignore them), every wheel is checked against requirements.lock's hashes."""
    kit = releases_kit(tmp_path_factory)
    wheelhouse = kit.wheelhouse(kit.old)
    closed = f"http://127.0.0.1:{free_port()}/simple"
    env = dict(os.environ, PIP_INDEX_URL=closed, PIP_EXTRA_INDEX_URL=closed, PIP_FIND_LINKS=closed,
               PIP_NO_INDEX="0", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")  # fmt: skip
    args = ["bash", str(INSTALL), "--root", str(target), "--wheelhouse", str(wheelhouse),
            "--provisioning-pubkey", str(pubkey)]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"install release {kit.old}" in r.stdout
    opt = target / "opt/edgegw"
    for link in ("current", "committed"):
        assert os.readlink(opt / link) == f"releases/{kit.old}"
    out = subprocess.run([str(opt / "current/bin/edgegw"), "--version"], capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.stdout.strip() == f"edgegw {kit.old}", out.stderr
    status = subprocess.run([str(opt / "current/bin/edgegw"), "update", "status", "--root",
                             str(opt), "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(status.stdout)["current"] == kit.old, status.stderr
    # Exactly the locked versions are installed.
    site = next((opt / "releases" / kit.old / "lib").glob("python3*/site-packages"))
    pins = parse_lock((REPO / "requirements.lock").read_text())
    dists = dict(
        (normalize_name(n), v)
        for n, v in (p.name.removesuffix(".dist-info").split("-") for p in site.glob("*.dist-info"))
    )
    for pin in pins.values():
        assert dists.get(pin.name) == pin.version, (pin, dists)
    for unit in ("edgegw-update.path", "edgegw-update-recover.service"):
        assert (target / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink()

    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert "nothing to do: already installed" in again.stdout, again.stdout + again.stderr

    # A wheel that is not the locked one is refused by its hash.
    bad = tmp_path_factory.mktemp("bad-wheelhouse")
    for w in wheelhouse.iterdir():
        (bad / w.name).write_bytes(w.read_bytes())
    tomli = next(bad.glob("tomli_w-*.whl"))
    tomli.write_bytes(tomli.read_bytes() + b"\0")
    other = tmp_path_factory.mktemp("root2")
    (other / "etc").mkdir()
    shutil.copy2(target / "etc/passwd", other / "etc/passwd")
    shutil.copy2(target / "etc/group", other / "etc/group")
    r = subprocess.run(["bash", str(INSTALL), "--root", str(other), "--wheelhouse", str(bad),
                        "--no-venv"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0  # --no-venv: the software is not touched
    r = subprocess.run(["bash", str(INSTALL), "--root", str(other), "--wheelhouse", str(bad)],
                       capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert r.returncode != 0 and "hash" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert not (other / "opt/edgegw/current").exists()
