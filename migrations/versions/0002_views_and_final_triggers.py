"""Views for licensing teams, and triggers that make final statements immutable.

Views (columns documented in docs/sql.md): query_credits, statement_lines_named,
provider_value_by_period, provider_value_by_month, statement_adjustments_named.

Triggers refuse UPDATE and DELETE of a final statement, and any INSERT, UPDATE or DELETE of the
lines, run links and adjustments of a final statement, on SQLite and PostgreSQL alike.

Revision ID: 0002
Revises: 0001
Create Date: 2024-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHILD_TABLES = ("statement_lines", "statement_runs", "adjustments")
VIEWS = (
    "statement_adjustments_named",
    "provider_value_by_month",
    "provider_value_by_period",
    "statement_lines_named",
    "query_credits",
)


def _decimal_text(minor: str, places: str, dialect: str) -> str:
    """SQL for the exact decimal text of `minor` minor units with `places` decimals."""
    if dialect == "postgresql":
        return (
            f"CAST(ROUND(CAST({minor} AS NUMERIC) / POWER(CAST(10 AS NUMERIC), {places}), "
            f"{places}) AS TEXT)"
        )
    scale = f"(CASE {places} WHEN 0 THEN 1 WHEN 1 THEN 10 WHEN 2 THEN 100 WHEN 3 THEN 1000 END)"
    magnitude = f"ABS({minor})"
    return (
        f"(CASE WHEN {minor} IS NULL THEN NULL "
        f"WHEN {places} = 0 THEN CAST({minor} AS TEXT) "
        f"ELSE (CASE WHEN {minor} < 0 THEN '-' ELSE '' END) "
        f"|| CAST({magnitude} / {scale} AS TEXT) || '.' "
        f"|| SUBSTR('000' || CAST({magnitude} % {scale} AS TEXT), -{places}) END)"
    )


def _month(column: str, dialect: str) -> str:
    if dialect == "postgresql":
        return f"TO_CHAR({column}, 'YYYY-MM')"
    return f"STRFTIME('%Y-%m', {column})"


def _quarter(column: str, dialect: str) -> str:
    if dialect == "postgresql":
        return f"TO_CHAR({column}, 'YYYY-\"Q\"Q')"
    return (
        f"STRFTIME('%Y', {column}) || '-Q' || "
        f"CAST((CAST(STRFTIME('%m', {column}) AS INTEGER) + 2) / 3 AS TEXT)"
    )


def _views(dialect: str) -> list[str]:
    return [
        """
        CREATE VIEW query_credits AS
        SELECT q.external_id AS query_external_id,
               q.id AS query_id,
               q.served_at AS served_at,
               q.weight_micros AS weight_micros,
               c.run_id AS run_id,
               p.name AS provider,
               c.positive_sum AS positive_sum,
               c.credit AS credit,
               r.recorded_at AS recorded_at
        FROM credits c
        JOIN query_results r ON r.run_id = c.run_id AND r.query_id = c.query_id
        JOIN queries q ON q.id = c.query_id
        JOIN providers p ON p.id = c.provider_id
        WHERE r.is_current
        """,
        f"""
        CREATE VIEW statement_lines_named AS
        SELECT s.id AS statement_id,
               s.period_label AS period_label,
               s.period_start AS period_start,
               s.period_end AS period_end,
               s.status AS status,
               s.currency AS currency,
               p.name AS provider,
               l.value AS value,
               l.share AS share,
               l.amount_minor AS amount_minor,
               {_decimal_text("l.amount_minor", "s.minor_units", dialect)} AS amount,
               l.carried_in_minor AS carried_in_minor,
               l.payable_minor AS payable_minor,
               {_decimal_text("l.payable_minor", "s.minor_units", dialect)} AS payable,
               l.carried_forward_minor AS carried_forward_minor
        FROM statement_lines l
        JOIN statements s ON s.id = l.statement_id
        JOIN providers p ON p.id = l.provider_id
        """,
        """
        CREATE VIEW provider_value_by_period AS
        SELECT s.period_label AS period_label,
               s.period_start AS period_start,
               s.period_end AS period_end,
               s.id AS statement_id,
               s.status AS status,
               p.name AS provider,
               l.value AS value,
               l.share AS share,
               l.amount_minor AS amount_minor,
               s.currency AS currency
        FROM statement_lines l
        JOIN statements s ON s.id = l.statement_id
        JOIN providers p ON p.id = l.provider_id
        """,
        f"""
        CREATE VIEW provider_value_by_month AS
        SELECT {_month("q.served_at", dialect)} AS month,
               {_quarter("q.served_at", dialect)} AS quarter,
               p.name AS provider,
               COUNT(*) AS queries,
               SUM(c.credit) AS value
        FROM credits c
        JOIN query_results r ON r.run_id = c.run_id AND r.query_id = c.query_id
        JOIN queries q ON q.id = c.query_id
        JOIN providers p ON p.id = c.provider_id
        WHERE r.is_current
        GROUP BY {_month("q.served_at", dialect)}, {_quarter("q.served_at", dialect)}, p.name
        """,
        f"""
        CREATE VIEW statement_adjustments_named AS
        SELECT a.id AS adjustment_id,
               a.statement_id AS statement_id,
               s.period_label AS period_label,
               p.name AS provider,
               a.amount_minor AS amount_minor,
               {_decimal_text("a.amount_minor", "s.minor_units", dialect)} AS amount,
               s.currency AS currency,
               a.reason AS reason,
               a.corrects_statement_id AS corrects_statement_id,
               c.period_label AS corrects_period_label,
               a.corrects_line_id AS corrects_line_id,
               a.created_at AS created_at
        FROM adjustments a
        JOIN statements s ON s.id = a.statement_id
        JOIN statements c ON c.id = a.corrects_statement_id
        JOIN providers p ON p.id = a.provider_id
        """,
    ]


def _sqlite_triggers() -> list[str]:
    message = "statement is final and cannot be changed"
    statements = [
        f"""
        CREATE TRIGGER statements_final_no_update BEFORE UPDATE ON statements
        WHEN OLD.status = 'final'
        BEGIN SELECT RAISE(ABORT, '{message}'); END
        """,
        f"""
        CREATE TRIGGER statements_final_no_delete BEFORE DELETE ON statements
        WHEN OLD.status = 'final'
        BEGIN SELECT RAISE(ABORT, '{message}'); END
        """,
    ]
    for table in CHILD_TABLES:
        final = "(SELECT status FROM statements WHERE id = {}.statement_id) = 'final'"
        statements += [
            f"""
            CREATE TRIGGER {table}_final_no_insert BEFORE INSERT ON {table}
            WHEN {final.format("NEW")}
            BEGIN SELECT RAISE(ABORT, '{message}'); END
            """,
            f"""
            CREATE TRIGGER {table}_final_no_update BEFORE UPDATE ON {table}
            WHEN {final.format("OLD")} OR {final.format("NEW")}
            BEGIN SELECT RAISE(ABORT, '{message}'); END
            """,
            f"""
            CREATE TRIGGER {table}_final_no_delete BEFORE DELETE ON {table}
            WHEN {final.format("OLD")}
            BEGIN SELECT RAISE(ABORT, '{message}'); END
            """,
        ]
    return statements


def _postgresql_triggers() -> list[str]:
    statements = [
        """
        CREATE FUNCTION ledger_refuse_final_statement() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.status = 'final' THEN
                RAISE EXCEPTION 'statement % is final and cannot be changed', OLD.id;
            END IF;
            IF TG_OP = 'DELETE' THEN
                RETURN OLD;
            END IF;
            RETURN NEW;
        END
        $$
        """,
        """
        CREATE TRIGGER statements_final_immutable BEFORE UPDATE OR DELETE ON statements
        FOR EACH ROW EXECUTE FUNCTION ledger_refuse_final_statement()
        """,
        """
        CREATE FUNCTION ledger_refuse_final_statement_child() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                IF EXISTS (SELECT 1 FROM statements
                           WHERE id = OLD.statement_id AND status = 'final') THEN
                    RAISE EXCEPTION 'statement % is final and cannot be changed (%)',
                        OLD.statement_id, TG_TABLE_NAME;
                END IF;
            END IF;
            IF TG_OP <> 'DELETE' THEN
                IF EXISTS (SELECT 1 FROM statements
                           WHERE id = NEW.statement_id AND status = 'final') THEN
                    RAISE EXCEPTION 'statement % is final and cannot be changed (%)',
                        NEW.statement_id, TG_TABLE_NAME;
                END IF;
                RETURN NEW;
            END IF;
            RETURN OLD;
        END
        $$
        """,
    ]
    for table in CHILD_TABLES:
        statements.append(
            f"""
            CREATE TRIGGER {table}_final_immutable BEFORE INSERT OR UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION ledger_refuse_final_statement_child()
            """
        )
    return statements


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for sql in _views(dialect):
        op.execute(sql)
    triggers = _postgresql_triggers() if dialect == "postgresql" else _sqlite_triggers()
    for sql in triggers:
        op.execute(sql)


def downgrade() -> None:
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
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
