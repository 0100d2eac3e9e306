"""Exact money: currencies, parsing, largest-remainder allocation and carry-forward."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import MoneyError
from ledger.money import (
    CURRENCIES,
    MAX_MINOR,
    allocate,
    apply_minimum_payout,
    format_minor,
    minor_units,
    parse_amount,
    to_minor,
)

SETTINGS = settings(max_examples=150, deadline=None)

names = st.text(alphabet="abcdefghij", min_size=1, max_size=4)
weights = st.one_of(
    st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.floats(min_value=1e-300, max_value=1e-3),
    st.integers(min_value=0, max_value=10**9),
)
weight_maps = st.dictionaries(names, weights, min_size=1, max_size=12).filter(
    lambda d: sum(Fraction(w) for w in d.values()) > 0
)
pools = st.integers(min_value=0, max_value=10**15)


def test_currency_table_has_minor_units_and_rejects_unknown_codes() -> None:
    assert len(CURRENCIES) >= 12
    assert [minor_units(c) for c in ("USD", "EUR", "GBP", "JPY", "BHD", "KWD", "CHF")] == [
        2,
        2,
        2,
        0,
        3,
        3,
        2,
    ]
    with pytest.raises(MoneyError, match="unknown currency 'XYZ'"):
        minor_units("XYZ")


def test_parse_amount_is_exact_and_refuses_extra_decimals() -> None:
    assert parse_amount("250000", "USD") == Decimal("250000")
    assert to_minor(parse_amount("19.99", "USD"), "USD") == 1999
    assert to_minor(parse_amount("1.005", "BHD"), "BHD") == 1005
    assert to_minor(parse_amount("120", "JPY"), "JPY") == 120
    assert parse_amount("19.990", "USD") == Decimal("19.99")
    for text, currency in [("1.005", "USD"), ("10.5", "JPY"), ("1.0001", "KWD")]:
        with pytest.raises(MoneyError, match="decimal place"):
            parse_amount(text, currency)
    for bad in ["", "abc", "NaN", "Infinity", "1e400x"]:
        with pytest.raises(MoneyError):
            parse_amount(bad, "USD")
    with pytest.raises(MoneyError, match="float"):
        parse_amount(1.5, "USD")  # type: ignore[arg-type]
    assert format_minor(1999, "USD") == "19.99"
    assert format_minor(5, "JPY") == "5"
    assert format_minor(7, "BHD") == "0.007"


def test_amounts_whose_minor_units_do_not_fit_a_bigint_are_refused() -> None:
    # The ledger stores minor units in BIGINT columns: at most 2**63 - 1.
    assert MAX_MINOR == 2**63 - 1
    assert to_minor(parse_amount("92233720368547758.07", "USD"), "USD") == MAX_MINOR
    assert to_minor(parse_amount(str(MAX_MINOR), "JPY"), "JPY") == MAX_MINOR
    assert to_minor(parse_amount("-92233720368547758.07", "USD"), "USD") == -MAX_MINOR
    assert to_minor(parse_amount("1e3", "USD"), "USD") == 100000
    for text, currency in [
        ("1e30", "USD"),
        ("92233720368547758.08", "USD"),
        ("-92233720368547758.08", "USD"),
        ("9223372036854775808", "JPY"),
        ("9223372036854775.808", "BHD"),
        ("9" * 40, "USD"),
        ("1e999999999", "USD"),  # an exponent beyond the decimal context's
    ]:
        with pytest.raises(MoneyError, match="too large for the ledger") as info:
            parse_amount(text, currency)
        assert text in str(info.value)
    with pytest.raises(MoneyError, match="too large"):
        parse_amount(10**30, "USD")


def test_decimal_places_are_counted_exactly_beyond_the_decimal_context() -> None:
    # 29 significant digits: rounding to the context's 28 would make this a whole number.
    with pytest.raises(MoneyError, match="decimal place"):
        parse_amount("1.0000000000000000000000000001", "USD")
    with pytest.raises(MoneyError, match="decimal place"):
        parse_amount("1e-999999999", "USD")
    assert parse_amount("0e999999999", "USD") == 0
    assert to_minor(parse_amount("12.50000000000000000000000000000", "USD"), "USD") == 1250


def test_amounts_must_be_written_with_ascii_digits() -> None:
    for text in ["\uff11\uff12", "1\uff10", "\u0661\u0662"]:  # Decimal() reads these as 12, 10, 12
        with pytest.raises(MoneyError, match="not a decimal number"):
            parse_amount(text, "USD")


def test_allocation_breaks_ties_by_name() -> None:
    assert allocate(1, {"b": 1.0, "a": 1.0}) == {"a": 1, "b": 0}
    assert allocate(2, {"c": 1, "b": 1, "a": 1}) == {"a": 1, "b": 1, "c": 0}
    assert allocate(100, {"a": 1, "b": 1, "c": 1}) == {"a": 34, "b": 33, "c": 33}


@SETTINGS
@given(pool=pools, ws=weight_maps)
def test_allocation_sums_to_the_pool_and_each_line_is_within_one_minor_unit(
    pool: int, ws: dict[str, float]
) -> None:
    lines = allocate(pool, ws)
    assert sum(lines.values()) == pool
    total = sum(Fraction(w) for w in ws.values())
    for name, w in ws.items():
        exact_share = Fraction(pool) * Fraction(w) / total
        assert abs(lines[name] - exact_share) < 1
        assert lines[name] >= 0


@SETTINGS
@given(pool=pools, ws=weight_maps, seed=st.randoms(use_true_random=False))
def test_allocation_does_not_depend_on_input_order(pool: int, ws: dict[str, float], seed) -> None:
    items = list(ws.items())
    seed.shuffle(items)
    assert allocate(pool, dict(items)) == allocate(pool, ws)


@SETTINGS
@given(
    allocated=st.dictionaries(names, st.integers(0, 10**9), max_size=10),
    carried=st.dictionaries(names, st.integers(0, 10**6), max_size=10),
    minimum=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_minimum_payout_conserves_money(
    allocated: dict[str, int], carried: dict[str, int], minimum: int | None
) -> None:
    payouts = apply_minimum_payout(allocated, carried, minimum)
    paid = sum(p.payable for p in payouts.values())
    held = sum(p.carried_forward for p in payouts.values())
    assert paid + held == sum(allocated.values()) + sum(carried.values())
    for p in payouts.values():
        assert p.payable == 0 or p.carried_forward == 0
        if minimum is not None and p.payable:
            assert p.payable >= minimum


def test_a_payable_beyond_bigint_minor_units_is_refused() -> None:
    fits = apply_minimum_payout({"a": MAX_MINOR - 5}, {"a": 5}, None)
    assert fits["a"].payable == MAX_MINOR
    with pytest.raises(MoneyError, match="a: .* exceed the largest amount"):
        apply_minimum_payout({"a": MAX_MINOR - 5, "b": 1}, {"a": 6}, None)
    with pytest.raises(MoneyError, match="exceed the largest amount"):  # held back as well
        apply_minimum_payout({"a": MAX_MINOR}, {"a": 1}, MAX_MINOR)


@SETTINGS
@given(
    pools_=st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
    ws=weight_maps,
    minimum=st.integers(0, 5_000),
)
def test_carry_forward_over_many_statements_conserves_money(
    pools_: list[int], ws: dict[str, float], minimum: int
) -> None:
    carried: dict[str, int] = {}
    paid = 0
    for pool in pools_:
        payouts = apply_minimum_payout(allocate(pool, ws), carried, minimum)
        paid += sum(p.payable for p in payouts.values())
        carried = {k: p.carried_forward for k, p in payouts.items() if p.carried_forward}
    assert paid + sum(carried.values()) == sum(pools_)
