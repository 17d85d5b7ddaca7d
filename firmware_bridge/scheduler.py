"""Protocol-neutral bus scheduler: one transaction at a time, per-meter health.

A bus (one RS-485 line or one Modbus TCP gateway) is half-duplex with one
master. :class:`BusScheduler` owns that bus: it runs every operation (a meter
read, a relay command, a relay read-back) under one lock, keeps the
protocol's silent interval between operations, applies per-meter timeouts and
retries, and tracks each meter's health.

Health policy (pure functions, see :func:`on_success` / :func:`on_failure`):

* **online** means the meter answered correctly on its last attempt, not
  that the port is open.
* Each failure increments ``consecutive_failures``; the next attempt is
  deferred by an exponential back-off (``backoff_ms``). After
  ``quarantine_after`` consecutive failures the meter is **quarantined** and
  only re-probed every ``reprobe_ms``.
* Retries (``retries`` per operation) are only spent on a meter that was
  online, and only for timeouts and garbled answers (an exception reply or a
  dead link is not retried): a meter already failing gets one attempt when
  due, so a dead meter costs at most one timeout per cycle (1 + retries in
  the cycle it stops answering) and never stalls the others.
* The first correct answer resets the meter to online.
* A transport error (port gone, TCP refused) is the bus's fault: it makes
  the meter not online but does not advance its back-off or quarantine.
* When two or more meters were asked in a cycle and none answered (supply
  outage in the area, cut cable, dead converter) the bus is **silent**: one
  sentinel meter per cycle is probed, round-robin, and the first answer
  wakes every meter, so a returning supply is seen within one cycle instead
  of one quarantine re-probe period.

The scheduler never creates tasks of its own; callers own the loop that calls
:meth:`BusScheduler.run_cycle`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from firmware_bridge import timing
from firmware_bridge.driver import MeterDriver, MeterError, MeterTimeout
from firmware_bridge.reading import Reading
from firmware_bridge.timing import backstop_s, rtu_t35_s

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Pure timing arithmetic (the formulas live in firmware_bridge.timing)


def char_time_s(baud: int, bits_per_char: int = 11) -> float:
    return bits_per_char / baud


def dlt645_gap_s(baud: int) -> float:
    """Inter-frame gap used between DL/T 645 transactions (8E1): max(20 ms, 4 characters)."""
    return timing.dlt645_gap_s(baud)


def silent_interval_s(
    protocol: str, bus_type: str, baud: int, parity: str = "E", stop_bits: int = 1
) -> float:
    """Gap kept between two operations on one bus."""
    if bus_type == "tcp":
        return 0.0
    if protocol == "modbus":
        return rtu_t35_s(baud, parity, stop_bits)
    if protocol == "dlt645":
        return timing.dlt645_gap_s(baud, parity, stop_bits)
    raise ValueError(f"unknown protocol {protocol!r}")


def modbus_rtu_read_time_s(baud: int, registers: int, response_delay_s: float = 0.0) -> float:
    """Wire time of one RTU register read: (8 + 5 + 2N) characters + 2·t3.5 + meter delay."""
    chars = 8 + 5 + 2 * registers
    return chars * char_time_s(baud) + 2 * rtu_t35_s(baud) + response_delay_s


# ---------------------------------------------------------------------------
# Pure health policy


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base_ms: int = 5_000  # delay after the first failure
    factor: int = 2
    max_ms: int = 300_000  # ceiling of the back-off
    quarantine_after: int = 5  # consecutive failures before quarantine
    reprobe_ms: int = 600_000  # re-probe period of a quarantined meter

    def __post_init__(self) -> None:
        if self.base_ms < 0 or self.max_ms < self.base_ms or self.factor < 1:
            raise ValueError("need 0 <= base_ms <= max_ms and factor >= 1")
        if self.quarantine_after < 1 or self.reprobe_ms < 0:
            raise ValueError("need quarantine_after >= 1 and reprobe_ms >= 0")


def backoff_ms(policy: BackoffPolicy, consecutive_failures: int) -> int:
    """Delay before the next attempt after ``consecutive_failures`` (>= 1) failures."""
    if consecutive_failures <= 0:
        return 0
    if consecutive_failures >= policy.quarantine_after:
        return policy.reprobe_ms
    # cap the exponent before multiplying: no huge integers for long outages
    delay = policy.base_ms
    for _ in range(consecutive_failures - 1):
        delay *= policy.factor
        if delay >= policy.max_ms:
            return policy.max_ms
    return min(delay, policy.max_ms)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    kind: str  # MeterError.kind: timeout, frame, refused, transport, error
    text: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class MeterHealth:
    meter_id: str
    online: bool = False  # answered correctly on the last attempt
    consecutive_failures: int = 0
    total_failures: int = 0
    total_successes: int = 0
    last_good_ms: int | None = None
    last_attempt_ms: int | None = None
    last_error: ErrorInfo | None = None
    next_attempt_ms: int = 0  # not attempted before this time
    quarantined: bool = False

    @property
    def state(self) -> str:
        """unknown / online / failing / quarantined."""
        if self.quarantined:
            return "quarantined"
        if self.online:
            return "online"
        return "failing" if self.consecutive_failures else "unknown"


def is_due(h: MeterHealth, now_ms: int) -> bool:
    return now_ms >= h.next_attempt_ms


def on_success(h: MeterHealth, now_ms: int) -> MeterHealth:
    # (built field by field and by position, in the order of MeterHealth's fields: this
    # runs for every reading, and dataclasses.replace or keywords cost twice as much)
    return MeterHealth(
        h.meter_id,
        True,  # online
        0,  # consecutive_failures
        h.total_failures,
        h.total_successes + 1,
        now_ms,  # last_good_ms
        now_ms,  # last_attempt_ms
        h.last_error,
        0,  # next_attempt_ms
        False,  # quarantined
    )


def on_failure(h: MeterHealth, now_ms: int, kind: str, text: str, policy: BackoffPolicy) -> MeterHealth:
    """A failed attempt. A ``transport`` error is the bus's fault, not the meter's:
    the meter is not online, but its back-off and quarantine do not advance."""
    if kind in BUS_LEVEL:
        return dataclasses.replace(
            h,
            online=False,
            total_failures=h.total_failures + 1,
            last_attempt_ms=now_ms,
            last_error=ErrorInfo(kind, text, now_ms),
        )
    n = h.consecutive_failures + 1
    return dataclasses.replace(
        h,
        online=False,
        consecutive_failures=n,
        total_failures=h.total_failures + 1,
        last_attempt_ms=now_ms,
        last_error=ErrorInfo(kind, text, now_ms),
        next_attempt_ms=now_ms + backoff_ms(policy, n),
        quarantined=n >= policy.quarantine_after,
    )


def wake(h: MeterHealth, now_ms: int) -> MeterHealth:
    """Make a failing or quarantined meter due now (the bus came back)."""
    return h if h.next_attempt_ms <= now_ms else dataclasses.replace(h, next_attempt_ms=now_ms)


def bus_went_silent(attempted: int, answered: int, kinds: Iterable[str]) -> bool:
    """A cycle in which several meters were asked and none answered at all.

    Healthy meters are due every cycle, so "nobody answered" with two or more
    attempts means no healthy meter is left: a supply outage in the area, a
    cut cable or a dead converter, rather than many meters failing at once.
    """
    return attempted >= 2 and answered == 0 and all(k in SILENT_KINDS for k in kinds)


# Failures that say nothing about the meter itself.
BUS_LEVEL: frozenset[str] = frozenset({"transport"})
# Failures consistent with "nobody on the line answers".
SILENT_KINDS: frozenset[str] = frozenset({"timeout", "transport"})

# An exception reply is deterministic (wrong map, unsupported register) and a
# transport error fails fast until the link is back: retrying in the same cycle
# only costs bus time.
# A reply from another address is deterministic too (a misconfigured meter).
NOT_RETRIED: frozenset[str] = frozenset({"refused", "transport", "address"})


def attempts_for(h: MeterHealth, retries: int) -> int:
    """Attempts to spend this cycle: retries only for a meter that was online."""
    return 1 + retries if h.online or h.total_failures + h.total_successes == 0 else 1


# ---------------------------------------------------------------------------
# Metrics


@dataclass
class BusMetrics:
    """Counters of one bus since start (monotonic seconds)."""

    started_s: float
    operations: int = 0  # scheduler operations (reads + relay operations)
    attempts: int = 0  # attempts including retries
    successes: int = 0
    busy_s: float = 0.0  # time the bus was held by an operation
    errors: Counter[str] = field(default_factory=Counter)  # by MeterError.kind
    cycles: int = 0
    last_cycle_s: float = 0.0

    def rate_per_s(self, now_s: float) -> float:
        elapsed = now_s - self.started_s
        return self.attempts / elapsed if elapsed > 0 else 0.0

    def utilisation(self, now_s: float) -> float:
        elapsed = now_s - self.started_s
        return min(1.0, self.busy_s / elapsed) if elapsed > 0 else 0.0

    def snapshot(self, now_s: float) -> dict[str, object]:
        """Counters plus rates, JSON-ready (for status pages and benchmarks)."""
        return {
            "operations": self.operations,
            "attempts": self.attempts,
            "successes": self.successes,
            "errors": dict(self.errors),
            "cycles": self.cycles,
            "last_cycle_s": round(self.last_cycle_s, 4),
            "transactions_per_s": round(self.rate_per_s(now_s), 3),
            "utilisation": round(self.utilisation(now_s), 4),
        }


@dataclass(frozen=True)
class CycleResult:
    readings: list[Reading]
    health: dict[str, MeterHealth]
    skipped: list[str]  # meters not asked this cycle (back-off, quarantine, silent bus)
    duration_s: float
    bus_silent: bool = False  # no meter answers: only one sentinel meter is probed per cycle


# ---------------------------------------------------------------------------
# The scheduler (imperative shell)


class _ReadDeadline:
    """The hard deadline of the bus's reads, one after another, on one timer.

    What ``asyncio.timeout`` around each read would do, without setting and
    cancelling a timer per read: reads follow each other well within their
    deadlines, so the timer is armed once and, when it fires, either cancels
    the read still running past its deadline or is re-armed for the current
    read's deadline (nothing, while no read runs). Only one read runs at a time
    (the bus lock).
    """

    __slots__ = ("_cancelling", "_deadline", "_task", "_timer", "expired")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._cancelling = 0
        self.expired = False

    def start(
        self,
        seconds: float,
        loop: asyncio.AbstractEventLoop | None = None,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        """The current task's read must end within ``seconds``.

        ``loop`` and ``task``, the running loop and the current task, where the caller
        already has them (a cycle's reads: asking costs a getpid() each on 3.11).
        """
        if loop is None or task is None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._deadline = deadline = loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._fire, deadline)

    def _fire(self, armed_for: float) -> None:
        self._timer = None
        task = self._task
        if task is None:
            return  # no read running: armed again by the next one
        if self._deadline <= armed_for:
            self.expired = True
            task.cancel()
        else:
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._fire, self._deadline)

    def stop(self) -> bool:
        """The read ended; True if its deadline cancelled it (the CancelledError
        is then this deadline's, not a caller's)."""
        task, self._task = self._task, None
        if not self.expired or task is None:
            return False
        self.expired = False
        return task.uncancel() <= self._cancelling


class BusScheduler:
    """Owns one bus; see the module documentation for the policy."""

    def __init__(
        self,
        name: str,
        drivers: Sequence[MeterDriver],
        *,
        silent_interval_s: float = 0.0,
        timeout_s: float = 1.0,
        retries: int = 1,
        policy: BackoffPolicy | None = None,
        meter_timeouts: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        ids = [d.meter_id for d in drivers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"bus {name}: duplicate meter ids")
        self.name = name
        self.drivers: dict[str, MeterDriver] = {d.meter_id: d for d in drivers}
        self.silent_interval_s = silent_interval_s
        self.timeout_s = timeout_s
        self.retries = retries
        self.policy = policy or BackoffPolicy()
        self.meter_timeouts = dict(meter_timeouts or {})
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._last_end: float | None = None
        self._health: dict[str, MeterHealth] = {mid: MeterHealth(mid) for mid in self.drivers}
        self.metrics = BusMetrics(started_s=clock())
        # transports built by firmware_bridge.bus.open_bus, by kind (relay actuators use them)
        self.transports: dict[str, Any] = {}
        # relay actuators and their minimum intervals, by meter id (see firmware_bridge.relay)
        self.relays: dict[str, Any] = {}
        self.relay_min_interval_s: dict[str, float] = {}
        self.bus_silent = False  # nobody answered last time: probe one sentinel per cycle
        self._sentinel = 0
        self._read_deadline = _ReadDeadline()

    @property
    def health(self) -> dict[str, MeterHealth]:
        return dict(self._health)

    def deadline_s(self, meter_id: str) -> float:
        """Backstop for one read of ``meter_id``; the transports apply the real timeouts.

        From the driver's own budget (its read plan × per-transaction times, see
        firmware_bridge/timing.py) where it has one, so a slow but conformant meter
        at a low baud rate is never cut off; else 4 × timeout + 1 s.
        """
        budget = getattr(self.drivers.get(meter_id), "read_budget_s", None)
        if callable(budget):
            return backstop_s(float(budget()))
        return self.meter_timeouts.get(meter_id, self.timeout_s) * 4 + 1.0

    def operation_deadline_s(self, meter_id: str) -> float:
        """Backstop for one other operation (relay command, read-back) of ``meter_id``."""
        driver = self.drivers.get(meter_id)
        budget = getattr(driver, "operation_budget_s", None)
        if callable(budget):
            return backstop_s(float(budget()))
        return self.meter_timeouts.get(meter_id, self.timeout_s) * 4 + 1.0

    async def exclusive(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` alone on the bus (lock + silent interval); the building block of everything."""
        await self._lock.acquire()
        try:
            if self._last_end is not None and self.silent_interval_s > 0:
                await self._keep_gap()
            start = self._clock()
            try:
                return await op()
            finally:
                self._release_turn(start)
        finally:
            self._lock.release()

    async def _keep_gap(self) -> None:
        """With the lock held: the silent interval after the last operation."""
        assert self._last_end is not None
        wait = self._last_end + self.silent_interval_s - self._clock()
        if wait > 0:
            await self._sleep(wait)

    def _release_turn(self, start: float) -> None:
        end = self._clock()
        self._last_end = end
        self.metrics.busy_s += end - start

    async def run_exclusive(self, meter_id: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run a non-polling operation for ``meter_id`` (e.g. a relay command) on the bus.

        Counted in the metrics; MeterErrors propagate to the caller (a relay
        controller decides about retries itself) and do not change polling health.
        """
        self.metrics.operations += 1
        self.metrics.attempts += 1

        async def guarded() -> T:
            try:
                async with asyncio.timeout(self.operation_deadline_s(meter_id)):
                    return await op()
            except TimeoutError:
                raise MeterTimeout(meter_id, "operation exceeded its deadline") from None

        try:
            result = await self.exclusive(guarded)
        except MeterError as exc:
            self.metrics.errors[exc.kind] += 1
            raise
        self.metrics.successes += 1
        return result

    async def _read_once(
        self,
        driver: MeterDriver,
        now_ms: int,
        since: float | None,
        clock_ms: Callable[[], int] | None,
        loop: asyncio.AbstractEventLoop | None,
        task: asyncio.Task[Any] | None,
    ) -> Reading:
        # what exclusive() does, written out: this runs for every reading, and one
        # lock, one deadline and no closure per read is what it costs
        await self._lock.acquire()
        try:
            if self._last_end is not None and self.silent_interval_s > 0:
                await self._keep_gap()
            start = self._clock()
            try:
                # stamp the reading with when the bus was actually ours, not the cycle start
                # (a cycle at 2400 baud can take many seconds)
                read_ms = self._wall_ms(now_ms, since, clock_ms)
                # the one deadline of the read (the transports time each request out
                # themselves; this catches a driver that does not)
                deadline = self._read_deadline
                deadline.start(self.deadline_s(driver.meter_id), loop, task)
                try:
                    return await driver.read(read_ms)
                except asyncio.CancelledError:
                    if deadline.stop():
                        raise MeterTimeout(driver.meter_id, "read exceeded its deadline") from None
                    raise
                except TimeoutError:
                    raise MeterTimeout(driver.meter_id, "read exceeded its deadline") from None
                finally:
                    deadline.stop()
            finally:
                self._release_turn(start)
        finally:
            self._lock.release()

    async def read_meter(
        self,
        meter_id: str,
        now_ms: int,
        *,
        force: bool = False,
        since: float | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> Reading | None:
        """Read one meter now (respecting back-off unless ``force``); update its health.

        ``now_ms`` is the wall time at scheduler clock ``since`` (default: now); the
        reading is stamped with ``now_ms`` plus the time elapsed since then — or, given
        ``clock_ms`` (the caller's clock), with ``clock_ms()`` when the bus is the read's.
        """
        return await self._read_meter(meter_id, now_ms, force, since, clock_ms, None, None)

    async def _read_meter(
        self,
        meter_id: str,
        now_ms: int,
        force: bool,
        since: float | None,
        clock_ms: Callable[[], int] | None,
        loop: asyncio.AbstractEventLoop | None,
        task: asyncio.Task[Any] | None,
    ) -> Reading | None:
        """:meth:`read_meter`, given the running loop and current task where the caller
        has them (see :meth:`_ReadDeadline.start`)."""
        h = self._health[meter_id]
        if not force and not is_due(h, now_ms):
            return None
        driver = self.drivers[meter_id]
        self.metrics.operations += 1
        for _ in range(attempts_for(h, self.retries)):
            self.metrics.attempts += 1
            try:
                reading = await self._read_once(driver, now_ms, since, clock_ms, loop, task)
            except MeterError as exc:
                self.metrics.errors[exc.kind] += 1
                last = exc
                if exc.kind in NOT_RETRIED:
                    break
                continue
            except Exception as exc:  # a driver bug must not stop the bus
                self.metrics.errors["error"] += 1
                last = MeterError(meter_id, f"driver failed: {type(exc).__name__}: {exc}")
                continue
            self.metrics.successes += 1
            self._health[meter_id] = on_success(h, self._wall_ms(now_ms, since, clock_ms))
            return reading
        # Back-off counts from the failed attempt, not from the cycle's start: in a
        # cycle longer than the first back-off step the meter must not be due again
        # at once.
        self._health[meter_id] = on_failure(
            h, self._wall_ms(now_ms, since, clock_ms), last.kind, last.detail, self.policy
        )
        return None

    def _wall_ms(self, now_ms: int, since: float | None, clock_ms: Callable[[], int] | None) -> int:
        """The wall time now: the caller's clock if it gave one, else ``now_ms`` (the
        wall time at scheduler clock ``since``) advanced to now."""
        if clock_ms is not None:
            return clock_ms()
        return now_ms if since is None else now_ms + max(0, round((self._clock() - since) * 1000))

    async def run_cycle(
        self,
        now_ms: int,
        on_reading: Callable[[Reading], Awaitable[None]] | None = None,
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> CycleResult:
        """Poll every due meter once, in configuration order.

        ``now_ms`` is the wall time at the cycle's start (which meters are due). Each
        reading, and each failed attempt's back-off, is stamped with the time the bus
        became that read's: ``clock_ms()`` then, where the caller has a clock of its own
        (the daemon's trusted clock: one clock for a reading and everything decided on
        it), else ``now_ms`` plus the scheduler clock's time since the start.

        While the bus is silent (see :func:`bus_went_silent`) only one meter per
        cycle is probed, round-robin and regardless of its back-off; the first
        answer wakes every meter, quarantined ones included, in the same cycle.
        ``on_reading`` is awaited with each reading as soon as it is taken (the
        result still lists them all).
        """
        start = self._clock()
        # the loop and task every read of the cycle runs in, asked once
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        readings: list[Reading] = []
        skipped: list[str] = []
        order = list(self.drivers)
        if self.bus_silent:
            sentinel = order[self._sentinel % len(order)]
            self._sentinel += 1
            reading = await self._read_meter(sentinel, now_ms, True, start, clock_ms, loop, task)
            if reading is not None and on_reading is not None:
                await on_reading(reading)
            if reading is None:
                duration = self._clock() - start
                self.metrics.cycles += 1
                self.metrics.last_cycle_s = duration
                rest = [m for m in order if m != sentinel]
                return CycleResult([], self.health, rest, duration, bus_silent=True)
            self.bus_silent = False
            readings.append(reading)
            order.remove(sentinel)
            for mid in order:
                self._health[mid] = wake(self._health[mid], now_ms)
        attempted = answered = 0
        kinds: list[str] = []
        for meter_id in order:
            if not is_due(self._health[meter_id], now_ms):
                skipped.append(meter_id)
                continue
            attempted += 1
            reading = await self._read_meter(meter_id, now_ms, False, start, clock_ms, loop, task)
            if reading is not None:
                answered += 1
                readings.append(reading)
                if on_reading is not None:
                    await on_reading(reading)
            else:
                err = self._health[meter_id].last_error
                kinds.append(err.kind if err else "error")
        if not readings and bus_went_silent(attempted, answered, kinds):
            self.bus_silent = True
        duration = self._clock() - start
        self.metrics.cycles += 1
        self.metrics.last_cycle_s = duration
        return CycleResult(readings, self.health, skipped, duration, bus_silent=self.bus_silent)
