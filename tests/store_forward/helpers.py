"""Shared helpers for store_forward tests: sealed gateways, a headend with a registry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import orjson

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.config import UplinkSection
from headend.registry import GatewayRegistry, generate_headend_key, load_headend_key
from provisioning.keys import Keystore
from store_forward.codec import SealedCodec
from store_forward.uplink_keys import gateway_uplink_key


def six_quantity_reading(meter: str, t: int, k: int) -> Reading:
    return Reading(
        meter,
        t,
        {
            Quantity.ENERGY_IMPORT: Measurement(Decimal(1000 + k) / 100),
            Quantity.VOLTAGE: Measurement(Decimal(2300 + k % 7) / 10),
            Quantity.CURRENT: Measurement(Decimal(5000 + k % 13) / 1000),
            Quantity.POWER: Measurement(Decimal(11500 + k % 17) / 10000),
            Quantity.POWER_FACTOR: Measurement(Decimal(990 - k % 5) / 1000),
            Quantity.FREQUENCY: Measurement(Decimal(5000 + k % 3) / 100),
        },
    )


class Site:
    """A headend key, a registry directory, and gateways enrolled in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.registry_dir = root / "registry"
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        self.headend_key_path = root / "headend.x25519.pem"
        self.headend_public = generate_headend_key(self.headend_key_path)

    def gateway(self, gateway_id: str, *, enroll: bool = True) -> Keystore:
        ks = Keystore.init(self.root / f"keys-{gateway_id}", gateway_id)
        if enroll:
            (self.registry_dir / f"{gateway_id}.json").write_bytes(orjson.dumps(ks.export_public()))
        return ks

    def codec(self, ks: Keystore) -> SealedCodec:
        k = gateway_uplink_key(ks, self.headend_public)
        return SealedCodec(k.key_id, k.key)

    def registry(self) -> GatewayRegistry:
        return GatewayRegistry.load(load_headend_key(self.headend_key_path), self.registry_dir)


def settings(**kw: float) -> UplinkSection:
    base: dict[str, float] = {
        "batch_max_records": 200,
        "ack_timeout_s": 2.0,
        "window": 3,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
    }
    base.update(kw)
    return UplinkSection(**base)  # type: ignore[arg-type]


async def wait_for(pred: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextlib.asynccontextmanager
async def running(*coros: Awaitable[None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
