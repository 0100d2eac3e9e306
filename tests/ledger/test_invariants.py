"""The ledger's invariants under the conditions that broke them: periods closed out of order,
adjustments across currencies, late credits, stale drafts, direct SQL and tampering with
triggers off. Each test here failed on the ledger before the journal and the database guards;
races between processes are in test_races.py, random sequences in test_ledger_state_machine.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DatabaseError

from ledger import models as m
from ledger.audit import audit_ledger, verify_statement
from ledger.db import make_engine, session_scope
from ledger.errors import ClosedPeriodError, ConflictError, LedgerError
from ledger.periods import parse_period
from ledger.recording import record_results, start_run
from ledger.statements import (
    add_adjustment,
    build_statement,
    finalize_statement,
    statement_rows,
    statement_summary,
)
from tests.ledger.helpers import record_run, result, setup_index, sha

PROVIDERS = ["alpha", "beta"]
Q3, Q4, Q1 = (parse_period(p) for p in ("2024-Q3", "2024-Q4", "2025-Q1"))


def populate(engine: Engine, results: list, label: str = "r") -> str:
    with session_scope(engine) as s:
        index_id = setup_index(s, PROVIDERS)
        run_id, _ = record_run(s, index_id, label, results)
    return run_id


def paid_by_final_statements(engine: Engine) -> int:
    with session_scope(engine) as s:
        finals = s.scalars(text("SELECT id FROM statements WHERE status = 'final'")).all()
        return sum(
            int(statement_rows(s, sid)["payable_minor"].fill_null(0).sum()) for sid in finals
        )


def carry_outstanding(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT COALESCE(SUM(CASE WHEN credit_account = 'carry' THEN amount_minor "
                    "ELSE -amount_minor END), 0) FROM transfers "
                    "WHERE credit_account = 'carry' OR debit_account = 'carry'"
                )
            ).scalar()
        )


def test_carried_forward_money_is_paid_once_whatever_order_periods_close_in(
    engine: Engine,
) -> None:
    # beta's 3.00 of Q3 is held back under a 7.00 minimum; 2025-Q1 closes before 2024-Q4.
    populate(
        engine,
        [
            result("a", datetime(2024, 7, 2), {"alpha": 97.0, "beta": 3.0}),
            result("b", datetime(2024, 10, 2), {"alpha": 95.0, "beta": 5.0}),
            result("c", datetime(2025, 1, 2), {"alpha": 95.0, "beta": 5.0}),
        ],
    )
    minimum = Decimal("7.00")
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("100.00"), "USD", min_payout=minimum)
        finalize_statement(s, q3.id)
    with session_scope(engine) as s:
        q1 = build_statement(s, Q1, Decimal("100.00"), "USD", min_payout=minimum)
        q4 = build_statement(s, Q4, Decimal("100.00"), "USD", min_payout=minimum)
        q1_id, q4_id = q1.id, q4.id
    with session_scope(engine) as s:
        finalize_statement(s, q1_id)
    # Q4's draft still carries the 3.00 in: it is out of date and must be rebuilt.
    with pytest.raises(ConflictError, match="out of date"), session_scope(engine) as s:
        finalize_statement(s, q4_id)
    with session_scope(engine) as s:
        build_statement(s, Q4, Decimal("100.00"), "USD", min_payout=minimum)
        finalize_statement(s, q4_id)
        carried_in = {
            sid: int(statement_rows(s, sid)["carried_in_minor"].sum()) for sid in (q1_id, q4_id)
        }
    assert carried_in == {q1_id: 300, q4_id: 0}
    # Q1 paid beta 5.00 + 3.00; Q4 holds its 5.00 back: nothing paid twice.
    assert carry_outstanding(engine) == 500
    assert paid_by_final_statements(engine) + carry_outstanding(engine) == 30000
    with session_scope(engine) as s:
        assert audit_ledger(s).ok


def test_the_database_refuses_carrying_the_same_money_twice(engine: Engine) -> None:
    populate(engine, [result("a", datetime(2024, 7, 2), {"alpha": 97.0, "beta": 3.0})])
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("100.00"), "USD", min_payout=Decimal("7.00"))
        finalize_statement(s, q3.id)
        beta = s.scalar(text("SELECT id FROM providers WHERE name = 'beta'"))
        draft = s.execute(
            text(
                "INSERT INTO statements (period_label, period_start, period_end, currency, "
                "minor_units, pool_minor, total_value, query_count, unattributed_count, "
                "status, created_at) VALUES ('x', '2030-01-01 00:00:00.000000', "
                "'2030-02-01 00:00:00.000000', 'USD', 2, 0, 0, 0, 0, 'draft', "
                "'2024-01-01 00:00:00.000000') RETURNING id"
            )
        ).scalar()
    insert = text(
        "INSERT INTO transfers (statement_id, kind, debit_account, credit_account, provider_id, "
        "currency, amount_minor, created_at) VALUES (:s, 'carry_in', 'carry', 'payable', :p, "
        "'USD', :a, '2024-01-01 00:00:00.000000')"
    )
    with engine.begin() as conn:
        conn.execute(insert, {"s": draft, "p": beta, "a": 300})  # the 3.00 carried, once
    with pytest.raises(DatabaseError, match="negative"), engine.begin() as conn:
        conn.execute(insert, {"s": draft, "p": beta, "a": 1})  # one cent more: refused


def test_an_adjustment_keeps_its_currency(engine: Engine) -> None:
    populate(
        engine,
        [
            result("a", datetime(2024, 7, 2), {"alpha": 1.0, "beta": 1.0}),
            result("b", datetime(2024, 10, 2), {"alpha": 1.0, "beta": 1.0}),
        ],
    )
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("10000.00"), "USD")
        finalize_statement(s, q3.id)
        q4 = build_statement(s, Q4, Decimal("5000.00"), "USD")
        add_adjustment(s, q3.id, "alpha", Decimal("-1234.56"), "over-credited")
        q4_id = q4.id
    for currency in ("JPY", "BHD", "EUR"):
        with pytest.raises(ConflictError, match="adjustments in USD"), session_scope(engine) as s:
            build_statement(s, Q4, Decimal("5000"), currency)
    with session_scope(engine) as s:
        row = statement_rows(s, q4_id).filter(provider="alpha").row(0, named=True)
        assert row["adjustments_minor"] == -123456
        assert statement_summary(s, q4_id)["adjustments"][0]["currency"] == "USD"
    # The database refuses it too: an adjustment in another currency than its statement's,
    # and a statement moved to another currency under its adjustments.
    with pytest.raises(DatabaseError, match="currency"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO adjustments (statement_id, corrects_statement_id, provider_id, "
                "amount_minor, currency, reason, created_at) SELECT :q4, :q3, id, 5, 'JPY', 'x', "
                "'2024-01-01 00:00:00.000000' FROM providers WHERE name = 'alpha'"
            ),
            {"q4": q4_id, "q3": q3.id},
        )
    with pytest.raises(DatabaseError, match="currency"), engine.begin() as conn:
        conn.execute(text("UPDATE statements SET currency = 'JPY' WHERE id = :s"), {"s": q4_id})


def test_overlapping_final_pools_are_refused_by_the_database(engine: Engine) -> None:
    populate(engine, [result("a", datetime(2024, 8, 2), {"alpha": 1.0})])
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("900"), "USD")
        finalize_statement(s, q3.id)
    # August as a pooled draft, written past the application's checks, then finalised in SQL:
    # with a pool of 0 every balance check passes, so only the overlap can refuse it.
    with engine.begin() as conn:
        aug = conn.execute(
            text(
                "INSERT INTO statements (period_label, period_start, period_end, currency, "
                "minor_units, pool_minor, total_value, query_count, unattributed_count, status, "
                "created_at) VALUES ('2024-08', '2024-08-01 00:00:00.000000', "
                "'2024-09-01 00:00:00.000000', 'USD', 2, 0, 1, 1, 0, 'draft', "
                "'2024-01-01 00:00:00.000000') RETURNING id"
            )
        ).scalar()
    with pytest.raises(DatabaseError, match="overlap"), engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE statements SET status = 'final', content = '{}', content_sha256 = 'x', "
                "final_seq = 99 WHERE id = :s"
            ),
            {"s": aug},
        )
    with pytest.raises(ConflictError, match="overlaps"), session_scope(engine) as s:
        finalize_statement(s, aug)


def test_late_credits_into_a_closed_period_are_refused_and_nothing_is_written(
    engine: Engine,
) -> None:
    populate(engine, [result("a", datetime(2024, 7, 2), {"alpha": 1.0})])
    with session_scope(engine) as s:
        finalize_statement(s, build_statement(s, Q3, Decimal("100"), "USD").id)
        index_id = s.scalar(text("SELECT id FROM gradient_indexes"))
        start_run(s, sha("late"), index_id, {"run": "late"})
    late = [
        result("new", datetime(2024, 9, 30, 23, 59), {"beta": 1.0}),
        result("open", datetime(2024, 10, 1), {"beta": 1.0}),
    ]
    with pytest.raises(ClosedPeriodError, match="2024-Q3"), session_scope(engine) as s:
        record_results(s, sha("late"), late)
    # A re-attribution of an output of the closed period is refused too.
    with pytest.raises(ClosedPeriodError), session_scope(engine) as s:
        record_results(s, sha("late"), [result("a", datetime(2024, 7, 2), {"beta": 1.0})])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM queries")).scalar() == 1
        assert conn.execute(text("SELECT COUNT(*) FROM query_results")).scalar() == 1
    with session_scope(engine) as s:  # the open period's output alone is fine
        assert record_results(s, sha("late"), late[1:]) == 1
    # Past the application, the database refuses a result for an output of the closed period.
    with pytest.raises(DatabaseError, match="final"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO query_results (run_id, query_id, unattributed, positive_total, "
                "is_current, recorded_at) SELECT :r, id, false, 1.0, false, "
                "'2025-01-01 00:00:00.000000' FROM queries WHERE external_id = 'a'"
            ),
            {"r": sha("late")},
        )


def test_finalising_needs_finished_runs_or_an_explicit_flag(engine: Engine) -> None:
    populate(engine, [result("a", datetime(2024, 7, 2), {"alpha": 1.0})])
    with session_scope(engine) as s:
        index_id = s.scalar(text("SELECT id FROM gradient_indexes"))
        start_run(s, sha("unfinished"), index_id, {"run": "unfinished"})
        record_results(s, sha("unfinished"), [result("b", datetime(2024, 8, 2), {"beta": 1.0})])
        sid = build_statement(s, Q3, Decimal("100"), "USD").id
    with pytest.raises(ConflictError, match="unfinished"), session_scope(engine) as s:
        finalize_statement(s, sid)
    with session_scope(engine) as s:
        assert finalize_statement(s, sid, allow_unfinished=True).status == "final"


def test_a_draft_out_of_date_with_the_credits_is_not_finalised(engine: Engine) -> None:
    populate(engine, [result("a", datetime(2024, 7, 2), {"alpha": 1.0})])
    with session_scope(engine) as s:
        sid = build_statement(s, Q3, Decimal("100"), "USD").id
    populate(engine, [result("b", datetime(2024, 8, 2), {"beta": 3.0})], "r2")
    with pytest.raises(ConflictError, match="out of date"), session_scope(engine) as s:
        finalize_statement(s, sid)
    with session_scope(engine) as s:
        build_statement(s, Q3, Decimal("100"), "USD")
        finalize_statement(s, sid)
        summary = statement_summary(s, sid)
    assert len(summary["runs"]) == 2 and summary["queries"] == 2


def closed_ledger(engine: Engine) -> tuple[int, int]:
    """Q3 final, Q4 final with an adjustment to Q3: (Q3 id, Q4 id)."""
    populate(
        engine,
        [
            result("a", datetime(2024, 7, 2), {"alpha": 3.0, "beta": 1.0}),
            result("b", datetime(2024, 10, 2), {"alpha": 1.0, "beta": 1.0}),
        ],
    )
    with session_scope(engine) as s:
        q3 = build_statement(s, Q3, Decimal("1000"), "USD")
        finalize_statement(s, q3.id)
        q4 = build_statement(s, Q4, Decimal("500"), "USD")
        add_adjustment(s, q3.id, "beta", Decimal("12.50"), "missed output")
        finalize_statement(s, q4.id)
        return q3.id, q4.id


def test_final_statements_are_sealed_and_chained(engine: Engine) -> None:
    q3, q4 = closed_ledger(engine)
    with session_scope(engine) as s:
        first, second = s.get(m.Statement, q3), s.get(m.Statement, q4)
        assert first.final_seq == 1 and first.previous_sha256 is None
        assert second.final_seq == 2 and second.previous_sha256 == first.content_sha256
        assert json.loads(second.content)["previous_sha256"] == first.content_sha256
        assert first.finalized_by and second.finalized_by
        for sid in (q3, q4):
            assert verify_statement(s, sid).ok
        assert audit_ledger(s).ok
        rows = statement_rows(s, q4)
    beta = rows.filter(provider="beta").row(0, named=True)
    assert beta["adjustments_minor"] == 1250
    assert beta["payable_minor"] == beta["amount_minor"] + 1250


WHAT_A_FINAL_STATEMENT_RESTS_ON = [
    "UPDATE credits SET credit = credit + 0.01",
    "DELETE FROM credits",
    "DELETE FROM top_examples",
    "UPDATE queries SET weight_micros = 2000000",
    "DELETE FROM query_results",
    "UPDATE query_results SET is_current = false",
    "UPDATE attribution_runs SET manifest = '{}'",
    "DELETE FROM attribution_runs",
    "UPDATE providers SET name = 'renamed' WHERE name = 'alpha'",
    "DELETE FROM providers",
    "UPDATE transfers SET amount_minor = amount_minor + 1",
    "DELETE FROM transfers",
    "UPDATE gradient_indexes SET manifest = '{}'",
]


@pytest.mark.parametrize("sql", WHAT_A_FINAL_STATEMENT_RESTS_ON)
def test_what_a_final_statement_rests_on_cannot_be_changed_with_sql(
    engine: Engine, sql: str
) -> None:
    closed_ledger(engine)
    with pytest.raises(DatabaseError), engine.begin() as conn:
        conn.execute(text(sql))
    with session_scope(engine) as s:
        assert audit_ledger(s).ok


@pytest.mark.postgres
def test_truncate_is_refused_on_postgresql(make_database_url) -> None:
    from ledger.db import upgrade

    engine = make_engine(make_database_url("postgresql"))
    upgrade(engine)
    closed_ledger(engine)
    # ledger_settings holds where the workspace lies (a hint for finding files, which are
    # checked by their hashes); it is the one table `ledger workspace relocate` rewrites.
    for table in set(m.Base.metadata.tables) - {"ledger_settings"}:
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {table} CASCADE"))
    with session_scope(engine) as s:
        assert audit_ledger(s).ok
    engine.dispose()


def _without_guards(engine: Engine, sql: str) -> None:
    """Change the tables as an owner who switched the triggers off (or edited a copy)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET session_replication_role = replica"))  # no triggers fire
            conn.execute(text(sql))
            conn.execute(text("SET session_replication_role = origin"))
        else:
            names = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
            for (name,) in names.all():
                conn.execute(text(f"DROP TRIGGER {name}"))
            conn.execute(text(sql))


@pytest.mark.parametrize(
    "sql, check",
    [
        ("UPDATE statement_lines SET payable_minor = payable_minor + 100", "content"),
        ("UPDATE providers SET name = 'renamed' WHERE name = 'alpha'", "content"),
        ("UPDATE credits SET credit = credit * 2", "values"),
        ("UPDATE statements SET content = replace(content, '\"beta\"', '\"eve\"')", "hash"),
        ("DELETE FROM transfers WHERE kind = 'adjustment'", "journal"),
        ("UPDATE query_results SET is_current = false", "values"),
    ],
)
def test_audit_and_verify_find_changes_made_with_the_triggers_off(
    engine: Engine, sql: str, check: str
) -> None:
    q3, q4 = closed_ledger(engine)
    _without_guards(engine, sql)
    with session_scope(engine) as s:
        failed = [c.name for sid in (q3, q4) for c in verify_statement(s, sid).checks if not c.ok]
        report = audit_ledger(s)
    assert any(check in name for name in failed), failed
    assert not report.ok


def test_a_final_statement_prints_what_it_sealed(engine: Engine) -> None:
    q3, _ = closed_ledger(engine)
    with session_scope(engine) as s:
        sealed = statement_rows(s, q3)
    _without_guards(engine, "UPDATE providers SET name = 'renamed' WHERE name = 'alpha'")
    with session_scope(engine) as s:
        assert statement_rows(s, q3).equals(sealed)
        assert "alpha" in statement_rows(s, q3)["provider"].to_list()


def test_one_current_result_per_output_is_held_by_the_database(engine: Engine) -> None:
    populate(engine, [result("a", datetime(2024, 7, 2), {"alpha": 1.0})])
    with session_scope(engine) as s:
        index_id = s.scalar(text("SELECT id FROM gradient_indexes"))
        start_run(s, sha("second"), index_id, {"run": "second"})
    with pytest.raises(DatabaseError), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO query_results (run_id, query_id, unattributed, positive_total, "
                "is_current, recorded_at) SELECT :r, id, false, 1.0, true, "
                "'2025-01-01 00:00:00.000000' FROM queries"
            ),
            {"r": sha("second")},
        )
    with session_scope(engine) as s:  # through the recorder the new result supersedes
        record_results(s, sha("second"), [result("a", datetime(2024, 7, 2), {"beta": 1.0})])
        assert s.scalar(text("SELECT COUNT(*) FROM query_results WHERE is_current")) == 1
        assert audit_ledger(s).ok


def test_statements_tolerate_nothing_but_their_own_errors(engine: Engine) -> None:
    """Refusals are the ledger's one-line errors, not database tracebacks."""
    populate(engine, [result("a", datetime(2024, 7, 2), {"alpha": 1.0})])
    with session_scope(engine) as s:
        sid = build_statement(s, Q3, Decimal("100"), "USD").id
        finalize_statement(s, sid)
    with pytest.raises(LedgerError), session_scope(engine) as s:
        finalize_statement(s, sid)


@pytest.mark.postgres
def test_roles_writer_records_approver_finalises_reader_sees_views(make_database_url) -> None:
    from sqlalchemy.engine import make_url

    from ledger.db import grant_role, upgrade

    url = make_database_url("postgresql")
    owner = make_engine(url)
    upgrade(owner)
    suffix = sha(url)[:8]
    users = {role: f"{role}_{suffix}" for role in ("reader", "writer", "approver")}
    for role, user in users.items():
        grant_role(owner, role, user, create=True)
    with pytest.raises(LedgerError, match="does not exist"):
        grant_role(owner, "reader", f"nobody_{suffix}")

    def as_user(role: str) -> Engine:
        return make_engine(make_url(url).set(username=users[role]).render_as_string(False))

    writer, approver, reader = as_user("writer"), as_user("approver"), as_user("reader")
    populate(writer, [result("a", datetime(2024, 7, 2), {"alpha": 1.0, "beta": 3.0})])
    with session_scope(writer) as s:
        sid = build_statement(s, Q3, Decimal("100"), "USD").id
    with pytest.raises(DatabaseError, match="approver"), session_scope(writer) as s:
        finalize_statement(s, sid)
    for sql in ("TRUNCATE credits", "ALTER TABLE credits DISABLE TRIGGER ALL"):
        with pytest.raises(DatabaseError, match="permission denied|must be owner"):
            with writer.begin() as conn:
                conn.execute(text(sql))
    with session_scope(approver) as s:
        assert finalize_statement(s, sid).finalized_by == users["approver"]
    with reader.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM statement_lines_named")).scalar() == 2
    with pytest.raises(DatabaseError, match="permission denied"), reader.connect() as conn:
        conn.execute(text("SELECT * FROM credits"))
    with reader.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "1min"
    for engine in (owner, writer, approver, reader):
        engine.dispose()


def _ledger(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from ledger.cli import main; main()", "--db", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_audit_and_verify_statement_on_the_command_line(db_url: str) -> None:
    engine = make_engine(db_url)
    from ledger.db import upgrade

    upgrade(engine)
    q3, _ = closed_ledger(engine)
    for args in (("audit",), ("verify", "--statement", "2024-Q3"), ("statements", "verify", "2")):
        done = _ledger(db_url, *args)
        assert done.returncode == 0, done.stderr
        assert "FAIL" not in done.stdout
    _without_guards(engine, "UPDATE statement_lines SET payable_minor = payable_minor + 1")
    audit = _ledger(db_url, "audit", "--format", "json")
    assert audit.returncode == 1
    failed = [c["name"] for c in json.loads(audit.stdout)["checks"] if not c["ok"]]
    assert failed and all("content equals" in name for name in failed)
    verify = _ledger(db_url, "verify", "--statement", str(q3))
    assert verify.returncode == 1 and "FAIL content equals" in verify.stdout
    assert _ledger(db_url, "verify").returncode == 2  # neither a run nor a statement
    engine.dispose()


@pytest.mark.parametrize("content", ["garbage", "{}", '{"lines": [{"provider": "zz"}]}'])
def test_damaged_sealed_content_is_reported_not_a_traceback(engine: Engine, content: str) -> None:
    q3, _ = closed_ledger(engine)
    _without_guards(engine, f"UPDATE statements SET content = '{content}' WHERE id = {q3}")
    with session_scope(engine) as s:
        report = verify_statement(s, q3)
        assert not report.ok
        assert not audit_ledger(s).ok
        with pytest.raises(LedgerError, match="sealed content is damaged"):
            statement_rows(s, q3)


def test_a_final_statement_shown_with_other_settings_is_refused(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    from ledger.db import upgrade

    upgrade(engine)
    closed_ledger(engine)
    engine.dispose()
    same = _ledger(url, "report", "--period", "2024-Q3", "--pool", "1000", "--currency", " usd")
    assert same.returncode == 0, same.stderr
    other = _ledger(url, "report", "--period", "2024-Q3", "--pool", "1000", "--min-payout", "5")
    assert other.returncode == 1 and "another minimum payout" in other.stderr


# Multi-row INSERTs whose rows are all valid but one: the set-based guards (PostgreSQL) and the
# row-level foreign keys and triggers (SQLite) refuse the whole statement.
BAD_CREDIT_ROWS = {
    "unknown provider": "(:r, :q, 999999, 1.0, 1.0)",
    "unknown result": "(:r, 999999, :p, 1.0, 1.0)",
    "unknown run": "(:other, :q, :p, 1.0, 1.0)",
}


@pytest.mark.parametrize("bad", sorted(BAD_CREDIT_ROWS))
def test_a_credit_row_without_its_result_or_provider_is_refused_among_good_rows(
    engine: Engine, bad: str
) -> None:
    run_id = populate(
        engine, [result(f"o{i}", datetime(2024, 7, 2 + i), {"alpha": 1.0}) for i in range(3)]
    )
    with engine.connect() as conn:
        qids = conn.execute(text("SELECT id FROM queries ORDER BY id")).scalars().all()
        beta = conn.execute(text("SELECT id FROM providers WHERE name = 'beta'")).scalar()
    good = [f"(:r, {q}, :p, 1.0, 1.0)" for q in qids]
    rows = ", ".join(good[:2] + [BAD_CREDIT_ROWS[bad]] + good[2:])
    with pytest.raises(DatabaseError), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO credits (run_id, query_id, provider_id, positive_sum, credit) "
                f"VALUES {rows}"
            ),
            {"r": run_id, "q": qids[0], "p": beta, "other": sha("no such run")},
        )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM credits")).scalar() == 3
    with engine.begin() as conn:  # the same rows without the bad one are accepted
        conn.execute(
            text(
                "INSERT INTO credits (run_id, query_id, provider_id, positive_sum, credit) "
                f"VALUES {', '.join(good)}"
            ),
            {"r": run_id, "p": beta},
        )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM credits")).scalar() == 6


@pytest.mark.parametrize("bad", ["unknown output", "unknown run"])
def test_a_result_row_without_its_output_or_run_is_refused_among_good_rows(
    engine: Engine, bad: str
) -> None:
    populate(engine, [result("o", datetime(2024, 7, 2), {"alpha": 1.0})])
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO queries (external_id, served_at, weight_micros, text_sha256, "
                "created_at) VALUES ('n1', '2024-07-03', 1, 'h', '2024-07-03'), "
                "('n2', '2024-07-04', 1, 'h', '2024-07-04')"
            )
        )
        new = conn.execute(text("SELECT id FROM queries WHERE external_id LIKE 'n%'")).all()
        run_id = conn.execute(text("SELECT id FROM attribution_runs")).scalar()
    rows = [f"(:r, {q}, false, 1.0, false, '2024-07-05')" for (q,) in new]
    rows.insert(1, "(:r, 999999, false, 1.0, false, '2024-07-05')" if bad == "unknown output"
                else f"(:other, {new[0][0]}, false, 1.0, false, '2024-07-05')")
    insert = (
        "INSERT INTO query_results (run_id, query_id, unattributed, positive_total, "
        "is_current, recorded_at) VALUES "
    )
    with pytest.raises(DatabaseError), engine.begin() as conn:
        conn.execute(text(insert + ", ".join(rows)), {"r": run_id, "other": sha("no such run")})
    with engine.begin() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM query_results")).scalar() == 1
        del rows[1]
        conn.execute(text(insert + ", ".join(rows)), {"r": run_id})
        assert conn.execute(text("SELECT COUNT(*) FROM query_results")).scalar() == 3


def test_a_credit_added_to_a_result_of_a_closed_period_is_refused_or_found(engine: Engine) -> None:
    run_id = populate(
        engine,
        [
            result("open", datetime(2024, 10, 2), {"alpha": 1.0}),
            result("closed", datetime(2024, 7, 2), {"alpha": 1.0}),
        ],
    )
    with session_scope(engine) as s:
        finalize_statement(s, build_statement(s, Q3, Decimal("100"), "USD").id)
    with engine.connect() as conn:
        ids = dict(conn.execute(text("SELECT external_id, id FROM queries")).all())
        beta = conn.execute(text("SELECT id FROM providers WHERE name = 'beta'")).scalar()
    insert = text(
        "INSERT INTO credits (run_id, query_id, provider_id, positive_sum, credit) "
        "VALUES (:r, :open, :p, 1.0, 1.0), (:r, :closed, :p, 1.0, 1.0)"
    )
    values = {"r": run_id, "open": ids["open"], "closed": ids["closed"], "p": beta}
    if engine.dialect.name == "postgresql":
        with pytest.raises(DatabaseError, match="final"), engine.begin() as conn:
            conn.execute(insert, values)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM credits")).scalar() == 2
    else:  # SQLite has no per-row trigger for it (docs/invariants.md): the audit finds it
        with engine.begin() as conn:
            conn.execute(insert, values)
        with session_scope(engine) as s:
            assert not audit_ledger(s).ok
