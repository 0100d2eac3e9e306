"""Statements from a probability sample of outputs (ledger.sampling, docs/sampling.md).

New tables: ``sample_designs`` (one per sampled attribution run: seed, method, size and strata
fields, the queries file's hash, population and sample counts, the design's canonical JSON),
``sample_strata`` (each stratum's population count, total size and total weight, and its
allocation), ``sample_units`` (each sampled output's stratum and inclusion probability) and
``statement_estimates`` (the 95% half-width of each provider's share on a statement estimated
from a sample).

The sample tables are append-only (a statement may rest on them); the estimates are a
statement's children, final with it, as its lines are. No existing table changes. Two views,
``sample_strata_named`` and ``sample_units_named``, show each design's strata and sampled
outputs with their run, seed and fields (readable by ``ledger_reader`` on PostgreSQL).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SAMPLE_TABLES = ("sample_designs", "sample_strata", "sample_units")
TABLES = (*SAMPLE_TABLES, "statement_estimates")
VIEWS = {
    "sample_strata_named": """
        SELECT d.id AS design_id, d.run_id, d.method, d.seed, d.size_field, d.strata_field,
               d.queries_sha256, s.stratum, s.population_count, s.size_total,
               s.weight_micros_total, s.sample_count, s.certainty_count
        FROM sample_strata s JOIN sample_designs d ON d.id = s.design_id""",
    "sample_units_named": """
        SELECT d.id AS design_id, d.run_id, u.external_id, u.line, u.served_at, u.stratum,
               u.inclusion_probability
        FROM sample_units u JOIN sample_designs d ON d.id = u.design_id""",
}


def _tables() -> None:
    op.create_table(
        "sample_designs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("queries_sha256", sa.String(64), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("size_field", sa.String(200), nullable=True),
        sa.Column("strata_field", sa.String(200), nullable=True),
        sa.Column("population_count", sa.BigInteger(), nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("sample_count > 0", name=op.f("ck_sample_designs_sample_not_empty")),
        sa.CheckConstraint(
            "sample_count <= population_count",
            name=op.f("ck_sample_designs_sample_within_population"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["attribution_runs.id"],
            name=op.f("fk_sample_designs_run_id_attribution_runs"),
        ),  # fmt: skip
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sample_designs")),
        sa.UniqueConstraint("run_id", name=op.f("uq_sample_designs_run_id")),
    )
    op.create_table(
        "sample_strata",
        sa.Column("design_id", sa.String(64), nullable=False),
        sa.Column("stratum", sa.String(200), nullable=False),
        sa.Column("population_count", sa.BigInteger(), nullable=False),
        sa.Column("size_total", sa.String(64), nullable=False),
        sa.Column("weight_micros_total", sa.BigInteger(), nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("certainty_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["design_id"],
            ["sample_designs.id"],
            name=op.f("fk_sample_strata_design_id_sample_designs"),
        ),  # fmt: skip
        sa.PrimaryKeyConstraint("design_id", "stratum", name=op.f("pk_sample_strata")),
    )
    op.create_table(
        "sample_units",
        sa.Column("design_id", sa.String(64), nullable=False),
        sa.Column("external_id", sa.String(200), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("served_at", sa.DateTime(), nullable=False),
        sa.Column("stratum", sa.String(200), nullable=False),
        sa.Column("inclusion_probability", sa.Float(), nullable=False),
        sa.CheckConstraint(
            "inclusion_probability > 0 AND inclusion_probability <= 1",
            name=op.f("ck_sample_units_probability_in_range"),
        ),
        sa.ForeignKeyConstraint(
            ["design_id"],
            ["sample_designs.id"],
            name=op.f("fk_sample_units_design_id_sample_designs"),
        ),  # fmt: skip
        sa.ForeignKeyConstraint(
            ["design_id", "stratum"],
            ["sample_strata.design_id", "sample_strata.stratum"],
            name="fk_sample_units_design_id_sample_strata",
        ),  # fmt: skip
        sa.PrimaryKeyConstraint("design_id", "external_id", name=op.f("pk_sample_units")),
    )
    op.create_table(
        "statement_estimates",
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("share_half_width", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["statement_id"],
            ["statements.id"],
            name=op.f("fk_statement_estimates_statement_id_statements"),
        ),  # fmt: skip
        sa.ForeignKeyConstraint(
            ["provider_id"],
            ["providers.id"],
            name=op.f("fk_statement_estimates_provider_id_providers"),
        ),  # fmt: skip
        sa.PrimaryKeyConstraint("statement_id", "provider_id", name=op.f("pk_statement_estimates")),
    )


def _sqlite_triggers() -> list[str]:
    out = []
    for table in SAMPLE_TABLES:
        for event in ("UPDATE", "DELETE"):
            out.append(
                f"CREATE TRIGGER {table}_no_{event.lower()} BEFORE {event} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END"
            )
    final_of = "(SELECT status FROM statements WHERE id = {}.statement_id) = 'final'"
    for event, row in (("INSERT", "NEW"), ("UPDATE", "OLD"), ("DELETE", "OLD")):
        out.append(
            f"CREATE TRIGGER statement_estimates_final_no_{event.lower()} BEFORE {event} ON "
            f"statement_estimates WHEN {final_of.format(row)} "
            "BEGIN SELECT RAISE(ABORT, 'statement is final and cannot be changed'); END"
        )
    return out


def _postgresql_objects() -> list[str]:
    out = []
    for table in SAMPLE_TABLES:
        out.append(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ledger_append_only()"
        )
    out.append(
        "CREATE TRIGGER statement_estimates_guard BEFORE INSERT OR UPDATE OR DELETE ON "
        "statement_estimates FOR EACH ROW EXECUTE FUNCTION ledger_statement_child_guard()"
    )
    for table in TABLES:
        out.append(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()"
        )
    # The roles of 0003, where they exist: writers record samples and rebuild drafts.
    tables, views = ", ".join(TABLES), ", ".join(VIEWS)
    out.append(
        f"""
        DO $grants$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_writer') THEN
                GRANT SELECT, INSERT ON {tables} TO ledger_writer;
                GRANT DELETE ON statement_estimates TO ledger_writer;
                GRANT SELECT ON {views} TO ledger_writer;
            END IF;
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_reader') THEN
                GRANT SELECT ON {views} TO ledger_reader;
            END IF;
        END
        $grants$
        """
    )
    return out


def upgrade() -> None:
    _tables()
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    if op.get_bind().dialect.name == "postgresql":
        for sql in _postgresql_objects():
            op.execute(sql)
    else:
        for sql in _sqlite_triggers():
            op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    # Dropping a table drops its triggers.
    for table in reversed(("sample_designs", "sample_strata", "sample_units")):
        op.drop_table(table)
    op.drop_table("statement_estimates")
