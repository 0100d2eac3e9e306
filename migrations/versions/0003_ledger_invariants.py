"""The ledger's invariants, guarded by the database itself (docs/invariants.md lists them).

- One current result per output: a partial unique index on ``query_results(query_id)``.
- Money is booked as balanced transfers (``transfers``) when a statement with a pool is
  finalised; the database refuses a finalisation whose lines do not add up to the pool, whose
  allocation was not booked exactly once, or that leaves a provider's payable unbalanced, and a
  transfer that would make a provider's carried-forward balance negative (paid twice).
- Final statements store their printed content and a sha256 chained to the previous final
  statement; they and everything they rest on (credits, results, queries, runs, provider
  names) are append-only: UPDATE, DELETE and, on PostgreSQL, TRUNCATE are refused.
- Pools of final statements never overlap (an exclusion constraint on PostgreSQL, a trigger on
  SQLite); credits for outputs served in a final period are refused; an adjustment keeps its
  currency, which must be its statement's.
- PostgreSQL roles: ``ledger_reader`` (SELECT on the views only), ``ledger_writer`` (records
  credits and builds drafts; no TRUNCATE, no ALTER, cannot finalise), ``ledger_approver``
  (a writer that may finalise). Created when the migrating user may create roles.

Final statements that exist when this migration runs get their content, hash chain and
journal booked from their stored lines, in the order they were finalised.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = ("ledger_reader", "ledger_writer", "ledger_approver")
VIEWS = (
    "query_credits",
    "statement_lines_named",
    "provider_value_by_period",
    "provider_value_by_month",
    "statement_adjustments_named",
)
GUARDED_TABLES = (
    "statements",
    "statement_lines",
    "statement_runs",
    "adjustments",
    "transfers",
    "credits",
    "query_results",
    "top_examples",
    "queries",
    "attribution_runs",
    "providers",
    "gradient_indexes",
    "shards",
)
CHILD_TABLES = ("statement_lines", "statement_runs", "adjustments")
SET_CHECKED_TABLES = ("credits", "top_examples")
SET_CHECKED_FOREIGN_KEYS = {
    table: [
        (
            f"fk_{table}_run_id_query_results",
            "FOREIGN KEY (run_id, query_id) REFERENCES query_results (run_id, query_id)",
        ),
        (
            f"fk_{table}_provider_id_providers",
            "FOREIGN KEY (provider_id) REFERENCES providers (id)",
        ),
    ]
    for table in SET_CHECKED_TABLES
}
"""On PostgreSQL these foreign keys are checked once per INSERT over all its rows by
`ledger_result_rows_guard` instead of row by row (the models keep them; SQLite enforces them
as declared)."""

# An output served inside the period of a final statement (SQL over NEW.query_id).
_IN_FINAL_PERIOD = """(EXISTS (SELECT 1 FROM statements WHERE status = 'final')
    AND EXISTS (SELECT 1 FROM statements s JOIN queries q ON q.id = {query}
    WHERE s.status = 'final' AND q.served_at >= s.period_start AND q.served_at < s.period_end))"""

_PAYABLE_UNBALANCED = """EXISTS (SELECT 1 FROM transfers t WHERE t.statement_id = {sid}
    GROUP BY t.provider_id
    HAVING SUM(CASE WHEN t.credit_account = 'payable' THEN t.amount_minor
                    WHEN t.debit_account = 'payable' THEN -t.amount_minor ELSE 0 END) <> 0)"""

_CARRY_BALANCE = """(SELECT COALESCE(SUM(CASE WHEN t.credit_account = 'carry' THEN t.amount_minor
                                  ELSE -t.amount_minor END), 0)
    FROM transfers t WHERE t.provider_id = {pid} AND t.currency = {cur}
    AND (t.credit_account = 'carry' OR t.debit_account = 'carry'))"""

_OVERLAPS_FINAL_POOL = """EXISTS (SELECT 1 FROM statements o WHERE o.id <> {sid}
    AND o.status = 'final' AND o.pool_minor IS NOT NULL
    AND o.period_start < {end} AND o.period_end > {start})"""


def _schema() -> None:
    bind = op.get_bind()
    op.create_index(
        "uq_query_results_current",
        "query_results",
        ["query_id"],
        unique=True,
        sqlite_where=sa.text("is_current"),
        postgresql_where=sa.text("is_current"),
    )
    op.drop_index("ix_credits_provider_id", table_name="credits")
    op.add_column("statements", sa.Column("finalized_by", sa.String(200), nullable=True))
    op.add_column("statements", sa.Column("final_seq", sa.Integer(), nullable=True))
    op.add_column("statements", sa.Column("content", sa.Text(), nullable=True))
    op.add_column("statements", sa.Column("content_sha256", sa.String(64), nullable=True))
    op.add_column("statements", sa.Column("previous_sha256", sa.String(64), nullable=True))
    op.create_index("uq_statements_final_seq", "statements", ["final_seq"], unique=True)
    op.add_column(
        "adjustments",
        sa.Column("currency", sa.String(3), nullable=False, server_default="XXX"),
    )
    op.add_column("adjustments", sa.Column("created_by", sa.String(200), nullable=True))
    if bind.dialect.name == "postgresql":
        op.alter_column("adjustments", "currency", server_default=None)
    op.create_table(
        "transfers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("adjustment_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("debit_account", sa.String(16), nullable=False),
        sa.Column("credit_account", sa.String(16), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_transfers_amount_positive")),
        sa.CheckConstraint(
            "debit_account <> credit_account", name=op.f("ck_transfers_two_accounts")
        ),
        sa.CheckConstraint(
            "debit_account IN ('pool', 'payable', 'carry', 'adjustments', 'paid')",
            name=op.f("ck_transfers_debit_known"),
        ),
        sa.CheckConstraint(
            "credit_account IN ('pool', 'payable', 'carry', 'adjustments', 'paid')",
            name=op.f("ck_transfers_credit_known"),
        ),
        sa.CheckConstraint(
            "kind IN ('allocation', 'carry_in', 'holdback', 'adjustment', 'payment')",
            name=op.f("ck_transfers_kind_known"),
        ),
        sa.ForeignKeyConstraint(
            ["adjustment_id"],
            ["adjustments.id"],
            name=op.f("fk_transfers_adjustment_id_adjustments"),
        ),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name=op.f("fk_transfers_provider_id_providers")
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"], ["statements.id"], name=op.f("fk_transfers_statement_id_statements")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfers")),
    )
    op.create_index("ix_transfers_statement_id", "transfers", ["statement_id"])
    op.create_index("ix_transfers_provider_id", "transfers", ["provider_id"])


def _drop_0002_triggers() -> None:
    """0002's finality triggers are replaced by this revision's (which also check balances)."""
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS statements_final_immutable ON statements")
        for table in CHILD_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_final_immutable ON {table}")
        op.execute("DROP FUNCTION IF EXISTS ledger_refuse_final_statement()")
        op.execute("DROP FUNCTION IF EXISTS ledger_refuse_final_statement_child()")
    else:
        names = ["statements_final_no_update", "statements_final_no_delete"]
        for table in CHILD_TABLES:
            names += [f"{table}_final_no_{verb}" for verb in ("insert", "update", "delete")]
        for name in names:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")


def _sqlite_trigger(name: str, timing: str, when: str, message: str) -> str:
    message = message.replace("'", "''")
    return f"CREATE TRIGGER {name} {timing} WHEN {when} BEGIN SELECT RAISE(ABORT, '{message}'); END"


def _sqlite_triggers() -> list[tuple[str, str]]:
    """(name, SQL) of every SQLite trigger of this revision."""
    final_of = "(SELECT status FROM statements WHERE id = {}.statement_id) = 'final'"
    t: list[tuple[str, str, str, str]] = [
        # Statements: created as drafts; final ones never change; finalisation must balance.
        (
            "statements_insert_draft",
            "BEFORE INSERT ON statements",
            "NEW.status <> 'draft'",
            "a statement is created as a draft and then finalised",
        ),
        (
            "statements_final_no_update",
            "BEFORE UPDATE ON statements",
            "OLD.status = 'final'",
            "statement is final and cannot be changed",
        ),
        (
            "statements_final_no_delete",
            "BEFORE DELETE ON statements",
            "OLD.status = 'final'",
            "statement is final and cannot be changed",
        ),
        (
            "statements_finalise_content",
            "BEFORE UPDATE OF status ON statements",
            "NEW.status = 'final' AND (NEW.content IS NULL OR NEW.content_sha256 IS NULL "
            "OR NEW.final_seq IS NULL)",
            "a final statement needs its content, hash and place in the chain",
        ),
        (
            "statements_finalise_pool_overlap",
            "BEFORE UPDATE OF status ON statements",
            "NEW.status = 'final' AND NEW.pool_minor IS NOT NULL AND "
            + _OVERLAPS_FINAL_POOL.format(
                sid="NEW.id", start="NEW.period_start", end="NEW.period_end"
            ),
            "the pool of this statement overlaps the pool of a final statement",
        ),
        (
            "statements_finalise_balanced",
            "BEFORE UPDATE OF status ON statements",
            "NEW.status = 'final' AND NEW.pool_minor IS NOT NULL AND ("
            "(SELECT COALESCE(SUM(amount_minor), 0) FROM statement_lines "
            " WHERE statement_id = NEW.id) <> NEW.pool_minor "
            "OR (SELECT COALESCE(SUM(amount_minor), 0) FROM transfers "
            " WHERE statement_id = NEW.id AND kind = 'allocation') <> NEW.pool_minor "
            "OR " + _PAYABLE_UNBALANCED.format(sid="NEW.id") + ")",
            "statement does not balance: lines, allocation and payables must add up to the pool",
        ),
        (
            "statements_currency_of_adjustments",
            "BEFORE UPDATE OF currency ON statements",
            "EXISTS (SELECT 1 FROM adjustments a WHERE a.statement_id = NEW.id "
            "AND a.currency <> NEW.currency)",
            "statement carries adjustments in another currency",
        ),
        (
            "adjustments_currency",
            "BEFORE INSERT ON adjustments",
            "NEW.currency <> (SELECT currency FROM statements WHERE id = NEW.statement_id)",
            "an adjustment must be in the currency of its statement",
        ),
        # The journal: append-only, booked only while its statement is being finalised.
        (
            "transfers_no_update",
            "BEFORE UPDATE ON transfers",
            "1",
            "transfers are append-only",
        ),
        (
            "transfers_no_delete",
            "BEFORE DELETE ON transfers",
            "1",
            "transfers are append-only",
        ),
        (
            "transfers_statement_open",
            "BEFORE INSERT ON transfers",
            final_of.format("NEW"),
            "statement is final and cannot be changed",
        ),
        (
            "transfers_carry_not_negative",
            "BEFORE INSERT ON transfers",
            "NEW.debit_account = 'carry' AND "
            + _CARRY_BALANCE.format(pid="NEW.provider_id", cur="NEW.currency")
            + " < NEW.amount_minor",
            "carried-forward balance would go negative: money carried forward is paid once",
        ),
        # What final statements rest on.
        ("credits_no_update", "BEFORE UPDATE ON credits", "1", "credits are append-only"),
        ("credits_no_delete", "BEFORE DELETE ON credits", "1", "credits are append-only"),
        # No closed-period trigger on credits here (a per-row trigger costs more than the insert
        # on SQLite): a credit needs its result (foreign key), which the trigger on
        # query_results refuses for a closed period; credits added to an older result of a
        # closed period change its values, which `ledger audit` finds.
        (
            "top_examples_no_update",
            "BEFORE UPDATE ON top_examples",
            "1",
            "top examples are append-only",
        ),
        (
            "top_examples_no_delete",
            "BEFORE DELETE ON top_examples",
            "1",
            "top examples are append-only",
        ),
        ("queries_no_update", "BEFORE UPDATE ON queries", "1", "queries are append-only"),
        ("queries_no_delete", "BEFORE DELETE ON queries", "1", "queries are append-only"),
        (
            "query_results_no_delete",
            "BEFORE DELETE ON query_results",
            "1",
            "results are append-only",
        ),
        (
            "query_results_closed_period",
            "BEFORE INSERT ON query_results",
            _IN_FINAL_PERIOD.format(query="NEW.query_id"),
            "the output was served in a period whose statement is final",
        ),
        (
            "query_results_only_supersede",
            "BEFORE UPDATE ON query_results",
            "NEW.run_id IS NOT OLD.run_id OR NEW.query_id IS NOT OLD.query_id "
            "OR NEW.unattributed IS NOT OLD.unattributed "
            "OR NEW.positive_total IS NOT OLD.positive_total "
            "OR NEW.recorded_at IS NOT OLD.recorded_at "
            "OR NOT (OLD.is_current AND NOT NEW.is_current) "
            "OR " + _IN_FINAL_PERIOD.format(query="OLD.query_id"),
            "a result can only be superseded, and not in a period whose statement is final",
        ),
        (
            "attribution_runs_no_delete",
            "BEFORE DELETE ON attribution_runs",
            "1",
            "runs are append-only",
        ),
        (
            "attribution_runs_fixed",
            "BEFORE UPDATE ON attribution_runs",
            "NEW.id IS NOT OLD.id OR NEW.index_id IS NOT OLD.index_id "
            "OR NEW.manifest IS NOT OLD.manifest OR NEW.started_at IS NOT OLD.started_at "
            "OR (OLD.status = 'finished' AND NEW.status IS NOT 'finished')",
            "a run's id, index and manifest never change, and a finished run stays finished",
        ),
        ("providers_no_delete", "BEFORE DELETE ON providers", "1", "providers are append-only"),
        (
            "providers_name_fixed",
            "BEFORE UPDATE ON providers",
            "NEW.name IS NOT OLD.name OR NEW.id IS NOT OLD.id",
            "a provider's name never changes (final statements print it)",
        ),
        (
            "gradient_indexes_no_delete",
            "BEFORE DELETE ON gradient_indexes",
            "1",
            "indexes are append-only",
        ),
        (
            "gradient_indexes_fixed",
            "BEFORE UPDATE ON gradient_indexes",
            "NEW.id IS NOT OLD.id OR NEW.manifest IS NOT OLD.manifest",
            "an index's id and manifest never change",
        ),
    ]
    for table in CHILD_TABLES:
        t += [
            (
                f"{table}_final_no_insert",
                f"BEFORE INSERT ON {table}",
                final_of.format("NEW"),
                "statement is final and cannot be changed",
            ),
            (
                f"{table}_final_no_update",
                f"BEFORE UPDATE ON {table}",
                f"{final_of.format('OLD')} OR {final_of.format('NEW')}",
                "statement is final and cannot be changed",
            ),
            (
                f"{table}_final_no_delete",
                f"BEFORE DELETE ON {table}",
                final_of.format("OLD"),
                "statement is final and cannot be changed",
            ),
        ]
    return [(name, _sqlite_trigger(name, timing, when, msg)) for name, timing, when, msg in t]


_PG_FUNCTIONS = {
    "ledger_statements_guard": f"""
        BEGIN
            IF TG_OP = 'INSERT' THEN
                IF NEW.status <> 'draft' THEN
                    RAISE EXCEPTION 'a statement is created as a draft and then finalised';
                END IF;
                RETURN NEW;
            END IF;
            IF OLD.status = 'final' THEN
                RAISE EXCEPTION 'statement % is final and cannot be changed', OLD.id;
            END IF;
            IF TG_OP = 'DELETE' THEN
                RETURN OLD;
            END IF;
            IF NEW.currency <> OLD.currency AND EXISTS (
                SELECT 1 FROM adjustments a WHERE a.statement_id = NEW.id
                AND a.currency <> NEW.currency) THEN
                RAISE EXCEPTION 'statement % carries adjustments in another currency', NEW.id;
            END IF;
            IF NEW.status = 'final' THEN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_approver')
                   AND NOT pg_has_role(current_user, 'ledger_approver', 'MEMBER')
                   AND NOT pg_has_role(current_user,
                       (SELECT tableowner FROM pg_tables
                        WHERE tablename = 'statements' AND schemaname = current_schema()),
                       'MEMBER') THEN
                    RAISE EXCEPTION 'only an approver (role ledger_approver) may finalise';
                END IF;
                IF NEW.content IS NULL OR NEW.content_sha256 IS NULL OR NEW.final_seq IS NULL THEN
                    RAISE EXCEPTION
                        'a final statement needs its content, hash and place in the chain';
                END IF;
                IF NEW.pool_minor IS NOT NULL AND (
                    (SELECT COALESCE(SUM(amount_minor), 0) FROM statement_lines
                     WHERE statement_id = NEW.id) <> NEW.pool_minor
                    OR (SELECT COALESCE(SUM(amount_minor), 0) FROM transfers
                        WHERE statement_id = NEW.id AND kind = 'allocation') <> NEW.pool_minor
                    OR {_PAYABLE_UNBALANCED.format(sid="NEW.id")}) THEN
                    RAISE EXCEPTION 'statement % does not balance: lines, allocation and '
                        'payables must add up to the pool', NEW.id;
                END IF;
            END IF;
            RETURN NEW;
        END
    """,
    "ledger_statement_child_guard": """
        DECLARE
            sid integer;
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                IF EXISTS (SELECT 1 FROM statements
                           WHERE id = OLD.statement_id AND status = 'final') THEN
                    RAISE EXCEPTION 'statement % is final and cannot be changed (%)',
                        OLD.statement_id, TG_TABLE_NAME;
                END IF;
            END IF;
            IF TG_OP = 'DELETE' THEN
                RETURN OLD;
            END IF;
            -- FOR SHARE waits for a finalisation in progress and then sees its outcome.
            SELECT id INTO sid FROM statements
            WHERE id = NEW.statement_id AND status = 'final' FOR SHARE;
            IF sid IS NOT NULL THEN
                RAISE EXCEPTION 'statement % is final and cannot be changed (%)',
                    NEW.statement_id, TG_TABLE_NAME;
            END IF;
            IF TG_TABLE_NAME = 'adjustments' THEN
                IF to_jsonb(NEW) ->> 'currency' IS DISTINCT FROM (
                    SELECT currency FROM statements WHERE id = NEW.statement_id) THEN
                    RAISE EXCEPTION 'an adjustment must be in the currency of its statement';
                END IF;
            END IF;
            RETURN NEW;
        END
    """,
    "ledger_transfers_guard": f"""
        DECLARE
            sid integer;
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                RAISE EXCEPTION 'transfers are append-only';
            END IF;
            SELECT id INTO sid FROM statements
            WHERE id = NEW.statement_id AND status = 'final' FOR SHARE;
            IF sid IS NOT NULL THEN
                RAISE EXCEPTION 'statement % is final and cannot be changed', NEW.statement_id;
            END IF;
            IF NEW.debit_account = 'carry' THEN
                -- One writer at a time per provider's carry account, then a fresh read.
                PERFORM pg_advisory_xact_lock(hashtext('ledger carry ' || NEW.currency),
                                              NEW.provider_id);
                IF {_CARRY_BALANCE.format(pid="NEW.provider_id", cur="NEW.currency")}
                   < NEW.amount_minor THEN
                    RAISE EXCEPTION 'carried-forward balance of provider % would go negative: '
                        'money carried forward is paid once', NEW.provider_id;
                END IF;
            END IF;
            RETURN NEW;
        END
    """,
    "ledger_append_only": """
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
        END
    """,
    # Credits and top examples, once per INSERT statement (COPY included) over all its rows:
    # each row's result and provider exist (their foreign keys, checked as a set: a per-row
    # foreign-key check costs more than the rest of the insert), and no output of a closed
    # period gets one. Referenced rows are never deleted or re-keyed (append-only triggers).
    "ledger_result_rows_guard": """
        BEGIN
            IF EXISTS (SELECT 1 FROM new_rows n WHERE NOT EXISTS (
                    SELECT 1 FROM query_results r
                    WHERE r.run_id = n.run_id AND r.query_id = n.query_id))
               OR EXISTS (SELECT 1 FROM new_rows n WHERE NOT EXISTS (
                    SELECT 1 FROM providers p WHERE p.id = n.provider_id)) THEN
                RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
                    MESSAGE = format('%s refers to a result or provider the ledger does not '
                                     'hold', TG_TABLE_NAME);
            END IF;
            IF TG_TABLE_NAME = 'credits' AND EXISTS (SELECT 1 FROM statements
                                                     WHERE status = 'final') AND EXISTS (
                SELECT 1 FROM new_rows n JOIN queries q ON q.id = n.query_id
                JOIN statements s ON s.status = 'final'
                    AND q.served_at >= s.period_start AND q.served_at < s.period_end) THEN
                RAISE EXCEPTION 'an output was served in a period whose statement is final';
            END IF;
            RETURN NULL;
        END
    """,
    # Results, once per INSERT statement: no output of a closed period gets one.
    "ledger_closed_period_guard": """
        BEGIN
            IF EXISTS (SELECT 1 FROM statements WHERE status = 'final') AND EXISTS (
                SELECT 1 FROM new_rows n JOIN queries q ON q.id = n.query_id
                JOIN statements s ON s.status = 'final'
                    AND q.served_at >= s.period_start AND q.served_at < s.period_end) THEN
                RAISE EXCEPTION 'an output was served in a period whose statement is final';
            END IF;
            RETURN NULL;
        END
    """,
    "ledger_query_results_guard": f"""
        BEGIN
            IF NEW.run_id IS DISTINCT FROM OLD.run_id
               OR NEW.query_id IS DISTINCT FROM OLD.query_id
               OR NEW.unattributed IS DISTINCT FROM OLD.unattributed
               OR NEW.positive_total IS DISTINCT FROM OLD.positive_total
               OR NEW.recorded_at IS DISTINCT FROM OLD.recorded_at
               OR NOT (OLD.is_current AND NOT NEW.is_current)
               OR {_IN_FINAL_PERIOD.format(query="OLD.query_id")} THEN
                RAISE EXCEPTION 'a result can only be superseded, and not in a period whose '
                    'statement is final';
            END IF;
            RETURN NEW;
        END
    """,
    "ledger_runs_guard": """
        BEGIN
            IF NEW.id IS DISTINCT FROM OLD.id OR NEW.index_id IS DISTINCT FROM OLD.index_id
               OR NEW.manifest IS DISTINCT FROM OLD.manifest
               OR NEW.started_at IS DISTINCT FROM OLD.started_at
               OR (OLD.status = 'finished' AND NEW.status <> 'finished') THEN
                RAISE EXCEPTION 'a run''s id, index and manifest never change, and a '
                    'finished run stays finished';
            END IF;
            RETURN NEW;
        END
    """,
    "ledger_providers_guard": """
        BEGIN
            IF NEW.name IS DISTINCT FROM OLD.name OR NEW.id IS DISTINCT FROM OLD.id THEN
                RAISE EXCEPTION 'a provider''s name never changes (final statements print it)';
            END IF;
            RETURN NEW;
        END
    """,
    "ledger_indexes_guard": """
        BEGIN
            IF NEW.id IS DISTINCT FROM OLD.id OR NEW.manifest IS DISTINCT FROM OLD.manifest THEN
                RAISE EXCEPTION 'an index''s id and manifest never change';
            END IF;
            RETURN NEW;
        END
    """,
}

# (trigger name, table, timing and events, function, row or statement level)
_PG_TRIGGERS = [
    (
        "statements_guard",
        "statements",
        "BEFORE INSERT OR UPDATE OR DELETE",
        "ledger_statements_guard",
    ),
    *[
        (f"{t}_guard", t, "BEFORE INSERT OR UPDATE OR DELETE", "ledger_statement_child_guard")
        for t in CHILD_TABLES
    ],
    ("transfers_guard", "transfers", "BEFORE INSERT OR UPDATE OR DELETE", "ledger_transfers_guard"),
    ("credits_append_only", "credits", "BEFORE UPDATE OR DELETE", "ledger_append_only"),
    ("top_examples_append_only", "top_examples", "BEFORE UPDATE OR DELETE", "ledger_append_only"),
    ("queries_append_only", "queries", "BEFORE UPDATE OR DELETE", "ledger_append_only"),
    ("query_results_no_delete", "query_results", "BEFORE DELETE", "ledger_append_only"),
    ("query_results_supersede", "query_results", "BEFORE UPDATE", "ledger_query_results_guard"),
    ("attribution_runs_no_delete", "attribution_runs", "BEFORE DELETE", "ledger_append_only"),
    ("attribution_runs_fixed", "attribution_runs", "BEFORE UPDATE", "ledger_runs_guard"),
    ("providers_no_delete", "providers", "BEFORE DELETE", "ledger_append_only"),
    ("providers_name_fixed", "providers", "BEFORE UPDATE", "ledger_providers_guard"),
    ("gradient_indexes_no_delete", "gradient_indexes", "BEFORE DELETE", "ledger_append_only"),
    ("gradient_indexes_fixed", "gradient_indexes", "BEFORE UPDATE", "ledger_indexes_guard"),
]


def _postgresql_objects() -> list[str]:
    sql = [
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn${body}$fn$"
        for name, body in _PG_FUNCTIONS.items()
    ]
    for name, table, events, function in _PG_TRIGGERS:
        sql.append(
            f"CREATE TRIGGER {name} {events} ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()"
        )
    sql.append(
        "CREATE TRIGGER query_results_closed_period AFTER INSERT ON query_results "
        "REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION ledger_closed_period_guard()"
    )
    for table in SET_CHECKED_TABLES:
        for name, _ in SET_CHECKED_FOREIGN_KEYS[table]:
            sql.append(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        sql.append(
            f"CREATE TRIGGER {table}_rows_guard AFTER INSERT ON {table} "
            "REFERENCING NEW TABLE AS new_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION ledger_result_rows_guard()"
        )
    # Row triggers do not fire on TRUNCATE: statement-level triggers refuse it.
    for table in GUARDED_TABLES:
        sql.append(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()"
        )
    sql.append(
        "ALTER TABLE statements ADD CONSTRAINT ex_statements_final_pools_overlap "
        "EXCLUDE USING gist (tsrange(period_start, period_end) WITH &&) "
        "WHERE (status = 'final' AND pool_minor IS NOT NULL)"
    )
    return sql


def _postgresql_roles() -> list[str]:
    """Roles and their grants, in one block that does nothing if roles cannot be created."""
    tables = ", ".join(GUARDED_TABLES)
    views = ", ".join(VIEWS)
    return [
        f"""
        DO $roles$
        DECLARE
            may boolean;
        BEGIN
            SELECT rolsuper OR rolcreaterole INTO may FROM pg_roles WHERE rolname = current_user;
            IF NOT may THEN
                RAISE NOTICE 'ledger roles not created: % may not create roles', current_user;
                RETURN;
            END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_reader') THEN
                CREATE ROLE ledger_reader NOLOGIN;
            END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_writer') THEN
                CREATE ROLE ledger_writer NOLOGIN;
            END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_approver') THEN
                CREATE ROLE ledger_approver NOLOGIN;
            END IF;
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO ledger_reader, ledger_writer',
                           current_schema());
            GRANT SELECT ON {views} TO ledger_reader;
            GRANT SELECT, INSERT ON {tables}, alembic_version TO ledger_writer;
            -- UPDATE on queries only lets writers lock them (SELECT ... FOR UPDATE); the
            -- append-only trigger refuses any actual change.
            GRANT UPDATE ON statements, statement_lines, query_results, attribution_runs, queries,
                gradient_indexes, shards TO ledger_writer;
            GRANT DELETE ON statement_lines, statement_runs TO ledger_writer;
            GRANT SELECT ON {views} TO ledger_writer;
            EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO ledger_writer',
                           current_schema());
            GRANT ledger_writer TO ledger_approver;
            IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE format('GRANT ledger_reader TO %I', current_user);
            END IF;
        END
        $roles$
        """
    ]


def _book_existing_final_statements() -> None:
    """Give final statements made before this revision their journal, content and chain."""
    from sqlalchemy.orm import Session

    from ledger.guards import LEGACY_SEALING
    from ledger.statements import seal_legacy_final_statements

    session = Session(bind=op.get_bind(), info={LEGACY_SEALING: True})
    seal_legacy_final_statements(session)
    session.flush()


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    _schema()
    _drop_0002_triggers()  # they refuse the changes below to final statements' rows
    op.execute(
        "UPDATE adjustments SET currency = "
        "(SELECT s.currency FROM statements s WHERE s.id = adjustments.statement_id)"
    )
    _book_existing_final_statements()
    if dialect == "postgresql":
        for sql in _postgresql_objects():
            op.execute(sql)
        for sql in _postgresql_roles():
            op.execute(sql)
    else:
        for _, sql in _sqlite_triggers():
            op.execute(sql)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            "ALTER TABLE statements DROP CONSTRAINT IF EXISTS ex_statements_final_pools_overlap"
        )
        for table in GUARDED_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        for name, table, _, _ in _PG_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        op.execute("DROP TRIGGER IF EXISTS query_results_closed_period ON query_results")
        for table in SET_CHECKED_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_rows_guard ON {table}")
            for name, definition in SET_CHECKED_FOREIGN_KEYS[table]:
                op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
        for name in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
        op.execute(
            """
            DO $roles$ BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_reader') THEN
                    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM ledger_reader, ledger_writer',
                                   current_schema());
                    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I '
                                   'FROM ledger_reader, ledger_writer', current_schema());
                    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM ledger_writer',
                                   current_schema());
                END IF;
            END $roles$
            """
        )
    else:
        for name, _ in _sqlite_triggers():
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_transfers_provider_id", table_name="transfers")
    op.drop_index("ix_transfers_statement_id", table_name="transfers")
    op.drop_table("transfers")
    op.drop_index("uq_statements_final_seq", table_name="statements")
    op.drop_index("uq_query_results_current", table_name="query_results")
    op.create_index("ix_credits_provider_id", "credits", ["provider_id"])
    # Plain DROP COLUMN (SQLite 3.35+): a batch copy of the table would break the views.
    for table, column in (
        ("adjustments", "created_by"),
        ("adjustments", "currency"),
        ("statements", "previous_sha256"),
        ("statements", "content_sha256"),
        ("statements", "content"),
        ("statements", "final_seq"),
        ("statements", "finalized_by"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    previous = importlib.import_module("migrations.versions.0002_views_and_final_triggers")
    triggers = (
        previous._postgresql_triggers() if dialect == "postgresql" else previous._sqlite_triggers()
    )
    for sql in triggers:
        op.execute(sql)
