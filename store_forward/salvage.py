"""Reading what can still be read from a damaged outbox database.

The evidence (:func:`store_forward.integrity.secure_evidence`) is never
opened for writing. :func:`build_images` writes *images* — copies of the
database file with the write-ahead log applied by this module — into
``<evidence>/images/`` (derived files, safe to delete once the recovery is
done):

* ``as-sqlite-reads``: the log applied up to the last commit SQLite itself
  would use;
* ``past-damage`` (only when the log has committed transactions after a
  damaged frame): every frame of the log up to its last commit, damaged ones
  included;
* ``past-damage-intact-frames`` (likewise, when exactly one frame is damaged):
  the same transactions with the damaged frame left out, its page as the log
  left it before that frame (or the database file): readable when the damaged
  page is one every table depends on, such as the schema's, at the cost of
  what that frame held. Whoever reads it judges what is missing as for any
  image.

The images of :data:`WHOLE_LOG` apply every committed transaction of the log;
``as-sqlite-reads`` does so only when the log is not damaged (it is then the
only image).

:func:`read_image` opens an image read-only (``immutable=1``: no locks, no
log, nothing written) and reads every table row by row in rowid order. When a
damaged page stops the scan, the reader seeks past it (exponential probe, then
bisection) and goes on, so one bad page costs the rows on it and nothing else;
each table says whether it was read completely. Whether what was read can be
trusted is for the reader of each table to decide (the ledger is re-folded and
compared with its stored view, the audit log's hash chain is checked, sealed
records must open under their authenticated encryption).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store_forward.integrity import read_manifest
from store_forward.walcheck import check_wal, pages_to_apply

log = logging.getLogger(__name__)

MAX_SKIPS = 10_000  # damaged regions skipped per table before giving up on it
AS_SQLITE_READS = "as-sqlite-reads"
PAST_DAMAGE = "past-damage"
PAST_DAMAGE_INTACT = "past-damage-intact-frames"
WHOLE_LOG = (PAST_DAMAGE, PAST_DAMAGE_INTACT)  # best first
_MIN_ROWID = -(2**63)
_MAX_ROWID = 2**63 - 1


@dataclass
class SalvagedTable:
    name: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    complete: bool = True
    errors: list[str] = field(default_factory=list)

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


@dataclass
class Salvage:
    """What one image gave."""

    label: str
    readable: bool  # the schema could be read
    tables: dict[str, SalvagedTable] = field(default_factory=dict)
    error: str | None = None

    def table(self, name: str) -> SalvagedTable | None:
        return self.tables.get(name)

    def kv(self) -> dict[str, Any]:
        t = self.tables.get("kv")
        return {} if t is None else {str(k): v for k, v in t.rows}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def build_images(evidence: Path) -> list[tuple[str, Path]]:
    """Write the images of the evidence's database; (label, path), best first."""
    manifest = read_manifest(evidence)
    name = str(manifest.get("database") or "")
    db = evidence / name if name else None
    if db is None or not db.exists():
        return []
    base = db.read_bytes()
    out_dir = evidence / "images"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    wal_path = evidence / f"{name}-wal"
    wal = wal_path.read_bytes() if wal_path.exists() else b""
    images: list[tuple[str, Path]] = []
    report = check_wal(wal) if wal else None
    variants = [(AS_SQLITE_READS, False, True)]
    if report is not None and report.lost_commits:
        variants.insert(0, (PAST_DAMAGE, True, True))
        # Exactly one frame of the transactions applied is not whole (one flipped bit
        # damages one frame: the next is judged from the checksum stored in it). With
        # one page left at an older copy the ledger cannot look consistent and old at
        # once: an append writes the entry's page and the account's in one
        # transaction, so one of the two would be newer, and the re-fold says so. With
        # two or more, both could be old: no such image then.
        if len(report.damaged) == 1:
            variants.insert(1, (PAST_DAMAGE_INTACT, True, False))
    for label, past, damaged in variants:
        image = bytearray(base)
        size: int | None = None
        if report is not None and report.page_size is not None:
            pages, size = pages_to_apply(wal, report, past_damage=past, damaged_frames=damaged)
            ps = report.page_size
            if size is not None:
                image = image.ljust(size * ps, b"\x00")[: size * ps]
            for pgno, page in pages:
                end = pgno * ps
                if end > len(image):
                    image = image.ljust(end, b"\x00")
                image[(pgno - 1) * ps : end] = page
        if len(image) >= 100 and image.startswith(b"SQLite format 3\x00"):
            image[18] = image[19] = 1  # read as a rollback-journal file: no log to look for
            if size is not None:
                # The header's page count as the last applied commit gives it (page 1
                # may be an older copy), marked valid: change counter = version-valid-for.
                image[28:32] = size.to_bytes(4, "big")
                image[96:100] = image[92:96]
        path = out_dir / f"{label}.db"
        path.write_bytes(bytes(image))
        images.append((label, path))
    return images


def remove_images(evidence: Path) -> None:
    """Drop the derived images (the evidence itself stays)."""
    shutil.rmtree(evidence / "images", ignore_errors=True)


def read_image(path: Path, label: str, tables: set[str] | None = None) -> Salvage:
    """Every readable row of every table (or of ``tables``) of an image."""
    try:
        conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return Salvage(label, False, error=str(exc))
    try:
        try:
            names = [
                str(r[0])
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                )
            ]
        except sqlite3.Error as exc:
            return Salvage(label, False, error=f"schema unreadable: {exc}")
        out = Salvage(label, True)
        for name in names:
            if tables is not None and name not in tables:
                continue
            out.tables[name] = _read_table(conn, name)
        return out
    finally:
        conn.close()


def _read_table(conn: sqlite3.Connection, name: str) -> SalvagedTable:
    try:
        cols = tuple(str(r[1]) for r in conn.execute(f"PRAGMA table_info({_quote(name)})"))
    except sqlite3.Error as exc:
        return SalvagedTable(name, (), complete=False, errors=[f"columns unreadable: {exc}"])
    t = SalvagedTable(name, cols)
    if not cols:
        t.complete = False
        return t
    select = ", ".join(_quote(c) for c in cols)
    base = f"SELECT rowid, {select} FROM {_quote(name)}"
    last: int | None = None  # rows after this rowid are still to read
    for _ in range(MAX_SKIPS):
        try:
            if last is None:
                cur = conn.execute(f"{base} ORDER BY rowid")
            else:
                cur = conn.execute(f"{base} WHERE rowid > ? ORDER BY rowid", (last,))
            for row in cur:
                last = int(row[0])
                t.rows.append(tuple(row[1:]))
            return t
        except sqlite3.Error as exc:
            t.complete = False
            t.errors.append(f"after rowid {'(start)' if last is None else last}: {exc}")
            nxt = _next_readable(conn, name, _MIN_ROWID if last is None else last)
            if nxt is None:
                return t
            last = nxt - 1
    t.errors.append(f"gave up after {MAX_SKIPS} damaged regions")
    return t


def _probe(conn: sqlite3.Connection, name: str, after: int) -> int | bool | None:
    """The first rowid above ``after``: an int, None (there is none) or False (unreadable)."""
    try:
        row = conn.execute(
            f"SELECT rowid FROM {_quote(name)} WHERE rowid > ? ORDER BY rowid LIMIT 1", (after,)
        ).fetchone()
    except sqlite3.Error:
        return False
    return None if row is None else int(row[0])


def _next_readable(conn: sqlite3.Connection, name: str, after: int) -> int | None:
    """The smallest rowid above ``after`` whose neighbourhood can be read again."""
    bad = after
    good: int | None = None
    found: int | None = None
    step = 1
    while bad + step <= _MAX_ROWID:
        r = _probe(conn, name, bad + step)
        if r is not False:
            good, found = bad + step, r if isinstance(r, int) else None
            break
        step *= 2
    if good is None:
        return None
    while good - bad > 1:  # the readable boundary lies between bad and good
        mid = (bad + good) // 2
        r = _probe(conn, name, mid)
        if r is False:
            bad = mid
        else:
            good, found = mid, r if isinstance(r, int) else None
    return found


def salvage(evidence: Path, tables: set[str] | None = None) -> list[Salvage]:
    """Build the images of the evidence and read them (best first)."""
    out = []
    for label, path in build_images(evidence):
        s = read_image(path, label, tables)
        if not s.readable:
            log.error("salvage: image %s of %s is unreadable: %s", label, evidence, s.error)
        else:
            bad = [
                f"{t.name} ({len(t.errors)} damaged region(s))"
                for t in s.tables.values()
                if not t.complete
            ]
            log.warning(
                "salvage: image %s of %s: %d table(s) read%s",
                label,
                evidence,
                len(s.tables),
                "; incomplete: " + ", ".join(bad) if bad else ", all complete",
            )
        out.append(s)
    return out
