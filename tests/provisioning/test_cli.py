"""The technician CLI, end to end: keygen, make, inspect, verify, apply, status, rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.provision_cli import main
from provisioning.apply import current_release
from tests.provisioning.conftest import EXAMPLE, REPO, example_files


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "prov.key"
    assert main(["provision", "keygen", "--out", str(key)]) == 0
    return key, tmp_path / "prov.key.pub"


def test_keygen_refuses_overwrite(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = keys
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in pub.read_bytes()
    assert main(["provision", "keygen", "--out", str(key)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_make_verify_apply_status_rollback(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = keys
    b1, b2 = tmp_path / "v1.egwb", tmp_path / "v2.egwb"
    assert main(["provision", "make", "--from", str(EXAMPLE), "--key", str(key), "--out", str(b1),
                 "--version", "1", "--technician", "tech-07"]) == 0  # fmt: skip
    assert "target gateway:gw-0001" in capsys.readouterr().out
    assert main(["provision", "make", "--from", str(EXAMPLE), "--key", str(key), "--out", str(b2),
                 "--version", "2", "--backlog-export"]) == 0  # fmt: skip
    capsys.readouterr()

    assert main(["provision", "inspect", str(b1)]) == 0
    out = capsys.readouterr()
    assert "UNVERIFIED" in out.err
    assert json.loads(out.out)["manifest"]["version"] == 1

    assert (
        main(["provision", "verify", str(b1), "--pubkey", str(pub), "--gateway-id", "gw-0001"]) == 0
    )
    assert (
        f"OK: signature and {len(example_files())} file hashes verified" in capsys.readouterr().out
    )
    assert main(["provision", "verify", str(b1), "--pubkey", str(pub), "--gateway-id", "gw-9"]) == 1
    assert "REFUSED (wrong-target)" in capsys.readouterr().err

    state = tmp_path / "state"
    audit = tmp_path / "audit.jsonl"
    common = ["--state-dir", str(state), "--pubkey", str(pub), "--audit-log", str(audit)]
    assert main(["provision", "apply", str(b1), *common, "--gateway-id", "gw-0001"]) == 0
    capsys.readouterr()
    # Identity now comes from the installed configuration.
    assert main(["provision", "apply", str(b2), *common, "--carry-back", str(tmp_path / "cb")]) == 0
    capsys.readouterr()
    assert main(["provision", "apply", str(b1), *common]) == 1
    assert '"code": "rollback"' in capsys.readouterr().out
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [x["outcome"] for x in lines] == ["accepted", "accepted", "refused"]
    result = json.loads((tmp_path / "cb" / "result.json").read_text())
    # The bundle asked for the backlog; the plain CLI has no exporter and says so.
    assert result["backlog_export"]["status"] == "failed"

    assert main(["provision", "status", "--state-dir", str(state)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["current"]["version"], st["previous"]["version"]) == (2, 1)
    assert main(["provision", "rollback", "--state-dir", str(state)]) == 0
    rel = current_release(state)
    assert rel is not None and rel.version == 1


def test_make_refuses_links_and_invalid_config(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = keys
    src = tmp_path / "src"
    src.mkdir()
    (src / "gateway.toml").write_text('[gateway]\nid = "gw-1"\nsite = "s"\n')
    out = tmp_path / "x.egwb"
    assert (
        main(["provision", "make", "--from", str(src), "--key", str(key), "--out", str(out)]) == 1
    )
    assert "storage: missing required table" in capsys.readouterr().err
    (src / "gateway.toml").write_text((EXAMPLE / "gateway.toml").read_text())
    os.symlink("/etc/shadow", src / "shadow")
    (src / ".hidden").write_text("x")
    assert (
        main(["provision", "make", "--from", str(src), "--key", str(key), "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert "shadow: symbolic links are not allowed" in err
    assert ".hidden: path '.hidden': component '.hidden' not allowed" in err
    assert not out.exists()


def test_apply_without_identity_is_a_usage_error(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    b = tmp_path / "b.egwb"
    assert (
        main(["provision", "make", "--from", str(EXAMPLE), "--key", str(key), "--out", str(b)]) == 0
    )
    assert (
        main(
            ["provision", "apply", str(b), "--state-dir", str(tmp_path / "s"), "--pubkey", str(pub)]
        )
        == 2
    )


def test_runs_as_a_module(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "gateway.provision_cli", "provision", "keygen", "--out", str(tmp_path / "k")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ed25519:" in r.stdout
