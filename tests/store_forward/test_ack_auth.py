"""Acks that cannot be forged, with real mosquitto, the real uplink and the real headend.

Whoever can publish on a gateway's ack topic (a broker operator, a leaked
credential) must not make it delete data central never stored, nor make it
believe central is in contact. Only the headend that opened a batch can answer
for it; a database recreated after a fault numbers its batches in a new epoch,
so central stores them instead of answering "duplicate".
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sqlite3
from pathlib import Path

import aiomqtt
import orjson
import pytest

from gateway.config import BrokerSection
from headend.ingest import Headend
from headend.store import HeadendDB
from store_forward.acks import ack_mac, encode_ack
from store_forward.batch_epoch import LEGACY_EPOCH
from store_forward.codec import JsonCodec, SealedCodec
from store_forward.outbox import Outbox
from store_forward.topics import Topics
from store_forward.uplink import LinkState, Uplink
from tests.harness.mosquitto import Mosquitto
from tests.store_forward.helpers import Site, running, settings, six_quantity_reading, wait_for

PREFIX = "edgegw/v1"


def central_batches(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as db:
        return sorted((str(e), int(s)) for e, s in db.execute("SELECT epoch, seq FROM batches"))


def central_reading_keys(path: Path) -> set[tuple[str, int]]:
    with sqlite3.connect(path) as db:
        return {(str(m), int(t)) for m, t in db.execute("SELECT meter_id, time_ms FROM readings")}


async def uplink_is_up(up: Uplink) -> bool:
    return up.stats.state is LinkState.UP and up.stats.published >= 1


async def test_forged_and_malformed_acks_delete_nothing_and_are_counted(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="store_forward.uplink")
    site = Site(tmp_path)
    codec = site.codec(site.gateway("gw-f"))
    other_gateway = site.codec(site.gateway("gw-o"))
    ob = await Outbox.open(tmp_path / "gw.db")
    for k in range(3):
        await ob.commit_cycle(k, [six_quantity_reading(f"m{j}", 1_000 * k + j, k) for j in range(5)])
    await ob.add_event(9, {"type": "relay_trip", "meter": "m1"})
    up = Uplink(
        ob, gateway_id="gw-f", broker=BrokerSection(port=mosquitto.port), settings=settings(), codec=codec
    )
    ack_topic = Topics(PREFIX, "gw-f").ack
    async with running(up.run()):
        # The batches go out, but no headend listens: nothing was ever stored.
        await wait_for(lambda: uplink_is_up(up), 10, "batches published")
        epoch = await ob.batch_epoch()
        before = await ob.stats()
        pending = await ob.pending_batches()
        seq = pending[0]
        payload = await ob.batch_payload(seq)
        assert payload is not None
        digest = hashlib.sha256(payload).digest()
        wrong_key = other_gateway.ack_key(1)  # another enrolled gateway's genuine ack key
        assert wrong_key is not None

        def forged_mac(status: str, key: bytes, **kw: object) -> bytes:
            fields = dict(gateway_id="gw-f", epoch=epoch, seq=seq, key_id=1, status=status, digest=digest)
            fields.update(kw)  # type: ignore[arg-type]
            return ack_mac(key, **fields)  # type: ignore[arg-type]

        forgeries = [
            b"junk",  # malformed
            b'{"seq": 1, "status": "stored"}',  # the old unauthenticated form: wrong (legacy) epoch
            encode_ack(seq=seq, epoch=epoch, status="stored"),  # no mac: unauthenticated
            encode_ack(seq=seq, epoch=epoch, status="rejected", reason="x"),  # no mac either
            encode_ack(seq=seq, epoch=epoch, status="stored", mac=bytes(32)),  # bad mac
            encode_ack(seq=seq, epoch=epoch, status="stored", mac=forged_mac("stored", wrong_key)),
            encode_ack(seq=999, epoch=epoch, status="stored", mac=bytes(32)),  # never numbered
        ]
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="forger") as forger:
            for f in forgeries:
                await forger.publish(ack_topic, f, qos=1)

            async def all_refused() -> bool:
                return sum(up.stats.acks_refused.values()) >= len(forgeries)

            await wait_for(all_refused, 10, "every forged ack handled")
        assert up.stats.acks_refused == {
            "malformed": 1,
            "wrong epoch": 1,
            "unauthenticated": 2,
            "bad mac": 2,
            "unknown batch": 1,
        }
        after = await ob.stats()
        assert (after.records, after.readings_acked) == (before.records, 0)
        assert set(pending) <= set(await ob.pending_batches())
        assert up.stats.acked == 0 and up.last_contact_ms is None
        # One log line per cause, not per forged ack.
        refusals = [r for r in caplog.records if "ack refused" in r.getMessage()]
        assert sorted(r.getMessage().split("(")[1].split(")")[0] for r in refusals) == [
            "bad mac",
            "malformed",
            "unauthenticated",
            "unknown batch",
            "wrong epoch",
        ]

        # The real headend answers: its acks verify, the backlog drains, contact is noted.
        hdb = await HeadendDB.open(tmp_path / "central.db")
        he = Headend(hdb, host="127.0.0.1", port=mosquitto.port, registry=site.registry())
        async with running(he.run()):

            async def drained() -> bool:
                return (await ob.stats()).records == 0

            await wait_for(drained, 20, "backlog drained by valid acks")
        await hdb.close()
    assert up.stats.acked >= len(pending) and up.last_contact_ms is not None
    forged_causes = {k: v for k, v in up.stats.acks_refused.items() if k != "unknown batch"}
    assert forged_causes == {"malformed": 1, "wrong epoch": 1, "unauthenticated": 2, "bad mac": 2}
    assert len(central_reading_keys(tmp_path / "central.db")) == 15
    await ob.close()


async def test_unsealed_batches_are_deleted_on_ack_only_where_configured(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Encoding 1 has no secret, so its acks prove nothing: by default the gateway
    keeps the batches (central has them anyway) and notes no contact; a development
    set-up opts in with ``allow_unauthenticated_acks``."""
    ob = await Outbox.open(tmp_path / "gw.db")
    await ob.commit_cycle(1, [six_quantity_reading("m1", 1, 1)])
    hdb = await HeadendDB.open(tmp_path / "central.db")
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port)  # no registry: development
    broker = BrokerSection(port=mosquitto.port)
    safe = Uplink(ob, gateway_id="gw-u", broker=broker, settings=settings(), codec=JsonCodec())
    async with running(he.run(), safe.run()):

        async def answered() -> bool:
            return safe.stats.acks_refused.get("unauthenticated", 0) >= 2

        await wait_for(answered, 10, "the headend's unauthenticated acks")
    assert (await ob.stats()).records == 2  # central stored them, the gateway still keeps them
    assert safe.stats.acked == 0 and safe.last_contact_ms is None
    assert central_batches(tmp_path / "central.db") != []

    dev = Uplink(
        ob, gateway_id="gw-u", broker=broker, settings=settings(), codec=JsonCodec(), unauthenticated_acks=True
    )
    async with running(he.run(), dev.run()):

        async def drained() -> bool:
            return (await ob.stats()).records == 0

        await wait_for(drained, 10, "drained with unauthenticated acks allowed")
    assert dev.last_contact_ms is not None
    await hdb.close()
    await ob.close()


async def test_a_database_recreated_after_a_fault_is_stored_not_answered_duplicate(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    site = Site(tmp_path)
    codec = site.codec(site.gateway("gw-r"))
    hdb = await HeadendDB.open(tmp_path / "central.db")
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port, registry=site.registry())
    broker = BrokerSection(port=mosquitto.port)
    epochs = []
    async with running(he.run()):
        for generation, name in enumerate(("gw.db", "gw-recreated.db")):
            # The second database is what a storage fault leaves: empty, numbering from 1.
            ob = await Outbox.open(tmp_path / name)
            for k in range(2):
                t = 10_000 * generation + 1_000 * k
                await ob.commit_cycle(t, [six_quantity_reading(f"m{j}", t + j, k) for j in range(4)])
            up = Uplink(ob, gateway_id="gw-r", broker=broker, settings=settings(), codec=codec)
            async with running(up.run()):

                async def drained() -> bool:
                    return (await ob.stats()).records == 0  # noqa: B023

                await wait_for(drained, 20, f"database {name} drained")
            epochs.append(await ob.batch_epoch())
            await ob.close()
    summary = await hdb.summary("gw-r")
    await hdb.close()
    assert epochs[0] != epochs[1]
    batches = central_batches(tmp_path / "central.db")
    assert {e for e, _ in batches} == set(epochs)
    assert (epochs[0], 1) in batches and (epochs[1], 1) in batches  # seq 1 twice, both stored
    # Every reading of both databases is at central (record ids 1.. repeat, keyed by epoch).
    assert len(central_reading_keys(tmp_path / "central.db")) == 16 == summary["readings"]
    assert summary["conflicting_batches"] == 0


async def test_a_batch_from_before_epochs_pending_in_an_upgraded_database_is_delivered(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A batch numbered and sealed before epochs (version byte 2) goes out as its stored
    bytes; central stores it under the legacy epoch and its MAC'd ack deletes it."""
    site = Site(tmp_path)
    codec = site.codec(site.gateway("gw-l"))
    ob = await Outbox.open(tmp_path / "gw.db")
    await ob.add_event(1, {"type": "old"})
    old = await ob.next_batch(
        1, pack=lambda s, r, m, *, epoch: codec.pack("gw-l", s, r, m, epoch=LEGACY_EPOCH)
    )
    assert old is not None and old.payload is not None and old.payload[0] == 0x02
    with sqlite3.connect(tmp_path / "gw.db") as db:  # as the database from before epochs had it
        db.execute("UPDATE batches SET epoch = '' WHERE seq = ?", (old.seq,))
    await ob.add_event(2, {"type": "new"})
    hdb = await HeadendDB.open(tmp_path / "central.db")
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port, registry=site.registry())
    up = Uplink(
        ob, gateway_id="gw-l", broker=BrokerSection(port=mosquitto.port), settings=settings(), codec=codec
    )
    async with running(he.run(), up.run()):

        async def drained() -> bool:
            return (await ob.stats()).records == 0

        await wait_for(drained, 20, "old and new batches drained")
    epoch = await ob.batch_epoch()
    await hdb.close()
    await ob.close()
    assert central_batches(tmp_path / "central.db") == sorted([("", old.seq), (epoch, old.seq + 1)])
    assert up.stats.acks_refused == {}


async def test_an_ack_for_a_batch_sealed_under_an_earlier_key_still_verifies(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """After a rotation of the uplink key, batches sealed under the old key id are still
    acknowledged: the codec keeps the older keys for checking acks."""
    site = Site(tmp_path)
    ks = site.gateway("gw-k")
    old_codec = site.codec(ks)
    ob = await Outbox.open(tmp_path / "gw.db")
    await ob.add_event(1, {"type": "sealed under key 1"})
    b = await ob.next_batch(1, pack=functools.partial(old_codec.pack, "gw-k"))
    assert b is not None
    # The new codec (key id 2, with key 1 kept for acks); the headend knows both ids.
    from store_forward.uplink_keys import derive_uplink_key

    shared = ks.exchange(site.headend_public)
    k2 = derive_uplink_key(shared, "gw-k", site.headend_public, 2)
    k1 = derive_uplink_key(shared, "gw-k", site.headend_public, 1)
    new_codec = SealedCodec(2, k2, older={1: k1})
    doc = orjson.loads((site.registry_dir / "gw-k.json").read_bytes())
    doc.setdefault("key_versions", {})["uplink-seal"] = 2
    (site.registry_dir / "gw-k.json").write_bytes(orjson.dumps(doc))
    hdb = await HeadendDB.open(tmp_path / "central.db")
    he = Headend(hdb, host="127.0.0.1", port=mosquitto.port, registry=site.registry())
    await ob.add_event(2, {"type": "sealed under key 2"})
    up = Uplink(
        ob, gateway_id="gw-k", broker=BrokerSection(port=mosquitto.port), settings=settings(), codec=new_codec
    )
    async with running(he.run(), up.run()):

        async def drained() -> bool:
            return (await ob.stats()).records == 0

        await wait_for(drained, 20, "batches of both key ids drained")
    await hdb.close()
    await ob.close()
    assert up.stats.acks_refused == {} and he.rejected == 0
