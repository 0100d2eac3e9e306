"""The ledger's SQL tables (SQLAlchemy 2 typed ORM).

Conventions, relied on by docs/sql.md and by the migrations:

- Timestamps are UTC, stored without a time zone (``served_at``, ``created_at``, ...).
- Money is whole minor units in ``BIGINT`` columns whose names end in ``_minor``; the currency
  and its number of decimal places (``minor_units``) are on the statement.
- A query's weight is ``weight_micros``: millionths, as an integer (weight 1 → 1000000), so a
  revenue weight stays exact.
- Scores and credits are floats; sums that feed money are computed in Python deterministically.
- The schema is created by the Alembic migrations in ``migrations/``; a test checks that the
  migrations and these models agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("running", "finished")
STATEMENT_STATUSES = ("draft", "final")


def utcnow() -> datetime:
    """The current UTC time, naive, as the ledger stores timestamps."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base carrying the constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Provider(Base):
    """A data provider whose training examples earn credit."""

    __tablename__ = "providers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Shard(Base):
    """A training data file, identified by path and content hash, tagged with its provider."""

    __tablename__ = "shards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"), index=True)
    row_count: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    provider: Mapped[Provider] = relationship()

    __table_args__ = (CheckConstraint("row_count >= 0", name="row_count_non_negative"),)


class GradientIndex(Base):
    """A gradient index on disk; `id` is the sha256 of its manifest's canonical form."""

    __tablename__ = "gradient_indexes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="finished")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class AttributionRun(Base):
    """One attribution run over a set of queries; `id` is the sha256 of its manifest."""

    __tablename__ = "attribution_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    index_id: Mapped[str] = mapped_column(ForeignKey("gradient_indexes.id"), index=True)
    manifest: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    index: Mapped[GradientIndex] = relationship()

    __table_args__ = (CheckConstraint("status IN ('running', 'finished')", name="status_known"),)


class Query(Base):
    """A served model output (prompt and completion) whose credit is measured."""

    __tablename__ = "queries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(200), unique=True)
    served_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    weight_micros: Mapped[int] = mapped_column(BigInteger)
    text_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (CheckConstraint("weight_micros >= 0", name="weight_non_negative"),)


class QueryResult(Base):
    """The outcome of one run for one query; only the latest recorded one is current.

    ``is_current`` is true for exactly one result per attributed query: the most recently
    recorded one. Older results stay for audit but count for nothing (superseded, not summed).
    ``unattributed`` marks a query whose scores were all non-positive; it has no credits.
    """

    __tablename__ = "query_results"

    run_id: Mapped[str] = mapped_column(ForeignKey("attribution_runs.id"), primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), primary_key=True)
    unattributed: Mapped[bool] = mapped_column(Boolean)
    positive_total: Mapped[float] = mapped_column(Float)
    is_current: Mapped[bool] = mapped_column(Boolean)
    recorded_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_query_results_query_id_is_current", "query_id", "is_current"),
        # The database holds "one current result per output", whatever writes to it.
        Index(
            "uq_query_results_current",
            "query_id",
            unique=True,
            sqlite_where=text("is_current"),
            postgresql_where=text("is_current"),
        ),
    )


class Credit(Base):
    """credit(q, p) = w_q · pos_sum(q, p) / Σ_p pos_sum(q, p) for one run."""

    __tablename__ = "credits"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    query_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"), primary_key=True)
    positive_sum: Mapped[float] = mapped_column(Float)
    credit: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "query_id"],
            ["query_results.run_id", "query_results.query_id"],
            name="fk_credits_run_id_query_results",
        ),
        CheckConstraint("positive_sum > 0", name="positive_sum_positive"),
        CheckConstraint("credit >= 0", name="credit_non_negative"),
        # No index on provider_id alone: statements and views reach credits through their
        # results, and an index of ten-odd distinct values costs more than the rest of an
        # insert on PostgreSQL.
    )


class TopExample(Base):
    """The most influential training examples for a query, kept for audit."""

    __tablename__ = "top_examples"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    query_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    example_id: Mapped[str] = mapped_column(Text)
    shard: Mapped[str] = mapped_column(Text)
    row: Mapped[int] = mapped_column(BigInteger)
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"))
    score: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "query_id"],
            ["query_results.run_id", "query_results.query_id"],
            name="fk_top_examples_run_id_query_results",
        ),
    )


statement_runs = Table(
    "statement_runs",
    Base.metadata,
    Column("statement_id", ForeignKey("statements.id"), primary_key=True),
    Column("run_id", ForeignKey("attribution_runs.id"), primary_key=True),
)
"""Which attribution runs a statement's credits came from."""


class Statement(Base):
    """A value statement for one period; drafts may be rebuilt, final ones never change."""

    __tablename__ = "statements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    period_label: Mapped[str] = mapped_column(String(64))
    period_start: Mapped[datetime] = mapped_column(DateTime)
    period_end: Mapped[datetime] = mapped_column(DateTime)
    currency: Mapped[str] = mapped_column(String(3))
    minor_units: Mapped[int] = mapped_column(Integer)
    pool_minor: Mapped[int | None] = mapped_column(BigInteger)
    min_payout_minor: Mapped[int | None] = mapped_column(BigInteger)
    total_value: Mapped[float] = mapped_column(Float)
    query_count: Mapped[int] = mapped_column(Integer)
    unattributed_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8), default="draft")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime)
    finalized_by: Mapped[str | None] = mapped_column(String(200))
    final_seq: Mapped[int | None] = mapped_column(Integer)
    """Order of finalisation (1, 2, ...): the hash chain runs in this order."""
    content: Mapped[str | None] = mapped_column(Text)
    """A final statement's printed content as canonical JSON (provider names included)."""
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    """sha256 of the previous final statement's content_sha256 and this content."""
    previous_sha256: Mapped[str | None] = mapped_column(String(64))

    lines: Mapped[list[StatementLine]] = relationship(
        back_populates="statement", order_by="StatementLine.id"
    )
    runs: Mapped[list[AttributionRun]] = relationship(
        secondary=statement_runs, order_by=AttributionRun.id
    )

    __table_args__ = (
        UniqueConstraint("period_start", "period_end"),
        CheckConstraint("status IN ('draft', 'final')", name="status_known"),
        CheckConstraint("period_end > period_start", name="period_not_empty"),
        CheckConstraint("pool_minor IS NULL OR pool_minor >= 0", name="pool_non_negative"),
        Index("uq_statements_final_seq", "final_seq", unique=True),
    )


class StatementLine(Base):
    """One provider's value, share and amounts on a statement (amounts in minor units).

    ``amount_minor`` is the provider's part of the pool (the lines' amounts sum to the pool);
    ``carried_in_minor`` was held back on earlier statements; ``payable_minor`` is paid now and
    ``carried_forward_minor`` is held back for the next statement (below the minimum payout).
    """

    __tablename__ = "statement_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    statement_id: Mapped[int] = mapped_column(ForeignKey("statements.id"))
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"), index=True)
    value: Mapped[float] = mapped_column(Float)
    share: Mapped[float] = mapped_column(Float)
    amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    carried_in_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    payable_minor: Mapped[int | None] = mapped_column(BigInteger)
    carried_forward_minor: Mapped[int] = mapped_column(BigInteger, default=0)

    statement: Mapped[Statement] = relationship(back_populates="lines")
    provider: Mapped[Provider] = relationship()

    __table_args__ = (UniqueConstraint("statement_id", "provider_id"),)


class Adjustment(Base):
    """A correction to a final statement, applied on a later open (draft) statement.

    ``corrects_statement_id`` (and ``corrects_line_id`` when the provider had a line there) point
    at what is corrected; ``statement_id`` is the draft statement that carries the correction.
    """

    __tablename__ = "adjustments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    statement_id: Mapped[int] = mapped_column(ForeignKey("statements.id"), index=True)
    corrects_statement_id: Mapped[int] = mapped_column(ForeignKey("statements.id"))
    corrects_line_id: Mapped[int | None] = mapped_column(ForeignKey("statement_lines.id"))
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    """The adjustment's own currency; it must be its statement's (the database refuses others)."""
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))

    provider: Mapped[Provider] = relationship()

    __table_args__ = (
        CheckConstraint("amount_minor <> 0", name="amount_not_zero"),
        CheckConstraint("statement_id <> corrects_statement_id", name="not_self"),
    )


ACCOUNTS = ("pool", "payable", "carry", "adjustments", "paid")
TRANSFER_KINDS = ("allocation", "carry_in", "holdback", "adjustment", "payment")


class Transfer(Base):
    """One balanced journal entry: `amount_minor` moves from `debit_account` to `credit_account`.

    Booked when a statement with a pool is finalised, never changed afterwards. Accounts are
    per provider and currency: ``pool`` (funds a statement's allocation), ``payable`` (what a
    provider is owed on the statement being closed; zero once it is closed), ``carry`` (held back
    under a minimum payout; never negative), ``adjustments`` (funds corrections) and ``paid``.
    A balance is Σ amounts in − Σ amounts out, so money paid twice shows as a balance that does
    not add up.
    """

    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    statement_id: Mapped[int] = mapped_column(ForeignKey("statements.id"), index=True)
    adjustment_id: Mapped[int | None] = mapped_column(ForeignKey("adjustments.id"))
    kind: Mapped[str] = mapped_column(String(16))
    debit_account: Mapped[str] = mapped_column(String(16))
    credit_account: Mapped[str] = mapped_column(String(16))
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"), index=True)
    currency: Mapped[str] = mapped_column(String(3))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("debit_account <> credit_account", name="two_accounts"),
        CheckConstraint(
            "debit_account IN ('pool', 'payable', 'carry', 'adjustments', 'paid')",
            name="debit_known",
        ),
        CheckConstraint(
            "credit_account IN ('pool', 'payable', 'carry', 'adjustments', 'paid')",
            name="credit_known",
        ),
        CheckConstraint(
            "kind IN ('allocation', 'carry_in', 'holdback', 'adjustment', 'payment')",
            name="kind_known",
        ),
    )


class SampleDesign(Base):
    """The probability sample of a queries file that one attribution run attributed
    (`ledger.sampling`); `id` is the sha256 of `document`, its canonical description.

    Append-only: the design, its strata and its sampled outputs never change, so a statement
    resting on the run can always be re-estimated and the sample re-drawn from the seed.
    """

    __tablename__ = "sample_designs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("attribution_runs.id"), unique=True)
    queries_sha256: Mapped[str] = mapped_column(String(64))
    """sha256 of the whole queries file: the population."""
    method: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(BigInteger)
    size_field: Mapped[str | None] = mapped_column(String(200))
    """Field whose value is each output's size (PPS); NULL for a uniform design."""
    strata_field: Mapped[str | None] = mapped_column(String(200))
    population_count: Mapped[int] = mapped_column(BigInteger)
    sample_count: Mapped[int] = mapped_column(Integer)
    document: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint("sample_count > 0", name="sample_not_empty"),
        CheckConstraint("sample_count <= population_count", name="sample_within_population"),
    )


class SampleStratum(Base):
    """One stratum of a design: its population (count and total size) and its allocation."""

    __tablename__ = "sample_strata"

    design_id: Mapped[str] = mapped_column(ForeignKey("sample_designs.id"), primary_key=True)
    stratum: Mapped[str] = mapped_column(String(200), primary_key=True)
    population_count: Mapped[int] = mapped_column(BigInteger)
    size_total: Mapped[str] = mapped_column(String(64))
    """Σ of the outputs' sizes, as an exact decimal string (the count for a uniform design)."""
    weight_micros_total: Mapped[int] = mapped_column(BigInteger)
    """Σ of the outputs' credit weights in millionths: the stratum's whole weight."""
    sample_count: Mapped[int] = mapped_column(Integer)
    certainty_count: Mapped[int] = mapped_column(Integer)


class SampleUnit(Base):
    """One sampled output: its stratum and inclusion probability (whether attributed yet or
    not; its result joins through `queries.external_id`)."""

    __tablename__ = "sample_units"

    design_id: Mapped[str] = mapped_column(ForeignKey("sample_designs.id"), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    line: Mapped[int] = mapped_column(Integer)
    served_at: Mapped[datetime] = mapped_column(DateTime)
    stratum: Mapped[str] = mapped_column(String(200))
    inclusion_probability: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        CheckConstraint(
            "inclusion_probability > 0 AND inclusion_probability <= 1",
            name="probability_in_range",
        ),
        ForeignKeyConstraint(
            ["design_id", "stratum"],
            ["sample_strata.design_id", "sample_strata.stratum"],
            name="fk_sample_units_design_id_sample_strata",
        ),
    )


class StatementEstimate(Base):
    """The 95% interval of a provider's share on a statement estimated from a sample: the
    share is the line's, ± `share_half_width`. Final with its statement."""

    __tablename__ = "statement_estimates"

    statement_id: Mapped[int] = mapped_column(ForeignKey("statements.id"), primary_key=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"), primary_key=True)
    share_half_width: Mapped[float] = mapped_column(Float)


class Setting(Base):
    """A ledger-wide setting: ``workspace_root``, the directory stored paths are relative to
    (on SQLite, the database's directory when it was created or upgraded)."""

    __tablename__ = "ledger_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
