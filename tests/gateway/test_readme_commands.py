"""The README's real-meter commands, run as written, on a fresh copy of the repository.

The commands are read from the README itself (the code block under "Using it
with real meters"), so the README cannot drift from what works. The copy holds
the repository's tracked files only, as a fresh clone does, with the
virtualenv beside it. Two deliberate differences from a person at a terminal:
the fixed ports (5020 for the simulated meters, 1883 for the broker) become
free loopback ports, in the commands and in the copied example, because test
runs share the machine; and the broker is the test harness's mosquitto.
Nothing else is changed.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.mosquitto import Mosquitto, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it with real meters", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def fresh_copy(dest: Path) -> Path:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        target.chmod(src.stat().st_mode & 0o777)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def wait_for(pred: object, timeout_s: float, what: str) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s: {what}")


def meters_at_central(db: Path) -> set[str]:
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            return {m for (m,) in c.execute("SELECT DISTINCT meter_id FROM readings")}
    except sqlite3.OperationalError:  # not created yet
        return set()


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "edgegw").exists(), reason="needs the ./dev virtualenv")
def test_readme_real_meter_commands_work_verbatim(tmp_path: Path, mosquitto: Mosquitto) -> None:
    commands = readme_commands()
    assert any("config check" in c for c in commands) and any(c.endswith("&") for c in commands)
    repo = fresh_copy(tmp_path / "edge-gateway")
    modbus = free_port()
    ports = {"5020": str(modbus), "1883": str(mosquitto.port)}

    def localise(text: str) -> str:
        return re.sub(r"\b(5020|1883)\b", lambda m: ports[m.group(1)], text)

    example = repo / "examples" / "site-modbus-tcp.toml"
    example.write_text(localise(example.read_text()))

    background: list[tuple[str, subprocess.Popen[str]]] = []
    outputs: dict[str, str] = {}
    try:
        for line in commands:
            line = localise(line)
            if line.endswith("&"):
                argv = shlex.split(line[:-1])
                proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                background.append((line, proc))
                if "simulator" in line:
                    wait_port(modbus, up=True, timeout_s=20)
                if " run --config" in line:  # the gateway: wait for its readings at central
                    # The example polls every 60 s: on a loaded machine a meter may miss
                    # the first cycle, or the first batch may beat the headend's
                    # subscription (it goes again after uplink.ack_timeout_s).
                    wait_for(
                        lambda: meters_at_central(repo / "central.db") == {"m-0001", "m-0002", "m-0003"},
                        150,
                        "readings of all three meters at the headend",
                    )
                continue
            variants = [line]
            if "[--json]" in line:  # an optional argument: run it without and with
                variants = [line.replace(" [--json]", ""), line.replace("[--json]", "--json")]
            for v in variants:
                proc_fg = subprocess.run(shlex.split(v), cwd=repo, capture_output=True, text=True, timeout=60)
                assert proc_fg.returncode == 0, (v, proc_fg.stdout, proc_fg.stderr)
                outputs[v] = proc_fg.stdout
        for line, proc in background:
            assert proc.poll() is None, (line, proc.communicate()[0])
    finally:
        for _, proc in reversed(background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        logs = {}
        for line, proc in background:
            try:
                logs[line] = proc.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                logs[line] = proc.communicate()[0]
    for line, proc in background:
        assert proc.returncode == 0, (line, proc.returncode, logs[line])

    check = next(out for cmd, out in outputs.items() if "config check" in cmd)
    assert "ok — gateway gw-xincun-03, 1 bus(es), 3 meter(s)" in check
    status_text = next(out for cmd, out in outputs.items() if "status" in cmd and "--json" not in cmd)
    for meter in ("m-0001", "m-0002", "m-0003"):
        assert re.search(rf"{meter}\s+online", status_text), status_text
    status = json.loads(next(out for cmd, out in outputs.items() if "status" in cmd and "--json" in cmd))
    assert {m["meter"]: m["state"] for m in status["meters"]} == dict.fromkeys(("m-0001", "m-0002", "m-0003"), "online")
    assert status["totals"]["readings_committed"] >= 3
    assert (repo / "examples" / "var" / "gateway.db").exists()  # the daemon made its directory
    assert not any("Traceback" in text for text in logs.values()), logs
