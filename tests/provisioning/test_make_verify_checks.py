"""`provision make` and `provision verify` refuse what `provision apply` refuses.

Each broken bundle tree is (1) given to `make`, which must refuse to sign it,
(2) signed anyway with the library (as a careless or older tool would) and
given to `verify`, which must refuse it, and (3) applied to a real state
directory, which must refuse it with code `config`. A sound tree passes all
three.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.provision_cli import main
from gateway.release_check import check_release
from provisioning.apply import apply_bundle, current_release
from provisioning.bundle import CarryBack, DeviceIdentity, Target, encode_bundle
from provisioning.keyfiles import load_private_key
from testbed.demo_pki import make_demo_pki
from tests.provisioning.conftest import EXAMPLE

GW = "gw-0001"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "prov.key"
    assert main(["provision", "keygen", "--out", str(key)]) == 0
    return key, tmp_path / "prov.key.pub"


def tree(tmp_path: Path, edit: Callable[[Path], None] | None = None) -> Path:
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src)
    if edit is not None:
        edit(src)
    return src


def replace_in_config(old: str, new: str) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        p = src / "gateway.toml"
        text = p.read_text()
        assert old in text
        p.write_text(text.replace(old, new))

    return edit


def with_client_cert(matching: bool) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        pki = make_demo_pki(src.parent / "pki", gateway_ids=[GW, "gw-other"], valid_for=timedelta(days=365))
        shutil.copy(pki.ca, src / "certs" / "ca.pem")
        shutil.copy(pki.client(GW).cert, src / "certs" / "client.pem")
        shutil.copy(pki.client(GW if matching else "gw-other").key, src / "certs" / "client.key")
        replace_in_config('ca_file = "certs/ca.pem"', 'ca_file = "certs/ca.pem"\ncert_file = "certs/client.pem"\nkey_file = "certs/client.key"')(src)

    return edit


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "keepalive off the air": (replace_in_config("port = 8883", "port = 8883\nkeepalive_s = 70000"), "broker.keepalive_s: must be 5..240 s"),
    "relative database": (replace_in_config('path = "/var/lib/edgegw/gateway.db"', 'path = "gateway.db"'), "storage.path must be an absolute path outside the configuration"),
    "CA not PEM": (lambda src: (src / "certs" / "ca.pem").write_text("not a certificate\n"), "broker.ca_file: certs/ca.pem: not a PEM certificate"),
    "key of another certificate": (with_client_cert(matching=False), "broker.key_file: certs/client.key: does not match the certificate certs/client.pem"),
    "trust file garbage": (
        lambda src: (replace_in_config("[[bus]]", '[security]\ntrust_file = "keys/trust.json"\n\n[[bus]]')(src), (src / "keys" / "trust.json").write_text("{")),
        "security.trust_file: keys/trust.json: not valid JSON",
    ),
}


def sign(src: Path, key: Path, target: str = GW) -> bytes:
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    now = datetime.now(UTC)
    return encode_bundle(
        bundle_id="b-1", version=1, target=Target.parse(target), created=now, expires=now + timedelta(days=7),
        technician="tech-07", files=files, key=load_private_key(key), carry_back=CarryBack(),
    )  # fmt: skip


def apply_code(bundle: Path, pub_key: Ed25519PrivateKey | None, root: Path, key: Path) -> tuple[str, str]:
    from provisioning.keyfiles import load_public_key

    result = asyncio.run(
        apply_bundle(bundle, root=root, verify_key=[load_public_key(key)], identity=DeviceIdentity(GW, "site-hilltop"), check=check_release)
    )
    return result.code, result.reason


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_make_verify_and_apply_refuse_alike(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str], case: str
) -> None:
    key, pub = keys
    edit, expected = BROKEN[case]
    src = tree(tmp_path, edit)
    out = tmp_path / "b.egwb"
    assert main(["provision", "make", "--from", str(src), "--key", str(key), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "bundle would be refused by the gateway; not signing" in err and expected in err, err
    assert not out.exists()

    out.write_bytes(sign(src, key))
    assert main(["provision", "verify", str(out), "--pubkey", str(pub), "--gateway-id", GW]) == 1
    err = capsys.readouterr().err
    assert "REFUSED (config)" in err and expected in err, err

    code, reason = apply_code(out, None, tmp_path / "state", pub)
    assert code == "config" and expected in reason, reason
    assert current_release(tmp_path / "state") is None


def test_a_sound_bundle_passes_make_verify_and_apply(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = keys
    src = tree(tmp_path, with_client_cert(matching=True))
    out = tmp_path / "b.egwb"
    assert main(["provision", "make", "--from", str(src), "--key", str(key), "--out", str(out)]) == 0
    assert main(["provision", "verify", str(out), "--pubkey", str(pub)]) == 0
    assert "OK: gateway.toml passes the checks apply runs" in capsys.readouterr().out
    assert apply_code(out, None, tmp_path / "state", pub)[0] == "ok"


def test_make_refuses_a_target_that_is_not_the_configured_gateway(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = keys
    out = tmp_path / "b.egwb"
    argv = ["provision", "make", "--from", str(tree(tmp_path)), "--key", str(key), "--out", str(out)]
    assert main([*argv, "--target", "gateway:gw-0099"]) == 1
    assert "gateway.id is 'gw-0001' but this gateway is 'gw-0099'" in capsys.readouterr().err
    assert main([*argv, "--target", "site:elsewhere"]) == 1
    assert "gateway.site is 'site-hilltop' but the bundle targets site 'elsewhere'" in capsys.readouterr().err


def test_files_left_to_the_installed_release(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle that leaves the CA to the installed release: make and verify say
    so (they cannot know the gateway); verify --state-dir checks it exactly as
    apply will, against the installed release, and apply agrees."""
    key, pub = keys
    state = tmp_path / "state"
    first = tmp_path / "v1.egwb"
    assert main(["provision", "make", "--from", str(tree(tmp_path)), "--key", str(key), "--out", str(first), "--version", "1"]) == 0
    assert main(["provision", "apply", str(first), "--state-dir", str(state), "--pubkey", str(pub), "--gateway-id", GW]) == 0
    src = tmp_path / "src2"
    shutil.copytree(EXAMPLE, src)
    (src / "certs" / "ca.pem").unlink()
    (src / "certs").rmdir()
    second = tmp_path / "v2.egwb"
    capsys.readouterr()
    assert main(["provision", "make", "--from", str(src), "--key", str(key), "--out", str(second), "--version", "2"]) == 0
    assert "note: gateway.toml: broker.ca_file = 'certs/ca.pem' is not in the bundle" in capsys.readouterr().err
    assert main(["provision", "verify", str(second), "--pubkey", str(pub), "--state-dir", str(state)]) == 0
    out = capsys.readouterr()
    assert "OK: applicable to gateway gw-0001" in out.out and "note:" not in out.err
    fresh = tmp_path / "fresh"  # a gateway with nothing installed: both refuse
    assert main(["provision", "verify", str(second), "--pubkey", str(pub), "--state-dir", str(fresh), "--gateway-id", GW]) == 1
    assert "REFUSED (config)" in capsys.readouterr().err
    assert main(["provision", "apply", str(second), "--state-dir", str(fresh), "--pubkey", str(pub), "--gateway-id", GW]) == 1
    assert '"code": "config"' in capsys.readouterr().out
    assert main(["provision", "apply", str(second), "--state-dir", str(state), "--pubkey", str(pub)]) == 0
    assert json.loads((state / "current" / "manifest.json").read_text())["version"] == 2
