"""PostgreSQL: the set-based guards of result rows check each output once, not each row.

`ledger_result_rows_guard` (credits, top_examples) and `ledger_closed_period_guard`
(query_results) check the rows of one INSERT statement as a set. They looked up every inserted
row: 100,000 credit rows of 10,000 outputs made 100,000 index probes of `query_results` and of
`providers`, which cost more than the insert itself. They now look up the distinct
(run, output) pairs, providers and outputs of the statement: the same conditions, checked
on about a tenth of the lookups (see benchmarks/ledger_statement.py).

The foreign keys of `query_results` (its output and its run) are checked the same way, once per
INSERT over the distinct outputs and runs, by `ledger_closed_period_guard`, instead of by two
row-level foreign-key triggers per result. What they also guarded, the referenced rows'
deletion or change of key, the append-only triggers of `queries` and `attribution_runs`
already refuse (as for the credits' foreign keys since 0003).

SQLite is unchanged (its foreign keys and triggers are row by row).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence
from importlib import import_module

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each distinct output's time is read by its primary key (LATERAL ... OFFSET 0 keeps it a
# lookup per output): a join the planner is free to reorder turned, with statistics that had
# not yet seen a large load of outputs, into comparing every new row with every output.
_IN_FINAL_PERIOD = """EXISTS (SELECT 1 FROM statements WHERE status = 'final') AND EXISTS (
                SELECT 1 FROM (SELECT DISTINCT query_id FROM new_rows) n
                CROSS JOIN LATERAL (SELECT q.served_at FROM queries q
                                    WHERE q.id = n.query_id OFFSET 0) q
                WHERE EXISTS (SELECT 1 FROM statements s WHERE s.status = 'final'
                    AND q.served_at >= s.period_start AND q.served_at < s.period_end))"""

FUNCTIONS = {
    # Credits and top examples, once per INSERT statement: every row refers to a result and a
    # provider the ledger holds (the foreign keys, checked as a set), and no credit is added
    # to an output of a period whose statement is final.
    "ledger_result_rows_guard": f"""
        BEGIN
            IF EXISTS (SELECT 1 FROM (SELECT DISTINCT run_id, query_id FROM new_rows) n
                       WHERE NOT EXISTS (SELECT 1 FROM query_results r
                                         WHERE r.run_id = n.run_id AND r.query_id = n.query_id))
               OR EXISTS (SELECT 1 FROM (SELECT DISTINCT provider_id FROM new_rows) n
                          WHERE NOT EXISTS (SELECT 1 FROM providers p
                                            WHERE p.id = n.provider_id)) THEN
                RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
                    MESSAGE = format('%s refers to a result or provider the ledger does not '
                                     'hold', TG_TABLE_NAME);
            END IF;
            IF TG_TABLE_NAME = 'credits' AND {_IN_FINAL_PERIOD} THEN
                RAISE EXCEPTION 'an output was served in a period whose statement is final';
            END IF;
            RETURN NULL;
        END
    """,
    # Results, once per INSERT statement: each refers to an output and a run the ledger holds
    # (the foreign keys, checked as a set), and no output of a closed period gets one.
    "ledger_closed_period_guard": f"""
        BEGIN
            IF EXISTS (SELECT 1 FROM (SELECT DISTINCT query_id FROM new_rows) n
                       WHERE NOT EXISTS (SELECT 1 FROM queries q WHERE q.id = n.query_id))
               OR EXISTS (SELECT 1 FROM (SELECT DISTINCT run_id FROM new_rows) n
                          WHERE NOT EXISTS (SELECT 1 FROM attribution_runs a
                                            WHERE a.id = n.run_id)) THEN
                RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
                    MESSAGE = 'query_results refers to an output or run the ledger does not hold';
            END IF;
            IF {_IN_FINAL_PERIOD} THEN
                RAISE EXCEPTION 'an output was served in a period whose statement is final';
            END IF;
            RETURN NULL;
        END
    """,
}


def _replace(functions: dict[str, str]) -> None:
    for name, body in functions.items():
        op.execute(
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
            f"AS $fn${body}$fn$"
        )


# The foreign keys of query_results that `ledger_closed_period_guard` checks as a set.
SET_CHECKED_FOREIGN_KEYS = [
    (
        "fk_query_results_query_id_queries",
        "FOREIGN KEY (query_id) REFERENCES queries (id)",
    ),
    (
        "fk_query_results_run_id_attribution_runs",
        "FOREIGN KEY (run_id) REFERENCES attribution_runs (id)",
    ),
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _replace(FUNCTIONS)
        for name, _ in SET_CHECKED_FOREIGN_KEYS:
            op.execute(f"ALTER TABLE query_results DROP CONSTRAINT {name}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name, definition in SET_CHECKED_FOREIGN_KEYS:
            op.execute(f"ALTER TABLE query_results ADD CONSTRAINT {name} {definition}")
        previous = import_module("migrations.versions.0003_ledger_invariants")._PG_FUNCTIONS
        _replace({name: previous[name] for name in FUNCTIONS})
