"""Power loss: the gateway's keystore and database on a filesystem that forgets.

tests/harness/powerfs.py is a FUSE filesystem that keeps, at a power cut,
only what was fsynced (files) and what was made durable by an fsync of its
directory (names); the ``reorder`` mode keeps a random part of the rest as a
disk cache might. SIGKILL cannot show a missing fsync (the page cache
survives it); this can.

* The harness first shows it is not vacuous: data written without fsync is
  lost, with fsync kept; a name not made durable by its directory's fsync is
  lost; SQLite with ``synchronous=OFF`` loses commits that ``FULL`` keeps.
* Then the real daemon runs on it (tests/chaos/site.py: prepaid accounts,
  signed top-ups, Modbus TCP and DL/T 645 meters, mosquitto and the headend),
  the power is cut at random moments (the daemon frozen at that instant, the
  unsynced state dropped, the daemon killed), the filesystem "reboots" from
  its durable state and the daemon starts again. The same invariants as the
  SIGKILL runs must hold.
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chaos.site import ChaosSite, check, until
from tests.harness.powerfs import BLOCK, Model, PowerFS, fsync_tree, fuse_unavailable


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: power loss cannot be simulated here")
    why = fuse_unavailable()
    if why is not None:
        pytest.fail(why, pytrace=False)


@pytest.fixture
def powerfs(tmp_path: Path, fuse: None) -> Iterator[PowerFS]:
    fs = PowerFS(tmp_path / "disk", tmp_path / "mnt", seed=int.from_bytes(os.urandom(4)))
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


# -- the model, without FUSE -------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 5 * BLOCK), st.binary(min_size=1, max_size=2 * BLOCK)),
        st.tuples(st.just("truncate"), st.integers(0, 6 * BLOCK), st.just(b"")),
        st.tuples(st.just("fsync"), st.just(0), st.just(b"")),
    ),
    max_size=25,
)


def apply(content: bytearray, op: tuple[str, int, bytes]) -> None:
    kind, off, data = op
    if kind == "write":
        if len(content) < off:
            content.extend(bytes(off - len(content)))
        content[off : off + len(data)] = data
    elif kind == "truncate":
        del content[off:]
        content.extend(bytes(off - len(content)))


@settings(max_examples=60, deadline=None)
@given(ops=ops, mode=st.sampled_from(["drop", "reorder"]), seed=st.integers(0, 2**16))
def test_model_keeps_exactly_what_was_synced(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, bytes]], mode: str, seed: int) -> None:
    """After a cut, a file holds exactly its last synced bytes (``drop``); with
    ``reorder`` some unsynced writes may have reached the disk, but no byte is
    ever one that was neither synced nor written (or zero)."""
    backing = tmp_path_factory.mktemp("disk")
    m = Model(backing)
    f = m.create(1, b"f", 0o600)
    m.fsync_dir(1)
    live, synced = bytearray(), bytearray()
    for op in ops:
        if op[0] == "fsync":
            m.fsync(f.ino)
            synced = bytearray(live)
            continue
        apply(live, op)
        if op[0] == "write":
            m.write(f.ino, op[1], op[2])
        else:
            m.truncate(f.ino, op[1])
        assert m.read(f.ino, 0, 1 << 20) == bytes(live)
    m.cut(mode, random.Random(seed))
    m.close()
    after = Model(backing)
    got = after.read(after.lookup(1, b"f").ino, 0, 1 << 20)
    after.close()
    if mode == "drop":
        assert got == bytes(synced)
        return
    # reorder: every byte is the synced one, the written one or zero; nothing invented
    for i, byte in enumerate(got):
        allowed = {0, synced[i] if i < len(synced) else 0, live[i] if i < len(live) else 0}
        assert byte in allowed, f"byte {i} is {byte}, neither synced, written nor zero"


# -- the filesystem: it catches a missing fsync --------------------------------------


def test_powerfs_loses_what_was_not_synced_and_keeps_what_was(powerfs: PowerFS) -> None:
    m = powerfs.mountpoint
    (m / "lost.txt").write_bytes(b"written, never synced")
    fd = os.open(m / "kept.txt", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"synced")
    os.fsync(fd)
    os.close(fd)
    (m / "db").mkdir()
    fsync_path(m)  # the three names are durable now; only kept.txt's data is
    fd = os.open(m / "orphan.txt", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"data synced, name not")
    os.fsync(fd)
    os.close(fd)
    os.rename(m / "kept.txt", m / "renamed.txt")  # directory not synced again
    # SQLite (in a directory of its own: a new WAL gets its directory fsynced):
    # synchronous=FULL commits survive; synchronous=OFF ones need not
    db = sqlite3.connect(m / "db" / "t.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (v TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [("full",)] * 20)
    db.execute("PRAGMA synchronous=OFF")
    for _ in range(20):
        db.execute("INSERT INTO t VALUES ('off')")
    assert db.execute("SELECT count(*) FROM t").fetchone() == (40,)
    report = powerfs.cut("drop")
    with pytest.raises(sqlite3.OperationalError):  # the disk is gone
        db.execute("INSERT INTO t VALUES ('after')")
    db.close()
    powerfs.reboot()
    names = sorted(os.listdir(m))
    assert names == ["db", "kept.txt", "lost.txt"], names
    assert (m / "lost.txt").read_bytes() == b""
    assert (m / "kept.txt").read_bytes() == b"synced"
    db = sqlite3.connect(m / "db" / "t.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT v, count(*) FROM t GROUP BY v").fetchall() == [("full", 20)]
    finally:
        db.close()
    assert report["unsynced_files"] >= 2 and report["unsynced_names"] >= 2, report


# -- the daemon on it ---------------------------------------------------------------


async def power_loss_run(tmp_path: Path, fs: PowerFS, *, cuts: int, seed: int) -> None:
    rng = random.Random(seed)
    state = fs.mountpoint / "var-lib-edgegw"
    state.mkdir()
    fsync_tree(fs.mountpoint)  # the installer made the state directory, durably
    async with ChaosSite(tmp_path, state, seed=seed) as site:
        site.provision()  # `edgegw keys init` on the gateway's own disk
        site.start_headend()
        site.start_central()
        for i in range(cuts):
            site.daemon.start()
            await site.daemon_past_imports()  # a cut during imports finds nothing to lose
            await site.chaos_window(rng.uniform(0.5, 2.5) if rng.random() < 0.2 else rng.uniform(2.0, 5.0))
            assert site.daemon.exited() is None, site.daemon.tail()
            site.daemon.freeze()  # the instant of the cut: nothing more happens in the gateway
            fs.cut("drop" if i % 2 == 0 else "reorder")
            site.daemon.kill()
            fs.reboot()
        await until(lambda: site.central.sales != [], 5, "central sold something")
        await site.settle_and_drain()
        findings = check(site)
    print(findings, fs.reports)
    assert not findings.problems, "\n".join(findings.problems)
    assert findings.readings > 0 and findings.debits > 0 and findings.credits > 0, findings
    # the cuts threw real writes away (the gateway was busy, not idle)
    assert sum(r["unsynced_blocks"] for r in fs.reports) > 0, fs.reports


async def test_power_cuts_keep_readings_money_and_relays_exact(tmp_path: Path, powerfs: PowerFS) -> None:
    await power_loss_run(tmp_path, powerfs, cuts=4, seed=int.from_bytes(os.urandom(4)))


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_power_cuts_long(tmp_path: Path, powerfs: PowerFS) -> None:
    await power_loss_run(tmp_path, powerfs, cuts=60, seed=int.from_bytes(os.urandom(4)))
