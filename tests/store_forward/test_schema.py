"""The schema registry: user_version migrations, all-or-nothing, newer databases refused."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from store_forward.schema import (
    Schema,
    SchemaRegistry,
    SchemaTooNew,
    SchemaTooOld,
    Step,
    statements,
)

A = Schema(
    "a",
    Step(1, "table a", ("CREATE TABLE IF NOT EXISTS a (x INTEGER)",)),
    Step(3, "a.y", ("ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT 'old'",)),
)
B = Schema("b", Step(2, "table b", statements("CREATE TABLE IF NOT EXISTS b (k TEXT PRIMARY KEY);")))


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    async with aiosqlite.connect(tmp_path / "t.db", isolation_level=None) as c:
        yield c


async def migrate(conn: aiosqlite.Connection, registry: SchemaRegistry) -> tuple[int, int, int]:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        m = await registry.migrate(conn, name="t.db")
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return m.from_version, m.to_version, len(m.steps)


def tables(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as c:
        return sorted(c.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))


async def test_a_new_database_runs_every_step_in_version_order(conn: aiosqlite.Connection) -> None:
    registry = SchemaRegistry([A, B])
    assert [(o, s.version) for o, s in registry.steps()] == [("a", 1), ("b", 2), ("a", 3)]
    assert await migrate(conn, registry) == (0, 3, 3)
    assert await registry.version_of(conn) == 3
    await conn.execute("INSERT INTO a (x) VALUES (1)")
    async with conn.execute("SELECT x, y FROM a") as cur:
        assert await cur.fetchall() == [(1, "old")]
    assert await migrate(conn, registry) == (3, 3, 0)  # nothing pending


async def test_an_older_database_runs_only_the_steps_it_lacks(tmp_path: Path, conn: aiosqlite.Connection) -> None:
    await migrate(conn, SchemaRegistry([Schema("a", A.steps[0]), B]))
    await conn.execute("INSERT INTO a (x) VALUES (7)")
    assert await migrate(conn, SchemaRegistry([A, B])) == (2, 3, 1)
    async with conn.execute("SELECT x, y FROM a") as cur:
        assert await cur.fetchall() == [(7, "old")]


@pytest.mark.parametrize("upto", [1, 2])
async def test_step_by_step_and_all_at_once_give_the_same_schema(tmp_path: Path, upto: int) -> None:
    full = SchemaRegistry([A, B])
    for name, parts in (("once", [full]), ("steps", [_upto(full, upto), full])):
        async with aiosqlite.connect(tmp_path / f"{name}.db", isolation_level=None) as c:
            for registry in parts:
                await migrate(c, registry)
    assert tables(tmp_path / "once.db") == tables(tmp_path / "steps.db")


def _upto(registry: SchemaRegistry, version: int) -> SchemaRegistry:
    schemas = []
    for s in registry.schemas:
        steps = [st for st in s.steps if st.version <= version]
        if steps:
            schemas.append(Schema(s.owner, *steps))
    return SchemaRegistry(schemas)


async def test_a_failing_step_leaves_the_database_as_it_was(tmp_path: Path, conn: aiosqlite.Connection) -> None:
    await migrate(conn, SchemaRegistry([Schema("a", A.steps[0])]))
    broken = Schema("c", Step(2, "table c", ("CREATE TABLE c (k TEXT)",)), Step(3, "bad", ("CREATE TABLE c (k TEXT)",)))
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        await migrate(conn, SchemaRegistry([Schema("a", A.steps[0]), broken]))
    assert await SchemaRegistry([A], dense=False).version_of(conn) == 1
    assert [t for t, _ in tables(tmp_path / "t.db")] == ["a"]


async def test_a_database_newer_than_the_code_is_refused_untouched(tmp_path: Path, conn: aiosqlite.Connection) -> None:
    await migrate(conn, SchemaRegistry([A, B]))
    await conn.execute("PRAGMA user_version = 4")
    image = (tmp_path / "t.db").read_bytes()
    with pytest.raises(SchemaTooNew, match=r"t.db: schema version 4 was written by a newer release .* up to 3"):
        await migrate(conn, SchemaRegistry([A, B]))
    assert (tmp_path / "t.db").read_bytes() == image
    assert await SchemaRegistry([A, B]).version_of(conn) == 4


async def test_a_database_older_than_the_oldest_migratable_is_refused(conn: aiosqlite.Connection) -> None:
    registry = SchemaRegistry([B, Schema("a", A.steps[1])], oldest=2, marker="b", dense=True)
    await conn.execute("CREATE TABLE b (k TEXT PRIMARY KEY)")  # a database of the format before
    await conn.execute("PRAGMA user_version = 1")
    with pytest.raises(SchemaTooOld, match="schema version 1, this gateway needs 2 or later"):
        await migrate(conn, registry)


async def test_a_database_without_the_marker_is_new_whatever_its_version(conn: aiosqlite.Connection) -> None:
    registry = SchemaRegistry([B, Schema("t", Step(3, "t", ("CREATE TABLE IF NOT EXISTS t (v)",)))], oldest=2, marker="b")
    assert await migrate(conn, registry) == (0, 3, 2)


def test_registries_refuse_gaps_and_schemas_refuse_disorder() -> None:
    with pytest.raises(ValueError, match=r"gaps: \[2\] missing"):
        SchemaRegistry([A])
    SchemaRegistry([A], dense=False)  # a few modules of a database may leave gaps
    with pytest.raises(ValueError, match="not increasing"):
        Schema("x", Step(2, "two", ("SELECT 1",)), Step(1, "one", ("SELECT 1",)))
    with pytest.raises(ValueError, match="registered twice"):
        SchemaRegistry([B, B])
    with pytest.raises(ValueError, match="neither statements nor a function"):
        Step(1, "nothing")
    with pytest.raises(ValueError, match="below 1"):
        Step(0, "zero", ("SELECT 1",))


def test_the_gateway_history_is_whole_and_declares_every_table() -> None:
    """Every table the gateway's and the outbox's modules create is declared to the
    registry, in one history without gaps from version 2."""
    from gateway.database import SCHEMA

    versions = sorted({s.version for _, s in SCHEMA.steps()})
    assert versions == list(range(2, SCHEMA.version + 1))
    create = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)")
    declared = {m.group(1) for _, step in SCHEMA.steps() for st in step.statements if (m := create.search(st))}
    root = Path(__file__).resolve().parents[2]
    in_source = {
        name
        for package in ("gateway", "store_forward")
        for path in (root / package).rglob("*.py")
        for name in create.findall(path.read_text())
    }
    assert in_source, "the pattern finds the modules' tables"
    assert in_source <= declared, sorted(in_source - declared)
    assert {"outbox", "kv", "storage_nonce_epoch", "billing_entry", "audit_log", "risk_daily"} <= declared
