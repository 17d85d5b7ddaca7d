"""Central with its real parts for tests: the headend's ingest, the dispatcher, the HTTP API.

:class:`CentralStack` runs, in this process, on one database (a SQLite file
or a PostgreSQL DSN): the headend ingest (stores batches, applies the
gateways' command results), the dispatcher (publishes queued commands to
the broker) and the aiohttp application on a free loopback port (central's
API, and when asked the operator console with its forms on the queue), all on a
:class:`SimClock` a test moves forward by hours without waiting.
:func:`prepaid_site` writes a gateway configuration with one prepaid account
on a Modbus meter with a supply relay, trusting central's keys.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from gateway.billing import ledger_store as ls
from gateway.config import load_config
from gateway.daemon import Daemon
from headend.central import ApiRole, Central
from headend.central_db import CentralDB
from headend.central_desk import CentralDesk
from headend.console.app import ConsoleSettings
from headend.console.auth import Role, Users
from headend.console.db import ConsoleDb, open_console_db
from headend.dispatch import Dispatcher, Outgoing
from headend.ingest import Headend
from headend.signing import Signer, init_keys
from headend.store import HeadendDB, HeadendStore
from headend.web import build_app, serve
from tests.harness.site import DEV_UPLINK, gateway_config, meter, prepaid_account

GATEWAY = "gw-central"
ACCOUNT_ID = "acct-001"

class SimClock:
    """Real time plus an offset the test moves (the site's and central's clock)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def now(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms

    def advance(self, ms: int) -> None:
        self.offset_ms += ms


@dataclass(frozen=True)
class ClientTls:
    """The gateway's files for mutual TLS with the shipped broker configuration."""

    ca: Path
    cert: Path
    key: Path


def prepaid_site(
    tmp: Path,
    *,
    broker_port: int,
    modbus_port: int,
    trust: Path,
    keepalive_s: int = 5,
    tls: ClientTls | None = None,
) -> Path:
    """A gateway with one prepaid account (100.00) on a meter with a supply relay,
    trusting central's keys (tests/harness/site.py builds it)."""
    shutil.copy(trust, tmp / "trust.json")
    broker: dict[str, object] = {"host": "127.0.0.1", "port": broker_port, "keepalive_s": keepalive_s}
    if tls is not None:
        broker |= {"tls": True, "ca_file": str(tls.ca), "cert_file": str(tls.cert), "key_file": str(tls.key)}
    account = prepaid_account(tmp, opening="100.00", alarm1="5.00", alarm2="2.00", close_permit="1.00")
    return gateway_config(
        tmp, GATEWAY, modbus_port=modbus_port, gateway={"timezone": "Asia/Shanghai", "poll_interval_s": 0.5},
        broker=broker, uplink=DEV_UPLINK, security={"trust_file": "trust.json"},
        meters=[meter(account=ACCOUNT_ID)], accounts=[account],
    )  # fmt: skip


class GatewayRun:
    """The gateway daemon on a site's configuration file, run in a task on the test's
    clock; after it stops by itself for a restart (a configuration change) it is
    started again on the file as it is then, as systemd does (``Restart=always``).
    ``settings`` are set on each daemon before it runs (e.g. ``maintenance_interval_s``)."""

    def __init__(self, site: Path, clock: SimClock, **settings: Any) -> None:
        self.site = site
        self.clock = clock
        self.settings = settings
        self.starts = 0
        self._stop = asyncio.Event()
        self._run: asyncio.Task[None] | None = None
        self._daemon: Daemon | None = None

    @property
    def daemon(self) -> Daemon:
        assert self._daemon is not None, "not started"
        return self._daemon

    @property
    def db(self) -> Path:
        """The gateway's database."""
        return self.daemon.config.storage.path

    async def start(self) -> Daemon:
        assert self._run is None or self._run.done()
        daemon = Daemon(load_config(self.site), clock_ms=self.clock.now)
        for k, v in self.settings.items():
            setattr(daemon, k, v)
        self._daemon, self._stop = daemon, asyncio.Event()
        self._run = asyncio.create_task(daemon.run(self._stop))
        self.starts += 1
        await asyncio.wait_for(daemon.ready.wait(), 15)
        return daemon

    async def restarted(self, timeout_s: float) -> str:
        """Wait (bounded) until the daemon stopped by itself for a restart, start it
        again; the reason it gave."""
        assert self._run is not None
        await asyncio.wait_for(asyncio.shield(self._run), timeout_s)
        reason = self.daemon.restart_reason
        assert reason is not None, "the daemon stopped without asking for a restart"
        await self.start()
        return reason

    async def stop(self) -> None:
        if self._run is not None:
            self._stop.set()
            await asyncio.wait_for(self._run, 30)


class Api:
    """Real HTTP requests to the application, one token per role."""

    def __init__(self, base: str, tokens: dict[str, str]) -> None:
        self.base = base
        self.tokens = tokens
        self.session = aiohttp.ClientSession()

    async def call(
        self, method: str, path: str, who: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        h = {"Authorization": f"Bearer {self.tokens[who]}"} if who in self.tokens else {}
        h.update(headers or {})
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=h) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None), dict(r.headers)

    async def close(self) -> None:
        await self.session.close()


class CentralStack:
    """The headend's ingest, the dispatcher and the API on one database."""

    def __init__(
        self,
        workdir: Path,
        *,
        broker_port: int,
        clock: SimClock,
        dsn: str | None = None,
        keys: Path | None = None,
        tls: ssl.SSLContext | None = None,
        dispatcher_tls: ssl.SSLContext | None = None,
        console: bool = False,
    ) -> None:
        """``tls``: the headend ingest's client certificate, ``dispatcher_tls`` the
        dispatcher's (default: ``tls``). The shipped broker names every session by its
        certificate's CN, so on it each needs a certificate of its own
        (``edgegw-headend``, ``edgegw-central``). ``console``: also serve the operator
        console (its forms on central's queue, its users those of
        tests/headend/console/test_console_http.py) at :attr:`console_url`."""
        self.workdir = workdir
        self.with_console = console
        self.console_url = ""
        self.console_db: ConsoleDb | None = None
        self.broker_port = broker_port
        self.clock = clock
        self.dsn = dsn
        self.tls = tls
        self.dispatcher_tls = tls if dispatcher_tls is None else dispatcher_tls
        self.db_path = workdir / "central.db"
        self.keys = keys or workdir / "central-keys"
        if keys is None:
            init_keys(self.keys)
        self.tasks: list[asyncio.Task[None]] = []
        self.ingest_task: asyncio.Task[None] | None = None

    @property
    def trust(self) -> Path:
        return self.keys / "trust.json"

    async def __aenter__(self) -> CentralStack:
        self.store: HeadendStore
        if self.dsn:
            from headend.store_pg import PostgresHeadendDB

            self.store = await PostgresHeadendDB.open(self.dsn)
        else:
            self.store = await HeadendDB.open(self.db_path)
        self.db = await CentralDB.open(db=self.db_path, dsn=self.dsn)
        self.signer = Signer.load(self.keys)
        self.headend = Headend(
            self.store, host="127.0.0.1", port=self.broker_port, tls_context=self.tls, clock_ms=self.clock.now
        )
        self.dispatcher = Dispatcher(
            self.db, self.signer, "127.0.0.1", self.broker_port, tls_context=self.dispatcher_tls,
            clock_ms=self.clock.now, interval_s=0.2,
        )  # fmt: skip
        self.published: list[str] = []  # command ids, as each publish to the broker completed
        publish = self.dispatcher.publish

        async def published(client: Any, batch: list[Outgoing], now_ms: int) -> int:
            done = await publish(client, batch, now_ms)
            self.published += [o.command_id for o in batch]
            return done

        self.dispatcher.publish = published  # type: ignore[method-assign]
        self.central = Central(self.db, self.signer, clock_ms=self.clock.now, on_queued=[self.dispatcher.wake])
        self.runner, port = await serve(build_app(self.central, console=await self._console()), "127.0.0.1", 0)
        if self.with_console:
            self.console_url = f"http://127.0.0.1:{port}/console"
        tokens = {}
        for who, role, channel in (
            ("billing", ApiRole.BILLING, None),
            ("operations", ApiRole.OPERATIONS, None),
            ("viewer", ApiRole.VIEWER, None),
            ("bank", ApiRole.CHANNEL, "bank"),
            ("mobile_app", ApiRole.CHANNEL, "mobile_app"),
        ):
            _, tokens[who] = await self.central.create_token(f"test-{who}", role, channel)
        self.api = Api(f"http://127.0.0.1:{port}", tokens)
        self.start_ingest()
        self.tasks.append(asyncio.create_task(self.dispatcher.run()))
        await asyncio.wait_for(self.dispatcher.connected.wait(), 10)
        await asyncio.wait_for(self.headend.connected.wait(), 10)
        return self

    async def _console(self) -> ConsoleSettings | None:
        if not self.with_console:
            return None
        from tests.headend.console.test_console_http import PASSWORDS

        self.console_db = await open_console_db(None if self.dsn else str(self.db_path), self.dsn)
        users = Users(self.console_db)
        for name, (role, password) in PASSWORDS.items():
            await users.add(name, Role(role), password, self.clock.now())
        return ConsoleSettings(
            db=self.console_db, tz=ZoneInfo("Asia/Shanghai"), desk=CentralDesk(self.central), clock_ms=self.clock.now
        )

    def start_ingest(self) -> None:
        assert self.ingest_task is None
        self.ingest_task = asyncio.create_task(self.headend.run())

    async def stop_ingest(self) -> None:
        assert self.ingest_task is not None
        self.ingest_task.cancel()
        await asyncio.gather(self.ingest_task, return_exceptions=True)
        self.ingest_task = None

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.ingest_task is not None:
            await self.stop_ingest()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.api.close()
        await self.runner.cleanup()
        if self.console_db is not None:
            await self.console_db.close()
        await self.db.close()
        await self.store.close()

    async def state(self, command_id: str) -> dict[str, Any]:
        status, body, _ = await self.api.call("GET", f"/api/v1/commands/{command_id}", "viewer")
        assert status == 200, body
        return dict(body)

    async def until_published(self, command_id: str, timeout_s: float) -> None:
        """Wait (bounded) until the dispatcher's publish of the command completed: it is
        marked sent, and committed, before it is published, so a broker killed between
        the two would see a publish that fails (and one to the next broker), not lose it."""
        deadline = time.monotonic() + timeout_s
        while command_id not in self.published:
            if time.monotonic() > deadline:
                raise AssertionError(f"command {command_id} not published after {timeout_s}s")
            await asyncio.sleep(0.05)

    async def records(self, kind: str, gateway: str = GATEWAY) -> list[dict[str, Any]]:
        """The bodies of the records of ``kind`` (``charge``: the gateway's ledger
        entries; ``event``) central stored from ``gateway``'s batches, oldest first."""
        async with self.db.transaction(readonly=True) as tx:
            rows = await tx.all(
                "SELECT body FROM events WHERE gateway_id = ? AND kind = ? ORDER BY created_ms, record_id",
                (gateway, kind),
            )
        return [b if isinstance(b, dict) else json.loads(b) for (b,) in rows]

    async def until_state(
        self, command_id: str, states: set[str], timeout_s: float, *, credited: bool = False
    ) -> dict[str, Any]:
        """Wait (bounded) for the command to reach one of ``states`` (and, with
        ``credited``, for the gateway's ledger credit of a top-up to be reported:
        it travels as billing data, behind the result event)."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = await self.state(command_id)
            if v["state"] in states and (not credited or v["credited"] is not None):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"command {command_id} still {v['state']} after {timeout_s}s: {v}")
            await asyncio.sleep(0.2)


def gateway_credits(db: Path) -> list[tuple[str, int]]:
    """(top-up id, amount) of every credit in the gateway's ledger, in ledger order."""
    with sqlite3.connect(db) as conn:
        return [
            (str(e).removeprefix("topup:"), int(a))
            for e, a in conn.execute(
                "SELECT entry_id, amount_micro FROM billing_entry WHERE kind = 'credit' ORDER BY seq"
            )
        ]


def gateway_applied(db: Path) -> list[str]:
    """Every command id the gateway's command handler accepted (its replay table)."""
    with sqlite3.connect(db) as conn:
        return [str(c) for (c,) in conn.execute("SELECT command_id FROM sec_seen_command ORDER BY accepted_ms")]


def gateway_audit(db: Path, action_prefix: str) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        return [
            {"action": str(a), **json.loads(d)}
            for a, d in conn.execute("SELECT action, details FROM audit_log ORDER BY seq")
            if str(a).startswith(action_prefix)
        ]



def gateway_view(db: Path, account: str = ACCOUNT_ID) -> tuple[list[dict[str, Any]], int, int]:
    """The account's entries in the gateway's ledger (in ledger order), its balance and
    its purchase counter, read together."""
    with sqlite3.connect(db) as conn:
        conn.execute("BEGIN")
        row = conn.execute(
            "SELECT balance_micro, purchase_counter FROM billing_account WHERE account = ?", (account,)
        ).fetchone()
        entries = [
            {"seq": q, "id": e, "kind": k, "amount_micro": a, "time_ms": t, "body": ls.body_from_column(b, e)}
            for q, e, k, a, t, b in conn.execute(
                "SELECT seq, entry_id, kind, amount_micro, time_ms, body FROM billing_entry"
                " WHERE account = ? ORDER BY seq",
                (account,),
            )
        ]
        conn.execute("COMMIT")
    assert row is not None, f"no account {account} in the gateway's ledger"
    return entries, int(row[0]), int(row[1])


def gateway_rows(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query on the gateway's database."""
    with sqlite3.connect(db) as conn:
        return [tuple(r) for r in conn.execute(sql, args)]
