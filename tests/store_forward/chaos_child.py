"""The gateway's storage and uplink in a process a test may SIGKILL at any moment.

    python -m tests.store_forward.chaos_child DB KEYSTORE HEADEND_PUB_B64 BROKER_PORT MODE

MODE ``ingest``: commit a poll cycle of 4 meters every 20 ms while the uplink
drains; ``drain``: only drain. Prints ``open <epoch>`` once the outbox is open.
"""

from __future__ import annotations

import asyncio
import sys
import time

from gateway.config import BrokerSection, UplinkSection
from provisioning.keys import Keystore
from store_forward.codec import SealedCodec
from store_forward.outbox import Outbox
from store_forward.storage_keys import StorageKeys
from store_forward.uplink import Uplink
from store_forward.uplink_keys import gateway_uplink_key, parse_public_key
from tests.store_forward.helpers import six_quantity_reading


async def main(db: str, keystore: str, headend_pub: str, port: int, mode: str) -> None:
    ks = Keystore.open(keystore)
    key = gateway_uplink_key(ks, parse_public_key(headend_pub))
    ob = await Outbox.open(db, keys=StorageKeys.from_keystore(ks))
    print(f"open {ob.epoch}", flush=True)
    settings = UplinkSection(
        batch_max_records=40, ack_timeout_s=1.0, window=3, reconnect_min_s=0.05, reconnect_max_s=0.3
    )
    up = Uplink(
        ob, gateway_id=ks.gateway_id, broker=BrokerSection(port=port, keepalive_s=5),
        settings=settings, codec=SealedCodec(key.key_id, key.key),
    )
    task = asyncio.create_task(up.run())
    k = 0
    while True:
        if mode == "ingest":
            t = time.time_ns() // 1_000_000
            await ob.commit_cycle(t, [six_quantity_reading(f"m{j}", t * 10 + j, k + j) for j in range(4)])
            up.notify()
            k += 4
        await asyncio.sleep(0.02)
        if task.done():
            task.result()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
