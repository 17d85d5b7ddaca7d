"""The page cache's writeback setting the appliance ships (systemd/60-edgegw-writeback.conf)
and what `edgegw status` says when a machine runs with a shorter one."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.database import open_database
from store_forward import storage_policy
from store_forward.storage_policy import APPLIANCE_WRITEBACK_S, page_cache_writeback_s
from tests.gateway.e2e import site_config

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "systemd" / "60-edgegw-writeback.conf"


def test_the_shipped_setting_is_the_one_the_gateway_expects() -> None:
    settings = [
        line for line in CONF.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert settings == [f"vm.dirty_expire_centisecs = {APPLIANCE_WRITEBACK_S * 100}"]


def test_the_running_setting_is_read_in_seconds(tmp_path: Path) -> None:
    f = tmp_path / "dirty_expire_centisecs"
    f.write_text("3000\n")
    assert page_cache_writeback_s(f) == 30.0
    f.write_text("60000\n")
    assert page_cache_writeback_s(f) == 600.0
    f.write_text("not a number\n")
    assert page_cache_writeback_s(f) is None
    assert page_cache_writeback_s(tmp_path / "absent") is None
    # this machine's own value, whatever it is, reads as a number of seconds
    running = page_cache_writeback_s()
    assert running is None or running >= 0


@pytest.mark.parametrize(("centisecs", "noted"), [(3000, True), (60000, False), (None, False)])
def test_status_notes_a_shorter_writeback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    centisecs: int | None,
    noted: bool,
) -> None:
    sysctl = tmp_path / "dirty_expire_centisecs"
    if centisecs is not None:
        sysctl.write_text(f"{centisecs}\n")
    monkeypatch.setattr(storage_policy, "DIRTY_EXPIRE", sysctl)
    cfg = site_config(
        tmp_path / "site.toml", gateway_id="gw-w", db=tmp_path / "gw.db", broker_port=1883, modbus_port=502, units=[1]
    )

    async def create() -> None:
        await (await open_database(tmp_path / "gw.db")).close()

    asyncio.run(create())
    assert main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    note = re.search(r"page cache is written back after (\S+) s", text)
    assert bool(note) is noted, text
    if note:
        assert note.group(1) == "30" and "60-edgegw-writeback.conf" in text
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["storage"]["writeback_s"] == (None if centisecs is None else centisecs / 100)
