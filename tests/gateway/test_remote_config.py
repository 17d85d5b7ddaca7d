"""Configuration changes from central (config.patch, meter.roster) in the running daemon.

The real daemon polls a Modbus simulator and takes signed commands through its
command handler (the path MQTT commands take). A valid change is checked by the
configuration loader, staged, put in force and the daemon stops for a restart;
an invalid or forbidden one is refused with the loader's words and the file is
untouched; a crash between the commit and the rename is finished at the next
start.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tomllib
from pathlib import Path

import pytest

from firmware_bridge.modbus.simulator import ModbusSimulator
from gateway.commands import CommandRefused, ConfigChange
from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.remote_config import RemoteConfig, apply_change
from gateway.security.envelope import Outcome
from gateway.security.roles import CommandType
from store_forward.outbox import Outbox
from tests.harness.mosquitto import free_port
from tests.security.conftest import GATEWAY, Central

DOC = {
    "gateway": {"id": "gw-0001", "site": "s", "poll_interval_s": 0.2},
    "storage": {"path": "gw.db"},
    "meter": [{"id": "m1"}],
}


def test_patch_sets_only_what_may_change_remotely() -> None:
    new = apply_change(DOC, ConfigChange.CONFIG_PATCH, {"set": {"gateway.poll_interval_s": 30, "uplink.window": 2}})
    assert new["gateway"]["poll_interval_s"] == 30 and new["uplink"] == {"window": 2}
    assert DOC["gateway"]["poll_interval_s"] == 0.2  # the input is not modified
    for path in ("gateway.id", "storage.path", "security.trust_file", "broker.ca_file", "bus.port"):
        with pytest.raises(CommandRefused, match="not changeable remotely"):
            apply_change(DOC, ConfigChange.CONFIG_PATCH, {"set": {path: "x"}})
    with pytest.raises(CommandRefused, match=r"TABLE\.KEY"):
        apply_change(DOC, ConfigChange.CONFIG_PATCH, {"set": {"gateway": 1}})
    with pytest.raises(CommandRefused, match="string, number or boolean"):
        apply_change(DOC, ConfigChange.CONFIG_PATCH, {"set": {"uplink.window": [1]}})
    with pytest.raises(CommandRefused, match='needs "set"'):
        apply_change(DOC, ConfigChange.CONFIG_PATCH, {})


def test_roster_replaces_the_meter_list() -> None:
    new = apply_change(DOC, ConfigChange.METER_ROSTER, {"meters": [{"id": "a"}, {"id": "b"}]})
    assert new["meter"] == [{"id": "a"}, {"id": "b"}]
    with pytest.raises(CommandRefused, match='needs "meters"'):
        apply_change(DOC, ConfigChange.METER_ROSTER, {"meters": "m1"})


def site(tmp: Path, modbus_port: int, central: Central) -> Path:
    (tmp / "trust.json").write_text(json.dumps(central.trust().to_dict()))
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[gateway]
id = "{GATEWAY}"
site = "test"
poll_interval_s = 0.2

[storage]
path = "gw.db"

[broker]
port = {free_port()}   # nobody listens: commands go straight to the handler here

[security]
trust_file = "trust.json"

[[bus]]
name = "lan"
type = "tcp"
host = "127.0.0.1"
port = {modbus_port}
timeout_s = 0.5
retries = 0

[[meter]]
id = "m001"
bus = "lan"
protocol = "modbus"
unit_id = 1
profile = "sdm120"
"""
    )
    return path


async def test_config_changes_from_central_in_the_running_daemon(tmp_path: Path) -> None:
    central = Central()
    async with ModbusSimulator(units=[1, 2]) as sim:
        path = site(tmp_path, sim.port, central)
        original = path.read_bytes()
        daemon = Daemon(load_config(path))
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            assert daemon.commands is not None

            async def send(type: CommandType, body: dict[str, object]) -> object:
                assert daemon.commands is not None
                return await daemon.commands.handle(
                    central.cmd(type, body, issued_at=daemon.clock_ms(), expires_at=daemon.clock_ms() + 60_000),
                    channel="mqtt",
                )

            bad = await send(CommandType.CONFIG_PATCH, {"set": {"gateway.poll_interval_s": -5}})
            assert bad.outcome is Outcome.REJECTED  # type: ignore[attr-defined]
            assert "gateway.poll_interval_s" in bad.message  # type: ignore[attr-defined]
            forbidden = await send(CommandType.CONFIG_PATCH, {"set": {"storage.path": "/tmp/elsewhere.db"}})
            assert forbidden.outcome is Outcome.REJECTED  # type: ignore[attr-defined]
            assert "not changeable remotely" in forbidden.message  # type: ignore[attr-defined]
            roster_bad = await send(CommandType.METER_ROSTER, {"meters": [{"id": "m002", "bus": "nowhere"}]})
            assert roster_bad.outcome is Outcome.REJECTED  # type: ignore[attr-defined]
            assert path.read_bytes() == original and not stop.is_set()

            roster = await send(
                CommandType.METER_ROSTER,
                {"meters": [
                    {"id": "m001", "bus": "lan", "protocol": "modbus", "unit_id": 1, "profile": "sdm120"},
                    {"id": "m002", "bus": "lan", "protocol": "modbus", "unit_id": 2, "profile": "sdm120"},
                ]},
            )
            assert roster.outcome is Outcome.APPLIED, roster  # type: ignore[attr-defined]
            await asyncio.wait_for(run, 20)  # stopped by itself, for the restart
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)
    assert daemon.restart_reason is not None and "configuration change" in daemon.restart_reason
    cfg = load_config(path)
    assert [m.id for m in cfg.meters] == ["m001", "m002"]
    assert path.with_name("gateway.toml.previous").read_bytes() == original
    assert not list(tmp_path.glob(".gateway.toml.*.staged"))  # noqa: ASYNC240
    with sqlite3.connect(tmp_path / "gw.db") as db:
        rows = db.execute("SELECT change, state FROM cmd_config_stage").fetchall()
        actions = [r[0] for r in db.execute("SELECT action FROM audit_log ORDER BY seq")]
    assert rows == [("meter.roster", "applied")]
    assert "command.applied" in actions


async def test_a_change_committed_before_a_crash_is_put_in_force_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "{GATEWAY}"\nsite = "s"\n\n[storage]\npath = "gw.db"\n'
    )
    restarts: list[str] = []
    outbox = await Outbox.open(tmp_path / "gw.db")
    try:
        port = RemoteConfig(path, outbox, lambda: 1, restarts.append)
        async with outbox.transaction() as db:
            effect = await port.stage_in(
                db, ConfigChange.CONFIG_PATCH, {"set": {"gateway.poll_interval_s": 15}}, command_id="c-1", now_ms=1
            )
        assert effect["set"] == ["gateway.poll_interval_s"]
        # A staged file of a command whose transaction rolled back has no row.
        orphan = tmp_path / ".gateway.toml.c-2.staged"
        orphan.write_text("junk")
        # -- the power goes here: committed, not yet renamed --
        assert tomllib.loads(path.read_text())["gateway"].get("poll_interval_s") is None
        again = RemoteConfig(path, outbox, lambda: 2, restarts.append)
        assert await again.after_commit() == "c-1"
        assert await again.after_commit() is None  # idempotent
    finally:
        await outbox.close()
    assert load_config(path).gateway.poll_interval_s == 15
    assert restarts == ["configuration change c-1"] and not orphan.exists()
