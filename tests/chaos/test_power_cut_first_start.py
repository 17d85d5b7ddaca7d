"""A power cut during a new database's first write, then the daemon on what is left.

A new database's first write is the switch to WAL (``PRAGMA journal_mode=WAL``
rewrites the header in a rollback-journal transaction); the migration
transaction follows in WAL mode. SQLite deletes the switch's journal after the
database file is synced but does not sync the directory, so a power cut before
the first WAL commit (which syncs the directory) brings the journal back: a
*hot* journal beside a header that already says WAL. A read-only connection
cannot roll it back ("attempt to write a readonly database"), which is how the
start-up integrity check used to stop the daemon for good.

The cut is placed deterministically: the test makes the first write exactly as
:meth:`store_forward.database.Database._prepare` does (page size, WAL,
``synchronous=FULL``, ``BEGIN IMMEDIATE`` and the first migration step, not
committed: the instant the daemon logs that the schema was migrated) on the
gateway's own state directory on tests/harness/powerfs.py, cuts the power, and
starts the real daemon on the rebooted disk. It must roll the unfinished
transaction back, open a fresh database, run and deliver, with no storage fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from store_forward.database import PAGE_SIZE, SCHEMA
from store_forward.integrity import JOURNAL_MAGIC, db_header_mode, evidence_root
from tests.chaos.site import ChaosSite, check, until
from tests.harness.powerfs import PowerFS, fsync_tree, fuse_unavailable

SQLITE_READONLY_ROLLBACK = 776


@pytest.fixture
def powerfs(tmp_path: Path) -> Iterator[PowerFS]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: power loss cannot be simulated here")
    why = fuse_unavailable()
    if why is not None:
        pytest.fail(why, pytrace=False)
    fs = PowerFS(tmp_path / "disk", tmp_path / "mnt", seed=int.from_bytes(os.urandom(4)))
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


def first_write_then_cut(fs: PowerFS, db_path: Path) -> dict[str, object]:
    """The daemon's first write on a new database, the migration in flight; the cut."""
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        assert db.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        for sql in SCHEMA.steps[0].statements:
            db.execute(sql)
        report = fs.cut("drop")
    finally:
        db.close()
    fs.reboot()
    return report


async def test_power_cut_in_first_write_leaves_a_hot_journal_the_daemon_rolls_back(
    tmp_path: Path, powerfs: PowerFS
) -> None:
    state = powerfs.mountpoint / "var-lib-edgegw"
    state.mkdir()
    fsync_tree(powerfs.mountpoint)  # the installer made the state directory, durably
    async with ChaosSite(tmp_path, state, seed=int.from_bytes(os.urandom(4))) as site:
        site.provision()
        fsync_tree(powerfs.mountpoint)  # `edgegw keys init` syncs what it writes
        report = first_write_then_cut(powerfs, site.db)
        # What the cut left: the switch to WAL is on disk, its journal came back hot,
        # and a read-only connection cannot read the file.
        journal = site.db.with_name(site.db.name + "-journal")
        assert "gateway.db-journal" in report["names"], report
        assert journal.read_bytes().startswith(JOURNAL_MAGIC), "the journal is not hot"
        assert db_header_mode(site.db) == 2, "the header does not say WAL"
        with pytest.raises(sqlite3.OperationalError) as refused:
            ro = sqlite3.connect(f"file:{site.db}?mode=ro", uri=True)
            try:
                ro.execute("PRAGMA quick_check").fetchone()
            finally:
                ro.close()
        assert refused.value.sqlite_errorcode == SQLITE_READONLY_ROLLBACK, refused.value

        site.start_headend()
        site.start_central()
        site.daemon.start()
        # it comes up on a fresh database and commits readings
        await until(
            lambda: site._committed() > 0 or site.daemon.exited() is not None,
            60,
            "readings committed",
            site,
        )
        assert site.daemon.exited() is None, site.daemon.tail()
        log = site.daemon.log.read_text(errors="replace")
        assert "cannot check the outbox database" not in log, site.daemon.tail()
        assert "first-start transaction that did not complete was rolled back" in log, (
            site.daemon.tail()
        )
        assert not journal.exists()
        assert await asyncio.to_thread(site.daemon.stop) == 0, site.daemon.tail()
        await site.settle_and_drain()  # starts it again, delivers everything, stops it
        findings = check(site)
    assert not findings.problems, "\n".join(findings.problems)
    assert findings.readings > 0 and findings.debits > 0, findings
    # a fresh database, not a storage fault: nothing kept as evidence, generation 1
    assert not evidence_root(site.db).exists()
    with contextlib.closing(sqlite3.connect(f"file:{site.db}?mode=ro", uri=True)) as gw:
        assert gw.execute("SELECT value FROM kv WHERE key = 'db_generation'").fetchone() == (1,)
        assert gw.execute("SELECT count(*) FROM kv WHERE key = 'storage_state'").fetchone() == (0,)
