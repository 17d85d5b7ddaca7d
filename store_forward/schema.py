"""The database's schema: every table declared once, migrated by ``user_version``.

Each module that keeps tables in the gateway's database declares them as a
:class:`Schema`: numbered :class:`Step` s, each bringing the database from
version ``n - 1`` to ``n`` (creating tables, adding a column, moving rows).
A :class:`SchemaRegistry` puts the schemas of one database together; opening
the database (:class:`store_forward.database.Database`) reads SQLite's
``PRAGMA user_version`` and runs the steps above it, all in the one
transaction that also sets the new ``user_version``: a database is at one
version or the next, never in between.

Version numbers are global to a database, so the steps of every module form
one history: a version is a release's change to the schema, and each module
declares its own part of it (several modules may declare steps of one
version: they run in the registry's order). A new step takes the next free
number, in the module whose tables it changes, and is never edited once
released (a database written by the release has run it). The gateway's history is
:data:`gateway.database.SCHEMA`; docs/architecture.md lists it.

A database whose version is newer than the newest step the code knows was
written by a later release: it is refused (:class:`SchemaTooNew`) before
anything is written to it, so an older program never runs on tables it does
not understand. One older than the registry can migrate is refused too
(:class:`SchemaTooOld`).

Steps are plain SQL statements (run one by one: a script would commit the
transaction) or a function of the connection, for changes that depend on
what is there (a column that an earlier program may already have added).
Every step that creates a table says ``IF NOT EXISTS``: databases written
before the registry existed already hold some of the tables, created by the
module that used them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import aiosqlite

from firmware_bridge.errors import EdgeGwError, ErrorKind

log = logging.getLogger(__name__)

Apply = Callable[[aiosqlite.Connection], Awaitable[None]]


class SchemaError(EdgeGwError):
    """The database's schema version is one this program cannot work with."""

    kind = ErrorKind.UNSUPPORTED


class SchemaTooNew(SchemaError):
    """The database was written by a newer release than this program."""


class SchemaTooOld(SchemaError):
    """The database is older than any version this program can migrate."""


@dataclass(frozen=True)
class Step:
    """One migration: brings the database to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...] = ()
    apply: Apply | None = None

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"schema step {self.description!r}: version {self.version} is below 1")
        if not self.statements and self.apply is None:
            raise ValueError(f"schema step {self.version}: neither statements nor a function")

    async def run(self, conn: aiosqlite.Connection) -> None:
        for stmt in self.statements:
            await conn.execute(stmt)
        if self.apply is not None:
            await self.apply(conn)


def statements(script: str) -> tuple[str, ...]:
    """The statements of a script of ``CREATE TABLE``/``CREATE INDEX`` statements
    (no semicolons inside them), one per element."""
    return tuple(s.strip() for s in script.split(";") if s.strip())


class Schema:
    """The tables of one module: its steps, in version order."""

    def __init__(self, owner: str, *steps: Step) -> None:
        if not steps:
            raise ValueError(f"schema {owner}: no steps")
        versions = [s.version for s in steps]
        if versions != sorted(set(versions)):
            raise ValueError(f"schema {owner}: step versions {versions} are not increasing")
        self.owner = owner
        self.steps = steps

    def __repr__(self) -> str:
        return f"Schema({self.owner!r}, versions {[s.version for s in self.steps]})"

    async def create(self, conn: aiosqlite.Connection) -> None:
        """Run this module's steps on a connection of its own (a module's tests and
        tools that use its tables alone); databases a registry owns are migrated by
        :meth:`SchemaRegistry.migrate` instead. Every step must be repeatable."""
        for step in self.steps:
            await step.run(conn)


@dataclass(frozen=True)
class Migration:
    """What opening did to the schema: from one version to another, by these steps."""

    from_version: int
    to_version: int
    steps: tuple[Step, ...]

    @property
    def done(self) -> bool:
        return bool(self.steps)


class SchemaRegistry:
    """The schemas of one database, as one history of versions.

    ``oldest`` is the lowest version a database already holding ``marker`` (a
    table) may have to be migrated; below it (an earlier, incompatible format)
    it is refused. A database without ``marker`` is new, whatever its version.
    ``dense``: the versions must run 1 or ``oldest`` up to the newest without a
    gap (the history of a whole database; a registry of a few of its modules,
    for tests and tools, need not be).
    """

    def __init__(
        self,
        schemas: Iterable[Schema],
        *,
        oldest: int = 0,
        marker: str | None = None,
        dense: bool = True,
    ) -> None:
        self.schemas = tuple(schemas)
        owners = [schema.owner for schema in self.schemas]
        if len(set(owners)) != len(owners):
            raise ValueError(f"a schema is registered twice: {owners}")
        steps: dict[int, list[tuple[Schema, Step]]] = {}
        for schema in self.schemas:
            for step in schema.steps:
                steps.setdefault(step.version, []).append((schema, step))
        if not steps:
            raise ValueError("a schema registry needs at least one step")
        self._steps = dict(sorted(steps.items()))
        self.oldest = oldest
        self.marker = marker
        if dense:
            first = min(self._steps)
            expected = list(range(first, first + len(self._steps)))
            if list(self._steps) != expected:
                missing = sorted(set(range(first, max(self._steps) + 1)) - set(self._steps))
                raise ValueError(f"schema versions have gaps: {missing} missing")

    @property
    def version(self) -> int:
        """The newest version this registry knows (what it migrates a database to)."""
        return max(self._steps)

    def steps(self) -> Sequence[tuple[str, Step]]:
        """(owner, step) for every step, in the order they run."""
        return [(schema.owner, step) for at in self._steps.values() for schema, step in at]

    def pending(self, version: int) -> tuple[Step, ...]:
        """The steps a database at ``version`` lacks, in the order they run."""
        return tuple(step for v, at in self._steps.items() if v > version for _, step in at)

    async def version_of(self, conn: aiosqlite.Connection) -> int:
        async with conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def check(self, conn: aiosqlite.Connection, *, name: str = "database") -> int:
        """The database's version, if this registry can work with it (reads only).
        Raises :class:`SchemaTooNew` or :class:`SchemaTooOld`."""
        version = await self.version_of(conn)
        if version > self.version:
            raise SchemaTooNew(
                f"{name}: schema version {version} was written by a newer release of the"
                f" gateway (this one knows versions up to {self.version}); refusing to use it."
                " Run the release that wrote it, or restore a backup made by this one"
            )
        if version < self.oldest and self.marker is not None and await _has_table(conn, self.marker):
            raise SchemaTooOld(
                f"{name}: schema version {version}, this gateway needs {self.oldest} or later"
                " (drain it with the version that wrote it)"
            )
        return version

    async def migrate(self, conn: aiosqlite.Connection, *, name: str = "database") -> Migration:
        """Bring the database to :attr:`version` inside the caller's transaction.

        The caller has begun a write transaction and commits it: the steps and
        the new ``user_version`` take effect together or not at all. Raises
        :class:`SchemaTooNew`/:class:`SchemaTooOld` (nothing written)."""
        version = await self.check(conn, name=name)
        pending = self.pending(version)
        for step in pending:
            await step.run(conn)
        if pending:
            await conn.execute(f"PRAGMA user_version={self.version}")
            log.info(
                "%s: schema migrated from version %d to %d (%s)",
                name,
                version,
                self.version,
                "; ".join(f"{s.version}: {s.description}" for s in pending),
            )
        return Migration(version, self.version if pending else version, pending)


async def _has_table(conn: aiosqlite.Connection, table: str) -> bool:
    async with conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ) as cur:
        row = await cur.fetchone()
    return bool(row and row[0])
