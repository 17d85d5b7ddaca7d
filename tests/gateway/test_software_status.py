"""`edgegw status` says which release runs, where an update stands and what is on
its way, from the releases root and the update spool as gateway.update and
gateway.update_transfer leave them (read-only: nothing is written or repaired)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.software_status import software_lines, software_status
from gateway.update import STATE_FILE
from tests.gateway.e2e import site_config
from tests.gateway.test_cli_status_demo import _fill

SHA = "ab" * 32


def releases_root(root: Path, state: dict[str, object] | None) -> Path:
    for v in ("0.1.0", "0.2.0"):
        (root / "releases" / v).mkdir(parents=True)
    os.symlink("releases/0.2.0", root / "current")
    os.symlink("releases/0.1.0", root / "committed")
    if state is not None:
        (root / STATE_FILE).write_text(json.dumps(state))
    return root


def spool(path: Path) -> Path:
    for sub in ("offers", "incoming", "ready", "held"):
        (path / sub).mkdir(parents=True)
    (path / "offers" / f"{SHA}.json").write_text(json.dumps(
        {"version": "0.3.0", "sha256": SHA, "size": 4_000_000, "chunk_size": 65536, "chunks": []}
    ))
    (path / "incoming" / f"{SHA}.part").write_bytes(b"\0" * 1_500_000)
    (path / "ready" / f"{'cd' * 32}.egws").write_bytes(b"x")
    (path / "offers" / "broken.json").write_text("{not json")
    return path


def test_a_trial_in_progress_and_a_download_on_its_way(tmp_path: Path) -> None:
    trial = {"from": "0.1.0", "to": "0.2.0", "digest": SHA, "source": "mqtt", "downgrade": False,
             "boot_id": "b", "switched_ns": 1, "deadline_ns": 2}  # fmt: skip
    root = releases_root(tmp_path / "opt", {"phase": "trial", "floor": "0.1.0", "trial": trial,
                                            "failed": ["x"], "attempts": {}})  # fmt: skip
    before = sorted(p.name for p in (tmp_path / "opt").iterdir())
    sw = software_status(root, spool(tmp_path / "updates"), "0.2.0")
    assert sorted(p.name for p in (tmp_path / "opt").iterdir()) == before  # read-only
    rel = sw["releases"]
    assert (rel["current"], rel["committed"], rel["phase"], rel["floor"]) == ("0.2.0", "0.1.0", "trial", "0.1.0")
    assert rel["trial"] == {"from": "0.1.0", "to": "0.2.0", "source": "mqtt", "downgrade": False}
    assert rel["failed"] == 1
    downloads = sw["spool"]["downloads"]
    assert {"version": "0.3.0", "sha256": SHA, "size": 4_000_000, "bytes_on_disk": 1_500_000} in downloads
    assert any(d.get("offer") == "broken.json" and "unreadable offer" in d["problem"] for d in downloads)
    assert (sw["spool"]["ready"], sw["spool"]["held"]) == (1, 0)
    text = "\n".join(software_lines(sw))
    assert "current 0.2.0, committed 0.1.0, floor 0.1.0, update TRIAL" in text
    assert "in progress: 0.1.0 -> 0.2.0 (mqtt)" in text
    assert "1 bundle(s) failed their trial" in text
    assert "downloading 0.3.0 (abababababab…): part file at 1.5 MB of 4.0 MB" in text
    assert "1 ready to install, 0 held below the floor" in text
    assert "broken.json: unreadable offer" in text


def test_idle_after_a_rollback_a_damaged_state_and_no_releases_root(tmp_path: Path) -> None:
    last = {"outcome": "rolled-back", "from": "0.1.0", "to": "0.2.0", "source": "usb", "boot_id": "b"}
    root = releases_root(tmp_path / "a", {"phase": "idle", "floor": "0.1.0", "last": last})
    sw = software_status(root, tmp_path / "no-spool", None)
    assert sw["releases"]["last"] == {"outcome": "rolled-back", "from": "0.1.0", "to": "0.2.0", "source": "usb"}
    assert sw["spool"] == {"path": str(tmp_path / "no-spool"), "downloads": [], "ready": 0, "held": 0}
    text = "\n".join(software_lines(sw))
    assert text.startswith("software: not running; current 0.2.0") and "update idle" in text
    assert "last update: rolled-back 0.1.0 -> 0.2.0" in text

    damaged = releases_root(tmp_path / "b", None)
    (damaged / STATE_FILE).write_text("{half")
    rel = software_status(damaged, tmp_path / "no-spool", "0.2.0")["releases"]
    assert rel["phase"] == "unknown" and STATE_FILE in rel["problem"]
    assert rel["problem"] in "\n".join(software_lines(software_status(damaged, tmp_path, "0.2.0")))

    bare = software_status(tmp_path / "nowhere", tmp_path / "no-spool", "0.2.0")
    assert software_lines(bare) == [
        f"software: 0.2.0 (no releases root at {tmp_path / 'nowhere'}: not installed by install.sh)"
    ]


def test_status_command_carries_the_software_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = site_config(tmp_path / "site.toml", gateway_id="gw-s", db=tmp_path / "gw.db",
                      broker_port=1883, modbus_port=502, units=[1])  # fmt: skip
    asyncio.run(_fill(tmp_path / "gw.db"))
    spool(tmp_path / "updates")  # beside the database, where the daemon puts it
    root = releases_root(tmp_path / "opt", {"phase": "idle", "floor": "0.1.0"})
    assert main(["status", "--config", str(cfg), "--json", "--releases-root", str(root)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["software"]["releases"]["current"] == "0.2.0"
    assert st["software"]["spool"]["downloads"][0]["version"] == "0.3.0"
    assert main(["status", "--config", str(cfg), "--releases-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "software: not running; current 0.2.0, committed 0.1.0, floor 0.1.0, update idle" in out
    assert "downloading 0.3.0" in out


def test_the_same_as_metrics_for_the_fleet(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import render, software_families
    from gateway.software_status import releases_root_of

    last = {"outcome": "rolled-back", "from": "0.1.0", "to": "0.2.0", "source": "mqtt"}
    root = releases_root(tmp_path / "opt", {"phase": "trial", "floor": "0.1.0", "last": last, "failed": ["a", "b"]})
    assert releases_root_of(root / "releases" / "0.2.0") == root
    assert releases_root_of(tmp_path / ".venv") is None
    text = render(software_families(software_status(root, spool(tmp_path / "updates"), "0.2.0")))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("edgegw_update_phase", (("phase", "trial"),))] == 1
    assert samples[("edgegw_update_phase", (("phase", "idle"),))] == 0
    assert samples[("edgegw_update_last", (("from", "0.1.0"), ("outcome", "rolled-back"), ("to", "0.2.0")))] == 1
    assert samples[("edgegw_update_failed_bundles", ())] == 2
    assert samples[("edgegw_software_downloads", ())] == 1  # the unreadable offer is not a download
    assert samples[("edgegw_software_download_bytes", (("size", "4000000"), ("version", "0.3.0")))] == 1_500_000
    assert samples[("edgegw_software_bundles_ready", ())] == 1
    assert samples[("edgegw_software_bundles_held", ())] == 0

    # a development install: no releases root, downloads only
    bare = render(software_families(software_status(tmp_path / "nowhere", tmp_path / "no-spool", "0.2.0")))
    assert "edgegw_update_phase" not in bare and "edgegw_software_downloads 0" in bare
