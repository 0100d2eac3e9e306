"""What licensing analysts do with statements, through the command line, on SQLite and
PostgreSQL: previews and saved drafts, currencies, exports, corrections to closed periods, and
numbers printed as numbers. The ledger is filled with recorded results directly (no model)."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from ledger.cli import cli
from ledger.db import make_engine, session_scope, upgrade
from tests.ledger.helpers import record_run, result, setup_index

PROVIDERS = ["alpha", "beta", "gamma"]
# Q3 outputs: (id, served, positive influence per provider, weight).
Q3 = [
    ("q1", datetime(2024, 7, 3), {"alpha": 3.0, "beta": 1.0}, Decimal(1)),
    ("q2", datetime(2024, 8, 9), {"alpha": 1.0, "gamma": 1.0}, Decimal(1)),
    ("q3", datetime(2024, 9, 30, 23), {"beta": 2.0}, Decimal("2.5")),
]


@pytest.fixture
def url(db_url: str) -> str:
    """A ledger with three providers and one finished run over Q3's outputs."""
    engine = make_engine(db_url)
    upgrade(engine)
    with session_scope(engine) as session:
        index_id = setup_index(session, PROVIDERS)
        record_run(session, index_id, "q3", [result(e, t, pos, w) for e, t, pos, w in Q3])
    engine.dispose()
    return db_url


def ledger(url: str, *args: str, ok: bool = True) -> str:
    """Run `ledger --db URL ARGS`: its stdout when it succeeds, or (`ok=False`) the one line
    of its refusal (exit status 1)."""
    res = CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
        return res.stdout
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def count(url: str, table: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


def test_another_currency_than_a_saved_drafts_is_refused_not_ignored(url: str) -> None:
    ledger(url, "report", "--period", "2024-Q3", "--pool", "1000", "--currency", "USD", "--save")
    out = ledger(url, "report", "--period", "2024-Q3", "--currency", "EUR", ok=False)
    assert "draft in USD" in out and "EUR" in out
    # A pool in the other currency rebuilds the draft in it; the same currency is accepted.
    ledger(url, "report", "--period", "2024-Q3", "--currency", "usd")
    doc = json.loads(
        ledger(
            url,
            "report",
            "--period",
            "2024-Q3",
            "--pool",
            "900",
            "--currency",
            "EUR",
            "--save",
            "--format",
            "json",
        )  # fmt: skip
    )
    assert doc["statement"]["currency"] == "EUR" and doc["statement"]["pool"] == "900.00"
    ledger(url, "report", "--period", "2024-Q3", "--finalize")
    out = ledger(url, "report", "--period", "2024-Q3", "--currency", "USD", ok=False)
    assert "final in EUR" in out


def test_looking_at_a_period_leaves_nothing_and_saving_and_discarding_are_explicit(
    url: str,
) -> None:
    out = ledger(url, "report", "--period", "2024-Q3", "--pool", "1000")
    assert "Statement preview for 2024-Q3 [preview: not saved" in out
    assert count(url, "statements") == count(url, "statement_lines") == 0
    preview = json.loads(ledger(url, "report", "--period", "2024-Q3", "--pool", "1000",
                                "--format", "json"))  # fmt: skip
    assert preview["statement"]["id"] is None and preview["statement"]["status"] == "preview"
    assert {line["statement_id"] for line in preview["lines"]} == {None}
    assert count(url, "statements") == 0

    saved = json.loads(ledger(url, "report", "--period", "2024-Q3", "--pool", "1000",
                              "--save", "--format", "json"))  # fmt: skip
    sid = saved["statement"]["id"]
    assert saved["statement"]["status"] == "draft" and count(url, "statements") == 1
    # What was saved is what the preview showed.
    strip = ("statement_id", "status")
    assert [{k: v for k, v in line.items() if k not in strip} for line in saved["lines"]] == [
        {k: v for k, v in line.items() if k not in strip} for line in preview["lines"]
    ]
    ledger(url, "statements", "discard", str(sid))
    assert count(url, "statements") == count(url, "statement_lines") == 0
    assert "unknown statement" in ledger(url, "statements", "discard", str(sid), ok=False)

    # Finalising builds from the preview in one step; a final statement is never discarded.
    out = ledger(url, "statements", "finalize", "2024-Q3", "--pool", "1000")
    assert "is final" in out
    final = json.loads(ledger(url, "report", "--period", "2024-Q3", "--format", "json"))
    assert final["lines"] == [
        {**line, "statement_id": final["statement"]["id"], "status": "final"}
        for line in preview["lines"]
    ]
    assert "final" in ledger(url, "statements", "discard", "2024-Q3", ok=False)
    assert count(url, "statements") == 1


def test_the_database_lets_drafts_be_deleted_and_never_final_statements(url: str) -> None:
    ledger(url, "report", "--period", "2024-07", "--pool", "10", "--save")
    ledger(url, "report", "--period", "2024-08", "--pool", "10", "--finalize")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            ids = dict(conn.execute(text("SELECT status, id FROM statements")).all())
            conn.execute(text("DELETE FROM statement_lines WHERE statement_id = :s"),
                         {"s": ids["draft"]})  # fmt: skip
            conn.execute(text("DELETE FROM statement_runs WHERE statement_id = :s"),
                         {"s": ids["draft"]})  # fmt: skip
            conn.execute(text("DELETE FROM statements WHERE id = :s"), {"s": ids["draft"]})
        for table, column in (("statements", "id"), ("statement_lines", "statement_id")):
            with pytest.raises(Exception, match="final"), engine.begin() as conn:
                conn.execute(text(f"DELETE FROM {table} WHERE {column} = :s"),
                             {"s": ids["final"]})  # fmt: skip
    finally:
        engine.dispose()
    assert count(url, "statements") == 1
    assert "ok" in ledger(url, "audit")


def _adjusted_august(url: str) -> None:
    """July final (pool 100.00), August saved with a pool of 1000.00, carrying a correction of
    +100.50 to alpha's July amount."""
    ledger(url, "report", "--period", "2024-07", "--pool", "100", "--finalize")
    ledger(url, "report", "--period", "2024-08", "--pool", "1000", "--save")
    ledger(url, "statements", "adjust", "--corrects", "2024-07", "--provider", "alpha",
           "--amount", "100.50", "--reason", "missed output")  # fmt: skip


def test_the_table_totals_what_is_payable_after_adjustments(url: str) -> None:
    _adjusted_august(url)
    foot = ledger(url, "report", "--period", "2024-08").strip().splitlines()
    amount = next(i for i, line in enumerate(foot) if line.startswith("Total amount:"))
    assert foot[amount] == "Total amount: 1000.00 USD (= pool)"
    assert foot[amount + 1].startswith("Adjustment ") and "alpha 100.50" in foot[amount + 1]
    assert foot[amount + 2].startswith("Total payable: 1100.50 USD")


def test_exports_carry_their_statement_on_every_line_and_a_total_payable(
    url: str, tmp_path: Path
) -> None:
    import openpyxl

    _adjusted_august(url)
    doc = json.loads(ledger(url, "report", "--period", "2024-08", "--format", "json"))
    s = doc["statement"]
    stamp = {"statement_id": s["id"], "period": "2024-08", "currency": "USD", "status": "draft"}
    assert all({k: line[k] for k in stamp} == stamp for line in doc["lines"])
    # Independently: the payables of the lines, as exact decimals.
    payable = sum(Decimal(line["payable"]) for line in doc["lines"])
    assert payable == Decimal("1100.50") == Decimal(s["totals"]["payable"])
    assert s["totals"]["payable_minor"] == 110050 and s["totals"]["amount"] == "1000.00"

    frames = {}
    for fmt in ("csv", "parquet", "xlsx"):
        out = tmp_path / f"august.{fmt}"
        ledger(url, "report", "--period", "2024-08", "--format", fmt, "--out", str(out))
        if fmt == "csv":
            frames[fmt] = pl.read_csv(out, infer_schema=False)
        elif fmt == "parquet":
            frames[fmt] = pl.read_parquet(out).cast(pl.String)
        else:  # read back with another library than the writer's
            sheet = openpyxl.load_workbook(out).active
            header, *rows = [list(r) for r in sheet.iter_rows(values_only=True)]
            frames[fmt] = pl.DataFrame(
                [[None if v is None else str(v) for v in row] for row in rows],
                schema=[str(h) for h in header], orient="row",
            )  # fmt: skip
    for fmt, frame in frames.items():
        lines, total = frame.filter(pl.col("line") == "provider"), frame.row(-1, named=True)
        assert lines["provider"].to_list() == [line["provider"] for line in doc["lines"]], fmt
        for key, value in stamp.items():
            assert set(frame[key].to_list()) == {str(value)}, (fmt, key)
        assert [Decimal(p) for p in lines["payable"]] == [
            Decimal(line["payable"]) for line in doc["lines"]
        ], fmt
        assert total["line"] == "total" and total["provider"] is None, fmt
        assert Decimal(total["payable"]) == payable and total["payable_minor"] == "110050", fmt
        assert Decimal(total["amount"]) == Decimal("1000.00"), fmt


def test_numbers_print_as_numbers_and_money_keeps_its_minor_units(url: str) -> None:
    big = 7994255852388.722656
    floats = [f"CAST({v} AS DOUBLE PRECISION) AS c{i}"
              for i, v in enumerate((big, "3.95846e+11", "0.000123456789"))]  # fmt: skip
    out = ledger(url, "sql", "SELECT " + ", ".join(floats))
    assert out.splitlines()[-1].split() == ["7994255852389", "395846000000", "0.000123457"]
    assert "e+" not in out
    # A value of that size on a statement: digits, not an exponent or a string of decimals;
    # amounts exact to the cent of the pool.
    engine = make_engine(url)
    with session_scope(engine) as session:
        index_id = setup_index(session, ["delta"])
        rich = result("q9", datetime(2024, 11, 2), {"delta": 1.0}, Decimal("7994255852388.72"))
        record_run(session, index_id, "q4", [rich])
    engine.dispose()
    table = ledger(url, "report", "--period", "2024-Q4", "--pool", "1234567.89")
    row = next(line for line in table.splitlines() if line.startswith("delta"))
    assert row.split() == ["delta", "7994255852389", "100.00%", "1234567.89", "1234567.89"]


def test_a_closed_period_is_corrected_before_the_next_one_has_outputs(url: str) -> None:
    ledger(url, "report", "--period", "2024-Q3", "--pool", "1000", "--finalize")
    out = ledger(url, "statements", "adjust", "--corrects", "2024-Q3", "--provider", "alpha",
                 "--amount", "100.50", "--reason", "missed output")  # fmt: skip
    assert "(2024-Q4, draft)" in out
    q4 = json.loads(ledger(url, "report", "--period", "2024-Q4", "--format", "json"))
    assert q4["statement"]["status"] == "draft" and q4["statement"]["pool"] == "0.00"
    assert [(x["provider"], x["payable"]) for x in q4["lines"]] == [("alpha", "100.50")]
    assert "Total payable: 100.50 USD" in ledger(url, "report", "--period", "2024-Q4")
    ledger(url, "statements", "finalize", "2024-Q4")
    # Paid once, in the journal; every invariant holds.
    engine = make_engine(url)
    with engine.connect() as conn:
        paid = conn.execute(text(
            "SELECT SUM(amount_minor) FROM transfers t JOIN statements s "
            "ON s.id = t.statement_id WHERE s.period_label = '2024-Q4' AND kind = 'payment'"
        )).scalar_one()  # fmt: skip
    engine.dispose()
    assert paid == 10050
    assert ledger(url, "audit").strip().endswith("checks passed")
    # A later correction of Q3 goes past the final Q4: to a new 2025-Q1 draft.
    out = ledger(url, "statements", "adjust", "--corrects", "2024-Q3", "--provider", "beta",
                 "--amount", "-1.00", "--reason", "double counted")  # fmt: skip
    assert "(2025-Q1, draft)" in out


def test_an_empty_period_pays_what_was_carried_forward_to_it(url: str) -> None:
    # Q3: values alpha 1.25, beta 2.75, gamma 0.5 of 4.5; gamma's 111.11 is under the minimum.
    q3 = json.loads(ledger(url, "report", "--period", "2024-Q3", "--pool", "1000",
                           "--min-payout", "200", "--finalize", "--format", "json"))  # fmt: skip
    gamma = next(x for x in q3["lines"] if x["provider"] == "gamma")
    assert (gamma["amount"], gamma["payable"], gamma["carried_forward_minor"]) == (
        "111.11", "0.00", 11111,
    )  # fmt: skip
    q4 = json.loads(ledger(url, "report", "--period", "2024-Q4", "--format", "json"))
    assert q4["statement"]["status"] == "preview" and count(url, "statements") == 1
    assert [(x["provider"], x["carried_in_minor"], x["payable"]) for x in q4["lines"]] == [
        ("gamma", 11111, "111.11")
    ]
    ledger(url, "statements", "finalize", "2024-Q4")
    assert ledger(url, "audit").strip().endswith("checks passed")
