"""The reserve file follows the size of the site, and the write-ahead log's
checkpoint follows the reserve actually in place (store_forward.storage_policy
``reserve_for``, store_forward.database ``ensure_reserve``)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.config import load_config
from gateway.storage_setup import storage_policy
from store_forward.outbox import Outbox, StoragePolicy
from store_forward.storage_policy import RESERVE_MAX_BYTES, RESERVE_MIN_BYTES, reserve_for
from tests.harness.fixtures import small_tmpfs
from tests.harness.site import bus, free_port, gateway_config, meter

KIB = 1024


@given(st.integers(min_value=0, max_value=100_000), st.integers(min_value=0, max_value=100_000))
def test_the_reserve_grows_with_the_meters_within_its_bounds(a: int, b: int) -> None:
    small, large = sorted((a, b))
    assert RESERVE_MIN_BYTES <= reserve_for(small) <= reserve_for(large) <= RESERVE_MAX_BYTES


def test_small_sites_keep_two_mib_and_a_thousand_meters_get_sixteen() -> None:
    assert reserve_for(1) == reserve_for(128) == 2 * 1024 * KIB
    assert reserve_for(1000) == 16_000 * KIB
    assert reserve_for(5000) == 16 * 1024 * KIB


def test_the_daemon_policy_takes_the_reserve_from_the_configured_meters(tmp_path: Path) -> None:
    def site(name: str, n: int) -> Path:
        (tmp_path / name).mkdir()
        meters = [meter(f"m{i}", unit=i % 200 + 1, bus=f"lan{i // 200}") for i in range(n)]
        buses = [bus(free_port(), name=f"lan{b}") for b in range((n + 199) // 200)]
        return gateway_config(tmp_path / name, "gw-r", buses=buses, meters=meters)

    assert storage_policy(load_config(site("few", 3))).ballast_bytes == 2 * 1024 * KIB
    assert storage_policy(load_config(site("many", 600))).ballast_bytes == 600 * 16 * KIB


async def _autocheckpoint(ob: Outbox) -> int:
    db: Any = ob._db  # the outbox's one connection: the setting is per connection
    rows = list(await db.execute_fetchall("PRAGMA wal_autocheckpoint"))
    return int(rows[0][0])


async def _cycles(ob: Outbox, n: int, start: int = 0) -> None:
    for c in range(start, start + n):
        readings = [
            Reading(f"m{j}", c * 1000 + j, {Quantity.ENERGY_IMPORT: Measurement(Decimal(c * 7 + j))})
            for j in range(20)
        ]
        await ob.commit_cycle(c * 1000, readings)


async def test_the_log_stays_within_half_the_reserve(tmp_path: Path) -> None:
    reserve = 256 * KIB
    ob = await Outbox.open(tmp_path / "gw.db", policy=StoragePolicy(ballast_bytes=reserve))
    try:
        assert ob.ballast.stat().st_size == reserve
        assert await _autocheckpoint(ob) == reserve // 2 // KIB  # 1 KiB pages
        largest = 0
        for k in range(30):
            await _cycles(ob, 10, 10 * k)
            largest = max(largest, (tmp_path / "gw.db-wal").stat().st_size)
        # checkpointed at half the reserve, and cut back to it (one commit's frames over)
        assert 0 < largest <= reserve // 2 + 64 * KIB
    finally:
        await ob.close()


async def test_a_site_that_grew_gets_the_larger_reserve_and_a_longer_log(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ob = await Outbox.open(path, policy=StoragePolicy(ballast_bytes=128 * KIB))
    await ob.close()
    assert ob.ballast.stat().st_size == 128 * KIB
    ob = await Outbox.open(path, policy=StoragePolicy(ballast_bytes=1024 * KIB))
    try:
        assert ob.ballast.stat().st_size == 1024 * KIB
        assert await _autocheckpoint(ob) == 512
    finally:
        await ob.close()


async def test_a_reserve_the_disk_has_no_room_to_grow_keeps_the_log_within_it(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "3m") as mnt:
        path = mnt / "gw.db"
        ob = await Outbox.open(path, policy=StoragePolicy(ballast_bytes=256 * KIB))
        await ob.close()
        # 2 MiB needs 8 MiB free: the 256 KiB reserve stays, and the log follows it
        ob = await Outbox.open(path, policy=StoragePolicy(ballast_bytes=2048 * KIB))
        try:
            assert ob.ballast.stat().st_size == 256 * KIB
            assert not ob.reserve_released
            assert await _autocheckpoint(ob) == 128
            await _cycles(ob, 60)
            assert (mnt / "gw.db-wal").stat().st_size <= 128 * KIB + 64 * KIB
        finally:
            await ob.close()
