"""Fixtures for the security tests: a central signer per role and a gateway database."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.security.envelope import (
    CommandResult,
    Outcome,
    create_schema,
    process_command,
    sign_command,
)
from gateway.security.roles import COMMAND_ROLE, CentralKey, CommandType, Role, TrustStore

GATEWAY = "gw-0001"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000


def raw_public(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def topup_body(
    amount_micro: int = 50_000_000, pc: int = 1, channel: str = "mobile_app"
) -> dict[str, Any]:
    return {
        "account": "acct-17",
        "amount_micro": amount_micro,
        "purchase_counter": pc,
        "payment_channel": channel,
    }


@dataclass
class Central:
    """Central's signing side: one key per role, a counter per key."""

    keys: dict[Role, Ed25519PrivateKey] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        for role in Role:
            self.keys[role] = Ed25519PrivateKey.generate()

    @staticmethod
    def key_id(role: Role) -> str:
        return f"{role.value}-k1"

    def trust(self) -> TrustStore:
        return TrustStore.of(
            CentralKey(self.key_id(r), r, raw_public(k)) for r, k in self.keys.items()
        )

    def cmd(
        self,
        type: CommandType,
        body: Mapping[str, Any] | None = None,
        *,
        target: str = GATEWAY,
        role: Role | None = None,
        key: Ed25519PrivateKey | None = None,
        issuer: str | None = None,
        counter: int | None = None,
        command_id: str | None = None,
        issued_at: int = T0,
        expires_at: int | None = None,
    ) -> bytes:
        role = role or COMMAND_ROLE[type]
        issuer = issuer or self.key_id(role)
        if counter is None:
            counter = self.counters.get(issuer, 0) + 1
        self.counters[issuer] = max(self.counters.get(issuer, 0), counter)
        if body is None:
            body = topup_body() if type is CommandType.TOPUP else {}
        return sign_command(
            key or self.keys[role],
            issuer=issuer,
            target=target,
            command_id=command_id or f"cmd-{next(self.ids)}",
            counter=counter,
            issued_at_ms=issued_at,
            expires_at_ms=expires_at if expires_at is not None else issued_at + HOUR,
            type=type,
            body=body,
        )


BALANCE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS test_balance (account TEXT PRIMARY KEY, micro INTEGER NOT NULL)"
)


class GatewayDB:
    """The daemon's side: one writer connection, one transaction per command.

    A top-up that comes back APPLIED is credited in the same transaction,
    the way the ledger will do it, so the tests can check balance-relevant
    state as well as the security tables.
    """

    def __init__(self, path: Path, trust: TrustStore) -> None:
        self.path = path
        self.trust = trust
        self.conn: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self.conn = await aiosqlite.connect(self.path)
        await self.conn.execute("PRAGMA journal_mode=WAL")
        await self.conn.execute("PRAGMA synchronous=FULL")
        await create_schema(self.conn)
        await self.conn.execute(BALANCE_SCHEMA)
        await self.conn.commit()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    async def reboot(self) -> None:
        await self.close()
        await self.open()

    async def process(
        self, raw: bytes, now_ms: int = T0 + 1000, gateway_id: str = GATEWAY, channel: str = "mqtt"
    ) -> CommandResult:
        assert self.conn is not None
        result = await process_command(
            self.conn, raw, trust=self.trust, gateway_id=gateway_id, now_ms=now_ms, channel=channel
        )
        if result.outcome is Outcome.APPLIED and result.envelope is not None:
            env = result.envelope
            if env.type is CommandType.TOPUP:
                await self.conn.execute(
                    "INSERT INTO test_balance (account, micro) VALUES (?, ?) "
                    "ON CONFLICT(account) DO UPDATE SET micro = micro + excluded.micro",
                    (env.body["account"], env.body["amount_micro"]),
                )
        await self.conn.commit()
        return result

    async def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table that a command can change."""
        assert self.conn is not None
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in (
            "sec_counter_floor",
            "sec_seen_command",
            "sec_central_key",
            "sec_revoked_key",
            "test_balance",
        ):
            async with self.conn.execute(f"SELECT * FROM {table} ORDER BY 1") as cur:
                out[table] = [tuple(r) for r in await cur.fetchall()]
        return out

    async def balance(self, account: str = "acct-17") -> int:
        assert self.conn is not None
        async with self.conn.execute(
            "SELECT micro FROM test_balance WHERE account = ?", (account,)
        ) as cur:
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    async def floor(self, issuer: str) -> int | None:
        assert self.conn is not None
        async with self.conn.execute(
            "SELECT floor FROM sec_counter_floor WHERE issuer = ?", (issuer,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])


@pytest.fixture
def central() -> Central:
    return Central()


@pytest.fixture
async def gw(tmp_path: Path, central: Central) -> AsyncIterator[GatewayDB]:
    db = GatewayDB(tmp_path / "gateway.db", central.trust())
    await db.open()
    yield db
    await db.close()
