"""Skipping quiet accounts decides exactly what evaluating every account decides.

The prepaid shell skips the policy evaluation of an account when nothing changed
since its last one and no instant at which the decision may change has come
(:func:`gateway.billing.cutoff.next_change_ms`), and the fixed-charge scan when
no charge can start in the span (:mod:`gateway.billing.ledger_cache`). Two
shells on two real databases receive the same random story — ticks a moment or
hours apart, readings that debit, top-ups, relay positions read back, contact
with central coming and going, the clock stepping back, transactions rolled
back — one skipping, one evaluating every account in full every time. Every
step must hand the same relay intents, store the same records (events and
charges, with their instants) and leave the same cutoff states, policy points
and fixed-charge positions.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from firmware_bridge.reading import Measurement, Quantity, Reading
from gateway.billing.account import load_account
from gateway.billing.cutoff import Contact
from gateway.billing.tariff_file import load_book
from gateway.database import open_database
from gateway.prepaid import Prepaid, PrepaidAccount
from store_forward.outbox import Outbox
from tests.gateway.billing._util import ms

T0 = ms("2026-09-21T20:30")  # before a 22:00 no-disconnect window
SECOND, MINUTE, HOUR = 1_000, 60_000, 3_600_000

ACCOUNT = """
account = "{name}"
timezone = "Asia/Shanghai"
opening_balance = "1.00"
meters = ["{meter}"]
protected = false

[limits]
alarm1 = "0.60"
alarm2 = "0.30"
overdraft = "0.10"
close_permit = "0.05"
close_mode = "{close_mode}"
reconnect_delay_s = {reconnect}
relay_min_interval_s = {interval}
{extra}
"""
WINDOW = """contact_protect_after_s = 600
startup_protect_s = 90

[[no_disconnect]]
start = "22:00"
end = "06:00"
"""
FLAT = """
id = "flat-q"
version = 1
effective_from = "2026-01-01T00:00:00+08:00"
timezone = "Asia/Shanghai"
price = "0.5600"
"""
DAILY = """
id = "daily-q"
version = 1
effective_from = "2026-01-01T00:00:00+08:00"
timezone = "Asia/Shanghai"
price = "0.9000"
[[fixed]]
name = "standing"
period = "daily"
amount = "0.1500"
"""
# account -> (meter, account file's extra lines, close mode, reconnect delay s, relay interval s, tariff)
ACCOUNTS = {
    "acct-w": ("m-w", WINDOW, "direct", 30, 10, FLAT),
    "acct-d": ("m-d", "", "allowed", 0, 0, DAILY),
    "acct-p": ("m-p", "", "direct", 5, 20, DAILY),
}
METERS = {v[0]: k for k, v in ACCOUNTS.items()}

step_ms = st.one_of(
    st.integers(1, 3 * SECOND),
    st.integers(1, 10 * MINUTE),
    st.integers(1, 6 * HOUR),
)
op = st.one_of(
    st.tuples(st.just("tick"), step_ms),
    st.tuples(st.just("tick"), st.integers(1, 3 * SECOND)),
    # register step in 0.01 kWh (0.56 or 0.90 yuan per kWh): one may take 1.00 yuan to a trip
    st.tuples(st.just("read"), st.sampled_from(sorted(METERS)), st.integers(0, 250), step_ms),
    st.tuples(st.just("topup"), st.sampled_from(sorted(ACCOUNTS)), st.integers(1, 2_000_000)),
    st.tuples(st.just("relay"), st.sampled_from(sorted(METERS)), st.booleans()),
    st.tuples(st.just("contact"), st.booleans()),  # heard from central now / lost (never heard)
    st.tuples(st.just("back"), st.integers(1, 5 * MINUTE)),  # the clock steps back
)
story = st.lists(st.tuples(st.lists(op, min_size=1, max_size=6), st.booleans()), min_size=1, max_size=30)
TICKS = [("tick", SECOND)] * 3 + [("tick", 3 * SECOND)] * 8


def _tx(*ops: tuple[Any, ...]) -> tuple[list[tuple[Any, ...]], bool]:
    return (list(ops), False)


# Stories that reach each time-driven instant (the random ones reach them less often).
RECONNECT = [  # a trip, a top-up, the reconnect delay and the relay rate limit run out
    _tx(("read", "m-p", 0, SECOND)), _tx(("read", "m-p", 250, SECOND)), _tx(("topup", "acct-p", 2_000_000)),
    *(_tx(t) for t in TICKS),
]
WINDOW_END = [  # a trip due at 21:50 waits for contact, then for the window's end at 06:00
    _tx(("read", "m-w", 0, SECOND)), _tx(("tick", 80 * MINUTE)), _tx(("read", "m-w", 250, SECOND)),
    _tx(("contact", True)), _tx(("tick", SECOND)), _tx(("tick", 4 * HOUR)), _tx(("tick", 4 * HOUR)),
    _tx(("contact", True)), _tx(("tick", SECOND)), _tx(("tick", 9 * MINUTE)), _tx(("tick", 2 * MINUTE)),
]
CONTACT_LOST = [  # contact protection starts 600 s after the last contact, then restores
    _tx(("read", "m-w", 0, SECOND)), _tx(("contact", True)), _tx(("read", "m-w", 250, 2 * HOUR)),
    _tx(("tick", 5 * MINUTE)), _tx(("tick", 5 * MINUTE)), _tx(("tick", SECOND)), _tx(("tick", SECOND)),
]


def write_site(tmp: Path) -> dict[str, PrepaidAccount]:
    accounts = {}
    for name, (meter, extra, mode, reconnect, interval, tariff) in ACCOUNTS.items():
        (tmp / f"{name}.toml").write_text(
            ACCOUNT.format(name=name, meter=meter, extra=extra, close_mode=mode, reconnect=reconnect,
                           interval=interval), encoding="utf-8")  # fmt: skip
        (tmp / f"{name}-tariff.toml").write_text(tariff, encoding="utf-8")
        accounts[name] = PrepaidAccount(
            load_account(tmp / f"{name}.toml"), load_book([tmp / f"{name}-tariff.toml"], "Asia/Shanghai")
        )
    return accounts


class Side:
    def __init__(self, prepaid: Prepaid, outbox: Outbox) -> None:
        self.prepaid, self.outbox = prepaid, outbox

    async def records(self) -> list[tuple[int, str, int, dict[str, Any]]]:
        """Every record stored, read back through the outbox."""
        out: list[tuple[int, str, int, dict[str, Any]]] = []
        seen: list[int] = []
        while (b := await self.outbox.next_batch(9, exclude=seen, max_records=10_000)) is not None:
            seen.append(b.seq)
            out += [(r.id, r.kind, r.created_ms, r.body) for r in b.records]
        return sorted(out, key=lambda r: r[0])

    def memory(self) -> tuple[Any, ...]:
        p = self.prepaid
        return (dict(p._points), dict(p.ledger._cutoff), dict(p.ledger._fixed_until))

    async def step(self, db: Any, o: tuple[Any, ...], w: World) -> list[Any]:
        p = self.prepaid
        contact = Contact(w.contact, T0)
        if o[0] == "tick":
            # as the daemon's writer does: a quiet tick is done without tick_in
            if p.tick_quiet(w.now, contact):
                event("quiet tick")
                return []
            return await p.tick_in(db, self.outbox, w.now, contact)
        if o[0] == "read":
            meter = o[1]
            r = Reading(meter, w.now, {Quantity.ENERGY_IMPORT: Measurement(w.kwh[meter])})
            ids = await self.outbox.commit_cycle_in(db, w.now, [r])
            return await p.on_readings_in(db, self.outbox, [(ids[0], r)], w.now, contact)
        if o[0] == "topup":
            account, amount = o[1], o[2]
            body = {"account": account, "amount_micro": amount, "purchase_counter": w.counter[account],
                    "payment_channel": "counter"}  # fmt: skip
            res = await p.apply_topup_in(db, body, command_id=f"sale-{account}-{w.counter[account]}",
                                         channel="cli", now_ms=w.now, outbox=self.outbox)  # fmt: skip
            return [res["status"]]
        if o[0] == "relay":
            return await p.on_relay_states_in(db, self.outbox, [(o[1], o[2])], w.now, contact)
        return []
READ_AFTER_TICK = [  # readings stamped before the last tick (a slice committed after it), the clock back
    _tx(("read", "m-p", 0, SECOND)), _tx(("read", "m-p", 250, SECOND)), _tx(("topup", "acct-p", 2_000_000)),
    _tx(("tick", 2 * SECOND)), _tx(("back", 30 * SECOND)), _tx(("read", "m-p", 0, SECOND)),
    _tx(("tick", 4 * SECOND)), _tx(("back", 3 * SECOND), ("read", "m-p", 0, 1)), _tx(("tick", 20 * SECOND)),
    _tx(("back", 2 * MINUTE)), _tx(("read", "m-p", 0, SECOND)), _tx(("tick", SECOND)),
]


async def open_side(tmp: Path, accounts: dict[str, PrepaidAccount], *, skip: bool) -> Side:
    prepaid = Prepaid(accounts, METERS, skip_quiet=skip)
    outbox = await open_database(tmp / f"gw-{skip}.db")
    prepaid.attach(outbox)
    async with outbox.transaction() as db:
        await prepaid.start_in(db, T0, outbox)
    return Side(prepaid, outbox)


@dataclass(frozen=True)
class World:
    """What both sides see at one operation: the time, the registers, the top-up
    counters and the last contact with central."""

    now: int
    kwh: dict[str, Decimal]
    counter: dict[str, int]
    contact: int | None

    def after(self, o: tuple[Any, ...]) -> World:
        if o[0] == "tick":
            return replace(self, now=self.now + o[1])
        if o[0] == "read":
            _, meter, step, dt = o
            return replace(self, now=self.now + dt, kwh={**self.kwh, meter: self.kwh[meter] + Decimal(step) / 100})
        if o[0] == "topup":
            return replace(self, now=self.now + 1, counter={**self.counter, o[1]: self.counter[o[1]] + 1})
        if o[0] == "contact":
            return replace(self, contact=self.now if o[1] else None)
        if o[0] == "back":
            return replace(self, now=self.now - o[1])
        return self


async def _run(tmp: Path, txs: list[tuple[list[tuple[Any, ...]], bool]]) -> None:
    accounts = write_site(tmp)
    skipping = await open_side(tmp, accounts, skip=True)
    full = await open_side(tmp, {k: replace(v) for k, v in accounts.items()}, skip=False)
    world = World(T0, dict.fromkeys(METERS, Decimal("100")), dict.fromkeys(ACCOUNTS, 0), None)
    try:
        for ops, roll_back in txs:
            worlds = []
            w = world
            for o in ops:
                w = w.after(o)
                worlds.append(w)
            results = []
            for side in (skipping, full):
                got: list[Any] = []
                try:
                    async with side.outbox.transaction() as db:
                        for o, wo in zip(ops, worlds, strict=True):
                            got.append(await side.step(db, o, wo))
                        if roll_back:
                            raise _RollBack
                except _RollBack:
                    pass
                results.append(got)
            assert results[0] == results[1]
            assert skipping.memory() == full.memory()
            for o, r in zip(ops, results[0], strict=True):
                if o[0] == "topup":
                    event(f"top-up {r[0]}")
                elif r:
                    event(f"{o[0]}: {' '.join(sorted({i.op.value for i in r}))}")
            # a transaction rolled back: the world goes on from before it, a moment later
            world = replace(world, now=world.now + 1) if roll_back else w
        assert await skipping.records() == await full.records()
    finally:
        await skipping.outbox.close()
        await full.outbox.close()


class _RollBack(Exception):
    pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(txs=story)
@example(txs=RECONNECT)
@example(txs=WINDOW_END)
@example(txs=CONTACT_LOST)
@example(txs=READ_AFTER_TICK)
def test_skipping_quiet_accounts_decides_what_evaluating_every_account_decides(
    tmp_path_factory: pytest.TempPathFactory, txs: list[tuple[list[tuple[Any, ...]], bool]]
) -> None:
    asyncio.run(_run(tmp_path_factory.mktemp("quiet"), txs))


def test_a_quiet_tick_skips_the_evaluations(tmp_path: Path) -> None:
    """The skip happens (the test above would pass without it): a tick a second after
    the last, with nothing changed, evaluates no account's policy."""

    async def run() -> None:
        side = await open_side(tmp_path, write_site(tmp_path), skip=True)
        calls = 0
        import gateway.prepaid as shell

        real = shell.follow

        def counting(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(*a, **k)

        shell.follow = counting  # type: ignore[assignment]
        try:
            contact = Contact(T0, T0)
            async with side.outbox.transaction() as db:
                await side.prepaid.tick_in(db, side.outbox, T0 + SECOND, contact)
            assert calls == len(ACCOUNTS)  # the first evaluation of each account is in full
            async with side.outbox.transaction() as db:
                await side.prepaid.tick_in(db, side.outbox, T0 + 2 * SECOND, contact)
            assert calls == len(ACCOUNTS)
            assert {p.time_ms for p in side.prepaid._points.values()} == {T0 + 2 * SECOND}
        finally:
            shell.follow = real  # type: ignore[assignment]
            await side.outbox.close()

    asyncio.run(run())
