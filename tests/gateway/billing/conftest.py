"""Shared fixtures of the billing tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from gateway.billing import ledger_store as ls


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    """A real SQLite file with the ledger's tables."""
    async with aiosqlite.connect(tmp_path / "billing.db") as c:
        await ls.init_schema(c)
        await c.commit()
        yield c
