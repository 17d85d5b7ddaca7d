"""The salvage's images of a damaged log (store_forward.salvage), on real SQLite files.

A damaged copy of the schema's page in the log, with no later copy after it,
makes the image of every frame unreadable: each table is reached through that
page. The image that leaves the damaged frame out keeps the page the database
file holds, and reads every later transaction.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from store_forward.integrity import MANIFEST
from store_forward.outbox import Outbox
from store_forward.salvage import (
    AS_SQLITE_READS,
    PAST_DAMAGE,
    PAST_DAMAGE_INTACT,
    Salvage,
    build_images,
    salvage,
)
from store_forward.walcheck import FRAME_HEADER_BYTES, check_wal


def _evidence(tmp: Path, flip: tuple[int, int] | None, *, second_flip: bool = False) -> Path:
    """A database whose schema is in the file and whose log begins with a
    transaction that grows the file (page 1 first), then transactions that only
    update rows (page 1 not written again); a bit of frame ``flip[0]`` at byte
    ``flip[1]`` of its page flipped. Kept as the integrity check keeps evidence."""
    live = tmp / "live"
    live.mkdir()
    db = live / "gw.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA page_size=1024")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    for t in ("a", "b", "c"):
        conn.execute(f"CREATE TABLE {t} (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the schema is in the file
    conn.execute("BEGIN")
    for i in range(40):  # the file grows: page 1 (its page count) is the log's first frame
        conn.execute("INSERT INTO a (id, v) VALUES (?, ?)", (i, f"a{i} " + "x" * 80))
    conn.execute("COMMIT")
    for n in range(5):  # later transactions change rows in place
        conn.execute("UPDATE b SET v = 'never'")  # (nothing: b stays empty)
        conn.execute("INSERT OR REPLACE INTO c (id, v) VALUES (1, ?)", (f"c{n}",))
        conn.execute("UPDATE a SET v = ? WHERE id = 7", (f"a7 v{n} " + "y" * 80,))
    evidence = tmp / "evidence"
    evidence.mkdir()
    shutil.copy(db, evidence / "gw.db")
    wal = bytearray((live / "gw.db-wal").read_bytes())
    conn.close()
    report = check_wal(bytes(wal))
    assert report.frames[0].page_no == 1
    assert [f.index for f in report.frames if f.page_no == 1] == [0]  # no later copy of it
    ps = report.page_size or 0
    if flip is not None:
        frame, at = flip
        wal[report.frames[frame].offset + FRAME_HEADER_BYTES + at] ^= 0x10
        if second_flip:  # the first frame of the second transaction, too
            first_commit = next(f.index for f in report.frames if f.commit)
            f2 = report.frames[first_commit + 1]
            wal[f2.offset + FRAME_HEADER_BYTES + ps - 40] ^= 0x01
    (evidence / "gw.db-wal").write_bytes(bytes(wal))
    (evidence / MANIFEST).write_bytes(orjson.dumps({"database": "gw.db", "kind": "wal"}))
    return evidence


def _rows(s: Salvage, table: str) -> list[tuple[Any, ...]]:
    t = s.table(table)
    assert t is not None
    return [tuple(r) for r in t.rows]


def test_a_damaged_schema_page_with_no_later_copy_is_taken_from_the_file(tmp_path: Path) -> None:
    # byte 100 of page 1: the schema b-tree's page type
    evidence = _evidence(tmp_path, (0, 100))
    report = check_wal((evidence / "gw.db-wal").read_bytes())
    assert report.corrupt and report.lost_commits
    images = salvage(evidence)
    assert [s.label for s in images] == [PAST_DAMAGE, PAST_DAMAGE_INTACT, AS_SQLITE_READS]
    past, intact, sqlite_reads = images
    assert not past.readable  # every table hangs on the damaged page
    assert intact.readable
    # every committed transaction after the damaged frame is there
    assert _rows(intact, "c") == [(1, "c4")]
    a = {r[0]: r[1] for r in _rows(intact, "a")}
    assert len(a) == 40 and a[7] == "a7 v4 " + "y" * 80
    assert all(t.complete for t in intact.tables.values())
    # what SQLite itself reads stops before the damage: the schema only
    assert sqlite_reads.readable and _rows(sqlite_reads, "a") == [] and _rows(sqlite_reads, "c") == []


def test_no_image_leaves_out_frames_when_two_are_damaged(tmp_path: Path) -> None:
    # Two damaged pages could both be older copies: an image of them could look
    # consistent and old at once, so it is not made.
    evidence = _evidence(tmp_path, (0, 100), second_flip=True)
    labels = [label for label, _ in build_images(evidence)]
    assert labels == [PAST_DAMAGE, AS_SQLITE_READS]


def test_an_intact_log_gives_one_image(tmp_path: Path) -> None:
    evidence = _evidence(tmp_path, None)
    images = salvage(evidence)
    assert [s.label for s in images] == [AS_SQLITE_READS]
    assert _rows(images[0], "c") == [(1, "c4")]


async def test_a_new_databases_schema_is_in_the_file_at_once(tmp_path: Path) -> None:
    """Not only in the write-ahead log, where a damaged copy would be its only one."""
    ob = await Outbox.open(tmp_path / "gw.db")
    try:
        assert (tmp_path / "gw.db-wal").exists()  # the database is open, in WAL mode
        main_file = (tmp_path / "gw.db").read_bytes()
        assert b"CREATE TABLE" in main_file and b"outbox" in main_file
    finally:
        await ob.close()
