"""Child process for SIGKILL tests: commits poll cycles into an outbox forever.

    python -m tests.store_forward.outbox_child DB START

Prints ``open <epoch>`` once the outbox is open, then ``c <n>`` after each
committed cycle (n = readings committed by this process so far).
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal

from firmware_bridge.reading import Measurement, Quantity, Reading
from store_forward.outbox import Outbox


async def main(db: str, start: int) -> None:
    ob = await Outbox.open(db)
    print(f"open {ob.epoch}", flush=True)
    n = 0
    while True:
        readings = [
            Reading(
                f"m{j}",
                start + n + j,
                {
                    Quantity.ENERGY_IMPORT: Measurement(Decimal(n + j) / 100),
                    Quantity.VOLTAGE: Measurement(Decimal("230.1")),
                },
            )
            for j in range(5)
        ]
        await ob.commit_cycle(start + n, readings)
        n += 5
        print(f"c {n}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
