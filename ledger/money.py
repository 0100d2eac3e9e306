"""Money: `Decimal` amounts in Python, whole minor units (cents, yen, fils) as integers in SQL.

`allocate` splits a pool between providers in proportion to exact weights with the largest
remainder method, so the parts add up to the pool exactly and each part is within one minor unit
of its exact proportional amount. `apply_minimum_payout` holds back small amounts and carries them
forward to the provider's next statement without creating or losing a single minor unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from numbers import Rational

from ledger.errors import MoneyError

MAX_MINOR = 2**63 - 1
"""The most minor units an amount may have: the largest value of SQL's signed 64-bit BIGINT."""

# ISO 4217 minor units.
CURRENCIES: dict[str, int] = {
    "AUD": 2,
    "BHD": 3,
    "BRL": 2,
    "CAD": 2,
    "CHF": 2,
    "CLP": 0,
    "CNY": 2,
    "DKK": 2,
    "EUR": 2,
    "GBP": 2,
    "HKD": 2,
    "INR": 2,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "MXN": 2,
    "NOK": 2,
    "NZD": 2,
    "OMR": 3,
    "SEK": 2,
    "SGD": 2,
    "TND": 3,
    "USD": 2,
    "ZAR": 2,
}


def minor_units(currency: str) -> int:
    """Number of decimal places of `currency` (``USD`` → 2, ``JPY`` → 0, ``BHD`` → 3)."""
    code = currency.strip().upper() if isinstance(currency, str) else ""
    if code not in CURRENCIES:
        raise MoneyError(
            f"unknown currency {currency!r}; known currencies: {', '.join(sorted(CURRENCIES))}"
        )
    return CURRENCIES[code]


def normalize_currency(currency: str) -> str:
    """The upper-case ISO code of a known currency; raises `MoneyError` otherwise."""
    minor_units(currency)
    return currency.strip().upper()


def decimal_places(value: Decimal) -> int:
    """Decimal places of a finite `Decimal` without its trailing zeros (``"19.990"`` → 2).

    Read from the digits, not with `Decimal.normalize`, which rounds to the context's 28 digits
    (``"1.0000000000000000000000000001"`` would count as 0 places) and overflows on large
    exponents (``"1e999999999"``).
    """
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    significant = "".join(map(str, digits)).rstrip("0")
    if not significant:
        return 0
    return max(0, -(exponent + len(digits) - len(significant)))


def fits_bigint(value: Decimal, places: int) -> bool:
    """Whether ``value × 10^places`` (a whole number) fits SQL's BIGINT: ``|minor| ≤ MAX_MINOR``."""
    if not value:
        return True
    # adjusted() is the exponent of the leading digit; checking it first keeps int() away from
    # numbers such as 1e999999999.
    if value.adjusted() + places > len(str(MAX_MINOR)):
        return False
    return abs(int(value.scaleb(places))) <= MAX_MINOR


def parse_amount(text: str | int | Decimal, currency: str) -> Decimal:
    """Parse an amount such as ``"250000"`` or ``"19.99"`` exactly, as a `Decimal`.

    Refuses floats (they are not exact), non-ASCII text (`Decimal` reads ``"１２"`` as 12),
    non-finite values, more decimal places than the currency has (``"1.005"`` in USD,
    ``"10.5"`` in JPY), and amounts whose minor units do not fit SQL's BIGINT (``"1e30"``).
    """
    places = minor_units(currency)
    if isinstance(text, float) or isinstance(text, bool):
        raise MoneyError(f"amount {text!r} must be given as a string or Decimal, not a float")
    if isinstance(text, str) and (not text.isascii() or "_" in text):
        # Decimal() reads Unicode digits ("１２" is 12) and underscores ("1_000" is 1000).
        raise MoneyError(f"invalid amount {text!r}: not a decimal number")
    try:
        value = Decimal(text.strip() if isinstance(text, str) else text)
    except (InvalidOperation, ValueError) as exc:
        raise MoneyError(f"invalid amount {text!r}: not a decimal number") from exc
    if not value.is_finite():
        raise MoneyError(f"invalid amount {text!r}: not a finite number")
    if decimal_places(value) > places:
        raise MoneyError(
            f"invalid amount {text!r}: {normalize_currency(currency)} allows at most "
            f"{places} decimal place{'s' if places != 1 else ''}"
        )
    if not fits_bigint(value, places):
        raise MoneyError(
            f"invalid amount {text!r}: too large for the ledger (its limit is "
            f"{format_minor(MAX_MINOR, currency)} {normalize_currency(currency)})"
        )
    return value


def to_minor(amount: Decimal, currency: str) -> int:
    """Whole minor units of an exact amount (``Decimal("19.99")`` USD → 1999)."""
    value = parse_amount(amount, currency)
    return int(value.scaleb(minor_units(currency)))


def from_minor(minor: int, currency: str) -> Decimal:
    """The `Decimal` amount of `minor` whole minor units, with the currency's decimal places."""
    places = minor_units(currency)
    return Decimal(int(minor)).scaleb(-places).quantize(Decimal(1).scaleb(-places))


def format_minor(minor: int, currency: str) -> str:
    """``1999`` USD → ``"19.99"``; ``5`` JPY → ``"5"``; exact, no float involved."""
    return str(from_minor(minor, currency))


def exact(value: float | int | Decimal | Fraction) -> Fraction:
    """The exact rational value of a number (a float converts without rounding)."""
    if isinstance(value, Fraction | int | Rational):
        return Fraction(value)
    if isinstance(value, float | Decimal):
        if not (value == value) or value in (float("inf"), float("-inf")):
            raise MoneyError(f"weight {value!r} is not a finite number")
        return Fraction(value)
    raise TypeError(f"cannot convert {type(value).__name__} to an exact number")


def allocate(
    pool_minor: int, weights: Mapping[str, float | int | Decimal | Fraction]
) -> dict[str, int]:
    """Split `pool_minor` minor units in proportion to `weights` by the largest remainder.

    Each key gets the floor of its exact share ``pool * w / sum(w)``; the minor units left over go
    one each to the keys with the largest fractional remainders, ties broken by key in ascending
    order. So the parts sum to the pool exactly, each part is within one minor unit of its exact
    share (strictly), and the result depends only on the weights, not on their order.
    Weights must be finite and non-negative with a positive sum (unless the pool is zero).
    """
    if pool_minor < 0:
        raise MoneyError(f"pool {pool_minor} must not be negative")
    exact_weights = {key: exact(w) for key, w in weights.items()}
    for key, w in exact_weights.items():
        if w < 0:
            raise MoneyError(f"weight of {key!r} is negative ({weights[key]!r})")
    total = sum(exact_weights.values(), Fraction(0))
    if total == 0:
        if pool_minor == 0:
            return {key: 0 for key in exact_weights}
        raise MoneyError("cannot allocate a pool when every weight is zero")
    floors: dict[str, int] = {}
    remainders: list[tuple[Fraction, str]] = []
    for key, w in exact_weights.items():
        share = pool_minor * w / total
        floors[key] = share.numerator // share.denominator
        remainders.append((share - floors[key], key))
    left = pool_minor - sum(floors.values())
    # Largest remainder first; equal remainders go to the alphabetically first key.
    remainders.sort(key=lambda item: (-item[0], item[1]))
    for _, key in remainders[:left]:
        floors[key] += 1
    return floors


@dataclass(frozen=True)
class Payout:
    """What a provider is paid on one statement, all in minor units.

    ``due = allocated + carried_in``; if ``due`` reaches the minimum payout it is paid in full
    (``payable = due``), otherwise nothing is paid and ``carried_forward = due`` moves to the
    provider's next statement.
    """

    allocated: int
    carried_in: int
    payable: int
    carried_forward: int


def apply_minimum_payout(
    allocated: Mapping[str, int], carried_in: Mapping[str, int], min_payout_minor: int | None
) -> dict[str, Payout]:
    """Combine this statement's allocation with amounts carried in, holding back small totals.

    Money is conserved: ``sum(payable) + sum(carried_forward) == sum(allocated) + sum(carried_in)``.
    """
    if min_payout_minor is not None and min_payout_minor < 0:
        raise MoneyError(f"minimum payout {min_payout_minor} must not be negative")
    result: dict[str, Payout] = {}
    for key in sorted(set(allocated) | set(carried_in)):
        a, c = int(allocated.get(key, 0)), int(carried_in.get(key, 0))
        due = a + c
        if due > MAX_MINOR:
            raise MoneyError(
                f"{key}: {a} minor units allocated plus {c} carried in exceed the largest amount "
                f"the ledger stores ({MAX_MINOR} minor units)"
            )
        if min_payout_minor is not None and due < min_payout_minor:
            result[key] = Payout(a, c, 0, due)
        else:
            result[key] = Payout(a, c, due, 0)
    return result
