"""``edgegw headend run | import | keygen`` as an operator runs them: real processes.

``headend run`` is started as a subprocess against a real mosquitto; a test
client plays the gateways (publishing batches made by the real codecs) and
watches the acks. ``keygen`` → ``backlog export`` → ``import`` is the USB
carry-back with the commands a technician and central would type. Usage
mistakes exit 2 before anything is opened; unusable files exit 1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import psycopg
import pytest

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.cli import main
from provisioning.keys import Keystore
from store_forward.codec import JsonCodec
from store_forward.outbox import Outbox
from store_forward.records import Record, RecordClass, RecordKind, reading_body
from store_forward.storage_keys import StorageKeys
from store_forward.topics import Topics
from store_forward.uplink import LinkState, Uplink
from tests.harness.mosquitto import Mosquitto
from tests.headend.test_headend_scaleout import pg_dsn  # noqa: F401 (fixture)
from tests.security.test_transport import TlsBroker
from tests.security.tls import HEADEND_CN, make_pki
from tests.store_forward.helpers import Site, running, settings, six_quantity_reading, wait_for

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "edgegw/v1"
EPOCH = "5e1f00d2c0ffee01"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def edgegw(*args: str | Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


class HeadendProcess:
    """``edgegw headend run ...`` in the background; stderr goes to a file."""

    def __init__(self, workdir: Path, *args: str | Path) -> None:
        self.stderr_path = workdir / "headend.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "headend", "run", *map(str, args)],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; returns the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._stderr.close()


@contextlib.contextmanager
def headend_process(workdir: Path, *args: str | Path) -> Iterator[HeadendProcess]:
    h = HeadendProcess(workdir, *args)
    try:
        yield h
    finally:
        if h.alive():
            h.stop()


def records(first_id: int, n: int) -> list[Record]:
    out = []
    for i in range(first_id, first_id + n):
        r = Reading(f"m{i % 3}", 1_000_000 + i, {Quantity.ENERGY_IMPORT: Measurement(Decimal(i) / 100)})
        out.append(Record(i, RecordClass.BILLING, RecordKind.READING, 1_000 + i, reading_body(r)))
    return out


def stored(path: Path) -> tuple[dict[str, list[int]], set[tuple[str, int]]]:
    """Record ids per gateway in ``readings``, and the (gateway, seq) of ``batches``."""
    with sqlite3.connect(path) as db:
        ids: dict[str, list[int]] = {}
        for gw, rid in db.execute("SELECT gateway_id, record_id FROM readings ORDER BY 1, 2"):
            ids.setdefault(str(gw), []).append(int(rid))
        batches = {(str(g), int(s)) for g, s in db.execute("SELECT gateway_id, seq FROM batches")}
    return ids, batches


class Central:
    """A test client on the broker: publishes as the gateways, collects every ack."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.acks: list[tuple[str, dict[str, Any]]] = []  # (gateway, ack)

    async def collect(self) -> None:
        async for msg in self.client.messages:
            gw = msg.topic.value.split("/")[-2]
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            self.acks.append((gw, orjson.loads(payload)))

    def acked(self, gw: str, seq: int) -> bool:
        return any(g == gw and a.get("seq") == seq for g, a in self.acks)

    async def publish(self, gw: str, payload: bytes) -> None:
        await self.client.publish(Topics(PREFIX, gw).up, payload, qos=1)


@contextlib.asynccontextmanager
async def central(port: int) -> AsyncIterator[Central]:
    async with aiomqtt.Client("127.0.0.1", port, identifier="test-central", timeout=10) as c:
        await c.subscribe(f"{PREFIX}/+/ack", qos=1)
        cen = Central(c)
        async with running(cen.collect()):
            yield cen


async def until(cond: Callable[[], bool], timeout_s: float, what: str, he: HeadendProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert he.alive(), f"headend exited ({he.proc.returncode}) waiting for {what}:\n{he.stderr()}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{he.stderr()}")
        await asyncio.sleep(0.05)


async def first_ack(cen: Central, gw: str, payload: bytes, he: HeadendProcess) -> None:
    """Publish until the headend (still starting up) answers: its subscription is
    clean-session, so a batch sent before it subscribed is lost, and is sent
    again, as a gateway would. Every attempt after the first is a duplicate."""
    deadline = time.monotonic() + 60
    while not cen.acks:
        assert he.alive(), f"headend exited ({he.proc.returncode}):\n{he.stderr()}"
        assert time.monotonic() < deadline, f"no ack from the headend in 60s:\n{he.stderr()}"
        await cen.publish(gw, payload)
        resend = time.monotonic() + 1.0
        while not cen.acks and time.monotonic() < resend:
            await asyncio.sleep(0.05)


# -- headend run --------------------------------------------------------------------


async def test_run_with_registry_stores_only_sealed_batches_of_enrolled_gateways(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    site = Site(tmp_path)
    enrolled = site.codec(site.gateway("gw-a"))
    stranger = site.codec(site.gateway("gw-x", enroll=False))
    db = tmp_path / "central.db"
    with headend_process(
        tmp_path, "--broker", f"127.0.0.1:{mosquitto.port}", "--db", db,
        "--key", site.headend_key_path, "--registry", site.registry_dir,
    ) as he:
        async with central(mosquitto.port) as cen:
            await first_ack(cen, "gw-a", enrolled.encode("gw-a", 1, records(1, 5), epoch=EPOCH), he)
            unsealed, _ = JsonCodec().pack("gw-a", 2, records(6, 5), 1 << 20, epoch=EPOCH)
            await cen.publish("gw-a", unsealed)
            await cen.publish("gw-x", stranger.encode("gw-x", 1, records(1, 5), epoch=EPOCH))
            await cen.publish("gw-a", enrolled.encode("gw-a", 3, records(11, 5), epoch=EPOCH))
            # seq 3 is answered after seq 2 was handled (one topic, one subscriber, in order)
            await until(lambda: cen.acked("gw-a", 3), 30, "ack of the last sealed batch", he)
            await until(
                lambda: "refused batch on edgegw/v1/gw-x/up" in he.stderr()
                and "refused batch on edgegw/v1/gw-a/up" in he.stderr(),
                30,
                "both refusals logged",
                he,
            )
        assert he.stop() == 0
    log = he.stderr()
    assert "unsealed batch (encoding 1) refused" in log
    assert "unknown or revoked gateway" in log
    assert {(g, a["seq"]) for g, a in cen.acks} == {("gw-a", 1), ("gw-a", 3)}
    assert all(a["status"] in ("stored", "duplicate") for _, a in cen.acks)
    ids, batches = stored(db)
    assert ids == {"gw-a": [*range(1, 6), *range(11, 16)]}
    assert batches == {("gw-a", 1), ("gw-a", 3)}


async def test_run_without_registry_accepts_unsealed_batches(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Development mode, as before ``--key``/``--registry`` existed; said on stderr."""
    db = tmp_path / "central.db"
    with headend_process(tmp_path, "--broker", f"127.0.0.1:{mosquitto.port}", "--db", db) as he:
        async with central(mosquitto.port) as cen:
            payload, _ = JsonCodec().pack("gw-dev", 1, records(1, 4), 1 << 20, epoch=EPOCH)
            await first_ack(cen, "gw-dev", payload, he)
        assert he.stop() == 0
    assert "unsealed batches are accepted (development only)" in he.stderr()
    assert cen.acks[0] == ("gw-dev", {"seq": 1, "epoch": EPOCH, "status": "stored", "records": 4})
    assert stored(db) == ({"gw-dev": [1, 2, 3, 4]}, {("gw-dev", 1)})


async def test_run_on_postgresql_in_a_shared_subscription(
    tmp_path: Path, mosquitto: Mosquitto, pg_dsn: str  # noqa: F811
) -> None:
    site = Site(tmp_path)
    codec = site.codec(site.gateway("gw-a"))
    with headend_process(
        tmp_path, "--broker", f"127.0.0.1:{mosquitto.port}", "--dsn", pg_dsn, "--share", "central",
        "--key", site.headend_key_path, "--registry", site.registry_dir,
    ) as he:
        async with central(mosquitto.port) as cen:
            await first_ack(cen, "gw-a", codec.encode("gw-a", 1, records(1, 5), epoch=EPOCH), he)
        assert he.stop() == 0
    ack = dict(cen.acks[0][1])
    assert len(ack.pop("mac")) == 64  # a sealed batch's ack is authenticated
    assert (cen.acks[0][0], ack) == ("gw-a", {"seq": 1, "epoch": EPOCH, "status": "stored", "records": 5})
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT gateway_id, record_id FROM readings ORDER BY 2").fetchall()
    assert rows == [("gw-a", i) for i in range(1, 6)]


async def test_run_over_mutual_tls_drains_a_sealed_uplink(tmp_path: Path) -> None:
    """The broker (example mosquitto config: mTLS, ACL by certificate CN) admits the
    headend by its certificate; a real sealed Uplink's backlog is stored and acked."""
    pki = make_pki(tmp_path / "pki", clients=("gw-a", HEADEND_CN))
    broker = TlsBroker(tmp_path / "broker", pki)
    broker.start()
    site = Site(tmp_path / "keys")
    ks = site.gateway("gw-a")
    ob = await Outbox.open(tmp_path / "gw.db")
    db = tmp_path / "central.db"
    try:
        for k in range(3):
            await ob.commit_cycle(k, [six_quantity_reading(f"m{j}", 1_000 * k + j, k) for j in range(10)])
        hp = pki.clients[HEADEND_CN]
        with headend_process(
            tmp_path, "--broker", f"127.0.0.1:{broker.port}", "--db", db,
            "--key", site.headend_key_path, "--registry", site.registry_dir,
            "--tls-ca", pki.ca, "--tls-cert", hp.cert, "--tls-key", hp.key,
        ) as he:
            up = Uplink(ob, gateway_id="gw-a", broker=broker.section("gw-a"), settings=settings(),
                        codec=site.codec(ks))
            async with running(up.run()):

                async def drained() -> bool:
                    assert he.alive(), he.stderr()
                    return (await ob.stats()).records == 0 and up.stats.state is LinkState.UP

                await wait_for(drained, 60, "backlog drained through the headend process over mTLS")
            assert he.stop() == 0
        assert (await ob.stats()).readings_acked == 30
    finally:
        await ob.close()
        broker.stop()
    ids, _ = stored(db)
    assert len(ids["gw-a"]) == 30
    assert "refused" not in he.stderr()


# -- keygen, backlog export, import -----------------------------------------------------


def test_keygen_then_import_of_a_backlog_export(tmp_path: Path) -> None:
    key = tmp_path / "central" / "headend.x25519.pem"
    key.parent.mkdir()
    r = edgegw("headend", "keygen", "--out", key)
    assert r.returncode == 0, r.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    line = next(x for x in r.stdout.splitlines() if x.startswith("public key"))
    public_b64 = line.split(": ", 1)[1].strip()
    assert len(base64.b64decode(public_b64)) == 32
    again = edgegw("headend", "keygen", "--out", key)
    assert again.returncode == 1 and "refusing to replace" in again.stderr

    # The gateway: keystore, an outbox with 40 readings, the headend key from keygen.
    ks = Keystore.init(tmp_path / "keys", "gw-usb")
    gw_db = tmp_path / "gw.db"

    async def fill() -> None:
        ob = await Outbox.open(gw_db, keys=StorageKeys.from_keystore(ks))
        await ob.commit_cycle(1, [six_quantity_reading("m1", t, t) for t in range(40)])
        await ob.close()

    asyncio.run(fill())
    config = tmp_path / "site.toml"
    config.write_text(
        f'[gateway]\nid = "gw-usb"\nsite = "t"\n[storage]\npath = "{gw_db}"\n'
        f'[uplink]\nheadend_public_key = "{public_b64}"\n'
        '[[bus]]\nname = "tcp-1"\ntype = "tcp"\nhost = "127.0.0.1"\n'
        '[[meter]]\nid = "m1"\nbus = "tcp-1"\nprotocol = "modbus"\nunit_id = 1\nprofile = "sdm120"\n'
    )
    usb = tmp_path / "usb"
    r = edgegw("backlog", "export", "--config", config, "--to", usb, "--keystore", ks.path)
    assert r.returncode == 0, r.stderr
    n = len(list(usb.glob("*.batch")))
    assert n >= 1

    # Central: enrolled gateway, import twice (the second finds everything known).
    registry = tmp_path / "central" / "registry"
    registry.mkdir()
    (registry / "gw-usb.json").write_bytes(orjson.dumps(ks.export_public()))
    central_db = tmp_path / "central" / "central.db"
    args = ("--key", key, "--registry", registry)
    r = edgegw("headend", "import", usb, "--db", central_db, *args)
    assert r.returncode == 0, r.stderr
    # 40 readings = 40 register records + 40 telemetry records
    assert f"{n} batch(es) stored (80 records), 0 already known" in r.stdout
    ids, batches = stored(central_db)
    assert list(ids) == ["gw-usb"] and len(ids["gw-usb"]) == 40
    assert batches == {("gw-usb", seq) for seq in range(1, n + 1)}
    r = edgegw("headend", "import", usb, "--db", central_db, *args)
    assert r.returncode == 0, r.stderr
    assert f"0 batch(es) stored (0 records), {n} already known" in r.stdout

    # Not enrolled: every file refused (exit 1), nothing stored.
    (registry / "gw-usb.json").unlink()
    other_db = tmp_path / "central" / "other.db"
    r = edgegw("headend", "import", usb, "--db", other_db, *args)
    assert r.returncode == 1
    assert r.stderr.count("refused:") == n
    assert stored(other_db) == ({}, set())


# -- usage and file errors ------------------------------------------------------------


def _run_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["headend", "run", "--broker", "127.0.0.1:1883", "--db", str(tmp_path / "c.db"), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--key", "h.pem"], "--key and --registry go together"),
        (["--registry", "reg"], "--key and --registry go together"),
        (["--tls-ca", "ca.pem", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "ca.pem", "--tls-key", "c.key"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "c.pem", "--tls-key", "c.key"], "need --tls-ca"),
        (["--dsn", "postgresql://x"], "not allowed with argument --db"),
    ],
)
def test_run_usage_errors_exit_2_before_opening_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(_run_args(tmp_path, *extra))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: edgegw headend run" in err and message in err
    assert not (tmp_path / "c.db").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["headend", "run", "--broker", "localhost", "--db", "c.db"], "expected HOST:PORT"),
        (["headend", "run", "--broker", "h:70000", "--db", "c.db"], "expected HOST:PORT"),
        (["headend", "run", "--db", "c.db"], "the following arguments are required: --broker"),
        (["headend"], "the following arguments are required: ACTION"),
        (["headend", "--broker", "127.0.0.1:1883", "--db", "c.db"], "choose from 'run', 'import', 'keygen'"),
        (["headend", "import", "usb", "--db", "c.db"], "required: --key, --registry"),
    ],
)
def test_parser_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_process_usage_error_exits_2(tmp_path: Path) -> None:
    """The same through the installed entry point's process boundary."""
    r = edgegw(*_run_args(tmp_path, "--registry", str(tmp_path)))
    assert r.returncode == 2
    assert "error: --key and --registry go together" in r.stderr


def test_run_unusable_files_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(tmp_path)
    assert main(_run_args(tmp_path, "--key", str(tmp_path / "missing.pem"), "--registry", str(site.registry_dir))) == 1
    assert "cannot read headend key" in capsys.readouterr().err
    assert main(_run_args(tmp_path, "--key", str(site.headend_key_path), "--registry", str(tmp_path / "none"))) == 1
    assert "registry directory does not exist" in capsys.readouterr().err
    assert main(_run_args(tmp_path, "--tls-ca", str(tmp_path / "missing-ca.pem"))) == 1
    assert "TLS files" in capsys.readouterr().err
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    assert main(_run_args(tmp_path, "--tls-ca", str(not_a_cert))) == 1
    assert "TLS files" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    assert main(["headend", "run", "--broker", "127.0.0.1:1883", "--db", str(unwritable / "c.db")]) == 1
    assert "cannot open the headend database" in capsys.readouterr().err
