"""Value statements: exact amounts, determinism, finality (in the app and in the database),
rebuilding drafts, carry-forward and adjustments."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import polars as pl
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DatabaseError

from ledger.db import session_scope
from ledger.errors import (
    ConflictError,
    EmptyStatementError,
    LedgerError,
    MoneyError,
    StatementFinalError,
)
from ledger.money import MAX_MINOR, from_minor
from ledger.periods import parse_period
from ledger.statements import (
    add_adjustment,
    build_statement,
    finalize_statement,
    statement_rows,
    statement_summary,
)
from tests.ledger.helpers import record_run, result, setup_index

PROVIDERS = ["alpha", "beta", "gamma", "delta"]
Q3 = parse_period("2024-Q3")
Q4 = parse_period("2024-Q4")


def random_results(seed: int, n: int, start: datetime, prefix: str = "q") -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = {p: rng.random() * 10 ** rng.randint(-3, 3) for p in rng.sample(PROVIDERS, 3)}
        weight = Decimal(rng.randint(1, 10**6)) / 1000
        served = start + timedelta(minutes=rng.randint(0, 60 * 24 * 80))
        out.append(result(f"{prefix}{i}", served, positive, weight))
    return out


def populate(engine: Engine, results: list, label: str = "r") -> str:
    with session_scope(engine) as s:
        index_id = setup_index(s, PROVIDERS)
        run_id, _ = record_run(s, index_id, label, results)
    return run_id


def lines_of(engine: Engine, statement_id: int) -> list[tuple]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT provider, value, share, amount_minor, payable_minor, "
                    "carried_in_minor, carried_forward_minor FROM statement_lines_named "
                    "WHERE statement_id = :s ORDER BY provider"
                ),
                {"s": statement_id},
            )
        ]


def test_statement_values_shares_and_amounts_match_an_independent_computation(
    engine: Engine,
) -> None:
    results = random_results(1, 200, datetime(2024, 7, 1))
    results.append(result("late", datetime(2024, 10, 1), {"alpha": 5.0}))  # outside Q3
    results.append(result("none", datetime(2024, 8, 1), {}))  # unattributed
    results.append(result("first", datetime(2024, 7, 1), {"beta": 2.0}))  # on the start bound
    run_id = populate(engine, results)
    with session_scope(engine) as s:
        statement = build_statement(s, Q3, Decimal("250000.00"), "USD")
        sid = statement.id
        rows = statement_rows(s, sid)
        summary = statement_summary(s, sid)
    in_q3 = [r for r in results if Q3.contains(r.query.served_at)]
    expected = {
        p: math.fsum(c.credit for r in in_q3 for c in r.credits if c.provider == p)
        for p in PROVIDERS
    }
    total = math.fsum(c.credit for r in in_q3 for c in r.credits)
    assert dict(zip(rows["provider"], rows["value"], strict=True)) == expected
    for provider, share in zip(rows["provider"], rows["share"], strict=True):
        assert share == expected[provider] / total
    assert sum(rows["amount_minor"]) == 25_000_000
    exact_total = sum(Fraction(v) for v in expected.values())
    for provider, amount in zip(rows["provider"], rows["amount_minor"], strict=True):
        assert abs(amount - Fraction(25_000_000) * Fraction(expected[provider]) / exact_total) < 1
    assert rows["amount"].to_list() == [f"{a // 100}.{a % 100:02d}" for a in rows["amount_minor"]]
    assert summary["status"] == "draft"
    assert summary["pool"] == "250000.00"
    assert summary["queries"] == len(in_q3)
    assert summary["unattributed_queries"] == 1
    assert [r["run_id"] for r in summary["runs"]] == [run_id]


def test_building_from_the_same_data_in_another_order_gives_identical_lines(
    make_database_url,
) -> None:
    from ledger.db import make_engine, upgrade

    results = random_results(2, 300, datetime(2024, 7, 1))
    shuffled = results[:]
    random.Random(3).shuffle(shuffled)
    lines = []
    for batch in (results, shuffled):
        engine = make_engine(make_database_url("sqlite"))
        upgrade(engine)
        populate(engine, batch)
        with session_scope(engine) as s:
            sid = build_statement(s, Q3, Decimal("1000"), "EUR").id
        lines.append(lines_of(engine, sid))
        with session_scope(engine) as s:
            assert build_statement(s, Q3, Decimal("1000"), "EUR").id == sid
        assert lines_of(engine, sid) == lines[-1]
        engine.dispose()
    assert lines[0] == lines[1]


def test_final_statement_is_refused_by_the_application(engine: Engine) -> None:
    populate(engine, random_results(4, 20, datetime(2024, 7, 1)))
    with session_scope(engine) as s:
        sid = build_statement(s, Q3, Decimal("100"), "USD").id
        finalize_statement(s, sid)
    with session_scope(engine) as s:
        with pytest.raises(StatementFinalError):
            build_statement(s, Q3, Decimal("100"), "USD")
        with pytest.raises(StatementFinalError):
            finalize_statement(s, sid)
    with pytest.raises(StatementFinalError):
        with session_scope(engine) as s:
            statement = s.get(__import__("ledger.models").models.Statement, sid)
            statement.lines[0].amount_minor += 1
            s.flush()
    with pytest.raises(StatementFinalError):
        with session_scope(engine) as s:
            statement = s.get(__import__("ledger.models").models.Statement, sid)
            statement.pool_minor = 1
            s.flush()


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE statements SET pool_minor = 1 WHERE id = :s",
        "UPDATE statements SET status = 'draft' WHERE id = :s",
        "DELETE FROM statements WHERE id = :s",
        "UPDATE statement_lines SET amount_minor = amount_minor + 1 WHERE statement_id = :s",
        "DELETE FROM statement_lines WHERE statement_id = :s",
        "DELETE FROM statement_runs WHERE statement_id = :s",
        "INSERT INTO statement_lines (statement_id, provider_id, value, share, amount_minor, "
        "carried_in_minor, payable_minor, carried_forward_minor) "
        "SELECT :s, id, 0, 0, 0, 0, 0, 0 FROM providers WHERE name = 'nobody'",
    ],
)
def test_final_statement_is_refused_by_the_database(engine: Engine, sql: str) -> None:
    populate(engine, random_results(5, 20, datetime(2024, 7, 1)))
    with session_scope(engine) as s:
        s.execute(text("INSERT INTO providers (name, created_at) VALUES ('nobody', '2024-01-01')"))
        sid = build_statement(s, Q3, Decimal("100"), "USD").id
        finalize_statement(s, sid)
    before = lines_of(engine, sid)
    with pytest.raises(DatabaseError, match="final"):
        with engine.begin() as conn:
            conn.execute(text(sql), {"s": sid})
    assert lines_of(engine, sid) == before


def test_rebuilding_a_draft_replaces_its_lines(engine: Engine) -> None:
    populate(engine, random_results(6, 30, datetime(2024, 7, 1)))
    with session_scope(engine) as s:
        sid = build_statement(s, Q3, Decimal("100"), "USD").id
    first = lines_of(engine, sid)
    populate(engine, [result("extra", datetime(2024, 8, 1), {"alpha": 1.0}, Decimal(1000))], "r2")
    with session_scope(engine) as s:
        assert build_statement(s, Q3, Decimal("100"), "USD").id == sid
        assert len(statement_summary(s, sid)["runs"]) == 2
    second = lines_of(engine, sid)
    assert len(second) == len(first) == 4
    assert second != first
    assert sum(line[3] for line in second) == 10000


def test_a_period_without_credited_queries_is_an_error(engine: Engine) -> None:
    populate(engine, [result("q", datetime(2024, 8, 1), {})])
    with session_scope(engine) as s, pytest.raises(EmptyStatementError, match="2024-Q3"):
        build_statement(s, Q3, Decimal("100"))
    with session_scope(engine) as s, pytest.raises(EmptyStatementError):
        build_statement(s, Q4, None)


def test_a_statement_without_pool_has_values_but_no_amounts(engine: Engine) -> None:
    populate(engine, random_results(7, 10, datetime(2024, 7, 1)))
    with session_scope(engine) as s:
        rows = statement_rows(s, build_statement(s, Q3, None).id)
    assert rows["amount_minor"].null_count() == rows.height
    assert math.isclose(sum(rows["share"]), 1.0)


def test_small_amounts_are_carried_forward_to_the_next_statement(engine: Engine) -> None:
    results = [
        result("a1", datetime(2024, 7, 2), {"alpha": 97.0, "beta": 3.0}),
        result("b1", datetime(2024, 10, 2), {"alpha": 97.0, "beta": 3.0}),
        result("c1", datetime(2025, 1, 2), {"alpha": 1.0}),
    ]
    populate(engine, results)
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("100.00"), "USD", min_payout=Decimal("7.00"))
        finalize_statement(s, q3.id)
        q4 = build_statement(s, Q4, Decimal("100.00"), "USD", min_payout=Decimal("7.00"))
        finalize_statement(s, q4.id)
        q1 = build_statement(
            s, parse_period("2025-Q1"), Decimal("100.00"), "USD", min_payout=Decimal("7.00")
        )
        ids = (q3.id, q4.id, q1.id)
    # provider, value, share, amount, payable, carried_in, carried_forward
    beta = [next(line for line in lines_of(engine, sid) if line[0] == "beta") for sid in ids]
    assert [b[3:] for b in beta] == [(300, 0, 0, 300), (300, 0, 300, 600), (0, 0, 600, 600)]
    paid = sum(line[4] for sid in ids for line in lines_of(engine, sid))
    assert paid + beta[-1][6] == 30000


def populate_q3_and_q4(engine: Engine) -> None:
    """40 credited outputs in 2024-Q3 and 10 in 2024-Q4."""
    populate(
        engine,
        random_results(8, 40, datetime(2024, 7, 1))
        + random_results(9, 10, datetime(2024, 10, 1), prefix="x"),
    )


def test_corrections_go_on_the_next_open_statement_and_point_at_what_they_correct(
    engine: Engine,
) -> None:
    populate_q3_and_q4(engine)
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("1000"), "USD")
        with pytest.raises(LedgerError, match="draft"):
            add_adjustment(s, q3.id, "alpha", Decimal("10"), "typo")
        finalize_statement(s, q3.id)
        with pytest.raises(LedgerError, match="no open statement"):
            add_adjustment(s, q3.id, "alpha", Decimal("10"), "typo")
        q4 = build_statement(s, Q4, Decimal("500"), "USD")
        adj = add_adjustment(s, q3.id, "alpha", Decimal("-12.34"), "double-counted query q7")
        assert adj.statement_id == q4.id
        assert adj.corrects_line_id is not None
        with pytest.raises(LedgerError):
            add_adjustment(s, q3.id, "alpha", Decimal("1.001"), "too precise")
        q4_id, q3_id = q4.id, q3.id
    with session_scope(engine) as s:
        before = statement_rows(s, q4_id)
        build_statement(s, Q4, Decimal("500"), "USD")  # rebuilding keeps the adjustment
        rows = statement_rows(s, q4_id)
        summary = statement_summary(s, q4_id)
    assert rows.equals(before)
    alpha = rows.filter(rows["provider"] == "alpha").row(0, named=True)
    assert alpha["adjustments_minor"] == -1234
    assert alpha["payable_minor"] == alpha["amount_minor"] - 1234
    assert summary["adjustments"][0]["corrects_statement_id"] == q3_id
    assert summary["adjustments"][0]["corrects_period"] == "2024-Q3"
    assert summary["adjustments"][0]["amount"] == "-12.34"
    with session_scope(engine) as s:
        finalize_statement(s, q4_id)
    with pytest.raises(DatabaseError, match="final"):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM adjustments"))


def test_adjustments_that_would_leave_bigint_are_refused_and_nothing_is_recorded(
    engine: Engine,
) -> None:
    populate_q3_and_q4(engine)
    largest = from_minor(MAX_MINOR, "USD")  # one adjustment can hold it ...
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("1000"), "USD")
        finalize_statement(s, q3.id)
        q4 = build_statement(s, Q4, Decimal("500"), "USD")
        q3_id, q4_id = q3.id, q4.id
        alpha = statement_rows(s, q4_id).filter(pl.col("provider") == "alpha").row(0, named=True)
        paid = alpha["payable_minor"]
        assert paid > 0
        # ... but not on top of what alpha is already paid on Q4,
        with pytest.raises(MoneyError, match=r"alpha: .*beyond the largest amount"):
            add_adjustment(s, q3_id, "alpha", largest, "too much")
        # which leaves room for exactly this much,
        add_adjustment(s, q3_id, "alpha", from_minor(MAX_MINOR - paid, "USD"), "all of it")
        # and then for nothing more, in one adjustment or across several.
        with pytest.raises(MoneyError, match="beyond the largest amount"):
            add_adjustment(s, q3_id, "alpha", Decimal("0.01"), "one cent more")
        assert (
            statement_rows(s, q4_id)
            .filter(pl.col("provider") == "alpha")
            .row(0, named=True)["payable_minor"]
            == MAX_MINOR
        )
        # Negative totals are bounded the same way.
        add_adjustment(s, q3_id, "beta", -largest, "all back")
        with pytest.raises(MoneyError, match="beyond the largest amount"):
            add_adjustment(s, q3_id, "beta", -largest, "more back")
    with session_scope(engine) as s:
        counted = s.scalar(text("SELECT COUNT(*) FROM adjustments"))
    assert counted == 2
    # A rebuild whose larger pool pushes alpha's payable past the limit is refused when read.
    with pytest.raises(MoneyError, match=r"alpha: payable .* adjustments included"):
        with session_scope(engine) as s:
            build_statement(s, Q4, Decimal("1000"), "USD")
            statement_rows(s, q4_id)


def test_overlapping_pools_are_refused(engine: Engine) -> None:
    populate(engine, random_results(10, 10, datetime(2024, 7, 1)))
    with session_scope(engine) as s:
        build_statement(s, Q3, Decimal("100"))
        with pytest.raises(ConflictError, match="overlaps"):
            build_statement(s, parse_period("2024-08"), Decimal("100"))
        build_statement(s, parse_period("2024-08"), None)  # values only: fine
