"""Views whose times compare correctly with date literals on SQLite, and views for what the
reader role could only see in tables.

On SQLite a time is text ('2025-01-01 00:00:00.000000'), so `period_end <= '2025-01-01'` was
false for a statement ending exactly on that day. The views now show each time in its shortest
exact form: 'YYYY-MM-DD' at midnight, 'YYYY-MM-DD HH:MM:SS' on a whole second, the full text
otherwise, so that comparing with a 'YYYY-MM-DD' (or 'YYYY-MM-DD HH:MM:SS') literal is
chronological, as it is on PostgreSQL (where the views are unchanged).

New views, so that the role ``ledger_reader`` (which reads views only) can answer what
docs/sql.md asks: statement_runs_named, query_results_named, top_examples_named. On
PostgreSQL they are granted to ``ledger_reader`` and ``ledger_writer`` where those roles exist.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from collections.abc import Sequence
from importlib import import_module

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_VIEWS = ("statement_runs_named", "query_results_named", "top_examples_named")
TIMED_VIEWS = (
    "query_credits",
    "statement_lines_named",
    "provider_value_by_period",
    "statement_adjustments_named",
)
TIME_COLUMNS = (
    "q.served_at",
    "r.recorded_at",
    "s.period_start",
    "s.period_end",
    "a.created_at",
)
GRANTEES = ("ledger_reader", "ledger_writer")


def sqlite_time(column: str) -> str:
    """SQLite: the shortest exact text of a stored time (see the module's docstring)."""
    return (
        f"(CASE WHEN {column} IS NULL THEN NULL "
        f"WHEN SUBSTR({column}, 11) IN ('', ' 00:00:00', ' 00:00:00.000000') "
        f"THEN SUBSTR({column}, 1, 10) "
        f"WHEN SUBSTR({column}, 20) IN ('', '.000000') THEN SUBSTR({column}, 1, 19) "
        f"ELSE {column} END)"
    )


def _views_0002(dialect: str) -> list[str]:
    return import_module("migrations.versions.0002_views_and_final_triggers")._views(dialect)


def _sqlite_timed_views() -> list[str]:
    """0002's views with every time column shown by `sqlite_time`."""
    out = []
    for sql in _views_0002("sqlite"):
        name = sql.split("CREATE VIEW", 1)[1].split()[0]
        if name not in TIMED_VIEWS:
            continue
        replaced = 0
        for column in TIME_COLUMNS:
            alias = column.split(".")[1]
            replaced += sql.count(f"{column} AS {alias}")
            sql = sql.replace(f"{column} AS {alias}", f"{sqlite_time(column)} AS {alias}")
        assert replaced, f"no time column found in {name}"
        out.append(sql)
    assert len(out) == len(TIMED_VIEWS)
    return out


def _new_views(dialect: str) -> list[str]:
    def t(column: str) -> str:
        return sqlite_time(column) if dialect == "sqlite" else column

    return [
        f"""
        CREATE VIEW statement_runs_named AS
        SELECT s.id AS statement_id,
               s.period_label AS period_label,
               s.status AS statement_status,
               r.id AS run_id,
               r.index_id AS index_id,
               r.status AS run_status,
               {t("r.started_at")} AS started_at,
               {t("r.finished_at")} AS finished_at
        FROM statement_runs sr
        JOIN statements s ON s.id = sr.statement_id
        JOIN attribution_runs r ON r.id = sr.run_id
        """,
        f"""
        CREATE VIEW query_results_named AS
        SELECT q.external_id AS query_external_id,
               q.id AS query_id,
               {t("q.served_at")} AS served_at,
               q.weight_micros AS weight_micros,
               r.run_id AS run_id,
               r.is_current AS is_current,
               r.unattributed AS unattributed,
               {t("r.recorded_at")} AS recorded_at
        FROM query_results r
        JOIN queries q ON q.id = r.query_id
        """,
        """
        CREATE VIEW top_examples_named AS
        SELECT q.external_id AS query_external_id,
               t.query_id AS query_id,
               t.run_id AS run_id,
               r.is_current AS is_current,
               t.rank AS rank,
               t.example_id AS example_id,
               t.shard AS shard,
               t.row AS example_row,
               p.name AS provider,
               t.score AS score
        FROM top_examples t
        JOIN query_results r ON r.run_id = t.run_id AND r.query_id = t.query_id
        JOIN queries q ON q.id = t.query_id
        JOIN providers p ON p.id = t.provider_id
        """,
    ]


def _grant(views: Sequence[str]) -> None:
    """PostgreSQL: SELECT on `views` to the ledger's roles that exist."""
    for role in GRANTEES:
        op.execute(
            f"""
            DO $$ BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                    GRANT SELECT ON {", ".join(views)} TO {role};
                END IF;
            END $$
            """
        )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for name in TIMED_VIEWS:
            op.execute(f"DROP VIEW IF EXISTS {name}")
        for sql in _sqlite_timed_views():
            op.execute(sql)
    for sql in _new_views(dialect):
        op.execute(sql)
    if dialect == "postgresql":
        _grant(NEW_VIEWS)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in NEW_VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    if dialect == "sqlite":
        for name in TIMED_VIEWS:
            op.execute(f"DROP VIEW IF EXISTS {name}")
        for sql in _views_0002("sqlite"):
            if sql.split("CREATE VIEW", 1)[1].split()[0] in TIMED_VIEWS:
                op.execute(sql)
