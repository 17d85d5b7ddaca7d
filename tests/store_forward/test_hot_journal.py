"""A hot rollback journal at start: rolled back when that is safe, a fault when not.

The journals here are real: a process writing a rollback-journal transaction
on a real file (a small page cache, so SQLite writes changed pages into the
database before the commit) is SIGKILLed before it commits. SQLite then
refuses the file to a read-only connection (SQLITE_READONLY_ROLLBACK) until
a read-write one rolls the journal back.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.security import audit
from gateway.security.audit import AuditError
from store_forward.database import Database
from store_forward.integrity import (
    JOURNAL_MAGIC,
    SQLITE_READONLY_ROLLBACK,
    FaultKind,
    check_database,
    db_header_mode,
    journal_path,
    read_manifest,
    secure_evidence,
)
from tests.harness.site import gateway_config, meter

# Runs a transaction that changes many pages (spilling them into the database
# file before the commit), says so, and waits to be killed.
WRITER = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=2")
if sys.argv[2] == "wal":
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("BEGIN IMMEDIATE")
    db.execute(sys.argv[3])
    db.execute("COMMIT")  # committed to the log, never checkpointed
else:
    if sys.argv[2] == "to-rollback":
        db.execute("PRAGMA journal_mode=DELETE")
    db.execute("BEGIN IMMEDIATE")
    for _ in range(3):
        db.execute(sys.argv[3])
print("ready", flush=True)
time.sleep(60)
"""


def killed_in(db: Path, mode: str, sql: str) -> None:
    """Run ``sql`` on ``db`` in a process SIGKILLed before it commits (``wal``: after)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), mode, sql], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def read_only_refused(db: Path) -> int | None:
    """The SQLite error code a read-only quick_check gets (None: it read the file)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA quick_check").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return exc.sqlite_errorcode
    return None


FILL = "INSERT INTO t (b) SELECT randomblob(900) FROM (SELECT 1 UNION ALL SELECT 2) CROSS JOIN (SELECT value FROM json_each('[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50]'))"


@pytest.fixture
def rollback_db(tmp_path: Path) -> tuple[Path, bytes]:
    """A rollback-journal database (header 1) with one committed row and a hot
    journal of a transaction that did not complete; and its bytes before that."""
    db = tmp_path / "gw.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA page_size=1024")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, b BLOB)")
    conn.execute("INSERT INTO t (b) VALUES (x'01')")
    conn.close()
    before = db.read_bytes()
    killed_in(db, "rollback", FILL)
    assert journal_path(db).read_bytes().startswith(JOURNAL_MAGIC)
    assert db.read_bytes() != before, "the transaction wrote nothing into the database file"
    return db, before


def test_a_hot_journal_is_rolled_back_to_the_state_before_the_transaction(
    rollback_db: tuple[Path, bytes],
) -> None:
    db, before = rollback_db
    assert db_header_mode(db) == 1
    assert read_only_refused(db) == SQLITE_READONLY_ROLLBACK  # what stopped the daemon
    result = check_database(db)
    assert result.ok, result
    assert result.rolled_back is not None and result.rolled_back.pages_before == len(before) // 1024
    assert not result.rolled_back.wal_mode
    assert not journal_path(db).exists()
    assert db.read_bytes() == before  # byte for byte what was committed
    assert read_only_refused(db) is None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT k, b FROM t").fetchall() == [(1, b"\x01")]
    finally:
        conn.close()
    again = check_database(db)  # nothing left to roll back
    assert again.ok and again.rolled_back is None


def test_a_journal_with_a_zeroed_header_is_not_hot_and_is_left_alone(
    rollback_db: tuple[Path, bytes],
) -> None:
    db, _before = rollback_db
    journal = journal_path(db)
    data = bytearray(journal.read_bytes())
    data[:28] = bytes(28)  # what a finished PERSIST-style transaction leaves
    journal.write_bytes(data)
    damaged = db.read_bytes()
    assert read_only_refused(db) is None  # SQLite ignores it
    result = check_database(db)
    assert result.rolled_back is None
    assert journal.read_bytes() == data and db.read_bytes() == damaged


def test_a_hot_journal_sqlite_cannot_read_is_a_fault_kept_as_evidence(
    rollback_db: tuple[Path, bytes],
) -> None:
    db, _before = rollback_db
    journal = journal_path(db)
    data = bytearray(journal.read_bytes())
    data[:8] = b"damaged!"
    journal.write_bytes(data)
    files = db.read_bytes()
    result = check_database(db)
    assert not result.ok and result.kind is FaultKind.JOURNAL, result
    assert journal.read_bytes() == data and db.read_bytes() == files  # untouched
    evidence = secure_evidence(db, FaultKind.JOURNAL, result.reason, 1_700_000_000_000)
    assert (evidence / "gw.db-journal").read_bytes() == data
    assert not journal.exists() and not db.exists()  # nothing left to roll back into a new database
    assert "gw.db-journal" in read_manifest(evidence)["files"]


def wal_db_with_frames(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, b BLOB)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    killed_in(db, "wal", "INSERT INTO t (b) VALUES (x'02')")
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 32, "the log holds no frame"


def test_a_wal_database_is_checked_read_only_and_its_log_is_not_touched(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    wal_db_with_frames(db)
    wal = db.with_name(db.name + "-wal")
    files = (db.read_bytes(), wal.read_bytes())
    result = check_database(db)
    assert result.ok and result.rolled_back is None and result.wal is not None, result
    assert result.wal.sqlite_frames > 0
    assert (db.read_bytes(), wal.read_bytes()) == files  # no checkpoint, no truncation
    assert not journal_path(db).exists()


def test_a_hot_journal_beside_a_log_with_frames_is_a_fault(
    tmp_path: Path, rollback_db: tuple[Path, bytes]
) -> None:
    hot = journal_path(rollback_db[0]).read_bytes()
    db = tmp_path / "wal" / "gw.db"
    db.parent.mkdir()
    wal_db_with_frames(db)
    journal_path(db).write_bytes(hot)
    wal = db.with_name(db.name + "-wal")
    files = (db.read_bytes(), wal.read_bytes(), hot)
    result = check_database(db)
    assert not result.ok and result.kind is FaultKind.JOURNAL, result
    assert "write-ahead log" in result.reason
    assert (db.read_bytes(), wal.read_bytes(), journal_path(db).read_bytes()) == files


async def test_the_database_opens_with_what_was_committed_before_the_unfinished_transaction(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "gw.db"
    ob = await Database.open(db)
    generation = ob.generation
    await ob.close()
    conn = sqlite3.connect(db, isolation_level=None)
    kv = conn.execute("SELECT key, value FROM kv ORDER BY key").fetchall()
    conn.execute("CREATE TABLE filler (k INTEGER PRIMARY KEY, b BLOB)")
    conn.close()
    # the transaction that did not complete: back in rollback-journal mode, many pages
    killed_in(db, "to-rollback", FILL.replace("INTO t", "INTO filler"))
    assert journal_path(db).read_bytes().startswith(JOURNAL_MAGIC)
    assert read_only_refused(db) == SQLITE_READONLY_ROLLBACK
    with caplog.at_level("WARNING", logger="store_forward.integrity"):
        ob = await Database.open(db)
    try:
        assert "did not complete was rolled back" in caplog.text
        assert ob.generation == generation and ob.corrupt is None
        assert not journal_path(db).exists()
    finally:
        await ob.close()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT key, value FROM kv ORDER BY key").fetchall()[: len(kv)] == kv
        assert conn.execute("SELECT count(*) FROM filler").fetchone() == (0,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    assert not (tmp_path / "gw.db.evidence").exists()


async def test_status_says_a_transaction_waits_to_be_rolled_back_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``edgegw status`` opens the database read-only, so it meets the hot journal
    too; it must say what it is (not damage) and leave the files as they are."""
    cfg = gateway_config(tmp_path, "gw-hot", modbus_port=1, broker={"port": 1}, meters=[meter()])
    db = load_config(cfg).storage.path
    ob = await Database.open(db)
    await ob.close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE filler (k INTEGER PRIMARY KEY, b BLOB)")
    conn.close()
    killed_in(db, "to-rollback", FILL.replace("INTO t", "INTO filler"))
    files = (db.read_bytes(), journal_path(db).read_bytes())
    capsys.readouterr()
    with ThreadPoolExecutor(1) as pool:  # status runs an event loop of its own
        assert pool.submit(main, ["status", "--config", str(cfg)]).result(timeout=30) == 1
    out = capsys.readouterr().out
    assert "waits to be rolled back; the daemon does that at its next start" in out, out
    assert "keeps it as evidence" not in out
    assert (db.read_bytes(), journal_path(db).read_bytes()) == files


def test_audit_verify_says_a_transaction_waits_to_be_rolled_back_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """``edgegw audit verify`` reads read-only as well: the same words as status,
    not SQLite's own, and the files as they were."""
    db = tmp_path / "gw.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, b BLOB)")
    conn.close()
    killed_in(db, "to-rollback", FILL)
    files = (db.read_bytes(), journal_path(db).read_bytes())
    with pytest.raises(AuditError, match="waits to be rolled back; the daemon does that at its next start"):
        audit.verify(db)
    assert (db.read_bytes(), journal_path(db).read_bytes()) == files
