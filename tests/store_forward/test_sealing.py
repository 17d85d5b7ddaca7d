"""Encryption at rest: round trip, tamper and swap detection, key files,
epoch recovery rules, and nonce uniqueness across SIGKILL."""

from __future__ import annotations

import os
import random
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from store_forward.sealing import (
    BLOB_OVERHEAD,
    MAX_EPOCH,
    EpochError,
    FileEpochStore,
    NonceExhaustedError,
    NonceSequence,
    SealingError,
    SqliteEpochStore,
    StorageKeyError,
    StorageSealer,
    UnsealError,
    acquire_epoch,
    create_storage_key,
    key_tag,
    load_storage_key,
)

REPO = Path(__file__).resolve().parents[2]


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    return create_storage_key(tmp_path / "storage.key")


@pytest.fixture
def stores(tmp_path: Path) -> tuple[FileEpochStore, SqliteEpochStore]:
    return FileEpochStore(tmp_path / "outbox.epoch"), SqliteEpochStore(connect(tmp_path / "o.db"))


# --------------------------------------------------------------------------- sealing


def test_round_trip_and_blob_layout(
    key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore]
) -> None:
    sealer = StorageSealer.open(key, stores, new_key=True)
    payloads = [b"", b"x", os.urandom(5000)]
    blobs = [sealer.seal(i, "reading", p) for i, p in enumerate(payloads, start=1)]
    for i, (p, blob) in enumerate(zip(payloads, blobs, strict=True), start=1):
        assert len(blob) == len(p) + BLOB_OVERHEAD
        assert blob[0] == 1
        assert StorageSealer.epoch_of(blob) == sealer.epoch == 1
        assert sealer.unseal(i, "reading", blob) == p
        if len(p) >= 16:
            # A short plaintext can appear in random ciphertext by chance
            # (one byte does so in about one blob in seven); 16 bytes cannot.
            assert p not in blob
    assert [StorageSealer.nonce_of(b)[4:] for b in blobs] == [
        n.to_bytes(8, "big") for n in range(3)
    ]


def test_any_changed_byte_is_detected(
    key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore]
) -> None:
    sealer = StorageSealer.open(key, stores, new_key=True)
    blob = sealer.seal(7, "charge", b'{"micro_yuan": 1000}')
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x04
        with pytest.raises(UnsealError):
            sealer.unseal(7, "charge", bytes(bad))
    for n in range(len(blob)):
        with pytest.raises(UnsealError):
            sealer.unseal(7, "charge", blob[:n])


def test_blobs_cannot_move_between_rows_or_classes(
    key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore]
) -> None:
    sealer = StorageSealer.open(key, stores, new_key=True)
    a = sealer.seal(1, "reading", b"reading one")
    b = sealer.seal(2, "reading", b"reading two")
    with pytest.raises(UnsealError):
        sealer.unseal(2, "reading", a)
    with pytest.raises(UnsealError):
        sealer.unseal(1, "reading", b)
    with pytest.raises(UnsealError):
        sealer.unseal(1, "charge", a)
    other = StorageSealer(os.urandom(32), NonceSequence(1))
    with pytest.raises(UnsealError):
        other.unseal(1, "reading", a)


@pytest.mark.parametrize(
    ("record_id", "record_class"),
    [(2**63, "reading"), (1.0, "reading"), (1, ""), (1, "x" * 256), (1, "\ud800"), (1, None)],
)
def test_bad_record_identity_is_refused(
    key: bytes,
    stores: tuple[FileEpochStore, SqliteEpochStore],
    record_id: object,
    record_class: object,
) -> None:
    sealer = StorageSealer.open(key, stores, new_key=True)
    with pytest.raises(SealingError):
        sealer.seal(record_id, record_class, b"x")  # type: ignore[arg-type]
    assert sealer.seal(-(2**63), "é" * 127, b"x")  # extremes that are valid


def test_nonces_unique_under_threads() -> None:
    seq = NonceSequence(9)
    seen: list[bytes] = []
    lock = threading.Lock()

    def work() -> None:
        local = [seq.next() for _ in range(2000)]
        with lock:
            seen.extend(local)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(seen) == len(set(seen)) == 8000
    assert {n[:4] for n in seen} == {(9).to_bytes(4, "big")}


def test_counter_exhaustion_refuses() -> None:
    seq = NonceSequence(1, start=2**64 - 1)
    assert seq.next()[4:] == b"\xff" * 8
    with pytest.raises(NonceExhaustedError):
        seq.next()


# --------------------------------------------------------------------------- key files


def test_key_file_is_private_atomic_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "k" / "storage.key"
    path.parent.mkdir()
    key = create_storage_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_storage_key(path) == key
    with pytest.raises(StorageKeyError, match="exists"):
        create_storage_key(path)
    assert load_storage_key(path) == key
    assert sorted(p.name for p in path.parent.iterdir()) == ["storage.key"]


def test_key_file_refusals(tmp_path: Path) -> None:
    path = tmp_path / "storage.key"
    with pytest.raises(StorageKeyError, match="does not exist"):
        load_storage_key(path)
    create_storage_key(path)
    data = path.read_bytes()
    path.chmod(0o644)
    with pytest.raises(StorageKeyError, match="0644"):
        load_storage_key(path)
    path.chmod(0o600)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(StorageKeyError, match="damaged"):
        load_storage_key(path)
    path.write_bytes(data[:20])
    with pytest.raises(StorageKeyError):
        load_storage_key(path)


# --------------------------------------------------------------------------- epochs


def test_epoch_is_durable_before_first_use(
    key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore], tmp_path: Path
) -> None:
    first = StorageSealer.open(key, stores, new_key=True)
    second = StorageSealer.open(key, stores)
    assert (first.epoch, second.epoch) == (1, 2)
    # Before either seals anything, both stores already hold epoch 2.
    assert FileEpochStore(tmp_path / "outbox.epoch").read(key_tag(key)) == 2
    fresh = SqliteEpochStore(connect(tmp_path / "o.db"))
    with fresh.lock():
        assert fresh.read(key_tag(key)) == 2


def test_lost_or_corrupt_epoch_file_continues_from_database(
    key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore]
) -> None:
    file_store, _ = stores
    for _ in range(3):
        acquire_epoch(key, stores, new_key=True)
    file_store.path.unlink()
    assert acquire_epoch(key, stores) == 4
    file_store.path.write_bytes(os.urandom(25))
    assert acquire_epoch(key, stores) == 5
    file_store.path.write_bytes(b"")
    assert acquire_epoch(key, stores) == 6
    assert file_store.read(key_tag(key)) == 6  # repaired


def test_lost_database_row_continues_from_file(
    key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore]
) -> None:
    _, db_store = stores
    acquire_epoch(key, stores, new_key=True)
    acquire_epoch(key, stores)
    db_store.conn.execute(f"DELETE FROM {SqliteEpochStore.TABLE}")
    db_store.conn.commit()
    assert acquire_epoch(key, stores) == 3


def test_everything_lost_refuses_unless_key_is_new(
    key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore]
) -> None:
    file_store, db_store = stores
    acquire_epoch(key, stores, new_key=True)
    file_store.path.write_bytes(b"garbage")
    db_store.conn.execute(f"DROP TABLE {SqliteEpochStore.TABLE}")
    db_store.conn.commit()
    with pytest.raises(EpochError, match="refusing"):
        acquire_epoch(key, stores)
    with pytest.raises(EpochError, match="refusing"):
        StorageSealer.open(key, stores)
    new = os.urandom(32)
    assert acquire_epoch(new, stores, new_key=True) == 1
    assert acquire_epoch(new, stores) == 2


def test_file_store_alone_corrupt_refuses(key: bytes, tmp_path: Path) -> None:
    only = [FileEpochStore(tmp_path / "e")]
    acquire_epoch(key, only, new_key=True)
    raw = only[0].path.read_bytes()
    only[0].path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # always a different byte
    with pytest.raises(EpochError, match="corrupt"):
        acquire_epoch(key, only)


def test_epochs_are_per_key(key: bytes, stores: tuple[FileEpochStore, SqliteEpochStore]) -> None:
    assert acquire_epoch(key, stores, new_key=True) == 1
    assert acquire_epoch(key, stores) == 2
    other = os.urandom(32)
    assert acquire_epoch(other, stores, new_key=True) == 1
    # The file now names the other key; the database still carries ours.
    assert acquire_epoch(key, stores) == 3


def test_epoch_exhaustion_refuses(key: bytes, tmp_path: Path) -> None:
    store = FileEpochStore(tmp_path / "e")
    store.write(key_tag(key), MAX_EPOCH)
    with pytest.raises(EpochError, match="exhausted"):
        acquire_epoch(key, [store])


def test_database_store_requires_full_sync(key: bytes, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "n.db")
    conn.execute("PRAGMA synchronous=NORMAL")
    with pytest.raises(EpochError, match="synchronous=FULL"):
        acquire_epoch(key, [SqliteEpochStore(conn)], new_key=True)


def test_concurrent_acquisitions_get_distinct_epochs(key: bytes, tmp_path: Path) -> None:
    acquire_epoch(key, [FileEpochStore(tmp_path / "e")], new_key=True)
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            e = acquire_epoch(key, [FileEpochStore(tmp_path / "e")])
            with lock:
                got.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == list(range(2, 32))


# --------------------------------------------------------------------------- SIGKILL

CHILD = textwrap.dedent(
    """
    import os, random, sqlite3, sys, time
    from store_forward.sealing import (
        FileEpochStore, SqliteEpochStore, StorageSealer, load_storage_key,
    )
    base = sys.argv[1]
    rnd = random.Random(int(sys.argv[2]))
    conn = sqlite3.connect(os.path.join(base, "outbox.db"))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, cls TEXT NOT NULL, "
        "payload BLOB NOT NULL, blob BLOB NOT NULL)"
    )
    conn.commit()
    key = load_storage_key(os.path.join(base, "storage.key"))
    sealer = StorageSealer.open(
        key, [FileEpochStore(os.path.join(base, "outbox.epoch")), SqliteEpochStore(conn)]
    )
    print("ready", sealer.epoch, flush=True)
    (last,) = conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()
    deadline = time.monotonic() + 20
    for _ in range(200_000):
        if time.monotonic() > deadline:
            break
        with conn:
            for _ in range(rnd.randint(1, 20)):
                last += 1
                cls = rnd.choice(("reading", "event", "charge"))
                payload = os.urandom(rnd.randint(0, 64))
                conn.execute(
                    "INSERT INTO outbox VALUES (?, ?, ?, ?)",
                    (last, cls, payload, sealer.seal(last, cls, payload)),
                )
    print("done", flush=True)
    """
)


def _run_kill_cycles(tmp_path: Path, kills: int, seed: int) -> None:
    rnd = random.Random(seed)
    key = create_storage_key(tmp_path / "storage.key")
    conn = connect(tmp_path / "outbox.db")
    acquire_epoch(
        key, [FileEpochStore(tmp_path / "outbox.epoch"), SqliteEpochStore(conn)], new_key=True
    )
    conn.close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    epochs: list[int] = []
    killed_while_sealing = 0
    started = time.monotonic()
    for run in range(kills):
        assert time.monotonic() - started < 60 + kills * 5, "kill loop overran its time bound"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(seed * 1000 + run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            if rnd.random() < 0.25:
                # Anywhere from interpreter start through epoch acquisition.
                time.sleep(rnd.uniform(0.0, 0.4))
            else:
                assert child.stdout is not None
                ready, _, _ = select.select([child.stdout], [], [], 30)
                line = child.stdout.readline() if ready else "<no output within 30 s>"
                if not line.startswith("ready"):
                    child.kill()
                    _, err = child.communicate(timeout=10)
                    pytest.fail(f"child failed to start: {line!r} {err}")
                epochs.append(int(line.split()[1]))
                time.sleep(rnd.uniform(0.0, 0.3))
                killed_while_sealing += child.poll() is None
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL, f"run {run} ended by itself"

    assert epochs == sorted(set(epochs)), "an epoch was handed out twice"
    assert killed_while_sealing >= kills // 2
    conn = connect(tmp_path / "outbox.db")
    rows = conn.execute("SELECT id, cls, payload, blob FROM outbox").fetchall()
    assert len(rows) > kills, "the children sealed too little for the test to mean anything"
    nonces = [StorageSealer.nonce_of(blob) for _, _, _, blob in rows]
    assert len(set(nonces)) == len(nonces), "a nonce was reused"
    sealer = StorageSealer(key, NonceSequence(MAX_EPOCH))  # used to open only
    for rid, cls, payload, blob in rows:
        assert sealer.unseal(rid, cls, blob) == payload
    # Every epoch in use is at or below what each store now holds.
    used = max(StorageSealer.epoch_of(b) for *_, b in rows)
    (in_db,) = conn.execute(f"SELECT epoch FROM {SqliteEpochStore.TABLE}").fetchone()
    in_file = FileEpochStore(tmp_path / "outbox.epoch").read(key_tag(key))
    assert in_file is not None
    assert used <= in_db <= in_file <= in_db + 1


def test_nonces_unique_across_sigkill(tmp_path: Path) -> None:
    _run_kill_cycles(tmp_path, kills=20, seed=1)


@pytest.mark.long
def test_nonces_unique_across_many_sigkills(tmp_path: Path) -> None:
    _run_kill_cycles(tmp_path, kills=300, seed=2)


def test_database_store_in_autocommit_mode(key: bytes, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    store = SqliteEpochStore(conn)
    assert acquire_epoch(key, [store], new_key=True) == 1
    assert acquire_epoch(key, [store]) == 2
    assert not conn.in_transaction
    other = sqlite3.connect(tmp_path / "a.db")
    assert other.execute(f"SELECT epoch FROM {SqliteEpochStore.TABLE}").fetchone() == (2,)


def test_database_store_refuses_inside_a_transaction(key: bytes, tmp_path: Path) -> None:
    conn = connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE x (a)")
    conn.execute("INSERT INTO x VALUES (1)")
    assert conn.in_transaction
    with pytest.raises(EpochError, match="inside a transaction"):
        acquire_epoch(key, [SqliteEpochStore(conn)], new_key=True)
