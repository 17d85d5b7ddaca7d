"""The outbox under storage faults: evidence, carried-over records, generations and batch
epochs, a full disk."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from store_forward.integrity import FaultKind
from store_forward.outbox import ID_BLOCK_BITS, Batch, Outbox, OutboxFullError, StoragePolicy
from store_forward.storage_state import StorageMode


def reading(meter: str, t: int, kwh: str) -> Reading:
    return Reading(meter, t, {Quantity.ENERGY_IMPORT: Measurement(Decimal(kwh))})


def damage_pages(db: Path, name: str) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [
            int(p) for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name = ?", (name,))
        ]
        (ps,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    data = bytearray(db.read_bytes())
    for p in pages:
        data[(p - 1) * ps : p * ps] = b"\xa5" * ps
    db.write_bytes(bytes(data))


async def test_unsent_records_and_numbered_batches_carry_over(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    await ob.commit_cycle(1, [reading(f"m{i}", 10 + i, str(i)) for i in range(5)])
    first = await ob.next_batch(2, max_records=3)
    assert first is not None and first.seq == 1
    await ob.add_event(3, {"type": "later"})
    bodies = {r.id: r.body for r in first.records}
    await ob.close()
    damage_pages(path, "meter_status")  # a table of no money, but the file is damaged
    damaged_sha = hashlib.sha256(path.read_bytes()).hexdigest()

    ob = await Outbox.open(path)
    try:
        assert ob.storage.mode is StorageMode.FAULT
        assert ob.storage.kind in (FaultKind.CHECK.value, FaultKind.OPEN.value)
        assert ob.generation == 2
        [evidence] = list((tmp_path / "gw.db.evidence").iterdir())
        manifest = json.loads((evidence / "manifest.json").read_text())
        assert manifest["files"]["gw.db"]["sha256"] == damaged_sha
        assert ob.salvaged["records"] == 6 and ob.salvaged["batches"] == 1
        # the numbered batch comes back with its number and its records; everything
        # new is numbered in the new epoch
        batches: dict[int, Batch] = {}
        while (b := await ob.next_batch(5, exclude=list(batches))) is not None:
            batches[b.seq] = b
        assert {r.id: r.body for r in batches[1].records} == bodies
        assert all(seq > 1 << ID_BLOCK_BITS for seq in batches if seq != 1)
        ids = sorted(r.id for b in batches.values() for r in b.records)
        old = [i for i in ids if i < 1 << ID_BLOCK_BITS]
        assert old == [1, 2, 3, 4, 5, 6]  # every unsent record, its id kept
        assert len(ids) == 7  # and the storage_fault event, numbered in the new epoch
    finally:
        await ob.close()


async def test_a_missing_database_is_a_fault_not_a_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    await ob.add_event(1, {"type": "x"})
    await ob.close()
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    ob = await Outbox.open(path)
    try:
        assert ob.storage.mode is StorageMode.FAULT and ob.storage.kind == FaultKind.MISSING.value
        assert ob.generation == 2
        assert "missing" in (ob.storage.reason or "")
    finally:
        await ob.close()


async def test_generations_never_repeat(tmp_path: Path) -> None:
    """Each damaged database leaves its generation behind, even when nothing of it can be
    read and the lineage marker is lost too (the evidence still names it); each new
    database numbers its batches in a new batch epoch."""
    path = tmp_path / "gw.db"
    generations: list[int] = []
    batch_epochs: set[str] = set()
    for round_ in range(4):
        ob = await Outbox.open(path)
        generations.append(ob.generation)
        await ob.add_event(round_, {"type": "x"})
        batch_epochs.add(await ob.batch_epoch())
        await ob.close()
        path.write_bytes(os.urandom(8192))  # not a database any more
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        if round_ == 2:
            path.with_name("gw.db.lineage").unlink()
    assert generations == [1, 2, 3, 4] and len(batch_epochs) == 4
    ob = await Outbox.open(path)
    try:
        assert ob.generation == 5
        assert len(list((tmp_path / "gw.db.evidence").iterdir())) == 4
    finally:
        await ob.close()


async def test_recover_in_place_keeps_the_file_and_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    try:
        await ob.commit_cycle(1, [reading("m1", 1, "1")])
        evidence = await ob.recover_in_place(FaultKind.RUNTIME, "found damaged")
        assert (evidence / "gw.db").exists() and ob.storage.mode is StorageMode.FAULT
        assert ob.generation == 2 and ob.salvaged["records"] == 1
        ids = await ob.commit_cycle(2, [reading("m1", 2, "2")])
        assert ids[0] > 1 << ID_BLOCK_BITS
        assert (await ob.stats()).readings == 2
    finally:
        await ob.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> Path:
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (64 * 1024, 4096, 512):
            for _ in range(10_000):
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


async def test_full_disk_at_open_waits_for_space(small_fs: Path) -> None:
    path = small_fs / "gw.db"
    policy = StoragePolicy(max_bytes=1 << 40, reserve_bytes=0, ballast_bytes=256 * 1024)
    ob = await Outbox.open(path, policy=policy)
    await ob.add_event(1, {"type": "before"})
    await ob.close()
    ob.ballast.unlink()  # used up by an earlier episode
    filler = fill(small_fs)
    ob = await Outbox.open(path, policy=policy)  # does not fail
    try:
        assert ob.starved is not None and ob.epoch == 0
        with pytest.raises(OutboxFullError):
            await ob.add_event(2, {"type": "while full"})
        assert not await ob.resume_if_space()
        assert await ob.ping()  # still answering reads
        filler.unlink()
        ob._last_resume_try = 0.0
        assert await ob.resume_if_space()
        assert ob.starved is None and ob.ballast.exists()
        await ob.add_event(3, {"type": "after"})
        b = await ob.next_batch(4)
        assert b is not None
        types = [r.body["type"] for r in b.records]
        assert types[:1] == ["before"] and "after" in types and "storage_full" in types
    finally:
        await ob.close()
