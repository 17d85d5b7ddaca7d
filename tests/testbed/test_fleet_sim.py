"""The fleet simulator's gateways are what a headend expects of real ones."""

from __future__ import annotations

from pathlib import Path

import orjson

from headend.registry import GatewayRegistry, generate_headend_key, load_headend_key
from provisioning.keys import Keystore
from store_forward import wire
from store_forward.codec import decode
from store_forward.records import RecordClass
from testbed import fleet_sim


def fleet(tmp_path: Path, n: int) -> tuple[list[fleet_sim.SimGateway], GatewayRegistry]:
    key = tmp_path / "headend.pem"
    public = generate_headend_key(key)
    gws = fleet_sim.provision(n, tmp_path / "registry", public, seed=5)
    return gws, GatewayRegistry.load(load_headend_key(key), tmp_path / "registry")


def test_enrollment_is_what_keys_export_public_writes(tmp_path: Path) -> None:
    gws, registry = fleet(tmp_path, 3)
    real = Keystore.init(tmp_path / "keys", "gw-real").export_public()
    for g in gws:
        doc = orjson.loads((tmp_path / "registry" / f"{g.gateway_id}.json").read_bytes())
        assert doc.keys() == real.keys()
        assert doc["gateway_id"] == g.gateway_id
        # the headend derives the very key the simulated gateway seals with
        assert registry.key_lookup(g.gateway_id, fleet_sim.KEY_ID) == g.key
    assert len({g.key for g in gws}) == 3 and len({g.epoch for g in gws}) == 3


def test_batches_open_at_the_headend_numbered_as_an_outbox_numbers_them(tmp_path: Path) -> None:
    gws, registry = fleet(tmp_path, 4)
    spec = fleet_sim.FleetSpec(meters=7, health_every=2, seed=5)
    cmds = {gws[1].gateway_id: ["cmd-a", "cmd-b"]}
    rounds = fleet_sim.seal_rounds(gws, spec, 3, commands=cmds)
    by_gw: dict[str, list[wire.DecodedBatch]] = {}
    for r in rounds:
        for b in r:
            d = decode(b.payload, registry.key_lookup, allow_plain=False)
            assert (
                isinstance(d, wire.DecodedBatch)
                and d.seq == b.seq
                and d.epoch == gws[b.gateway].epoch
            )
            assert len(d.records) == b.records
            by_gw.setdefault(d.gateway_id, []).append(d)
    for g in gws:
        batches = by_gw[g.gateway_id]
        assert [d.seq for d in batches] == list(range(1, len(batches) + 1))
        ids = [r.id for d in batches for r in d.records]
        assert ids == list(range(1, len(ids) + 1))  # contiguous, none twice
        classes = [{int(r.cls) for r in d.records} for d in batches]
        assert all(len(c) == 1 for c in classes)  # one class per batch
        readings = [r for d in batches for r in d.records if int(r.cls) == RecordClass.BILLING]
        assert len(readings) == 3 * 7
        assert len({(r.body["m"], r.body["t"]) for r in readings}) == 21
        events = [r.body for d in batches for r in d.records if r.kind == "event"]
        health = [e for e in events if e["type"] == "gateway.health"]
        assert len(health) == 2  # rounds 0 and 2
        results = [e["id"] for e in events if e["type"] == "command_result"]
        assert results == (["cmd-a", "cmd-b"] if g is gws[1] else [])
        # the registers only go up, and the rates add up to the total
        per_meter: dict[str, list[float]] = {}
        for r in readings:
            v = r.body["v"]
            total = float(v["energy_import_kwh"])
            assert abs(sum(float(x) for k, x in v.items() if "_t" in k) - total) < 1e-6
            per_meter.setdefault(r.body["m"], []).append(total)
        assert all(s == sorted(s) for s in per_meter.values())


def test_sealing_in_workers_makes_the_same_records(tmp_path: Path) -> None:
    gws, registry = fleet(tmp_path, 6)
    spec = fleet_sim.FleetSpec(meters=5, seed=9)

    def opened(rounds: list[list[fleet_sim.SealedBatch]]) -> list[object]:
        return [
            [
                (r.id, r.kind, r.body)
                for r in decode(b.payload, registry.key_lookup, allow_plain=False).records
            ]
            for rr in rounds
            for b in rr
        ]

    one = fleet_sim.seal_rounds(gws, spec, 2, workers=1)
    two = fleet_sim.seal_rounds(gws, spec, 2, workers=2)
    assert opened(one) == opened(two)
    assert [b.payload for r in one for b in r] != [
        b.payload for r in two for b in r
    ]  # fresh nonces
