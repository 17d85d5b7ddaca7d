"""Supply relays: actuators and a controller that verifies every command.

Safety rules (docs/modbus.md, "Relay safety"):

* Every command is verified by reading the relay state back after a settle
  time. A mismatch is re-driven on a bounded schedule; when the attempts are
  used up the controller raises an alarm carrying the evidence (every
  attempt: what was sent, what came back, errors). A command the meter
  refuses (an error reply, as opposed to no answer) is not resent: the alarm
  says what the meter answered and why it may have refused.
* The state is read first: a command for the state the relay is already in
  is not driven (no needless switching) and succeeds at once.
* A minimum interval is kept between two operations on one relay
  (contactor wear, in-rush); a switching command that comes too early is
  refused with :class:`RelayRateLimited` rather than silently delayed.
* An optional supply check (e.g. voltage above 0.75 Un) can veto a command.
* Each bus transaction runs through ``run`` (normally
  :meth:`firmware_bridge.scheduler.BusScheduler.run_exclusive`), so relay
  traffic interleaves with polling without ever overlapping it; the settle
  waits do not hold the bus.

Any object with ``set_open``/``read_open`` is an actuator: Modbus coils and
registers here, DL/T 645 meters through :class:`Dlt645RelayActuator`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, TypeVar, runtime_checkable

from firmware_bridge.dlt645.messages import ControlCommand
from firmware_bridge.driver import MeterError, MeterFrameError
from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.modbus.transport import ModbusTransport
from firmware_bridge.relay_ops import RelayOp
from firmware_bridge.settings import RelaySettings

T = TypeVar("T")

# The DL/T 645 control command (1CH, N1) of each operation.
DLT645_N1: Mapping[RelayOp, ControlCommand] = {
    RelayOp.TRIP: ControlCommand.TRIP,
    RelayOp.CLOSE: ControlCommand.CLOSE,
    RelayOp.CLOSE_ALLOWED: ControlCommand.CLOSE_ALLOWED,
    RelayOp.ALARM_ON: ControlCommand.ALARM,
    RelayOp.ALARM_OFF: ControlCommand.ALARM_OFF,
    RelayOp.PROTECT_ON: ControlCommand.PROTECT,
    RelayOp.PROTECT_OFF: ControlCommand.PROTECT_OFF,
}


@runtime_checkable
class RelayActuator(Protocol):
    """One supply relay. ``open`` = supply cut."""

    async def set_open(self, open: bool) -> None: ...

    async def read_open(self) -> bool: ...


class ModbusCoilActuator:
    """Relay on a coil: writes FC05, reads back FC01. ``open_value`` is the coil state meaning open."""

    def __init__(self, transport: ModbusTransport, meter_id: str, unit_id: int, address: int, open_value: int = 1) -> None:
        if open_value not in (0, 1):
            raise ValueError(f"meter {meter_id}: coil open_value must be 0 or 1, got {open_value}")
        self.transport = transport
        self.meter_id = meter_id
        self.unit_id = unit_id
        self.address = address
        self.open_state = bool(open_value)

    async def set_open(self, open: bool) -> None:
        coil = self.open_state if open else not self.open_state
        await self.transport.write_coil(self.meter_id, self.unit_id, self.address, coil)

    async def read_open(self) -> bool:
        return await self.transport.read_coil(self.meter_id, self.unit_id, self.address) == self.open_state


class ModbusRegisterActuator:
    """Relay on a holding register: writes FC06, reads back FC03."""

    def __init__(
        self,
        transport: ModbusTransport,
        meter_id: str,
        unit_id: int,
        address: int,
        open_value: int = 1,
        closed_value: int = 0,
    ) -> None:
        if open_value == closed_value:
            raise ValueError(f"meter {meter_id}: relay open_value and closed_value must differ")
        for v in (open_value, closed_value):
            if not 0 <= v <= 0xFFFF:
                raise ValueError(f"meter {meter_id}: relay register values must be 0..65535, got {v}")
        self.transport = transport
        self.meter_id = meter_id
        self.unit_id = unit_id
        self.address = address
        self.open_value = open_value
        self.closed_value = closed_value

    async def set_open(self, open: bool) -> None:
        value = self.open_value if open else self.closed_value
        await self.transport.write_register(self.meter_id, self.unit_id, self.address, value)

    async def read_open(self) -> bool:
        (value,) = await self.transport.read_registers(self.meter_id, self.unit_id, 3, self.address, 1)
        if value == self.open_value:
            return True
        if value == self.closed_value:
            return False
        raise MeterFrameError(
            self.meter_id,
            f"relay register {self.address:#06x} holds {value}, neither open ({self.open_value}) nor closed ({self.closed_value})",
        )


class Dlt645RelayActuator:
    """Adapter for a DL/T 645 driver exposing ``control(op, deadline)`` and ``read_relay_open()``.

    Trip = 1AH, close = 1CH (close directly) or 1BH (close allowed: the
    customer closes at the meter, so read-back stays "open" until they do and
    a close is then verified only by the meter's acknowledgement).

    Each command is valid for ``validity_s``, counted in the meter's own time:
    the driver's ``command_deadline`` uses the meter's clock where it was read,
    else the site's local time with a margin (docs/dlt645.md, "Control").
    """

    def __init__(
        self,
        driver: Any,
        *,
        close_directly: bool = True,
        validity_s: float = 300.0,
    ) -> None:
        self.driver = driver
        self.close_directly = close_directly
        self.validity_s = validity_s
        self._close = RelayOp.CLOSE if close_directly else RelayOp.CLOSE_ALLOWED

    @property
    def close_is_deferred(self) -> bool:
        return not self.close_directly

    async def _deadline(self) -> dt.datetime:
        deadline, _basis = await self.driver.command_deadline(self.validity_s)
        return deadline

    async def set_open(self, open: bool) -> None:
        deadline = await self._deadline()
        await self.driver.control(DLT645_N1[RelayOp.TRIP if open else self._close], deadline)

    async def read_open(self) -> bool:
        return bool(await self.driver.read_relay_open())

    async def signal(self, sig: RelayOp) -> None:
        """Meter alarm (2AH/2BH) or power-protect (3AH/3BH); returns on the meter's ack."""
        await self.driver.control(DLT645_N1[sig], await self._deadline())


def actuator_from_config(
    meter_id: str, relay: RelaySettings, transport: ModbusTransport, meter_unit_id: int | None
) -> RelayActuator:
    """Modbus coil/register actuator for a meter's ``[meter.relay]`` table."""
    unit = relay.unit_id if relay.unit_id is not None else meter_unit_id
    if unit is None:
        raise ValueError(f"meter {meter_id}.relay.unit_id: required (the meter has no unit_id)")
    if relay.kind == "coil":
        return ModbusCoilActuator(transport, meter_id, unit, relay.address, relay.open_value)
    if relay.kind == "register":
        return ModbusRegisterActuator(transport, meter_id, unit, relay.address, relay.open_value, relay.closed_value)
    raise ValueError(f"meter {meter_id}.relay.kind: {relay.kind!r} is not a Modbus relay (coil, register)")


# ---------------------------------------------------------------------------
# Pure policy


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    min_interval_s: float = 10.0  # between operations on one relay (also between re-drives)
    settle_s: float = 1.0  # contactor settle time before the read-back
    max_drives: int = 3  # first command + re-drives
    redrive_delays_s: tuple[float, ...] = (5.0, 15.0)  # wait before re-drive n (last value repeats)

    def __post_init__(self) -> None:
        if self.max_drives < 1:
            raise ValueError("max_drives must be >= 1")
        if self.min_interval_s < 0 or self.settle_s < 0 or any(d < 0 for d in self.redrive_delays_s):
            raise ValueError("relay times must be >= 0")


def redrive_delay_s(policy: RelayPolicy, redrive: int) -> float:
    """Wait before re-drive number ``redrive`` (1-based), never below the minimum interval."""
    delays = policy.redrive_delays_s or (0.0,)
    d = delays[min(redrive, len(delays)) - 1]
    return max(d, policy.min_interval_s)


def interval_remaining_s(last_op_s: float | None, now_s: float, min_interval_s: float) -> float:
    """Seconds until another operation is allowed (0 = now)."""
    if last_op_s is None:
        return 0.0
    # clamp: a clock that stepped back must not block the relay for longer than the interval
    return min(min_interval_s, max(0.0, last_op_s + min_interval_s - now_s))


def voltage_veto(
    voltage_v: Decimal | None,
    *,
    nominal_v: Decimal = Decimal(230),
    min_fraction: Decimal = Decimal("0.75"),
    allow_unknown: bool = False,
) -> str | None:
    """Why a relay must not be operated at this supply voltage, or None if it may."""
    if voltage_v is None:
        return None if allow_unknown else "supply voltage unknown"
    threshold = nominal_v * min_fraction
    if not voltage_v.is_finite() or voltage_v < threshold:
        return f"supply voltage {voltage_v} V below {min_fraction} Un ({threshold} V)"
    return None


def voltage_guard(
    last_voltage: Callable[[str], Decimal | None],
    *,
    nominal_v: Decimal = Decimal(230),
    min_fraction: Decimal = Decimal("0.75"),
    allow_unknown: bool = False,
) -> Callable[[str, bool], Awaitable[str | None]]:
    """A ``supply_check`` for :class:`RelayController` from the last voltage seen per meter.

    Only for meters that measure the supply side of their relay: a meter wired
    after the relay reads 0 V once tripped, and this guard would then refuse
    to ever close it.
    """

    async def check(meter_id: str, open: bool) -> str | None:
        return voltage_veto(
            last_voltage(meter_id), nominal_v=nominal_v, min_fraction=min_fraction, allow_unknown=allow_unknown
        )

    return check


# ---------------------------------------------------------------------------
# Results and errors


@dataclass(frozen=True, slots=True)
class SignalResult:
    meter_id: str
    signal: RelayOp
    ok: bool  # the meter acknowledged the command
    detail: str


class SignalNotSupported(EdgeGwError):
    """The meter's actuator cannot take this signal (e.g. a Modbus coil relay)."""

    kind = ErrorKind.UNSUPPORTED

    def __init__(self, meter_id: str, sig: RelayOp) -> None:
        super().__init__(f"meter {meter_id}: {sig.value} is not supported by its relay interface")
        self.meter_id = meter_id
        self.signal = sig


@dataclass(frozen=True, slots=True)
class RelayAttempt:
    drive: int  # 1 = first command
    at_s: float  # monotonic time of the command
    command_error: str | None  # None = acknowledged
    read_open: bool | None  # state read back, None when the read failed
    read_error: str | None


@dataclass(frozen=True, slots=True)
class RelayResult:
    meter_id: str
    want_open: bool
    ok: bool  # the relay was verified in the wanted state (or a deferred close was acknowledged)
    final_open: bool | None  # last state read back
    attempts: tuple[RelayAttempt, ...]
    alarm: bool
    reason: str  # human-readable summary: "already open", "verified open after 2 drives", ...
    pending_customer: bool = False  # close-allowed acknowledged, waiting for the customer
    refused: bool = False  # the meter answered the command with a refusal (not resent)


class RelayRateLimited(EdgeGwError):
    """A command came sooner than the relay's minimum interval."""

    kind = ErrorKind.BUSY

    def __init__(self, meter_id: str, retry_after_s: float) -> None:
        super().__init__(f"meter {meter_id}: relay operated too recently, retry in {retry_after_s:.1f}s")
        self.meter_id = meter_id
        self.retry_after_s = retry_after_s


class RelayRefused(EdgeGwError):
    """A pre-condition (e.g. supply voltage) vetoed the command; nothing was sent."""

    kind = ErrorKind.REFUSED

    def __init__(self, meter_id: str, reason: str) -> None:
        super().__init__(f"meter {meter_id}: relay command refused: {reason}")
        self.meter_id = meter_id
        self.reason = reason


async def _direct(meter_id: str, op: Callable[[], Awaitable[T]]) -> T:
    return await op()


Runner = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass
class _RelayState:
    last_op_s: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RelayController:
    """Drives relays with read-back verification, bounded re-drive, alarms and rate limiting."""

    def __init__(
        self,
        actuators: Mapping[str, RelayActuator],
        *,
        policy: RelayPolicy | None = None,
        policies: Mapping[str, RelayPolicy] | None = None,
        run: Runner = _direct,
        on_alarm: Callable[[RelayResult], None] | None = None,
        supply_check: Callable[[str, bool], Awaitable[str | None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.actuators = dict(actuators)
        self.policy = policy or RelayPolicy()
        self.policies = dict(policies or {})
        self._run = run
        self._on_alarm = on_alarm
        self._supply_check = supply_check
        self._clock = clock
        self._sleep = sleep
        self._state: dict[str, _RelayState] = {m: _RelayState() for m in self.actuators}

    def policy_for(self, meter_id: str) -> RelayPolicy:
        return self.policies.get(meter_id, self.policy)

    def _actuator(self, meter_id: str) -> RelayActuator:
        try:
            return self.actuators[meter_id]
        except KeyError:
            raise KeyError(f"meter {meter_id}: no relay configured") from None

    async def read_open(self, meter_id: str) -> bool:
        """Read the relay state (one bus transaction, not rate limited)."""
        act = self._actuator(meter_id)
        return bool(await self._run(meter_id, act.read_open))

    async def set_open(self, meter_id: str, open: bool) -> RelayResult:
        """Drive the relay to ``open`` and verify it; see the module documentation.

        Raises :class:`RelayRateLimited` or :class:`RelayRefused` before anything is
        sent; otherwise returns a :class:`RelayResult` (``alarm=True`` when the relay
        could not be verified in the wanted state).
        """
        act = self._actuator(meter_id)
        pol = self.policy_for(meter_id)
        st = self._state[meter_id]
        async with st.lock:
            word = "open" if open else "closed"
            try:
                current: bool | None = bool(await self._run(meter_id, act.read_open))
            except MeterError:
                current = None
            if current is open:
                return RelayResult(meter_id, open, True, current, (), False, f"already {word}")
            wait = interval_remaining_s(st.last_op_s, self._clock(), pol.min_interval_s)
            if wait > 0:
                raise RelayRateLimited(meter_id, wait)
            if self._supply_check is not None:
                veto = await self._supply_check(meter_id, open)
                if veto:
                    raise RelayRefused(meter_id, veto)
            deferred_close = not open and bool(getattr(act, "close_is_deferred", False))
            attempts: list[RelayAttempt] = []
            final: bool | None = current
            for drive in range(1, pol.max_drives + 1):
                if drive > 1:
                    await self._sleep(redrive_delay_s(pol, drive - 1))
                at = self._clock()
                st.last_op_s = at
                cmd_err: str | None = None
                try:
                    await self._run(meter_id, lambda: act.set_open(open))
                except MeterError as exc:
                    cmd_err = f"{exc.kind}: {exc.detail}"
                    if exc.kind == "refused":
                        # The meter answered "no": resending the same command gets the
                        # same answer. Say what it answered; nothing moved.
                        attempts.append(RelayAttempt(drive, at, cmd_err, None, None))
                        result = RelayResult(
                            meter_id,
                            open,
                            False,
                            final,
                            tuple(attempts),
                            True,
                            f"meter refused the {'trip' if open else 'close'} command, not resent: {exc.detail}",
                            refused=True,
                        )
                        return self._alarm(result)
                await self._sleep(pol.settle_s)
                read_err: str | None = None
                observed: bool | None = None
                try:
                    observed = bool(await self._run(meter_id, act.read_open))
                except MeterError as exc:
                    read_err = f"{exc.kind}: {exc.detail}"
                attempts.append(RelayAttempt(drive, at, cmd_err, observed, read_err))
                if observed is not None:
                    final = observed
                if observed is open:
                    return RelayResult(
                        meter_id, open, True, observed, tuple(attempts), False, f"verified {word} after {drive} drive(s)"
                    )
                if deferred_close and cmd_err is None:
                    return RelayResult(
                        meter_id,
                        open,
                        True,
                        observed,
                        tuple(attempts),
                        False,
                        "close allowed; waiting for the customer to close at the meter",
                        pending_customer=True,
                    )
            result = RelayResult(
                meter_id,
                open,
                False,
                final,
                tuple(attempts),
                True,
                f"relay not verified {word} after {pol.max_drives} drive(s); last read: "
                + ("unknown" if final is None else ("open" if final else "closed")),
            )
            return self._alarm(result)

    def _alarm(self, result: RelayResult) -> RelayResult:
        """``result``, an alarm, after telling ``on_alarm``."""
        if self._on_alarm is not None:
            self._on_alarm(result)
        return result


    def supports_signals(self, meter_id: str) -> bool:
        return callable(getattr(self.actuators.get(meter_id), "signal", None))

    async def signal(self, meter_id: str, sig: RelayOp) -> SignalResult:
        """Send a meter signal; ``ok`` when the meter acknowledged it.

        There is no state to read back: the acknowledgement is the evidence.
        Raises :class:`SignalNotSupported` before anything is sent when the
        meter's actuator has no such command.
        """
        act = self._actuator(meter_id)
        send = getattr(act, "signal", None)
        if not callable(send) or not sig.is_signal:
            raise SignalNotSupported(meter_id, sig)
        async with self._state[meter_id].lock:
            try:
                await self._run(meter_id, lambda: send(sig))
            except MeterError as exc:
                return SignalResult(meter_id, sig, False, f"{exc.kind}: {exc.detail}")
        return SignalResult(meter_id, sig, True, "acknowledged by the meter")


def controller_for(scheduler: Any, **kwargs: Any) -> RelayController:
    """A :class:`RelayController` for the relays of one bus, serialised on its scheduler.

    ``scheduler`` is a :class:`~firmware_bridge.scheduler.BusScheduler` from
    :func:`firmware_bridge.bus.open_bus`; per-meter ``min_interval_s`` comes from
    the meter's ``[meter.relay]`` table. ``kwargs`` go to :class:`RelayController`.
    """
    base: RelayPolicy = kwargs.pop("policy", None) or RelayPolicy()
    policies = {
        mid: dataclasses.replace(base, min_interval_s=interval)
        for mid, interval in scheduler.relay_min_interval_s.items()
    }
    policies.update(kwargs.pop("policies", None) or {})
    return RelayController(scheduler.relays, policy=base, policies=policies, run=scheduler.run_exclusive, **kwargs)
