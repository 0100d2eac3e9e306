"""Value statements: building drafts, finalising them, and correcting closed periods.

For a period, value(p) = Σ over the period's queries of credit(q, p), using each query's current
(latest recorded) result. Sums are `math.fsum`, which is correctly rounded and therefore the same
bit for bit whatever order the database returns rows in. share(p) = value(p) / Σ values. With a
pool, amounts are allocated from the exact values by largest remainder (`ledger.money.allocate`),
so the lines add up to the pool to the last minor unit.

Rules:

- A period with no credited query cannot have a statement: `EmptyStatementError`.
- Building a period again replaces a draft's lines; a final statement is never rebuilt or changed
  (`StatementFinalError`, and the database's triggers refuse it too).
- With a minimum payout, a provider whose amount plus what was carried in stays below it is paid
  nothing now; the amount is carried forward into its line on the next statement (same currency).
  Carried amounts come from the latest earlier statement with a pool, which therefore has to be
  final before the next statement is finalised.
- Corrections to a final statement are `Adjustment`s carried by the next open (draft) statement
  in the same currency; they are shown on that statement with a reference to what they correct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import polars as pl
from sqlalchemy import Integer, and_, delete, func, insert, select
from sqlalchemy.orm import Session

from ledger import guards
from ledger import models as m
from ledger.errors import (
    ConflictError,
    EmptyStatementError,
    LedgerError,
    MoneyError,
    NotFoundError,
    StatementFinalError,
)
from ledger.money import (
    MAX_MINOR,
    allocate,
    apply_minimum_payout,
    format_minor,
    minor_units,
    to_minor,
)
from ledger.periods import Period
from ledger.recording import to_utc_naive
from ledger.registry import get_provider

guards.install()


@dataclass(frozen=True)
class ProviderValue:
    """A provider's value in a period: the deterministic sum of its credits, and its share."""

    provider_id: int
    provider: str
    value: float
    share: float


def period_credits(session: Session, period: Period) -> pl.DataFrame:
    """Current credits of the queries served in `period`: columns provider_id, credit."""
    c, r, q = m.Credit.__table__, m.QueryResult.__table__, m.Query.__table__
    stmt = (
        select(c.c.provider_id, c.c.credit)
        .select_from(
            q.join(r, r.c.query_id == q.c.id).join(
                c, and_(c.c.run_id == r.c.run_id, c.c.query_id == r.c.query_id)
            )
        )
        .where(
            r.c.is_current,
            q.c.served_at >= to_utc_naive(period.start),
            q.c.served_at < to_utc_naive(period.end),
        )
    )
    result = session.execute(stmt)
    # Integers and floats need no conversion, so read the driver's rows directly: building
    # SQLAlchemy Row objects would take longer than the query itself at a million rows.
    rows = result.cursor.fetchall() if result.cursor is not None else []
    result.close()
    schema = {"provider_id": pl.Int64, "credit": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def provider_values(session: Session, credits: pl.DataFrame) -> list[ProviderValue]:
    """Per-provider values and shares from a frame of credits, sorted by provider name.

    Each value is `math.fsum` of the provider's credits, so it does not depend on row order.
    """
    if credits.height == 0:
        return []
    grouped = credits.group_by("provider_id").agg(pl.col("credit"))
    sums = {
        pid: math.fsum(values)
        for pid, values in zip(
            grouped["provider_id"].to_list(), grouped["credit"].to_list(), strict=True
        )
    }
    total = math.fsum(credits["credit"].to_list())
    names: dict[int, str] = {
        pid: name
        for pid, name in session.execute(
            select(m.Provider.id, m.Provider.name).where(m.Provider.id.in_(sums))
        )
    }
    values = [
        ProviderValue(pid, names[pid], value, value / total if total > 0 else 0.0)
        for pid, value in sums.items()
    ]
    return sorted(values, key=lambda v: v.provider)


def _period_results(session: Session, period: Period) -> tuple[list[str], int, int]:
    r, q = m.QueryResult.__table__, m.Query.__table__
    rows = session.execute(
        select(r.c.run_id, func.count(), func.sum(r.c.unattributed.cast(Integer)))
        .select_from(r.join(q, q.c.id == r.c.query_id))
        .where(
            r.c.is_current,
            q.c.served_at >= to_utc_naive(period.start),
            q.c.served_at < to_utc_naive(period.end),
        )
        .group_by(r.c.run_id)
    ).all()
    runs = sorted(run_id for run_id, _, _ in rows)
    return runs, sum(n for _, n, _ in rows), sum(int(u or 0) for _, _, u in rows)


def _predecessor(session: Session, start: datetime, currency: str) -> m.Statement | None:
    """The latest statement with a pool in `currency` that ended by `start`."""
    return session.scalar(
        select(m.Statement)
        .where(
            m.Statement.currency == currency,
            m.Statement.pool_minor.is_not(None),
            m.Statement.period_end <= start,
        )
        .order_by(m.Statement.period_end.desc(), m.Statement.id.desc())
        .limit(1)
    )


def _carried_in(session: Session, start: datetime, currency: str) -> dict[int, int]:
    """Amounts carried forward to this period by provider id, from the previous statement."""
    previous = _predecessor(session, start, currency)
    if previous is None:
        return {}
    carried = {
        line.provider_id: line.carried_forward_minor
        for line in previous.lines
        if line.carried_forward_minor
    }
    if carried and previous.status != "final":
        raise ConflictError(
            f"statement {previous.id} ({previous.period_label}) carries amounts forward but is "
            "still a draft; finalise it before building the next period"
        )
    return carried


def find_statement(session: Session, period: Period) -> m.Statement | None:
    """The statement for exactly this period, if one was built."""
    return session.scalar(
        select(m.Statement).where(
            m.Statement.period_start == to_utc_naive(period.start),
            m.Statement.period_end == to_utc_naive(period.end),
        )
    )


def get_statement(session: Session, statement_id: int) -> m.Statement:
    """The statement with this id; raises `NotFoundError` otherwise."""
    if statement_id > MAX_MINOR:  # beyond any BIGINT id; SQLite's driver would overflow
        raise NotFoundError(f"unknown statement {statement_id!r}")
    statement = session.get(m.Statement, statement_id)
    if statement is None:
        raise NotFoundError(f"unknown statement {statement_id!r}")
    return statement


def list_statements(session: Session) -> list[m.Statement]:
    """All statements by period start."""
    return list(
        session.scalars(select(m.Statement).order_by(m.Statement.period_start, m.Statement.id))
    )


def build_statement(
    session: Session,
    period: Period,
    pool: Decimal | None,
    currency: str = "USD",
    min_payout: Decimal | None = None,
) -> m.Statement:
    """Build (or rebuild) the draft statement for `period` from the current credits.

    With `pool` None the statement has values and shares only (amounts are NULL). Raises
    `StatementFinalError` if the period's statement is final, `EmptyStatementError` if no query
    served in the period earned credit, `MoneyError` for a bad currency or amount.
    """
    currency = currency.strip().upper() if isinstance(currency, str) else currency
    places = minor_units(currency)
    pool_minor = None if pool is None else to_minor(pool, currency)
    if pool_minor is not None and pool_minor < 0:
        raise MoneyError(f"pool {pool} must not be negative")
    if min_payout is not None and pool is None:
        raise MoneyError("a minimum payout needs a pool")
    min_minor = None if min_payout is None else to_minor(min_payout, currency)
    if min_minor is not None and min_minor < 0:
        raise MoneyError(f"minimum payout {min_payout} must not be negative")
    start, end = to_utc_naive(period.start), to_utc_naive(period.end)

    statement = find_statement(session, period)
    if statement is not None and statement.status == "final":
        raise StatementFinalError(
            f"statement {statement.id} for {statement.period_label} is final and cannot be "
            "rebuilt; add an adjustment to the next open statement instead"
        )
    if pool_minor is not None:
        overlapping = session.scalar(
            select(m.Statement).where(
                m.Statement.pool_minor.is_not(None),
                m.Statement.period_start < end,
                m.Statement.period_end > start,
                m.Statement.id != (statement.id if statement is not None else -1),
            )
        )
        if overlapping is not None:
            raise ConflictError(
                f"period {period.label} overlaps statement {overlapping.id} "
                f"({overlapping.period_label}), which already allocates a pool"
            )

    credits = period_credits(session, period)
    values = provider_values(session, credits)
    if not values:
        raise EmptyStatementError(
            f"no query served in {period.label} has any credit; nothing to put on a statement"
        )
    runs, query_count, unattributed_count = _period_results(session, period)

    amounts: dict[int, int] = {}
    payouts: dict[int, Any] = {}
    if pool_minor is not None:
        # Keyed by name so that equal remainders go to the alphabetically first provider.
        by_name = allocate(pool_minor, {v.provider: Fraction(v.value) for v in values})
        amounts = {v.provider_id: by_name[v.provider] for v in values}
        carried = _carried_in(session, start, currency)
        payouts = apply_minimum_payout(amounts, carried, min_minor)

    if statement is None:
        statement = m.Statement(period_start=start, period_end=end)
        session.add(statement)
    else:
        session.execute(
            delete(m.StatementLine.__table__).where(
                m.StatementLine.__table__.c.statement_id == statement.id
            )
        )
        session.execute(
            delete(m.statement_runs).where(m.statement_runs.c.statement_id == statement.id)
        )
        session.expire(statement, ["lines", "runs"])
    statement.period_label = period.label
    statement.currency = currency
    statement.minor_units = places
    statement.pool_minor = pool_minor
    statement.min_payout_minor = min_minor
    statement.total_value = math.fsum(credits["credit"].to_list())
    statement.query_count = query_count
    statement.unattributed_count = unattributed_count
    statement.status = "draft"
    statement.created_at = m.utcnow()
    session.flush()

    by_id = {v.provider_id: v for v in values}
    extra = sorted(set(payouts) - set(by_id))
    extra_names: dict[int, str] = {
        pid: name
        for pid, name in session.execute(
            select(m.Provider.id, m.Provider.name).where(m.Provider.id.in_(extra))
        )
    }
    ordered = [(v.provider, v.provider_id) for v in values] + [(extra_names[p], p) for p in extra]
    lines = []
    for _, pid in sorted(ordered):
        v = by_id.get(pid)
        payout = payouts.get(pid)
        lines.append(
            {
                "statement_id": statement.id,
                "provider_id": pid,
                "value": v.value if v else 0.0,
                "share": v.share if v else 0.0,
                "amount_minor": None if pool_minor is None else amounts.get(pid, 0),
                "carried_in_minor": payout.carried_in if payout else 0,
                "payable_minor": payout.payable if payout else None,
                "carried_forward_minor": payout.carried_forward if payout else 0,
            }
        )
    session.execute(insert(m.StatementLine.__table__), lines)
    if runs:
        session.execute(
            insert(m.statement_runs), [{"statement_id": statement.id, "run_id": r} for r in runs]
        )
    session.flush()
    session.expire(statement, ["lines", "runs"])
    return statement


def finalize_statement(session: Session, statement_id: int) -> m.Statement:
    """Make a draft statement final; from then on neither the ledger nor the database changes it.

    Refuses if an earlier statement with a pool in the same currency is still a draft, or if
    the amounts carried in no longer match what that statement carries forward (rebuild first).
    """
    statement = get_statement(session, statement_id)
    if statement.status == "final":
        raise StatementFinalError(f"statement {statement.id} ({statement.period_label}) is final")
    if statement.pool_minor is not None:
        previous = _predecessor(session, statement.period_start, statement.currency)
        if previous is not None and previous.status != "final":
            raise ConflictError(
                f"statement {previous.id} ({previous.period_label}) comes before "
                f"{statement.period_label} and is still a draft; finalise it first"
            )
        expected = _carried_in(session, statement.period_start, statement.currency)
        actual = {
            line.provider_id: line.carried_in_minor
            for line in statement.lines
            if line.carried_in_minor
        }
        if expected != actual:
            raise ConflictError(
                f"statement {statement.id} ({statement.period_label}) is out of date with the "
                "amounts carried forward to it; rebuild it before finalising"
            )
    statement.status = "final"
    statement.finalized_at = m.utcnow()
    session.flush()
    return statement


def add_adjustment(
    session: Session,
    corrects_statement_id: int,
    provider: str,
    amount: Decimal,
    reason: str,
) -> m.Adjustment:
    """Correct a final statement by `amount` (positive: owed to the provider; negative: owed back).

    The adjustment is attached to the next open (draft) statement with a pool in the same
    currency, whose period starts at or after the corrected period's end. Raises `LedgerError`
    if the corrected statement is a draft (rebuild it instead) or if no open statement exists
    yet (build the next period's draft first).
    """
    corrected = get_statement(session, corrects_statement_id)
    if corrected.status != "final":
        raise LedgerError(
            f"statement {corrected.id} ({corrected.period_label}) is a draft; rebuild it "
            "instead of adjusting it"
        )
    if corrected.pool_minor is None:
        raise LedgerError(
            f"statement {corrected.id} ({corrected.period_label}) has no pool; there are no "
            "amounts to adjust"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise LedgerError("an adjustment needs a reason")
    minor = to_minor(amount, corrected.currency)
    if minor == 0:
        raise MoneyError("an adjustment amount must not be zero")
    target = session.scalar(
        select(m.Statement)
        .where(
            m.Statement.status == "draft",
            m.Statement.currency == corrected.currency,
            m.Statement.pool_minor.is_not(None),
            m.Statement.period_start >= corrected.period_end,
        )
        .order_by(m.Statement.period_start, m.Statement.id)
        .limit(1)
    )
    if target is None:
        raise LedgerError(
            f"no open statement in {corrected.currency} after {corrected.period_label}; build "
            "the next period's draft statement first"
        )
    provider_row = get_provider(session, provider)
    line = session.scalar(
        select(m.StatementLine).where(
            m.StatementLine.statement_id == corrected.id,
            m.StatementLine.provider_id == provider_row.id,
        )
    )
    _check_payable_with_adjustment(session, target, provider_row, minor)
    adjustment = m.Adjustment(
        statement_id=target.id,
        corrects_statement_id=corrected.id,
        corrects_line_id=line.id if line is not None else None,
        provider_id=provider_row.id,
        amount_minor=minor,
        reason=reason.strip(),
        created_at=m.utcnow(),
    )
    session.add(adjustment)
    session.flush()
    return adjustment


def statement_adjustments(session: Session, statement_id: int) -> list[dict[str, Any]]:
    """Adjustments carried by a statement, each with the statement and line it corrects."""
    statement = get_statement(session, statement_id)
    corrected = m.Statement.__table__.alias("corrected")
    rows = session.execute(
        select(
            m.Adjustment.id,
            m.Provider.name,
            m.Adjustment.amount_minor,
            m.Adjustment.reason,
            m.Adjustment.corrects_statement_id,
            corrected.c.period_label,
            m.Adjustment.corrects_line_id,
            m.Adjustment.created_at,
        )
        .join(m.Provider, m.Provider.id == m.Adjustment.provider_id)
        .join(corrected, corrected.c.id == m.Adjustment.corrects_statement_id)
        .where(m.Adjustment.statement_id == statement_id)
        .order_by(m.Adjustment.id)
    ).all()
    return [
        {
            "id": adj_id,
            "provider": name,
            "amount_minor": minor,
            "amount": format_minor(minor, statement.currency),
            "reason": reason,
            "corrects_statement_id": corrects_id,
            "corrects_period": corrects_label,
            "corrects_line_id": line_id,
            "created_at": created_at,
        }
        for adj_id, name, minor, reason, corrects_id, corrects_label, line_id, created_at in rows
    ]


ROW_SCHEMA = {
    "provider": pl.String,
    "value": pl.Float64,
    "share": pl.Float64,
    "amount_minor": pl.Int64,
    "amount": pl.String,
    "carried_in_minor": pl.Int64,
    "carried_forward_minor": pl.Int64,
    "adjustments_minor": pl.Int64,
    "payable_minor": pl.Int64,
    "payable": pl.String,
}


def _check_payable_with_adjustment(
    session: Session, target: m.Statement, provider: m.Provider, minor: int
) -> None:
    """Refuse an adjustment after which the provider's adjustments on `target`, or what it is
    paid there, would leave BIGINT minor units."""
    earlier = session.scalar(
        select(func.coalesce(func.sum(m.Adjustment.amount_minor), 0)).where(
            m.Adjustment.statement_id == target.id, m.Adjustment.provider_id == provider.id
        )
    )
    adjusted = int(earlier) + minor
    payable = session.scalar(
        select(m.StatementLine.payable_minor).where(
            m.StatementLine.statement_id == target.id,
            m.StatementLine.provider_id == provider.id,
        )
    )
    for total in (adjusted, adjusted + (payable or 0)):
        if abs(total) > MAX_MINOR:
            raise MoneyError(
                f"{provider.name}: this adjustment brings the provider's total on statement "
                f"{target.id} ({target.period_label}) to {total} minor units, beyond the largest "
                f"amount the ledger stores ({MAX_MINOR} minor units)"
            )


def statement_rows(session: Session, statement_id: int) -> pl.DataFrame:
    """One row per provider: value, share and exact amounts (minor units and decimal strings).

    ``amount`` is the provider's part of the pool; ``payable`` is what is paid on this
    statement: amount plus amounts carried in, less what is carried forward, plus adjustments.
    Money columns are null for a statement without a pool. Sorted by value, largest first.
    """
    statement = get_statement(session, statement_id)
    cur = statement.currency
    pooled = statement.pool_minor is not None
    adjustments: dict[str, int] = {}
    for adj in statement_adjustments(session, statement_id):
        adjustments[adj["provider"]] = adjustments.get(adj["provider"], 0) + adj["amount_minor"]
    rows: list[dict[str, Any]] = []
    for line in statement.lines:
        name = line.provider.name
        adj = adjustments.pop(name, 0)
        payable = None if line.payable_minor is None else line.payable_minor + adj
        rows.append(
            {
                "provider": name,
                "value": line.value,
                "share": line.share,
                "amount_minor": line.amount_minor,
                "amount": None
                if line.amount_minor is None
                else format_minor(line.amount_minor, cur),
                "carried_in_minor": line.carried_in_minor,
                "carried_forward_minor": line.carried_forward_minor,
                "adjustments_minor": adj if pooled else None,
                "payable_minor": payable,
                "payable": None if payable is None else format_minor(payable, cur),
            }
        )
    for name, adj in sorted(adjustments.items()):
        rows.append(
            {
                "provider": name,
                "value": 0.0,
                "share": 0.0,
                "amount_minor": 0,
                "amount": format_minor(0, cur),
                "carried_in_minor": 0,
                "carried_forward_minor": 0,
                "adjustments_minor": adj,
                "payable_minor": adj,
                "payable": format_minor(adj, cur),
            }
        )
    for row in rows:
        if row["payable_minor"] is not None and abs(row["payable_minor"]) > MAX_MINOR:
            raise MoneyError(
                f"{row['provider']}: payable {row['payable_minor']} minor units on statement "
                f"{statement.id} ({statement.period_label}), adjustments included, exceed the "
                f"largest amount the ledger stores ({MAX_MINOR} minor units)"
            )
    rows.sort(key=lambda row: (-row["value"], row["provider"]))
    return pl.DataFrame(rows, schema=ROW_SCHEMA)


def statement_summary(session: Session, statement_id: int) -> dict[str, Any]:
    """Period, pool, currency, status, counts, the runs (and their indexes) the statement rests
    on, and the adjustments it carries."""
    s = get_statement(session, statement_id)
    cur = s.currency
    return {
        "id": s.id,
        "period": s.period_label,
        "period_start": s.period_start,
        "period_end": s.period_end,
        "status": s.status,
        "currency": cur,
        "pool_minor": s.pool_minor,
        "pool": None if s.pool_minor is None else format_minor(s.pool_minor, cur),
        "min_payout": None if s.min_payout_minor is None else format_minor(s.min_payout_minor, cur),
        "total_value": s.total_value,
        "queries": s.query_count,
        "unattributed_queries": s.unattributed_count,
        "created_at": s.created_at,
        "finalized_at": s.finalized_at,
        "runs": [
            {"run_id": run.id, "index_id": run.index_id, "status": run.status} for run in s.runs
        ],
        "adjustments": statement_adjustments(session, statement_id),
    }
