"""Money and energy units: exact integers, one rounding rule, written down.

* Money is an ``int`` of **micro-yuan** (1e-6 yuan). Nothing is rounded while
  money accumulates; the wallet keeps every micro-yuan.
* Prices are given to 4 decimal places (yuan/kWh) and kept as an ``int`` of
  **1e-4 yuan/kWh** ("price_e4").
* Energy is an ``int`` of **centi-kWh** (0.01 kWh, "ckwh"), the resolution of a
  DL/T 645 energy register.

Because 0.01 kWh x 0.0001 yuan/kWh = 0.000001 yuan, an amount is the exact
integer product ``ckwh * price_e4`` micro-yuan: no rounding step exists.

The ledger never rounds. Two roundings exist, both for display only:

* a *reported balance* is truncated toward zero to 0.01 yuan (``report_yuan``),
  so a customer is never shown money they do not have and never shown more
  debt than they owe;
* a *bill line* (a statement of what was debited) is rounded to the fen,
  half to even (``bill_fen``); a bill's total is the sum of its rounded lines,
  shown beside the exact total (docs/billing.md, "Bills").

Texts show money in yuan (``yuan_text``), never in micro-yuan.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation

from firmware_bridge.errors import EdgeGwError, ErrorKind

MICRO_PER_YUAN = 1_000_000
MICRO_PER_FEN = 10_000
CKWH_PER_KWH = 100
PRICE_E4_PER_YUAN = 10_000


class AmountError(EdgeGwError, ValueError):
    """A textual or numeric amount cannot be represented exactly."""

    kind = ErrorKind.INVALID


def _decimal(value: object) -> Decimal:
    if isinstance(value, bool):
        raise AmountError(f"expected a number, got {value!r}")
    if isinstance(value, float):
        # repr() is the shortest string that round-trips: 0.56 -> "0.56"
        value = repr(value)
    if not isinstance(value, (str, int, Decimal)):
        raise AmountError(f"expected a number or a decimal string, got {type(value).__name__}")
    try:
        d = Decimal(value)
    except InvalidOperation as exc:
        raise AmountError(f"not a decimal number: {value!r}") from exc
    if not d.is_finite():
        raise AmountError(f"not a finite number: {value!r}")
    return d


def _scaled(value: object, scale: int, what: str) -> int:
    d = _decimal(value) * scale
    i = d.to_integral_value()
    if d != i:
        digits = len(str(scale)) - 1
        raise AmountError(f"{what} {value!r} has more than {digits} decimal places")
    return int(i)


def yuan_to_micro(value: object) -> int:
    """Exact yuan (up to 6 decimals) -> micro-yuan; raise AmountError otherwise."""
    return _scaled(value, MICRO_PER_YUAN, "amount")


def price_to_e4(value: object) -> int:
    """Exact price in yuan/kWh (up to 4 decimals) -> 1e-4 yuan/kWh."""
    return _scaled(value, PRICE_E4_PER_YUAN, "price")


def kwh_to_ckwh_exact(value: object) -> int:
    """Exact kWh (up to 2 decimals) -> centi-kWh; for thresholds and limits."""
    return _scaled(value, CKWH_PER_KWH, "energy")


def register_ckwh(value: Decimal) -> int:
    """A cumulative register reading in kWh -> centi-kWh, truncated (floor).

    Registers are truncated *before* differencing, so consecutive interval
    energies telescope: the sum over any chain of intervals equals the
    truncated difference of its end points, and no 0.01 kWh is ever lost or
    counted twice, whatever the meter's own resolution.
    """
    if not value.is_finite():
        raise AmountError(f"register value is not finite: {value}")
    return int((value * CKWH_PER_KWH).to_integral_value(rounding=ROUND_FLOOR))


def amount_micro(ckwh: int, price_e4: int) -> int:
    """Exact amount for ``ckwh`` centi-kWh at ``price_e4`` 1e-4 yuan/kWh."""
    return ckwh * price_e4


def micro_to_decimal(micro: int) -> Decimal:
    """Full-precision yuan as a Decimal (for storage/uplink, never rounded)."""
    return Decimal(micro).scaleb(-6)


def report_yuan(micro: int) -> Decimal:
    """Reported balance: truncated toward zero to 0.01 yuan (never "-0.00")."""
    r = micro_to_decimal(micro).quantize(Decimal("0.01"), rounding=ROUND_DOWN)
    return r if r != 0 else Decimal("0.00")


def ckwh_to_kwh(ckwh: int) -> Decimal:
    return Decimal(ckwh).scaleb(-2)


def e4_to_price(e4: int) -> Decimal:
    return Decimal(e4).scaleb(-4)


def yuan_text(micro: int) -> str:
    """Exact yuan for texts: two decimals when the amount is whole fen, else every
    digit that is not zero (``5_000_000`` -> ``"5.00"``, ``5_283`` -> ``"0.005283"``,
    ``-2_000_000`` -> ``"-2.00"``, ``0`` -> ``"0.00"``)."""
    d = micro_to_decimal(micro)
    if micro % MICRO_PER_FEN == 0:
        return str(d.quantize(Decimal("0.01")))
    return str(d.normalize())  # not whole fen: more than two decimals, none trailing


def bill_fen(micro: int) -> int:
    """A bill line's amount rounded to the fen, half to even, in micro-yuan
    (``5_283`` -> ``10_000``; ``5_000`` -> ``0``; ``15_000`` -> ``20_000``)."""
    q, r = divmod(micro, MICRO_PER_FEN)  # floor division: r in [0, MICRO_PER_FEN)
    half = MICRO_PER_FEN // 2
    if r > half or (r == half and q % 2 == 1):
        q += 1
    return q * MICRO_PER_FEN


def fen_text(micro: int) -> str:
    """A whole-fen amount as yuan with two decimals (for rounded bill amounts)."""
    if micro % MICRO_PER_FEN:
        raise ValueError(f"{micro} micro-yuan is not a whole number of fen")
    return str(micro_to_decimal(micro).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))
