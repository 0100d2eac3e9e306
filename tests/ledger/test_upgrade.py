"""A ledger that was in use before the journal (revision 0002) upgrades to the guarded ledger:
its final statements are booked and sealed in the order they were finalised, the audit passes,
and a migration that fails leaves the database at its previous revision."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from sqlalchemy import Engine, inspect, text

from ledger.audit import audit_ledger
from ledger.db import current_revision, make_engine, session_scope, upgrade
from ledger.statements import statement_rows, statement_summary

RUN1, RUN2, INDEX = "1" * 64, "2" * 64, "9" * 64
CREDITS = {  # output: (served, {provider id: credit}) for run 1
    1: (datetime(2024, 7, 5), {1: 0.97, 2: 0.03}),
    2: (datetime(2024, 10, 5), {1: 0.95, 2: 0.05}),
}


def _legacy_ledger(engine: Engine) -> None:
    """Two final statements made at 0002: Q3 holds 3.00 back from beta under a 7.00 minimum,
    Q4 pays it with beta's 5.00 and a 1.00 adjustment to Q3; after Q3 closed, a second run
    re-attributed Q3's output (0002 allowed it)."""
    upgrade(engine, "0002")
    t = "'2024-07-01 00:00:00.000000'"
    with engine.begin() as c:
        run = c.execute
        run(text(f"INSERT INTO providers (id, name, created_at) VALUES (1, 'alpha', {t})"))
        run(text(f"INSERT INTO providers (id, name, created_at) VALUES (2, 'beta', {t})"))
        run(
            text(
                "INSERT INTO gradient_indexes (id, path, manifest, status, created_at) "
                f"VALUES ('{INDEX}', '/i', '{{}}', 'finished', {t})"
            )
        )
        for run_id in (RUN1, RUN2):
            run(
                text(
                    "INSERT INTO attribution_runs (id, index_id, manifest, status, started_at) "
                    f"VALUES ('{run_id}', '{INDEX}', '{{}}', 'finished', {t})"
                )
            )
        for qid, (served, credits) in CREDITS.items():
            run(
                text(
                    "INSERT INTO queries (id, external_id, served_at, weight_micros, "
                    "text_sha256, created_at) VALUES (:id, :ext, :served, 1000000, :sha, :t)"
                ),
                {"id": qid, "ext": f"q{qid}", "served": served, "sha": "a" * 64, "t": served},
            )
            _result(c, RUN1, qid, credits, served)
        for sid, (label, start, end, pool, lines, finalized) in enumerate(
            [
                ("2024-Q3", "2024-07-01", "2024-10-01", 10000,
                 {1: (9700, 0, 9700, 0), 2: (300, 0, 0, 300)}, "2024-10-02"),
                ("2024-Q4", "2024-10-01", "2025-01-01", 10000,
                 {1: (9500, 0, 9500, 0), 2: (500, 300, 800, 0)}, "2025-01-02"),
            ],
            start=1,
        ):  # fmt: skip
            values = CREDITS[sid][1]
            total = math.fsum(values.values())
            run(
                text(
                    "INSERT INTO statements (id, period_label, period_start, period_end, "
                    "currency, minor_units, pool_minor, min_payout_minor, total_value, "
                    "query_count, unattributed_count, status, created_at) VALUES (:id, :label, "
                    ":start, :end, 'USD', 2, :pool, 700, :total, 1, 0, 'draft', :start)"
                ),
                {
                    "id": sid,
                    "label": label,
                    "start": datetime.fromisoformat(start),
                    "end": datetime.fromisoformat(end),
                    "pool": pool,
                    "total": total,
                },
            )
            for pid, (amount, carried_in, payable, carried_forward) in lines.items():
                run(
                    text(
                        "INSERT INTO statement_lines (statement_id, provider_id, value, share, "
                        "amount_minor, carried_in_minor, payable_minor, carried_forward_minor) "
                        "VALUES (:s, :p, :v, :share, :a, :ci, :pay, :cf)"
                    ),
                    {
                        "s": sid, "p": pid, "v": values[pid], "share": values[pid] / total,
                        "a": amount, "ci": carried_in, "pay": payable, "cf": carried_forward,
                    },
                )  # fmt: skip
            run(text(f"INSERT INTO statement_runs VALUES ({sid}, '{RUN1}')"))
            if sid == 2:
                run(
                    text(
                        "INSERT INTO adjustments (statement_id, corrects_statement_id, "
                        "corrects_line_id, provider_id, amount_minor, reason, created_at) "
                        "VALUES (2, 1, NULL, 2, 100, 'missed output', :t)"
                    ),
                    {"t": datetime(2025, 1, 2)},
                )
            run(
                text("UPDATE statements SET status = 'final', finalized_at = :f WHERE id = :s"),
                {"f": datetime.fromisoformat(finalized), "s": sid},
            )
        # Re-attributed after Q3 was final: 0002 let the new run's result become current.
        run(text("UPDATE query_results SET is_current = false WHERE query_id = 1"))
        _result(c, RUN2, 1, {1: 0.5, 2: 0.5}, datetime(2024, 12, 1))


def _result(c, run_id: str, qid: int, credits: dict[int, float], at: datetime) -> None:
    c.execute(
        text(
            "INSERT INTO query_results (run_id, query_id, unattributed, positive_total, "
            "is_current, recorded_at) VALUES (:r, :q, false, 1.0, true, :at)"
        ),
        {"r": run_id, "q": qid, "at": at},
    )
    for pid, credit in credits.items():
        c.execute(
            text(
                "INSERT INTO credits (run_id, query_id, provider_id, positive_sum, credit) "
                "VALUES (:r, :q, :p, :c, :c)"
            ),
            {"r": run_id, "q": qid, "p": pid, "c": credit},
        )


def test_a_ledger_in_use_before_the_journal_upgrades_and_passes_the_audit(db_url: str) -> None:
    engine = make_engine(db_url)
    _legacy_ledger(engine)
    upgrade(engine)
    with session_scope(engine) as s:
        report = audit_ledger(s)
        assert report.ok, [(c.name, c.detail) for c in report.checks if not c.ok]
        q3, q4 = statement_summary(s, 1), statement_summary(s, 2)
        assert (q3["final_seq"], q4["final_seq"]) == (1, 2)
        assert q4["previous_sha256"] == q3["content_sha256"]
        beta = statement_rows(s, 2).filter(provider="beta").row(0, named=True)
        assert (beta["carried_in_minor"], beta["adjustments_minor"]) == (300, 100)
        assert beta["payable_minor"] == 900
        # The journal holds the money as the statements printed it: nothing carried is left.
        carry = s.scalar(
            text(
                "SELECT COALESCE(SUM(CASE WHEN credit_account = 'carry' THEN amount_minor "
                "ELSE -amount_minor END), 0) FROM transfers "
                "WHERE 'carry' IN (credit_account, debit_account)"
            )
        )
        assert carry == 0
    engine.dispose()


def test_a_migration_that_fails_leaves_the_database_as_it_was(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(db_url)
    _legacy_ledger(engine)

    def fail(_session):
        raise RuntimeError("stopped half-way")

    monkeypatch.setattr("ledger.statements.seal_legacy_final_statements", fail)
    with pytest.raises(RuntimeError, match="half-way"):
        upgrade(engine)
    assert current_revision(engine) == "0002"
    inspector = inspect(engine)
    assert "transfers" not in inspector.get_table_names()
    assert "final_seq" not in {c["name"] for c in inspector.get_columns("statements")}
    monkeypatch.undo()
    upgrade(engine)  # and the upgrade then goes through
    with session_scope(engine) as s:
        assert audit_ledger(s).ok
    engine.dispose()
