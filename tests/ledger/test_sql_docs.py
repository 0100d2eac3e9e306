"""Every SQL example in docs/sql.md runs on SQLite and PostgreSQL and returns rows, through the
read-only path of `ledger sql`, which no query can use to change the ledger."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from ledger.db import read_only_query, session_scope
from ledger.errors import LedgerError
from ledger.periods import parse_period
from ledger.statements import (
    add_adjustment,
    build_statement,
    finalize_statement,
    find_statement,
    statement_adjustments,
    statement_rows,
)
from tests.ledger.helpers import record_run, result, setup_index

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"
EXAMPLES = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
PROVIDERS = ["acme-news", "northwind-books", "openwiki"]


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.fixture
def analyst_db(engine: Engine) -> Engine:
    """Two quarters of credits, a final Q3 statement, a Q4 draft carrying a correction."""
    q3 = [
        result(f"chat-{i:04d}", datetime(2024, 7 + i % 3, 1 + i, 9), pos)
        for i, pos in enumerate(
            [
                {"northwind-books": 3.0, "acme-news": 1.0},
                {"northwind-books": 1.0, "openwiki": 1.0},
                {"acme-news": 2.0},
                {},
            ],
            start=1,
        )
    ]
    q4 = [result("chat-0100", datetime(2024, 11, 5), {"northwind-books": 1.0, "openwiki": 4.0})]
    with session_scope(engine) as s:
        index_id = setup_index(s, PROVIDERS)
        record_run(s, index_id, "r1", q3 + q4)
        statement = build_statement(s, parse_period("2024-Q3"), Decimal("250000"), "USD")
        finalize_statement(s, statement.id)
        build_statement(s, parse_period("2024-Q4"), Decimal("100000"), "USD")
        add_adjustment(
            s, statement.id, "openwiki", Decimal("-12.50"), "query chat-0002 double-served"
        )
    return engine


@pytest.mark.parametrize("sql", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_sql_example_runs_and_returns_rows(analyst_db: Engine, sql: str) -> None:
    with analyst_db.connect() as conn:
        rows = conn.execute(text(sql)).all()
    assert rows, f"no rows from:\n{sql}"
    assert [tuple(r.values()) for r in read_only_query(analyst_db, sql)] == [tuple(r) for r in rows]


TABLES = ("providers", "queries", "query_results", "credits", "top_examples", "statements",
          "statement_lines", "adjustments")  # fmt: skip
WRITES = [
    "WITH x AS (SELECT 1) DELETE FROM top_examples",
    "WITH d AS (DELETE FROM top_examples RETURNING *) SELECT COUNT(*) FROM d",
    "WITH x AS (SELECT 1) INSERT INTO providers (name, created_at) VALUES ('x', '2024-01-01')",
    "WITH x AS (SELECT 1) UPDATE credits SET credit = 0",
    "SELECT 1; DELETE FROM top_examples",
    "SELECT 1; COMMIT; DELETE FROM top_examples",
    "EXPLAIN ANALYZE DELETE FROM top_examples",
    "SELECT 1 FOR UPDATE",
]


@pytest.mark.parametrize("sql", WRITES, ids=[f"write{i}" for i in range(len(WRITES))])
def test_no_query_can_change_the_ledger(analyst_db: Engine, sql: str) -> None:
    def counts() -> dict[str, int]:
        with analyst_db.connect() as conn:
            return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}

    before = counts()
    assert before["top_examples"] > 0 and before["credits"] > 0
    try:
        list(read_only_query(analyst_db, sql))
    except LedgerError as exc:
        assert str(exc).startswith("SQL error: ") and "\n" not in str(exc)
    assert counts() == before
    with analyst_db.connect() as conn:  # and every credit is as it was
        assert conn.execute(text("SELECT MIN(credit) FROM credits")).scalar_one() > 0


def test_read_only_queries_take_colons_and_percent_signs_literally(analyst_db: Engine) -> None:
    rows = list(read_only_query(analyst_db, "SELECT 'a:b' AS s, '10%' AS p"))
    assert rows == [{"s": "a:b", "p": "10%"}]


def test_views_give_exact_amounts_and_the_current_credits(analyst_db: Engine) -> None:
    with analyst_db.connect() as conn:
        lines = conn.execute(
            text(
                "SELECT provider, amount_minor, amount FROM statement_lines_named "
                "WHERE period_label = '2024-Q3' ORDER BY provider"
            )
        ).all()
        adjustment = conn.execute(text("SELECT amount FROM statement_adjustments_named")).scalar()
        months = conn.execute(
            text("SELECT DISTINCT quarter FROM provider_value_by_month ORDER BY quarter")
        ).scalars()
        assert list(months) == ["2024-Q3", "2024-Q4"]
    assert sum(a for _, a, _ in lines) == 25_000_000
    for _, minor, amount in lines:
        assert Decimal(amount) == Decimal(minor) / 100
        assert amount == f"{minor // 100}.{minor % 100:02d}"
    assert adjustment == "-12.50"


def test_the_total_paid_example_pays_what_the_statements_pay(analyst_db: Engine) -> None:
    """Adjustments included (one for a provider with no line on the statement), and the Q4
    statement, which ends exactly on the example's boundary 2025-01-01, counted."""
    (example,) = [sql for sql in EXAMPLES if "paid_minor" in sql]
    with session_scope(analyst_db) as s:
        q3 = find_statement(s, parse_period("2024-Q3"))
        add_adjustment(s, q3.id, "acme-news", Decimal("5.00"), "query chat-0003 under-credited")
        q4 = find_statement(s, parse_period("2024-Q4"))
        finalize_statement(s, q4.id)
        expected: dict[tuple[str, str], int] = {}
        for statement in (q3, q4):
            assert statement_adjustments(s, statement.id) or statement is q3
            for row in statement_rows(s, statement.id).to_dicts():
                key = (row["provider"], statement.currency)
                expected[key] = expected.get(key, 0) + row["payable_minor"]
    assert q4.period_end.date() == date(2025, 1, 1)
    paid = {
        (r["provider"], r["currency"]): r["paid_minor"]
        for r in read_only_query(analyst_db, example)
    }
    assert paid == expected
    assert paid[("openwiki", "USD")] == expected[("openwiki", "USD")]  # -12.50 on Q4
    with analyst_db.connect() as conn:  # the same through any client, as the docs promise
        assert {(r[0], r[1]): r[2] for r in conn.execute(text(example))} == expected
