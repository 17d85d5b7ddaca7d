"""``edgegw status`` tells the truth about a real daemon (a subprocess) on a real
broker and a simulated meter: not running / starting / running from the daemon's
heartbeat, a clean stop and a kill told apart, the link down since it went down
(not since the latest retry) and down while the daemon is not running, each
account's balance and supply state with the reason, and the default
configuration path."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from testbed.simulators.modbus import ModbusSimulator
from tests.gateway.e2e import until
from tests.harness.mosquitto import Mosquitto
from tests.harness.procs import start_gateway
from tests.harness.site import gateway_config, meter, prepaid_account

ROOT = Path(__file__).resolve().parents[2]

def config(tmp: Path, broker_port: int, modbus_port: int) -> Path:
    acct = prepaid_account(tmp, opening="0.30", alarm1="0.20", alarm2="0.10", close_permit="0.05")
    path = gateway_config(
        tmp,
        "gw-status",
        modbus_port=modbus_port,
        gateway={"timezone": "Asia/Shanghai", "heartbeat_file": "run/heartbeat.json"},
        broker={"port": broker_port, "keepalive_s": 5},
        uplink={"allow_unauthenticated_acks": True, "reconnect_min_s": 0.1, "reconnect_max_s": 0.3},
        meters=[meter(account="acct-001")],
        accounts=[acct],
    )
    # connection attempts are counted in the metrics file (one log line per cause, not per attempt)
    path.write_text(path.read_text() + '\n[metrics]\ntextfile = "run/edgegw.prom"\ninterval_s = 1\n')
    (tmp / "run").mkdir()
    return path


def connect_failures(tmp: Path) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    prom = tmp / "run" / "edgegw.prom"
    for fam in text_string_to_metric_families(prom.read_text() if prom.exists() else ""):
        for s in fam.samples:
            if s.name == "edgegw_uplink_connect_failures_total":
                return s.value
    return 0.0


def cli(args: list[str]) -> int:
    """``edgegw ARGS`` run to its end in a thread of its own (it runs its own event
    loop; the test's loop, with the meter simulator, waits meanwhile)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(main, args).result(timeout=30)


def status(capsys: pytest.CaptureFixture[str], cfg: Path | None = None) -> dict[str, Any]:
    capsys.readouterr()
    args = ["status", "--json"] + ([] if cfg is None else ["--config", str(cfg)])
    assert cli(args) == 0
    return dict(json.loads(capsys.readouterr().out))


def text(capsys: pytest.CaptureFixture[str], cfg: Path) -> str:
    capsys.readouterr()
    assert cli(["status", "--config", str(cfg)]) == 0
    return capsys.readouterr().out


async def test_status_follows_the_daemon(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "gateway.log"
    async with ModbusSimulator(units=[1], load_kw="150") as sim:
        cfg = config(tmp_path, mosquitto.port, sim.port)
        proc = start_gateway(cfg, log, cwd=cfg.parent)
        try:
            # the database exists with its tables (the daemon is past its first steps)
            await until(lambda: cli(["status", "--config", str(cfg)]) == 0, 30, "database")
            await until(lambda: status(capsys, cfg)["daemon"]["state"] == "running", 30, "running")
            st = status(capsys, cfg)
            assert st["daemon"]["heartbeat"]["pid"] == proc.pid
            assert st["software"]["running"] == st["daemon"]["heartbeat"]["version"]
            await until(lambda: status(capsys, cfg)["link"]["state"] == "up", 20, "link up")
            # the account runs out of credit: the supply is cut, and status says why
            await until(lambda: sim.meter(1).relay_open, 30, "trip when the credit is gone")
            await until(
                lambda: status(capsys, cfg)["accounts"][0]["supply"].startswith("supply cut"), 10,
                "cut shown",
            )
            acct = status(capsys, cfg)["accounts"][0]
            assert acct["account"] == "acct-001" and acct["cutoff"]["relay_open"] is True
            assert acct["balance_micro"] <= 0 and "cut level 0.00" in acct["supply"]
            out = text(capsys, cfg)
            assert "daemon:  running" in out and "acct-001" in out and "supply cut" in out

            # the broker goes: down since then, through every retry
            mosquitto.kill()
            await until(lambda: status(capsys, cfg)["link"]["state"] != "up", 20, "link down")
            down_since = status(capsys, cfg)["link"]["since_ms"]
            failed = connect_failures(tmp_path)
            await until(lambda: connect_failures(tmp_path) >= failed + 4, 20, "retries")
            assert status(capsys, cfg)["link"]["since_ms"] == down_since
            mosquitto.start()
            await until(lambda: status(capsys, cfg)["link"]["state"] == "up", 30, "link up again")
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        assert rc == 0, log.read_text()[-3000:]
        st = status(capsys, cfg)
        assert st["daemon"]["state"] == "not running" and "clean stop" in st["daemon"]["detail"]
        # the link is down while no daemon runs, whatever it last recorded
        assert st["link"]["state"] == "down" and st["link"]["recorded_state"] == "up"
        assert "daemon:  NOT RUNNING" in text(capsys, cfg)

        # a kill is not a clean stop
        proc = start_gateway(cfg, log, cwd=cfg.parent)
        try:
            await until(lambda: status(capsys, cfg)["daemon"]["state"] == "running", 30, "running again")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        st = status(capsys, cfg)
        assert st["daemon"]["state"] == "not running"
        assert "without stopping cleanly" in st["daemon"]["detail"]


def test_status_alone_reads_the_default_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, 1, 1)
    monkeypatch.setenv("EDGEGW_CONFIG", str(cfg))
    assert main(["status"]) == 1  # no database yet: said, not a traceback
    assert "no database yet" in capsys.readouterr().err
    monkeypatch.setenv("EDGEGW_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["status"]) == 2
    assert "not provisioned yet" in capsys.readouterr().err
