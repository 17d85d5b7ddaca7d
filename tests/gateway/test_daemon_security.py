"""The daemon's own security housekeeping, on real parts.

* A remote configuration change that takes the gateway off the air (the broker
  re-pointed to a port nobody serves) is rolled back by the restarted daemon
  when it does not reach central within the window, and central hears of it
  once the old configuration is back (real mosquitto, real headend acks).
* The daemon signs audit checkpoints with its keystore, periodically and at
  stop, and sends them to central; truncating or rewriting the log's tail is
  then caught by ``edgegw audit verify``.
* The maintenance timer prunes seen command ids that can no longer be used,
  and replays of pruned commands are still refused.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway import storage_setup as setup
from gateway.cli import main as edgegw
from gateway.config import load_config
from gateway.daemon import Daemon, wall_ms
from gateway.database import open_database
from gateway.security import audit
from gateway.security.envelope import Outcome, RejectReason
from gateway.security.roles import CommandType
from gateway.security.trusted_time import save_floor
from headend.ingest import Headend
from headend.store import HeadendDB
from provisioning.keys import Keystore
from tests.gateway.e2e import Running, until
from tests.harness.mosquitto import Mosquitto, free_port
from tests.harness.site import DEV_UPLINK, gateway_config
from tests.security.conftest import GATEWAY, Central
from tests.security.test_audit import _rewrite_tail_consistently, _tamper

DAY_MS = 86_400_000


def site(tmp: Path, central: Central, broker_port: int) -> Path:
    (tmp / "trust.json").write_text(json.dumps(central.trust().to_dict()))
    if not (tmp / "keys").exists():
        Keystore.init(tmp / "keys", GATEWAY)
    return gateway_config(
        tmp,
        GATEWAY,
        gateway={"poll_interval_s": 0.5},
        broker={"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5},
        uplink={**DEV_UPLINK, "reconnect_max_s": 0.3},
        security={"trust_file": "trust.json", "keystore": "keys"},
        name="gateway.toml",
    )


def signed(central: Central, d: Daemon, type: CommandType, body: dict[str, Any], **kw: Any) -> bytes:
    now = d.clock_ms()
    return central.cmd(type, body, issued_at=now, expires_at=now + 60_000, **kw)


def headend_event_types(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [json.loads(b).get("type") for (b,) in db.execute("SELECT body FROM events")]


async def test_a_change_that_takes_the_gateway_off_the_air_is_rolled_back(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    central = Central()
    path = site(tmp_path, central, mosquitto.port)
    original = path.read_bytes()
    hdb = await HeadendDB.open(tmp_path / "central.db")
    headend = asyncio.create_task(Headend(hdb, host="127.0.0.1", port=mosquitto.port).run())
    try:
        # 1. on the air; central re-points the broker to a port nobody serves
        first = Running(path, config_confirm_ms=1_500)
        async with first as d:
            await until(lambda: d.contact().last_contact_ms is not None, 15, "first ack")
            assert d.commands is not None
            res = await d.commands.handle(
                signed(central, d, CommandType.CONFIG_PATCH, {"set": {"broker.port": free_port()}}),
                channel="mqtt",
            )
            assert res.outcome is Outcome.APPLIED, res
            await first.stopped_by_itself(20)
        assert (d.restart_reason or "").startswith("configuration change")
        assert path.read_bytes() != original
        # 2. off the air: after its window of running, the change is rolled back
        second = Running(path, maintenance_interval_s=0.1)
        async with second as d2:
            await second.stopped_by_itself(30)
        assert d2.contact().last_contact_ms is None
        assert (d2.restart_reason or "").endswith("rolled back")
        assert path.read_bytes() == original
        # 3. back on the air on the old file: central hears of the rollback
        async with Running(path, maintenance_interval_s=0.1) as d3:
            await until(
                lambda: "config_rolled_back" in headend_event_types(tmp_path / "central.db"),
                20,
                "the rollback event at central",
            )
            assert d3.restart_reason is None
        assert audit.verify(tmp_path / "gw.db").ok
    finally:
        headend.cancel()
        await asyncio.gather(headend, return_exceptions=True)
        await hdb.close()


def _verify(db: Path, keys: Path, *extra: str) -> int:
    return edgegw(["audit", "verify", "--db", str(db), "--keystore", str(keys), *extra])


async def test_the_daemon_signs_checkpoints_and_a_cut_or_rewritten_log_fails_verification(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    central = Central()
    path = site(tmp_path, central, free_port())  # no broker: nothing here needs one
    db, keys = tmp_path / "gw.db", tmp_path / "keys"
    running = Running(path, maintenance_interval_s=0.05, checkpoint_interval_s=0.05)

    def head() -> int:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0])

    def checkpoints() -> list[int]:
        with sqlite3.connect(db) as conn:
            return [int(r[0]) for r in conn.execute("SELECT seq FROM audit_checkpoint ORDER BY seq")]

    async with running as d:
        assert d.commands is not None
        for raw in (
            b"junk",
            signed(central, d, CommandType.RELAY_OPERATE, {"meter": "m-9", "op": "trip"}),
        ):
            assert (await d.commands.handle(raw, channel="mqtt")).outcome is Outcome.REJECTED
        running_head = head()
        await until(lambda: checkpoints()[-1:] == [running_head], 10, "a periodic checkpoint")
        # one more entry after it: the checkpoint at stop covers it
        elsewhere = signed(central, d, CommandType.RELAY_OPERATE, {"meter": "m-9", "op": "trip"}, target="gw-0002")
        assert (await d.commands.handle(elsewhere, channel="mqtt")).reason is RejectReason.WRONG_TARGET
    n = head()
    assert n > running_head and checkpoints()[-1] == n
    assert _verify(db, keys) == 0
    assert f"OK: {n} entries" in capsys.readouterr().out
    # central got each checkpoint as an event
    outbox = await open_database(db, keys=setup.storage_keys(load_config(path)))
    try:
        sent = []
        while (batch := await outbox.next_batch(0, exclude=[b for b, _ in sent])) is not None:
            sent += [(batch.seq, r.body) for r in batch.records if r.body.get("type") == "audit_checkpoint"]
    finally:
        await outbox.close()
    heads = [(b["seq"], b["hash"]) for _, b in sent]
    assert [s for s, _ in heads] == checkpoints()
    newest = f"{heads[-1][0]}:{heads[-1][1]}"
    assert _verify(db, keys, "--expect-head", newest) == 0
    capsys.readouterr()

    def copy(name: str) -> Path:
        out = tmp_path / name
        shutil.copy(db, out)
        return out

    # the tail cut off
    cut = copy("cut.db")
    _tamper(cut, f"DELETE FROM audit_log WHERE seq = {n}")
    assert _verify(cut, keys) == 1
    assert f"TAMPERED: first bad seq {n}" in capsys.readouterr().out
    # the tail rewritten with the chain recomputed
    rewritten = copy("rewritten.db")
    await _rewrite_tail_consistently(rewritten, n)
    assert _verify(rewritten, keys) == 1
    assert "history rewritten" in capsys.readouterr().out
    # tail and its checkpoint both cut: only central's copy of the head shows it
    both = copy("both.db")
    _tamper(both, f"DELETE FROM audit_log WHERE seq = {n}", f"DELETE FROM audit_checkpoint WHERE seq = {n}")
    assert _verify(both, keys) == 0
    capsys.readouterr()
    assert _verify(both, keys, "--expect-head", newest) == 1
    assert "entries deleted" in capsys.readouterr().out


async def test_maintenance_prunes_command_ids_no_command_can_use_any_more(tmp_path: Path) -> None:
    central = Central()
    path = site(tmp_path, central, free_port())
    # a gateway that ran for a while: a trusted-time floor, and one seen command long expired
    now = wall_ms()
    old = central.cmd(
        CommandType.RELAY_OPERATE,
        {"meter": "m-1", "op": "trip"},
        command_id="r-old",
        issued_at=now - 30 * DAY_MS,
        expires_at=now - 29 * DAY_MS,
    )
    outbox = await open_database(tmp_path / "gw.db", keys=setup.storage_keys(load_config(path)))
    try:
        from gateway.commands.handler import create_schema

        async with outbox.transaction() as db:
            await create_schema(db)
            await save_floor(db, now, 0)
            await db.execute(
                "INSERT INTO sec_seen_command (command_id, issuer, counter, type, digest, channel,"
                " accepted_ms, expires_ms) VALUES ('r-old', 'operations-k1', 1, 'relay.operate',"
                " x'00', 'mqtt', ?, ?)",
                (now - 30 * DAY_MS, now - 29 * DAY_MS),
            )
            await db.execute(
                "INSERT INTO sec_counter_floor (issuer, floor, updated_ms) VALUES ('operations-k1', 1, ?)",
                (now - 30 * DAY_MS,),
            )
    finally:
        await outbox.close()
    running = Running(path, maintenance_interval_s=0.05, prune_interval_s=0.05)
    async with running as d:
        assert d.commands is not None
        t = d.clock_ms()
        fresh = central.cmd(
            CommandType.TIME_SYNC,
            {"time_ms": t},
            command_id="t-new",
            issued_at=t - 1_000,
            expires_at=t + 60_000,
        )
        assert (await d.commands.handle(fresh, channel="mqtt")).outcome is Outcome.APPLIED

        def seen() -> list[str]:
            with sqlite3.connect(tmp_path / "gw.db") as conn:
                return [r[0] for r in conn.execute("SELECT command_id FROM sec_seen_command")]

        await until(lambda: seen() == ["t-new"], 10, "the old id pruned, the new one kept")
        res = await d.commands.handle(old, channel="mqtt")  # its replay is still refused
        assert res.reason is RejectReason.COUNTER_STALE, res
