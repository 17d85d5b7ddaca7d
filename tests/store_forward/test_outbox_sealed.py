"""Outbox at rest: sealed bodies, telemetry split, nonces across SIGKILL,
bounded storage, full disks and damaged records."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from store_forward.outbox import (
    K_TELEMETRY,
    EvictionPlan,
    Outbox,
    OutboxFullError,
    StoragePolicy,
    plan_eviction,
)
from store_forward.records import RecordClass
from store_forward.sealing import FileEpochStore, SqliteEpochStore

ROOT = Path(__file__).resolve().parents[2]


def full_reading(meter: str, t: int, kwh: str, volts: str = "230.4") -> Reading:
    return Reading(
        meter,
        t,
        {
            Quantity.ENERGY_IMPORT: Measurement(Decimal(kwh)),
            Quantity.VOLTAGE: Measurement(Decimal(volts)),
            Quantity.POWER: Measurement(Decimal("1.2345")),
        },
    )


async def test_bodies_are_sealed_at_rest(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    await ob.commit_cycle(1, [full_reading("METER-SECRET-4711", 1, "1206.42")])
    await ob.add_event(2, {"type": "relay", "note": "EVENT-SECRET-0815"})
    await ob.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("gw.db"))  # noqa: ASYNC240
    for secret in (b"METER-SECRET-4711", b"1206.42", b"EVENT-SECRET-0815"):
        assert secret not in raw
    ob = await Outbox.open(path)
    try:
        seen = []
        while (b := await ob.next_batch(3, exclude=[s for s, _ in seen])) is not None:
            seen.append((b.seq, b.records))
        bodies = [r.body for _, recs in seen for r in recs]
        assert {"type": "relay", "note": "EVENT-SECRET-0815"} in bodies
        assert any(b.get("m") == "METER-SECRET-4711" and b["v"] == {"energy_import_kwh": "1206.42"} for b in bodies)
    finally:
        await ob.close()


async def test_readings_split_into_billing_and_telemetry(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db")
    try:
        ids = await ob.commit_cycle(5, [full_reading("m1", 5, "1.50")])
        assert ids == [1]  # one id per reading: its billing record
        st = await ob.stats()
        assert (st.readings, st.telemetry, st.readings_committed) == (1, 1, 1)
        assert (await ob.kv())[K_TELEMETRY] == 1
        await ob.add_event(6, {"type": "alarm"})
        order = []
        while (b := await ob.next_batch(7, exclude=[o[0] for o in order])) is not None:
            order.append((b.seq, [r.cls for r in b.records], [r.body.get("v") for r in b.records]))
        assert [o[1] for o in order] == [[RecordClass.EVENT], [RecordClass.BILLING], [RecordClass.TELEMETRY]]
        assert order[1][2] == [{"energy_import_kwh": "1.50"}]
        assert order[2][2] == [{"power_kw": "1.2345", "voltage_v": "230.4"}]
    finally:
        await ob.close()


async def test_a_blob_moved_to_another_row_is_set_aside_not_sent(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    await ob.commit_cycle(1, [Reading("m1", t, {Quantity.ENERGY_IMPORT: Measurement(Decimal(t))}) for t in (1, 2, 3)])
    await ob.close()
    with sqlite3.connect(path) as db:  # someone with write access swaps two bodies
        b1, b2 = (bytes(r[0]) for r in db.execute("SELECT body FROM outbox WHERE id IN (1, 2) ORDER BY id"))
        db.execute("UPDATE outbox SET body = ? WHERE id = 1", (b2,))
        db.execute("UPDATE outbox SET body = ? WHERE id = 2", (b1,))
    ob = await Outbox.open(path)
    try:
        batch = await ob.next_batch(5)
        assert batch is not None and [r.id for r in batch.records] == [3]
        event = await ob.next_batch(5, exclude=[batch.seq])
        assert event is not None and event.records[0].body["type"] == "records_damaged"
        assert event.records[0].body["ids"] == [1, 2]
    finally:
        await ob.close()
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT id FROM damaged ORDER BY id")] == [1, 2]


async def test_rows_sealed_under_an_older_key_version_still_open(tmp_path: Path) -> None:
    from store_forward.storage_keys import StorageKeys

    k1, k2 = os.urandom(32), os.urandom(32)
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path, keys=StorageKeys(1, {1: k1}, "test v1"))
    await ob.add_event(1, {"type": "before rotation"})
    await ob.close()
    ob = await Outbox.open(path, keys=StorageKeys(2, {1: k1, 2: k2}, "test v2"))
    try:
        await ob.add_event(2, {"type": "after rotation"})
        batch = await ob.next_batch(3)
        assert batch is not None
        assert [r.body["type"] for r in batch.records] == ["before rotation", "after rotation"]
    finally:
        await ob.close()


# --------------------------------------------------------------------------- SIGKILL


def _kill_loop(tmp_path: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    db = tmp_path / "gw.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    epochs = []
    for k in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.store_forward.outbox_child", str(db), str(k * 1_000_000)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        if rng.random() < 0.2:
            # during start-up: imports, quick_check, epoch acquisition
            try:
                proc.wait(rng.uniform(0.05, 0.6))
            except subprocess.TimeoutExpired:
                pass
        else:
            line = proc.stdout.readline().decode()
            assert line.startswith("open "), (line, proc.stderr.read().decode() if proc.poll() is not None else "")
            epochs.append(int(line.split()[1]))
            for _ in range(rng.randrange(0, 30)):
                proc.stdout.readline()
        proc.kill()
        proc.wait(10)
        assert proc.returncode in (-9, None) or proc.returncode == -9, proc.stderr.read().decode()
    assert len(epochs) == len(set(epochs)), f"an epoch was used twice: {epochs}"
    assert epochs == sorted(epochs)


def _check_after_kills(tmp_path: Path) -> int:
    async def check() -> int:
        ob = await Outbox.open(tmp_path / "gw.db")
        try:
            nonces = await ob.nonces()
            assert len(nonces) == len(set(nonces)), "a nonce was reused"
            st = await ob.stats()
            assert st.readings == st.readings_committed  # counters commit with the rows
            opened = 0
            seen: list[int] = []
            while (b := await ob.next_batch(1, exclude=seen, max_records=5000, max_bytes=1 << 30)) is not None:
                seen.append(b.seq)
                opened += len(b.records)
            assert opened == st.records  # every blob opens under its own id and class
            return len(nonces)
        finally:
            await ob.close()

    return asyncio.run(check())


def test_no_nonce_reuse_across_sigkill(tmp_path: Path) -> None:
    _kill_loop(tmp_path, kills=20, seed=int.from_bytes(os.urandom(4)))
    assert _check_after_kills(tmp_path) > 20


@pytest.mark.long
def test_no_nonce_reuse_across_many_sigkills(tmp_path: Path) -> None:
    _kill_loop(tmp_path, kills=300, seed=int.from_bytes(os.urandom(4)))
    assert _check_after_kills(tmp_path) > 300


async def test_epoch_floor_survives_losing_the_epoch_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    e1 = ob.epoch
    await ob.close()
    path.with_name("gw.db.epoch").unlink()
    ob = await Outbox.open(path)
    assert ob.epoch == e1 + 1  # the database row carried the floor
    await ob.close()
    with sqlite3.connect(path) as db:
        db.execute(f"DELETE FROM {SqliteEpochStore.TABLE}")
    ob = await Outbox.open(path)
    assert ob.epoch == e1 + 2  # and the file carried it back
    await ob.close()
    assert FileEpochStore(path.with_name("gw.db.epoch")).path.exists()


# --------------------------------------------------------------------------- storage bounds


def test_plan_eviction_policy() -> None:
    p = StoragePolicy(max_bytes=1000, reserve_bytes=100)
    assert plan_eviction(500, 10_000, p) == EvictionPlan(0, 0)
    assert plan_eviction(1200, 10_000, p) == EvictionPlan(200, 0)  # telemetry only
    assert plan_eviction(1300, 10_000, p) == EvictionPlan(300, 50)  # past the margin (1000 + 250)
    assert plan_eviction(500, 150, p).shed_bytes == 50  # short of twice the reserve
    assert plan_eviction(500, 150, p).hard_bytes == 0
    assert plan_eviction(500, 40, p).hard_bytes == 60  # below the floor


async def test_ceiling_sheds_telemetry_and_keeps_every_billing_record(tmp_path: Path) -> None:
    policy = StoragePolicy(max_bytes=256 * 1024, reserve_bytes=0, keep_recent_telemetry_ms=0)
    ob = await Outbox.open(tmp_path / "gw.db", policy=policy)
    try:
        n = 0
        for cycle in range(110):  # past the ceiling (records are stored deflated: about a third)
            await ob.commit_cycle(cycle, [full_reading(f"m{j}", cycle * 100 + j, str(cycle + j)) for j in range(20)])
            n += 20
        st = await ob.stats()
        assert st.readings == n == st.readings_committed  # no billing record lost
        assert st.telemetry_evicted > 0 and st.telemetry < n
        assert st.billing_evicted == 0
    finally:
        await ob.close()


async def test_hard_floor_evicts_billing_with_a_critical_alarm(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    ob = await Outbox.open(tmp_path / "gw.db")
    try:
        await ob.commit_cycle(1, [full_reading("m1", t, "1") for t in range(50)])
        # the filesystem now "has" less than the reserve: past the hard floor
        ob.policy = StoragePolicy(max_bytes=1 << 40, reserve_bytes=free + 20_000)
        await ob.commit_cycle(2, [])
        st = await ob.stats()
        assert st.billing_evicted > 0 and st.telemetry == 0
        batch = await ob.next_batch(3)
        assert batch is not None and batch.records[0].body["type"] == "storage_hard_floor"
        assert batch.records[0].body["severity"] == "critical"
    finally:
        await ob.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); see the max_page_count test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def _fill_until_full(ob: Outbox) -> int:
    committed = 0
    for cycle in range(5000):
        readings = [
            Reading(f"meter-{uuid.uuid4().hex}", cycle * 100 + j, {Quantity.ENERGY_IMPORT: Measurement(Decimal(cycle))})
            for j in range(20)
        ]
        try:
            await ob.commit_cycle(cycle, readings)
        except OutboxFullError:
            return committed
        committed += len(readings)
    raise AssertionError("the disk never filled")


async def _check_full_disk_behaviour(ob: Outbox) -> None:
    committed = await _fill_until_full(ob)
    st = await ob.stats()
    assert st.readings == committed == st.readings_committed  # the failed cycle left nothing
    assert ob.health.full_errors >= 1
    # the writer keeps working for what fits: status rows, and, once space is
    # freed by acks, new cycles together with the storage_full alarm
    freed = 0
    seen: list[int] = []
    failures = 0

    async def retried(op):  # type: ignore[no-untyped-def]
        # the uplink's way: a failed batch/ack is simply tried again later
        nonlocal failures
        for _ in range(3):
            try:
                return await op()
            except OutboxFullError:
                failures += 1
        raise AssertionError("batching/acks never recovered on a full disk")

    while freed < committed // 2:
        b = await retried(lambda: ob.next_batch(1, exclude=seen, max_records=200))
        assert b is not None
        seen.append(b.seq)
        freed += await retried(lambda: ob.ack(b.seq))  # noqa: B023
    assert failures <= 4
    await ob.commit_cycle(9, [Reading("after", 9, {Quantity.ENERGY_IMPORT: Measurement(Decimal(1))})])
    b = await ob.next_batch(10, exclude=seen)
    assert b is not None and any(r.body.get("type") == "storage_full" for r in b.records)


async def test_full_disk_rolls_back_and_alarms_on_a_real_small_filesystem(small_fs: Path) -> None:
    policy = StoragePolicy(max_bytes=1 << 40, reserve_bytes=0, ballast_bytes=64 * 1024)
    ob = await Outbox.open(small_fs / "gw.db", policy=policy)
    assert ob.ballast.exists()
    try:
        await _check_full_disk_behaviour(ob)
    finally:
        await ob.close()


async def test_full_database_via_max_page_count(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "gw.db", policy=StoragePolicy(max_bytes=1 << 40, reserve_bytes=0))
    try:
        await ob._db.execute("PRAGMA max_page_count = 120")
        await _check_full_disk_behaviour(ob)
    finally:
        await ob.close()


async def test_a_wrong_storage_key_is_refused_not_treated_as_damage(tmp_path: Path) -> None:
    from store_forward.outbox import OutboxError
    from store_forward.storage_keys import StorageKeys

    path = tmp_path / "gw.db"
    ob = await Outbox.open(path)
    await ob.add_event(1, {"type": "x"})
    await ob.close()
    with pytest.raises(OutboxError, match="not the key"):
        await Outbox.open(path, keys=StorageKeys(1, {1: os.urandom(32)}, "wrong"))
    ob = await Outbox.open(path)  # the right key still opens everything
    try:
        assert (await ob.stats()).records == 1
        b = await ob.next_batch(2)
        assert b is not None and b.records[0].body == {"type": "x"}
    finally:
        await ob.close()
