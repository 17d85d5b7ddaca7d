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
import contextlib
import json
import sqlite3
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import pytest

from gateway.billing.cutoff import Contact
from gateway.commands.bodies import CommandRefused, ConfigChange
from gateway.config import load_config
from gateway.daemon import Daemon
from gateway.database import open_database
from gateway.remote_config import (
    DEFAULT_CONFIRM_MS,
    MAX_UNCONFIRMED_STARTS,
    RemoteConfig,
    apply_change,
)
from gateway.security.envelope import Outcome
from gateway.security.roles import CommandType
from store_forward.outbox import Outbox
from testbed.simulators.modbus import ModbusSimulator
from tests.harness.site import gateway_config, meter
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
    return gateway_config(  # nobody listens at the broker: commands go straight to the handler here
        tmp,
        GATEWAY,
        modbus_port=modbus_port,
        security={"trust_file": "trust.json"},
        meters=[meter()],
        name="gateway.toml",
    )


class RunningSite(NamedTuple):
    central: Central
    sim: ModbusSimulator
    path: Path
    original: bytes  # the configuration file's bytes at the start
    daemon: Daemon
    stop: asyncio.Event
    run: asyncio.Task[None]


@contextlib.asynccontextmanager
async def running_site(tmp_path: Path) -> AsyncIterator[RunningSite]:
    """The daemon on :func:`site`'s file with signed commands, against simulated units 1
    and 2, ready; stopped at the end (it may have stopped by itself for a restart)."""
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
            yield RunningSite(central, sim, path, original, daemon, stop, run)
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)


async def test_config_changes_from_central_in_the_running_daemon(tmp_path: Path) -> None:
    async with running_site(tmp_path) as (central, _sim, path, original, daemon, stop, run):

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


async def test_a_roster_with_two_meters_at_one_unit_id_is_refused_and_the_old_file_stays(
    tmp_path: Path,
) -> None:
    """Central sends a roster whose new meter sits at the unit id of one already on the
    bus: the running daemon refuses it with the loader's words (naming the bus, the unit
    id and both entries), records the refusal, and keeps polling on the file in force."""
    from tests.gateway.test_prepaid_daemon import outbox_bodies

    async with running_site(tmp_path) as (central, sim, path, original, daemon, stop, _run):
        assert daemon.commands is not None
        now = daemon.clock_ms()
        dup = await daemon.commands.handle(
            central.cmd(
                CommandType.METER_ROSTER,
                {"meters": [
                    {"id": "m001", "bus": "lan", "protocol": "modbus", "unit_id": 1, "profile": "sdm120"},
                    {"id": "m002", "bus": "lan", "protocol": "modbus", "unit_id": 1, "profile": "sdm120"},
                ]},
                issued_at=now, expires_at=now + 60_000,
            ),
            channel="mqtt",
        )
        assert dup.outcome is Outcome.REJECTED, dup
        assert dup.code == "invalid_config", dup
        assert "meter[m002].unit_id: unit id 1 on bus lan is already meter m001's" in dup.message, dup.message
        assert path.read_bytes() == original and not stop.is_set()
        polled = sim.meter(1).reads
        for _ in range(100):  # still polling on the file in force (0.2 s cycles)
            if sim.meter(1).reads > polled:
                break
            await asyncio.sleep(0.05)
        assert sim.meter(1).reads > polled and sim.meter(2).reads == 0
    assert daemon.restart_reason is None
    assert load_config(path).meters == daemon.config.meters
    assert not list(tmp_path.glob(".gateway.toml.*.staged"))  # noqa: ASYNC240
    with sqlite3.connect(tmp_path / "gw.db") as db:
        assert db.execute("SELECT count(*) FROM cmd_config_stage").fetchone() == (0,)
        details = [r[0] for r in db.execute("SELECT details FROM audit_log WHERE action = 'command.rejected'")]
    assert len(details) == 1 and "unit id 1 on bus lan is already meter m001's" in details[0]
    results = [b for b in await outbox_bodies(tmp_path / "gw.db", "event") if b.get("type") == "command_result"]
    assert [r.get("outcome") for r in results] == ["rejected"]
    assert "unit id 1 on bus lan is already meter m001's" in str(results[0])


async def test_a_change_committed_before_a_crash_is_put_in_force_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "{GATEWAY}"\nsite = "s"\n\n[storage]\npath = "gw.db"\n'
    )
    restarts: list[str] = []
    outbox = await open_database(tmp_path / "gw.db")
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


# ---------------------------------------------------------------------------
# What the operations role may change


BILLED = {
    "gateway": {"id": "gw-0001", "site": "s"},
    "storage": {"path": "gw.db"},
    "meter": [
        {"id": "m1", "bus": "lan", "protocol": "modbus", "unit_id": 1, "profile": "sdm120", "account": "acct-1"},
        {"id": "m2", "bus": "lan", "protocol": "modbus", "unit_id": 2, "profile": "sdm120"},
    ],
}


def roster(*meters: dict[str, object]) -> dict[str, object]:
    return {"meters": list(meters)}


M1 = BILLED["meter"][0]  # type: ignore[index]
M2 = BILLED["meter"][1]  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("gateway.timezone", "tariff periods"),
        ("uplink.headend_public_key", "sealed"),
        ("broker.tls", "transport security"),
        ("broker.ca_file", "transport security"),
        ("broker.username", "credentials"),
        ("account.id", ""),
        ("profiles.sdm120", ""),
        ("security.keystore", ""),
    ],
)
def test_a_patch_cannot_touch_billing_trust_or_the_uplink_key(path: str, why: str) -> None:
    with pytest.raises(CommandRefused, match="not changeable remotely") as info:
        apply_change(BILLED, ConfigChange.CONFIG_PATCH, {"set": {path: "x"}})
    assert info.value.reason == "not_patchable" and why in info.value.message


@pytest.mark.parametrize(
    ("meters", "words"),
    [
        ((M2,), "m1 bills to account 'acct-1': a roster cannot drop it"),
        (({**M1, "account": "acct-2"}, M2), "account cannot change remotely"),
        (({**M1, "unit_id": 3}, M2), "unit_id cannot change remotely"),
        (({**M1, "bus": "other"}, M2), "bus cannot change remotely"),
        (({**M1, "profile": "dds238"}, M2), "profile cannot change remotely"),
        (({**M1, "quantities": ["voltage"]}, M2), "quantities cannot change remotely"),
        ((M1, {**M2, "account": "acct-1"}), "m2: a roster cannot make a meter bill"),
        ((M1, M2, {"id": "m3", "bus": "lan", "account": "acct-1"}), "m3: a roster cannot make"),
        ((M1, M2, M2), "more than once"),
    ],
)
def test_a_roster_cannot_change_which_meter_bills_to_which_account(
    meters: tuple[dict[str, object], ...], words: str
) -> None:
    with pytest.raises(CommandRefused) as info:
        apply_change(BILLED, ConfigChange.METER_ROSTER, roster(*meters))
    assert words in info.value.message, info.value.message
    assert info.value.reason in ("billing_change", "duplicate_meter")


def test_a_roster_may_change_relays_and_unbilled_meters() -> None:
    relay = {"kind": "coil", "address": 0}
    new = apply_change(
        BILLED,
        ConfigChange.METER_ROSTER,
        roster({**M1, "relay": relay, "password": "02123456"}, {"id": "m3", "bus": "lan"}),
    )
    assert new["meter"][0]["relay"] == relay and [m["id"] for m in new["meter"]] == ["m1", "m3"]
    new = apply_change(BILLED, ConfigChange.CONFIG_PATCH, {"set": {"broker.host": "b", "uplink.window": 2}})
    assert new["broker"] == {"host": "b"}


def billed_site(tmp: Path) -> Path:
    """A file whose meter m001 bills to acct-001 (prepaid account and tariff files beside it)."""
    from tests.gateway.test_prepaid_daemon import config

    return config(tmp, 1502)


def test_the_loaded_configuration_keeps_every_protected_part(tmp_path: Path) -> None:
    """The invariant behind the rules: whatever passes them, protected_view is unchanged."""
    from gateway.remote_config import protected_changes

    path = billed_site(tmp_path)
    before = load_config(path)
    text = path.read_text()
    variants = {
        "billed meters": text.replace("unit_id = 1", "unit_id = 2"),
        "gateway.timezone": text.replace('timezone = "Asia/Shanghai"\npoll', 'timezone = "UTC"\npoll'),
        "uplink.headend_public_key": text.replace(
            "[uplink]", '[uplink]\nheadend_public_key = "' + "A" * 43 + '="'
        ),
        "accounts and their tariffs": text.replace('tariffs = ["flat.toml"]', 'tariffs = ["flat2.toml"]'),
    }
    (tmp_path / "flat2.toml").write_text((tmp_path / "flat.toml").read_text())
    for part, changed in variants.items():
        other = tmp_path / "other.toml"
        other.write_text(changed)
        assert protected_changes(before, load_config(other)) == [part]
    same = tmp_path / "same.toml"
    same.write_text(text.replace('site = "test"', 'site = "renamed"').replace("poll_interval_s = 0.2", "poll_interval_s = 5"))
    assert protected_changes(before, load_config(same)) == []


async def test_the_remote_path_refuses_billing_changes_and_what_the_loader_refuses(
    tmp_path: Path,
) -> None:
    path = billed_site(tmp_path)
    original = path.read_bytes()
    doc = tomllib.loads(path.read_text())
    m001 = doc["meter"][0]
    outbox = await open_database(tmp_path / "gw.db")
    try:
        port = RemoteConfig(path, outbox, lambda: 1, lambda _r: None)
        cases: list[tuple[ConfigChange, dict[str, object], str]] = [
            (ConfigChange.METER_ROSTER, {"meters": []}, "billing_change"),
            (ConfigChange.METER_ROSTER, {"meters": [{**m001, "account": None}]}, "billing_change"),
            (ConfigChange.METER_ROSTER, {"meters": [{**m001, "unit_id": 2}]}, "billing_change"),
            (ConfigChange.METER_ROSTER, {"meters": [m001, {"id": "m9", "bus": None}]}, "malformed"),
            (ConfigChange.CONFIG_PATCH, {"set": {"gateway.timezone": "UTC"}}, "not_patchable"),
            (ConfigChange.CONFIG_PATCH, {"set": {"uplink.headend_public_key": "x"}}, "not_patchable"),
            (ConfigChange.CONFIG_PATCH, {"set": {"broker.keepalive_s": -5}}, "invalid_config"),
            (ConfigChange.CONFIG_PATCH, {"set": {"broker.port": 1}, "confirm_within_s": 5}, "bad_confirm_window"),
            (ConfigChange.CONFIG_PATCH, {"set": {"broker.port": 1}, "extra": 1}, "unknown_keys"),
        ]
        for change, body, code in cases:
            with pytest.raises(CommandRefused) as info:
                async with outbox.transaction() as db:
                    await port.stage_in(db, change, body, command_id="c-1", now_ms=1)
            assert info.value.reason == code, (body, info.value.message)
        # an unbilled meter at the billed meter's unit id would read (and bill) it twice
        twin = {k: v for k, v in m001.items() if k not in ("id", "account")} | {"id": "m9"}
        with pytest.raises(CommandRefused) as info:
            async with outbox.transaction() as db:
                await port.stage_in(db, ConfigChange.METER_ROSTER, {"meters": [m001, twin]}, command_id="c-2", now_ms=1)
        assert info.value.reason == "invalid_config"
        assert f"meter[m9].unit_id: unit id {m001['unit_id']} on bus {m001['bus']} is already meter m001's" in (
            info.value.message
        ), info.value.message
        async with outbox.transaction() as db, db.execute("SELECT count(*) FROM cmd_config_stage") as cur:
            assert tuple(await cur.fetchone() or ()) == (0,)
        assert path.read_bytes() == original
        assert not list(tmp_path.glob(".*.staged"))  # noqa: ASYNC240
    finally:
        await outbox.close()


# ---------------------------------------------------------------------------
# Confirmation by contact with central, or automatic rollback


class Run:
    """One run of the daemon as the configuration port sees it: the monotonic clock,
    when it started and when it last had authenticated contact with central."""

    def __init__(self, path: Path, outbox: Outbox, restarts: list[str], *, mono: int = 0) -> None:
        self.mono = mono
        self.started_ms = 1_000
        self.last_contact_ms: int | None = None
        self.port = RemoteConfig(
            path,
            outbox,
            lambda: 5_000,
            restarts.append,
            contact=lambda: Contact(self.last_contact_ms, self.started_ms),
            mono_ms=lambda: self.mono,
        )

    async def start(self) -> Run:
        await self.port.start()
        return self

    async def check_after(self, ms: int) -> str | None:
        self.mono += ms
        return await self.port.check()


def small_site(tmp: Path) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "{GATEWAY}"\nsite = "s"\n\n[storage]\npath = "gw.db"\n\n'
        "[broker]\nport = 1883\nkeepalive_s = 30\n"
    )
    return path


async def change(port: RemoteConfig, outbox: Outbox, body: dict[str, object], cid: str) -> None:
    async with outbox.transaction() as db:
        await port.stage_in(db, ConfigChange.CONFIG_PATCH, body, command_id=cid, now_ms=2_000)
    assert await port.after_commit() == cid


async def confirmations(outbox: Outbox) -> list[tuple[object, ...]]:
    async with outbox.transaction() as db, db.execute(
        "SELECT command_id, state, waited_ms, starts FROM cmd_config_confirm ORDER BY command_id"
    ) as cur:
        return [tuple(r) for r in await cur.fetchall()]


async def trail(outbox: Outbox) -> tuple[list[str], list[str]]:
    """(audit actions, event types) of the configuration confirmation."""
    async with outbox.transaction() as db, db.execute("SELECT action FROM audit_log ORDER BY seq") as cur:
        actions = [str(r[0]) for r in await cur.fetchall()]
    seen: list[int] = []
    types: list[str] = []
    while (batch := await outbox.next_batch(0, exclude=seen)) is not None:
        seen.append(batch.seq)
        types += [str(r.body.get("type")) for r in batch.records]
    return actions, [t for t in types if t.startswith("config")]


@pytest.fixture
async def site_outbox(tmp_path: Path) -> AsyncIterator[tuple[Path, Outbox]]:
    outbox = await open_database(tmp_path / "gw.db")
    try:
        yield small_site(tmp_path), outbox
    finally:
        await outbox.close()


async def test_a_change_that_loses_central_is_rolled_back_after_its_window(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    original = path.read_bytes()
    restarts: list[str] = []
    applying = Run(path, outbox, restarts)
    await change(applying.port, outbox, {"set": {"broker.port": 1}, "confirm_within_s": 120}, "c-1")
    assert restarts == ["configuration change c-1"]
    assert load_config(path).broker.port == 1
    # the applying run does not count: it runs the old file until it restarts
    assert await applying.check_after(300_000) is None
    run = await Run(path, outbox, restarts).start()
    assert await run.check_after(60_000) is None
    assert await confirmations(outbox) == [("c-1", "pending", 60_000, 1)]
    # a power cut: the wait so far is kept, the start counted
    run = await Run(path, outbox, restarts, mono=9_999_999).start()
    assert await run.check_after(59_999) is None
    assert await run.check_after(1) == "rolled_back"
    assert path.read_bytes() == original
    assert restarts[-1] == "configuration change c-1 rolled back"
    assert await confirmations(outbox) == [("c-1", "rolled_back", 120_000, 2)]
    actions, events = await trail(outbox)
    assert actions == ["config.rolled_back"] and events == ["config_rolled_back"]
    # the run on the old file again: nothing more to do
    run = await Run(path, outbox, restarts).start()
    assert await run.check_after(10**9) is None and len(restarts) == 2


async def test_contact_with_central_on_the_new_file_confirms_it(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    restarts: list[str] = []
    await change(Run(path, outbox, restarts).port, outbox, {"set": {"broker.port": 1884}}, "c-1")
    run = await Run(path, outbox, restarts).start()
    run.last_contact_ms = 999  # before this run started (a stored value): not contact on it
    assert await run.check_after(1_000) is None
    run.last_contact_ms = 1_200
    assert await run.check_after(1_000) == "confirmed"
    assert await run.check_after(10 * DEFAULT_CONFIRM_MS) is None  # never rolled back now
    assert load_config(path).broker.port == 1884 and restarts == ["configuration change c-1"]
    actions, events = await trail(outbox)
    assert actions == ["config.confirmed"] and events == ["config_confirmed"]
    assert [r[:2] for r in await confirmations(outbox)] == [("c-1", "confirmed")]


async def test_the_default_window_is_fifteen_minutes_of_running(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    restarts: list[str] = []
    await change(Run(path, outbox, restarts).port, outbox, {"set": {"broker.port": 1}}, "c-1")
    run = await Run(path, outbox, restarts).start()
    assert await run.check_after(15 * 60_000 - 1) is None
    assert await run.check_after(1) == "rolled_back"


async def test_a_daemon_that_keeps_restarting_on_a_change_rolls_it_back_at_start(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    original = path.read_bytes()
    restarts: list[str] = []
    await change(Run(path, outbox, restarts).port, outbox, {"set": {"broker.keepalive_s": 7}}, "c-1")
    for _ in range(MAX_UNCONFIRMED_STARTS):  # each start crashes before a maintenance pass
        await Run(path, outbox, restarts).start()
    assert path.read_bytes() != original and len(restarts) == 1
    await Run(path, outbox, restarts).start()
    assert path.read_bytes() == original
    assert restarts[-1] == "configuration change c-1 rolled back"
    async with outbox.transaction() as db, db.execute(
        "SELECT json_extract(details, '$.reason') FROM audit_log WHERE action = 'config.rolled_back'"
    ) as cur:
        assert [r[0] for r in await cur.fetchall()] == [
            f"started {MAX_UNCONFIRMED_STARTS + 1} times on it without reaching central"
        ]


async def test_a_file_replaced_by_other_means_is_never_rolled_back(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    restarts: list[str] = []
    await change(Run(path, outbox, restarts).port, outbox, {"set": {"broker.port": 1}}, "c-1")
    run = await Run(path, outbox, restarts).start()
    technician = path.read_text().replace("port = 1\n", "port = 1885\n")
    path.write_text(technician)
    assert await run.check_after(DEFAULT_CONFIRM_MS) == "superseded"
    assert path.read_text() == technician and len(restarts) == 1
    assert (await trail(outbox))[0] == ["config.superseded"]


async def test_a_second_change_before_confirmation_rolls_back_to_the_last_good_file(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    original = path.read_bytes()
    restarts: list[str] = []
    await change(Run(path, outbox, restarts).port, outbox, {"set": {"broker.port": 1}}, "c-1")
    run = await Run(path, outbox, restarts).start()
    await change(run.port, outbox, {"set": {"broker.keepalive_s": 9}}, "c-2")
    assert path.with_name("gateway.toml.previous").read_bytes() == original
    run = await Run(path, outbox, restarts).start()
    assert await run.check_after(DEFAULT_CONFIRM_MS) == "rolled_back"
    assert path.read_bytes() == original
    assert [r[:2] for r in await confirmations(outbox)] == [
        ("c-1", "superseded"),
        ("c-2", "rolled_back"),
    ]


async def test_a_rollback_cut_short_by_a_crash_is_finished_at_the_next_start(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    original = path.read_bytes()
    restarts: list[str] = []
    await change(Run(path, outbox, restarts).port, outbox, {"set": {"broker.port": 1}}, "c-1")
    run = await Run(path, outbox, restarts).start()
    # the decision committed, then the power went before the file was put back
    async with outbox.transaction() as db:
        await db.execute("UPDATE cmd_config_confirm SET state = 'rolling_back'")
    await Run(path, outbox, restarts).start()
    assert path.read_bytes() == original
    assert restarts[-1] == "configuration change c-1 rolled back"
    assert [r[:2] for r in await confirmations(outbox)] == [("c-1", "rolled_back")]
    assert await run.check_after(DEFAULT_CONFIRM_MS) is None


async def test_no_rollback_without_the_file_before_the_change(
    site_outbox: tuple[Path, Outbox],
) -> None:
    path, outbox = site_outbox
    restarts: list[str] = []
    await change(Run(path, outbox, restarts).port, outbox, {"set": {"broker.port": 1}}, "c-1")
    run = await Run(path, outbox, restarts).start()
    path.with_name("gateway.toml.previous").unlink()
    assert await run.check_after(DEFAULT_CONFIRM_MS) == "failed"
    assert load_config(path).broker.port == 1 and len(restarts) == 1
    assert (await trail(outbox))[0] == ["config.rollback_failed"]


async def test_keepalive_beyond_mqtt_is_refused_or_rolled_back(
    site_outbox: tuple[Path, Outbox],
) -> None:
    """``broker.keepalive_s = 70000`` (MQTT allows 65535) must not keep the gateway off
    the air: the loader refuses it, or the change is rolled back when central is lost."""
    path, outbox = site_outbox
    original = path.read_bytes()
    restarts: list[str] = []
    first = Run(path, outbox, restarts)
    try:
        await change(first.port, outbox, {"set": {"broker.keepalive_s": 70_000}}, "c-1")
    except CommandRefused as exc:
        assert exc.reason == "invalid_config" and "keepalive_s" in exc.message
        assert path.read_bytes() == original
        return
    run = await Run(path, outbox, restarts).start()
    assert await run.check_after(DEFAULT_CONFIRM_MS) == "rolled_back"
    assert path.read_bytes() == original
