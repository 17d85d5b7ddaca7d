"""SIGKILL the real gateway daemon at random points of a prepaid site's life.

``edgegw run`` polls Modbus TCP and DL/T 645 meters, rates against prepaid
accounts, trips and restores supply, takes signed top-ups from central and
forwards everything through a real mosquitto to ``edgegw headend run``. The
gateway is SIGKILLed at random moments (during start-up, polling, rating,
commands, delivery); now and then the broker and the headend are SIGKILLed too.
A last clean run delivers what is left. Then, from the databases and the
meters alone (tests/chaos/site.py, ``check``): every committed record is at
the headend exactly once, readings are billed exactly as re-rating them gives,
every top-up is credited exactly once, balance = opening + top-ups - debits,
the ledger and audit chain verify, and no relay moved without a committed
decision.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from tests.chaos.site import GATEWAY, ChaosSite, RelayOp, check, until


async def sigkill_run(
    tmp_path: Path, *, kills: int, seed: int, window_s: tuple[float, float], tamper: bool = False
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    async with ChaosSite(tmp_path, state, seed=seed) as site:
        site.provision()
        site.start_headend()
        site.start_central()
        rng = site.rng
        for _ in range(kills):
            site.daemon.start()
            # sometimes inside start-up (imports, WAL recovery, ledger check, epoch)
            wait = rng.uniform(0.8, 2.0) if rng.random() < 0.2 else rng.uniform(*window_s)
            await site.chaos_window(wait)
            exited = site.daemon.exited()
            assert exited is None, f"the gateway exited by itself ({exited}):\n{site.daemon.tail()}"
            site.daemon.kill()
        await until(lambda: site.central.sales != [], 5, "central sold something")
        await site.settle_and_drain()
        findings = check(site)
        print(findings)
        assert not findings.problems, "\n".join(findings.problems)
        if tamper:
            the_checks_catch_tampering(site, tmp_path)
    # the run did what it claims: money moved and relays were operated
    assert findings.readings > 0 and findings.debits > 0 and findings.credits > 0, findings
    assert site.daemon.kills == kills, site.daemon.kills


async def test_sigkilled_daemon_keeps_readings_money_and_relays_exact(tmp_path: Path) -> None:
    await sigkill_run(tmp_path, kills=6, seed=int.from_bytes(os.urandom(4)), window_s=(2.0, 4.5), tamper=True)


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_sigkill_daemon_long(tmp_path: Path) -> None:
    await sigkill_run(tmp_path, kills=220, seed=int.from_bytes(os.urandom(4)), window_s=(0.3, 3.0))


def the_checks_catch_tampering(site: ChaosSite, tmp: Path) -> None:
    """The invariants are not vacuous: each kind of damage to a passing run's
    evidence is reported."""
    def copies() -> tuple[Path, Path]:
        gw, he = tmp / "gw-copy.db", tmp / "he-copy.db"
        for src, dst in ((site.db, gw), (site.headend_db, he)):
            with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
                a.backup(b)
        return gw, he

    def problems(gw: Path, he: Path) -> str:
        return "\n".join(check(site, gateway_db=gw, headend_db=he).problems)

    gw, he = copies()
    with sqlite3.connect(he) as db:  # a reading lost on the way
        db.execute("DELETE FROM readings WHERE rowid = (SELECT max(rowid) FROM readings)")
    assert "neither delivered nor in the outbox" in problems(gw, he)
    gw, he = copies()
    with sqlite3.connect(he) as db:  # a top-up credited twice
        db.execute(
            "INSERT INTO events (gateway_id, record_id, kind, created_ms, body, batch_seq)"
            " SELECT gateway_id, 1000000, kind, created_ms, body, batch_seq FROM events"
            " WHERE gateway_id = ? AND kind = 'charge' AND body LIKE '%\"credit\"%' LIMIT 1",
            (GATEWAY,),
        )
    assert "uploaded twice" in problems(gw, he)
    gw, he = copies()
    with sqlite3.connect(gw) as db:  # a debit charged twice
        db.execute("UPDATE billing_account SET balance_micro = balance_micro - 1")
    assert "balance" in problems(gw, he)
    gw, he = copies()
    meter = next(iter(site.modbus.values()))
    meter.ops.append(RelayOp(meter.meter_id, 0, True))  # a trip nobody decided
    try:
        assert "no committed decision" in problems(gw, he)
    finally:
        meter.ops.pop()
