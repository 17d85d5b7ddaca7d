"""A top-up a technician carries, applied through the running daemon's one command path.

Real parts: the daemon (its single SQLite writer) with a prepaid account on a
Modbus TCP simulator, the real ``edgegw topup apply`` command run as another
process, envelopes signed with real keys, a provisioning release directory
with ``topups/`` and ``commands/`` folders. Checked: applied once (a second
hand-over is answered "already applied"), refused top-ups change nothing and
say why in yuan, a wrong target is refused before the daemon sees it, an
envelope handed over while the daemon is down waits in the spool and is
applied at its start, and a bundle's envelopes (top-ups, a meter exchange)
are applied once across restarts.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from gateway.billing import ledger_store as ls
from gateway.daemon import wall_ms
from gateway.security.roles import CommandType
from gateway.technician import spool_dir
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import Running
from tests.gateway.test_prepaid_daemon import config
from tests.security.conftest import Central

HOUR = 3_600_000


def site(tmp: Path, central: Central, modbus_port: int) -> Path:
    path = config(tmp, modbus_port)
    (tmp / "trust.json").write_text(json.dumps(central.trust().to_dict()))
    path.write_text(path.read_text() + '\n[security]\ntrust_file = "trust.json"\n')
    return path


def topup(central: Central, tmp: Path, name: str, *, counter: int, amount_micro: int = 5_000_000,
          target: str = "gw-prepaid", command_id: str | None = None) -> Path:
    now = wall_ms()
    raw = central.cmd(
        CommandType.TOPUP,
        {"account": "acct-001", "amount_micro": amount_micro, "purchase_counter": counter,
         "payment_channel": "agent"},
        target=target, issued_at=now - 1000, expires_at=now + HOUR, command_id=command_id or name,
    )
    f = tmp / f"{name}.json"
    f.write_bytes(raw)
    return f


async def apply(path: Path, site_path: Path, wait_s: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "topup", "apply", str(path), "--config", str(site_path),
        "--wait", str(wait_s), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), wait_s + 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def balance(db: Path) -> int:
    with sqlite3.connect(db) as c:
        (b,) = c.execute("SELECT balance_micro FROM billing_account WHERE account = 'acct-001'").fetchone()
    return int(b)


def bodies(db: Path, kind: str) -> list[tuple[dict[str, Any], int]]:
    """The body (decoded as the ledger reads it) and amount of every entry of ``kind``."""
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT entry_id, body, amount_micro FROM billing_entry WHERE kind = ? ORDER BY seq", (kind,)
        ).fetchall()
    return [(ls.body_from_column(body, e), int(a)) for e, body, a in rows]


def credits(db: Path) -> list[tuple[Any, ...]]:
    return [(b["topup_id"], b["source"], a) for b, a in bodies(db, "credit")]


def debits(db: Path) -> list[tuple[int, int]]:
    return [(int(b["ckwh"]), a) for b, a in bodies(db, "debit")]


async def test_a_technician_top_up_goes_through_the_running_daemon(tmp_path: Path) -> None:
    central = Central()
    db = tmp_path / "gw.db"
    async with ModbusSimulator(units=[1], load_kw="0") as sim:
        path = site(tmp_path, central, sim.port)
        first = topup(central, tmp_path, "sale-1", counter=1)
        async with Running(path):
            code, out, err = await apply(first, path)
            assert code == 0, out + err
            assert "topup sale-1: applied; balance of acct-001 now 5.30" in out
            assert credits(db) == [("sale-1", "technician", 5_000_000)]
            # handed over again (the technician is not sure it went through): nothing twice
            code, out, err = await apply(first, path)
            assert code == 0 and "already applied before (nothing changed)" in out, out + err
            # a sale whose counter skips one is refused, and says why (in yuan where money is named)
            gap = topup(central, tmp_path, "sale-3", counter=3)
            code, out, err = await apply(gap, path)
            assert code == 1, out + err
            assert "refused (counter_gap): purchase counter 3 skips ahead (expected 2)" in out
            big = topup(central, tmp_path, "sale-2", counter=2, amount_micro=10**12 + 1)
            code, out, err = await apply(big, path)
            assert code == 1 and "at most 1000000.00, got 1000000.000001" in out, out + err
            # for another gateway: refused on the spot, the daemon never sees it
            other = topup(central, tmp_path, "sale-x", counter=2, target="gw-other")
            code, out, err = await apply(other, path)
            assert code == 2 and "for gateway 'gw-other'; this is gateway 'gw-prepaid'" in err
            # not a top-up at all
            junk = tmp_path / "junk.json"
            junk.write_text('{"payload": "x"}')
            code, out, err = await apply(junk, path)
            assert code == 2 and "not a signed command envelope" in err
        assert balance(db) == 300_000 + 5_000_000
        assert credits(db) == [("sale-1", "technician", 5_000_000)]

        # the daemon is down: the envelope waits in the spool, and is applied when it starts
        second = topup(central, tmp_path, "sale-2b", counter=2, command_id="sale-2")
        code, out, err = await apply(second, path, wait_s=1)
        assert code == 3 and "is edgegw running?" in err
        assert [p.suffix for p in spool_dir(db).iterdir()] == [".cmd"]
        async with Running(path) as d:
            for _ in range(100):
                if len(credits(db)) == 2:
                    break
                await asyncio.sleep(0.1)
            assert d.commands is not None
        assert credits(db) == [("sale-1", "technician", 5_000_000), ("sale-2", "technician", 5_000_000)]
        answers = [p.name for p in spool_dir(db).iterdir()]
        assert len(answers) == 1 and answers[0].endswith(".result.json")  # left for the technician


async def test_commands_in_a_bundle_are_applied_once(tmp_path: Path) -> None:
    central = Central()
    db = tmp_path / "gw.db"
    async with ModbusSimulator(units=[1], load_kw="0") as sim:
        path = site(tmp_path, central, sim.port)
        (tmp_path / "topups").mkdir()
        topup(central, tmp_path / "topups", "sale-1", counter=1)
        topup(central, tmp_path / "topups", "sale-2", counter=2, amount_micro=1_000_000)
        # and a meter exchange: the new meter started at 1206.00 kWh a minute ago; the
        # simulated meter shows 1206.42, so its first reading bills 0.42 kWh x 0.56
        (tmp_path / "commands").mkdir()
        now = wall_ms()
        (tmp_path / "commands" / "exchange.json").write_bytes(central.cmd(
            CommandType.METER_REPLACE,
            {"meter": "m001", "time_ms": now - 60_000, "old_final": {"import_kwh": "0"},
             "new_initial": {"import_kwh": "1206.00"}, "note": "meter exchanged on site"},
            target="gw-prepaid", issued_at=now - 1000, expires_at=now + HOUR, command_id="exchange-1",
        ))
        async with Running(path):
            for _ in range(100):
                if debits(db):
                    break
                await asyncio.sleep(0.1)
        assert credits(db) == [("sale-1", "usb", 5_000_000), ("sale-2", "usb", 1_000_000)]
        assert debits(db)[0] == (42, -235_200)
        async with Running(path):  # restarted: the files are not presented again
            pass
        with sqlite3.connect(db) as c:
            outcomes = [r[0] for r in c.execute(
                "SELECT json_extract(details, '$.outcome') FROM audit_log WHERE action LIKE 'command.%'")]
            imported = [r[0] for r in c.execute("SELECT path FROM cmd_file_import ORDER BY path")]
        assert imported == ["commands/exchange.json", "topups/sale-1.json", "topups/sale-2.json"]
        assert outcomes == ["applied", "applied", "applied"]
        assert balance(db) == 300_000 + 6_000_000 + sum(a for _, a in debits(db))
