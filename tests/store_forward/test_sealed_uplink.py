"""Sealed uplink end to end: keys bound to enrolled gateways, registry checks,
telemetry stored apart, payloads within the configured maximum."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from gateway.config import BrokerSection
from headend.ingest import Headend
from headend.registry import parse_enrollment
from headend.store import HeadendDB
from store_forward import wire
from store_forward.codec import DecodeError, JsonCodec, decode
from store_forward.outbox import Outbox
from store_forward.uplink import LinkState, Uplink
from store_forward.uplink_keys import UplinkKeyError
from tests.harness.mosquitto import Mosquitto
from tests.store_forward.helpers import Site, running, settings, six_quantity_reading, wait_for

EPOCH = "00112233deadbeef"


def rows(path: Path, table: str) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as db:
        return [(int(r), str(m)) for r, m in db.execute(f"SELECT record_id, meter_id FROM {table} ORDER BY record_id")]


async def test_sealed_batches_from_an_enrolled_gateway_are_stored_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    site = Site(tmp_path)
    ks = site.gateway("gw-a")
    ob = await Outbox.open(tmp_path / "gw.db")
    hdb = await HeadendDB.open(tmp_path / "central.db")
    for k in range(10):
        await ob.commit_cycle(k, [six_quantity_reading(f"m{j}", 1_000 * k + j, k) for j in range(10)])
    await ob.add_event(11, {"type": "relay_trip", "meter": "m3"})
    up = Uplink(ob, gateway_id="gw-a", broker=BrokerSection(port=mosquitto.port), settings=settings(), codec=site.codec(ks))
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port, registry=site.registry())
    async with running(he.run(), up.run()):
        async def drained() -> bool:
            return (await ob.stats()).records == 0 and up.stats.state is LinkState.UP
        await wait_for(drained, 20, "sealed backlog drained")
    await ob.close()
    await hdb.close()
    billing = rows(tmp_path / "central.db", "readings")
    telemetry = rows(tmp_path / "central.db", "telemetry")
    assert len(billing) == 100 and len(telemetry) == 100
    assert len({r for r, _ in billing + telemetry}) == 200  # record ids once each
    with sqlite3.connect(tmp_path / "central.db") as db:
        (q,) = db.execute("SELECT quantities FROM readings LIMIT 1").fetchone()
        (tq,) = db.execute("SELECT quantities FROM telemetry LIMIT 1").fetchone()
        (ev,) = db.execute("SELECT body FROM events").fetchone()
    assert set(orjson.loads(q)) == {"energy_import_kwh"}
    assert set(orjson.loads(tq)) == {"voltage_v", "current_a", "power_kw", "power_factor", "frequency_hz"}
    assert orjson.loads(ev)["type"] == "relay_trip"
    assert he.rejected == 0


@pytest.mark.parametrize("case", ["unknown", "revoked", "plain"])
async def test_headend_refuses_unknown_revoked_and_unsealed(
    tmp_path: Path, case: str, mosquitto: Mosquitto
) -> None:
    site = Site(tmp_path)
    ks = site.gateway("gw-x", enroll=case != "unknown")
    registry = site.registry()
    if case == "revoked":
        registry.revoke("gw-x")
    codec = JsonCodec() if case == "plain" else site.codec(ks)
    ob = await Outbox.open(tmp_path / "gw.db")
    hdb = await HeadendDB.open(tmp_path / "central.db")
    await ob.commit_cycle(1, [six_quantity_reading("m1", 1, 1)])
    up = Uplink(ob, gateway_id="gw-x", broker=BrokerSection(port=mosquitto.port), settings=settings(), codec=codec)
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port, registry=registry)
    async with running(he.run(), up.run()):
        async def refused() -> bool:
            return he.rejected >= 2
        await wait_for(refused, 10, "batches refused")
    assert (await ob.stats()).records == 2  # nothing acked: the gateway keeps its data
    await ob.close()
    await hdb.close()
    assert rows(tmp_path / "central.db", "readings") == []


def test_sealed_batch_proves_the_gateway(tmp_path: Path) -> None:
    site = Site(tmp_path)
    a, b = site.gateway("gw-a"), site.gateway("gw-b")
    registry = site.registry()
    from store_forward.records import Record, RecordClass

    rec = [Record(1, RecordClass.EVENT, "event", 1, {"type": "x"})]
    payload, _ = site.codec(a).pack("gw-a", 1, rec, 10_000, epoch=EPOCH)
    assert decode(payload, registry.key_lookup, allow_plain=False).gateway_id == "gw-a"
    # gw-b cannot speak for gw-a: its key does not open as gw-a's
    forged, _ = site.codec(b).pack("gw-a", 1, rec, 10_000, epoch=EPOCH)
    with pytest.raises(DecodeError, match="WireAuthError"):
        decode(forged, registry.key_lookup, allow_plain=False)
    # a key id beyond the enrolled version is refused
    assert registry.key_lookup("gw-a", 2) is None
    with pytest.raises(UplinkKeyError):
        parse_enrollment({"gateway_id": "g", "exchange_x25519": "AAAA"}, "t")


def test_payloads_respect_the_byte_budget(tmp_path: Path) -> None:
    site = Site(tmp_path)
    codec = site.codec(site.gateway("gw-a"))
    import random

    from store_forward.records import Record, RecordClass

    rng = random.Random(5)
    recs = []
    for k in range(2000):
        body = {"m": f"m{k % 50}", "t": 900_000 * (k // 50) + rng.randrange(400), "ts": "system",
                "v": {"energy_import_kwh": str(rng.randrange(10**6) / 100)}}
        recs.append(Record(len(recs) + 1, RecordClass.BILLING, "reading", body["t"], body))
    for budget in (600, 2_000, 5_000, 20_000, 5_000):
        payload, n = codec.pack("gw-a", 7, recs, budget, epoch=EPOCH)
        assert len(payload) <= budget and 1 <= n <= len(recs)
        assert (n == len(recs)) == (budget == 20_000)
        assert payload[0] == wire.VERSION
        if n < len(recs):  # nearly full: the next record would not have fitted
            assert len(payload) >= 0.75 * budget
