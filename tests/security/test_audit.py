"""Audit log: append, verify, and every kind of tampering on a real SQLite file."""

from __future__ import annotations

import argparse
import base64
import sqlite3
from decimal import Decimal
from pathlib import Path

import aiosqlite
import pytest

from gateway.security import cli as security_cli
from gateway.security.audit import (
    GENESIS_HASH,
    AuditError,
    append,
    checkpoint,
    create_schema,
    entry_hash,
    verify,
)
from provisioning.keys import Keystore

T0 = 1_767_225_600_000


async def _make_log(path: Path, n: int = 6, ks: Keystore | None = None, cp_at: int = 0) -> None:
    async with aiosqlite.connect(path) as conn:
        await create_schema(conn)
        for i in range(1, n + 1):
            await append(
                conn,
                actor="billing-k1" if i % 2 else "gateway",
                action="command.applied" if i % 2 else "clock.jump_backward",
                details={"i": i, "amount": Decimal("12.50"), "digest": b"\x01\x02"},
                time_ms=T0 + i,
                time_source="central",
            )
            if ks is not None and i == cp_at:
                await checkpoint(
                    conn, sign=ks.sign, public_key=ks.identity_public_bytes(), time_ms=T0 + i
                )
            await conn.commit()


def _tamper(path: Path, *sql: str) -> None:
    """What an attacker with the file would do: drop the guards, then edit."""
    db = sqlite3.connect(path)
    for t in (
        "audit_log_no_update",
        "audit_log_no_delete",
        "audit_checkpoint_no_update",
        "audit_checkpoint_no_delete",
    ):
        db.execute(f"DROP TRIGGER IF EXISTS {t}")
    for s in sql:
        db.execute(s)
    db.commit()
    db.close()


async def test_intact_log_verifies(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    await _make_log(db)
    r = verify(db)
    assert r.ok and r.entries == 6 and r.head_seq == 6 and r.first_bad_seq is None
    assert "OK: 6 entries" in r.summary()


async def test_entries_chain_and_hash_covers_every_field(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    async with aiosqlite.connect(db) as conn:
        await create_schema(conn)
        a = await append(conn, actor="x", action="a", details={"k": 1}, time_ms=T0)
        b = await append(conn, actor="x", action="a", details={"k": 1}, time_ms=T0)
        await conn.commit()
    assert a.prev_hash == GENESIS_HASH and b.prev_hash == a.hash and a.hash != b.hash
    base = (1, T0, "system", "x", "a", '{"k":1}', GENESIS_HASH)
    assert entry_hash(*base) == a.hash
    for i, changed in enumerate([2, T0 + 1, "central", "y", "b", '{"k":2}', b"\x01" * 32]):
        args = list(base)
        args[i] = changed
        assert entry_hash(*args) != a.hash  # type: ignore[arg-type]
    # field boundaries are unambiguous
    assert entry_hash(1, T0, "s", "ab", "c", "{}", GENESIS_HASH) != entry_hash(
        1, T0, "s", "a", "bc", "{}", GENESIS_HASH
    )


async def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    await _make_log(db)
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_log SET actor = 'me' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_log WHERE seq = 6")
    conn.close()
    assert verify(db).ok


@pytest.mark.parametrize(
    "sql, bad",
    [
        (['UPDATE audit_log SET details = \'{"i":3,"amount":"99.00"}\' WHERE seq = 3'], 3),
        (["UPDATE audit_log SET actor = 'operations-k1' WHERE seq = 2"], 2),
        (["UPDATE audit_log SET time_ms = time_ms - 86400000 WHERE seq = 4"], 4),
        (["UPDATE audit_log SET action = 'nothing' WHERE seq = 1"], 1),
        (["DELETE FROM audit_log WHERE seq = 3"], 3),
        (["DELETE FROM audit_log WHERE seq = 1"], 1),
        # reorder: swap the contents of entries 2 and 5 (each keeps its own hashes)
        (
            [
                "UPDATE audit_log SET seq = 100 WHERE seq = 2",
                "UPDATE audit_log SET seq = 2 WHERE seq = 5",
                "UPDATE audit_log SET seq = 5 WHERE seq = 100",
            ],
            2,
        ),
        # insertion in the middle: shift 4.. up and put a forged entry at 4
        (
            [
                "UPDATE audit_log SET seq = seq + 100 WHERE seq >= 4",
                "UPDATE audit_log SET seq = seq - 99 WHERE seq >= 104",
                "INSERT INTO audit_log SELECT 4, time_ms, time_source, actor, action, details, "
                "prev_hash, hash FROM audit_log WHERE seq = 3",
            ],
            4,
        ),
        # recompute nothing, just re-point a prev_hash
        (["UPDATE audit_log SET prev_hash = zeroblob(32) WHERE seq = 5"], 5),
    ],
)
async def test_tampering_is_detected_at_first_bad_seq(
    tmp_path: Path, sql: list[str], bad: int
) -> None:
    db = tmp_path / "gw.db"
    await _make_log(db)
    _tamper(db, *sql)
    r = verify(db)
    assert not r.ok and r.first_bad_seq == bad, r
    assert r.summary().startswith(f"TAMPERED: first bad seq {bad}")


async def _rewrite_tail_consistently(db: Path, from_seq: int) -> None:
    """An attacker who knows the scheme edits an entry and recomputes the rest."""
    _tamper(db)
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT seq, time_ms, time_source, actor, action, details, prev_hash FROM audit_log "
        "WHERE seq >= ? ORDER BY seq",
        (from_seq,),
    ).fetchall()
    prev = conn.execute("SELECT hash FROM audit_log WHERE seq = ?", (from_seq - 1,)).fetchone()[0]
    for seq, t, src, actor, action, details, _ in rows:
        if seq == from_seq:
            details = '{"forged":true}'
        h = entry_hash(seq, t, src, actor, action, details, prev)
        conn.execute(
            "UPDATE audit_log SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (details, prev, h, seq),
        )
        prev = h
    conn.commit()
    conn.close()


async def test_recomputed_chain_is_caught_by_signed_checkpoint(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "keys", "gw-1")
    db = tmp_path / "gw.db"
    await _make_log(db, n=6, ks=ks, cp_at=5)
    assert verify(db, public_key=ks.identity_public_bytes()).ok
    await _rewrite_tail_consistently(db, 3)
    r = verify(db, public_key=ks.identity_public_bytes())
    assert not r.ok and r.first_bad_seq == 5 and "rewritten" in r.reason


async def test_rewrite_after_newest_checkpoint_is_not_detectable(tmp_path: Path) -> None:
    # documented limit: only heads shipped off the device protect the newest tail
    ks = Keystore.init(tmp_path / "keys", "gw-1")
    db = tmp_path / "gw.db"
    await _make_log(db, n=6, ks=ks, cp_at=3)
    await _rewrite_tail_consistently(db, 5)
    assert verify(db, public_key=ks.identity_public_bytes()).ok


async def test_truncation_below_checkpoint_is_detected(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "keys", "gw-1")
    db = tmp_path / "gw.db"
    await _make_log(db, n=6, ks=ks, cp_at=6)
    _tamper(db, "DELETE FROM audit_log WHERE seq >= 5")
    r = verify(db, public_key=ks.identity_public_bytes())
    assert not r.ok and r.first_bad_seq == 5 and "deleted" in r.reason


async def test_checkpoint_forged_with_another_key_is_detected(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "keys", "gw-1")
    thief = Keystore.init(tmp_path / "thief", "gw-1")
    db = tmp_path / "gw.db"
    await _make_log(db, n=4, ks=ks, cp_at=4)
    await _rewrite_tail_consistently(db, 2)
    _tamper(db, "DELETE FROM audit_checkpoint")
    async with aiosqlite.connect(db) as conn:  # re-sign the forged head with another key
        await checkpoint(
            conn, sign=thief.sign, public_key=thief.identity_public_bytes(), time_ms=T0
        )
        await conn.commit()
    assert verify(db).ok  # consistent with itself...
    r = verify(db, public_key=ks.identity_public_bytes())  # ...but not with the gateway's key
    assert not r.ok and r.first_bad_seq == 4 and "another key" in r.reason


async def test_checkpoint_signature_tamper_is_detected(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "keys", "gw-1")
    db = tmp_path / "gw.db"
    await _make_log(db, n=3, ks=ks, cp_at=2)
    _tamper(db, "UPDATE audit_checkpoint SET time_ms = time_ms + 1")
    r = verify(db, public_key=ks.identity_public_bytes())
    assert not r.ok and "invalid signature" in r.reason


async def test_checkpoint_is_idempotent_per_head(tmp_path: Path) -> None:
    ks = Keystore.init(tmp_path / "keys", "gw-1")
    async with aiosqlite.connect(tmp_path / "gw.db") as conn:
        await create_schema(conn)
        pk = ks.identity_public_bytes()
        assert await checkpoint(conn, sign=ks.sign, public_key=pk, time_ms=T0) is None
        await append(conn, actor="gateway", action="boot", details={}, time_ms=T0)
        assert await checkpoint(conn, sign=ks.sign, public_key=pk, time_ms=T0) is not None
        assert await checkpoint(conn, sign=ks.sign, public_key=pk, time_ms=T0) is None


async def test_rolled_back_transaction_leaves_no_entry(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    await _make_log(db, n=2)
    async with aiosqlite.connect(db) as conn:
        await append(conn, actor="gateway", action="x", details={}, time_ms=T0)
        await conn.rollback()
        e = await append(conn, actor="gateway", action="y", details={}, time_ms=T0)
        await conn.commit()
    assert e.seq == 3
    assert verify(db).entries == 3


def test_verify_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no such database"):
        verify(tmp_path / "nope.db")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgegw")
    sub = parser.add_subparsers(dest="command", required=True)
    security_cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


async def test_cli_audit_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ks = Keystore.init(tmp_path / "keys", "gw-1")
    db = tmp_path / "gw.db"
    await _make_log(db, n=4, ks=ks, cp_at=4)
    assert _cli(["audit", "verify", "--db", str(db), "--keystore", str(tmp_path / "keys")]) == 0
    assert "OK: 4 entries" in capsys.readouterr().out
    pk = base64.b64encode(ks.identity_public_bytes()).decode()
    assert _cli(["audit", "verify", "--db", str(db), "--public-key", pk]) == 0
    capsys.readouterr()
    assert _cli(["audit", "verify", "--db", str(db)]) == 0
    assert "not pinned" in capsys.readouterr().out
    _tamper(db, "UPDATE audit_log SET actor = 'nobody' WHERE seq = 2")
    assert _cli(["audit", "verify", "--db", str(db)]) == 1
    assert "TAMPERED: first bad seq 2" in capsys.readouterr().out
    assert _cli(["audit", "verify", "--db", str(tmp_path / "none.db")]) == 2
