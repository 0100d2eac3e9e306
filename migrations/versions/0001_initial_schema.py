"""Initial schema: providers, shards, indexes, runs, queries, credits, statements.

Revision ID: 0001
Revises:
Create Date: 2024-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gradient_indexes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gradient_indexes")),
    )
    op.create_table(
        "providers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_providers")),
        sa.UniqueConstraint("name", name=op.f("uq_providers_name")),
    )
    op.create_table(
        "queries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("served_at", sa.DateTime(), nullable=False),
        sa.Column("weight_micros", sa.BigInteger(), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("weight_micros >= 0", name=op.f("ck_queries_weight_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queries")),
        sa.UniqueConstraint("external_id", name=op.f("uq_queries_external_id")),
    )
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_queries_served_at"), ["served_at"], unique=False)

    op.create_table(
        "statements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("period_label", sa.String(length=64), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("period_end", sa.DateTime(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("minor_units", sa.Integer(), nullable=False),
        sa.Column("pool_minor", sa.BigInteger(), nullable=True),
        sa.Column("min_payout_minor", sa.BigInteger(), nullable=True),
        sa.Column("total_value", sa.Float(), nullable=False),
        sa.Column("query_count", sa.Integer(), nullable=False),
        sa.Column("unattributed_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finalized_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint("status IN ('draft', 'final')", name=op.f("ck_statements_status_known")),
        sa.CheckConstraint(
            "period_end > period_start", name=op.f("ck_statements_period_not_empty")
        ),
        sa.CheckConstraint(
            "pool_minor IS NULL OR pool_minor >= 0", name=op.f("ck_statements_pool_non_negative")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_statements")),
        sa.UniqueConstraint(
            "period_start", "period_end", name=op.f("uq_statements_period_start_period_end")
        ),
    )
    op.create_table(
        "attribution_runs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("index_id", sa.String(length=64), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'finished')", name=op.f("ck_attribution_runs_status_known")
        ),
        sa.ForeignKeyConstraint(
            ["index_id"],
            ["gradient_indexes.id"],
            name=op.f("fk_attribution_runs_index_id_gradient_indexes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attribution_runs")),
    )
    with op.batch_alter_table("attribution_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_attribution_runs_index_id"), ["index_id"], unique=False
        )

    op.create_table(
        "shards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("row_count >= 0", name=op.f("ck_shards_row_count_non_negative")),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name=op.f("fk_shards_provider_id_providers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shards")),
        sa.UniqueConstraint("path", name=op.f("uq_shards_path")),
    )
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_shards_provider_id"), ["provider_id"], unique=False)

    op.create_table(
        "statement_lines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("carried_in_minor", sa.BigInteger(), nullable=False),
        sa.Column("payable_minor", sa.BigInteger(), nullable=True),
        sa.Column("carried_forward_minor", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name=op.f("fk_statement_lines_provider_id_providers")
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"],
            ["statements.id"],
            name=op.f("fk_statement_lines_statement_id_statements"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_statement_lines")),
        sa.UniqueConstraint(
            "statement_id", "provider_id", name=op.f("uq_statement_lines_statement_id_provider_id")
        ),
    )
    with op.batch_alter_table("statement_lines", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_statement_lines_provider_id"), ["provider_id"], unique=False
        )

    op.create_table(
        "adjustments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("corrects_statement_id", sa.Integer(), nullable=False),
        sa.Column("corrects_line_id", sa.Integer(), nullable=True),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("amount_minor <> 0", name=op.f("ck_adjustments_amount_not_zero")),
        sa.CheckConstraint(
            "statement_id <> corrects_statement_id", name=op.f("ck_adjustments_not_self")
        ),
        sa.ForeignKeyConstraint(
            ["corrects_line_id"],
            ["statement_lines.id"],
            name=op.f("fk_adjustments_corrects_line_id_statement_lines"),
        ),
        sa.ForeignKeyConstraint(
            ["corrects_statement_id"],
            ["statements.id"],
            name=op.f("fk_adjustments_corrects_statement_id_statements"),
        ),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name=op.f("fk_adjustments_provider_id_providers")
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"], ["statements.id"], name=op.f("fk_adjustments_statement_id_statements")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adjustments")),
    )
    with op.batch_alter_table("adjustments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_adjustments_statement_id"), ["statement_id"], unique=False
        )

    op.create_table(
        "query_results",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("unattributed", sa.Boolean(), nullable=False),
        sa.Column("positive_total", sa.Float(), nullable=False),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["query_id"], ["queries.id"], name=op.f("fk_query_results_query_id_queries")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["attribution_runs.id"],
            name=op.f("fk_query_results_run_id_attribution_runs"),
        ),
        sa.PrimaryKeyConstraint("run_id", "query_id", name=op.f("pk_query_results")),
    )
    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.create_index(
            "ix_query_results_query_id_is_current", ["query_id", "is_current"], unique=False
        )

    op.create_table(
        "statement_runs",
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["attribution_runs.id"],
            name=op.f("fk_statement_runs_run_id_attribution_runs"),
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"],
            ["statements.id"],
            name=op.f("fk_statement_runs_statement_id_statements"),
        ),
        sa.PrimaryKeyConstraint("statement_id", "run_id", name=op.f("pk_statement_runs")),
    )
    op.create_table(
        "credits",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("positive_sum", sa.Float(), nullable=False),
        sa.Column("credit", sa.Float(), nullable=False),
        sa.CheckConstraint("credit >= 0", name=op.f("ck_credits_credit_non_negative")),
        sa.CheckConstraint("positive_sum > 0", name=op.f("ck_credits_positive_sum_positive")),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name=op.f("fk_credits_provider_id_providers")
        ),
        sa.ForeignKeyConstraint(
            ["run_id", "query_id"],
            ["query_results.run_id", "query_results.query_id"],
            name="fk_credits_run_id_query_results",
        ),
        sa.PrimaryKeyConstraint("run_id", "query_id", "provider_id", name=op.f("pk_credits")),
    )
    with op.batch_alter_table("credits", schema=None) as batch_op:
        batch_op.create_index("ix_credits_provider_id", ["provider_id"], unique=False)

    op.create_table(
        "top_examples",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("example_id", sa.Text(), nullable=False),
        sa.Column("shard", sa.Text(), nullable=False),
        sa.Column("row", sa.BigInteger(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name=op.f("fk_top_examples_provider_id_providers")
        ),
        sa.ForeignKeyConstraint(
            ["run_id", "query_id"],
            ["query_results.run_id", "query_results.query_id"],
            name="fk_top_examples_run_id_query_results",
        ),
        sa.PrimaryKeyConstraint("run_id", "query_id", "rank", name=op.f("pk_top_examples")),
    )


def downgrade() -> None:
    op.drop_table("top_examples")
    with op.batch_alter_table("credits", schema=None) as batch_op:
        batch_op.drop_index("ix_credits_provider_id")

    op.drop_table("credits")
    op.drop_table("statement_runs")
    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.drop_index("ix_query_results_query_id_is_current")

    op.drop_table("query_results")
    with op.batch_alter_table("adjustments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adjustments_statement_id"))

    op.drop_table("adjustments")
    with op.batch_alter_table("statement_lines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_statement_lines_provider_id"))

    op.drop_table("statement_lines")
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_shards_provider_id"))

    op.drop_table("shards")
    with op.batch_alter_table("attribution_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_attribution_runs_index_id"))

    op.drop_table("attribution_runs")
    op.drop_table("statements")
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_queries_served_at"))

    op.drop_table("queries")
    op.drop_table("providers")
    op.drop_table("gradient_indexes")
