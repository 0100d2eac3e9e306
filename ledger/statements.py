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

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import polars as pl
from sqlalchemy import (
    Float,
    Integer,
    String,
    and_,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from ledger import guards
from ledger import models as m
from ledger.db import database_user, lock_ledger
from ledger.errors import (
    ConflictError,
    EmptyStatementError,
    LedgerError,
    MoneyError,
    NotFoundError,
    StatementFinalError,
)
from ledger.guards import LEGACY_SEALING
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
from ledger.registry import canonical_json, get_provider
from ledger.samples import PeriodEstimate, estimate_period, half_widths, statement_sample

guards.install()


@dataclass(frozen=True)
class ProviderValue:
    """A provider's value in a period: the deterministic sum of its credits, and its share."""

    provider_id: int
    provider: str
    value: float
    share: float


@dataclass(frozen=True)
class PeriodSnapshot:
    """Everything a statement reads about its period, from one SQL statement (one snapshot)."""

    credits: pl.DataFrame
    """query_id, provider_id, credit of the current credits of the period's outputs."""
    runs: list[str]
    query_count: int
    unattributed_count: int


def period_snapshot(
    session: Session, period: Period, as_of: datetime | None = None
) -> PeriodSnapshot:
    """The period's current results and credits, read in one SQL statement (one snapshot), so
    that the run list and the amounts can never come from different moments.

    The statement returns the credit rows (provider id, credit) followed by one row per run
    (run id, results, unattributed results), told apart by a NULL provider id.
    """
    start, end = to_utc_naive(period.start), to_utc_naive(period.end)
    r, q, c = m.QueryResult.__table__, m.Query.__table__, m.Credit.__table__
    if as_of is None:
        is_current = r.c.is_current
    else:
        # The result that was current at `as_of`: the latest recorded by then (results are
        # append-only, so this can be read back at any later time).
        later = r.alias("later")
        is_current = and_(
            r.c.recorded_at <= as_of,
            ~select(later.c.query_id)
            .where(
                later.c.query_id == r.c.query_id,
                later.c.recorded_at > r.c.recorded_at,
                later.c.recorded_at <= as_of,
            )
            .exists(),
        )
    current = (
        select(r.c.run_id, r.c.query_id, r.c.unattributed)
        .select_from(r.join(q, q.c.id == r.c.query_id))
        .where(is_current, q.c.served_at >= start, q.c.served_at < end)
        .cte("current_results")
    )
    credit_rows = select(
        c.c.provider_id,
        c.c.credit,
        c.c.query_id,
        literal(None, String).label("run_id"),
        literal(None, Integer).label("results"),
        literal(None, Integer).label("unattributed"),
    ).select_from(
        c.join(current, and_(c.c.run_id == current.c.run_id, c.c.query_id == current.c.query_id))
    )
    run_rows = select(
        literal(None, Integer).label("provider_id"),
        literal(None, Float).label("credit"),
        literal(None, Integer).label("query_id"),
        current.c.run_id,
        func.count().label("results"),
        func.sum(case((current.c.unattributed, 1), else_=0)).label("unattributed"),
    ).group_by(current.c.run_id)
    result = session.execute(union_all(credit_rows, run_rows))
    # Read the driver's rows directly: building SQLAlchemy Row objects would take longer than
    # the query itself at a million rows.
    rows = result.cursor.fetchall() if result.cursor is not None else []
    result.close()
    runs: dict[str, tuple[int, int]] = {}
    credit_part = []
    for row in rows:
        if row[0] is None:
            runs[row[3]] = (int(row[4]), int(row[5] or 0))
        else:
            credit_part.append(row[:3])
    credits = pl.DataFrame(
        credit_part,
        schema={"provider_id": pl.Int64, "credit": pl.Float64, "query_id": pl.Int64},
        orient="row",
    )
    return PeriodSnapshot(
        credits=credits,
        runs=sorted(runs),
        query_count=sum(n for n, _ in runs.values()),
        unattributed_count=sum(u for _, u in runs.values()),
    )


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


def account_balances(
    session: Session, account: str, currency: str | None = None
) -> dict[tuple[int, str], int]:
    """Balance (Σ in − Σ out, minor units) of `account` per (provider id, currency)."""
    t = m.Transfer.__table__
    signed = case((t.c.credit_account == account, t.c.amount_minor), else_=-t.c.amount_minor)
    stmt = (
        select(t.c.provider_id, t.c.currency, func.sum(signed))
        .where(or_(t.c.credit_account == account, t.c.debit_account == account))
        .group_by(t.c.provider_id, t.c.currency)
    )
    if currency is not None:
        stmt = stmt.where(t.c.currency == currency)
    return {(pid, cur): int(total) for pid, cur, total in session.execute(stmt)}


def carried_balances(session: Session, currency: str) -> dict[int, int]:
    """What each provider has carried forward and not yet been paid, in `currency`: the balance
    of its carry account in the journal (booked by final statements only)."""
    return {
        pid: total
        for (pid, _), total in account_balances(session, "carry", currency).items()
        if total
    }


def period_values(
    session: Session, period: Period, snapshot: PeriodSnapshot
) -> tuple[list[ProviderValue], PeriodEstimate | None]:
    """The period's provider values: sums of the credits, or for a period attributed from a
    sample, Horvitz-Thompson estimates with their 95% intervals (`ledger.samples`)."""
    estimate = estimate_period(session, period, snapshot.credits, snapshot.runs)
    if estimate is None:
        return provider_values(session, snapshot.credits), None
    names: dict[int, str] = dict(
        session.execute(
            select(m.Provider.id, m.Provider.name).where(m.Provider.id.in_(estimate.values))
        ).all()
    )
    values = [
        ProviderValue(pid, names[pid], estimate.values[pid], estimate.shares[pid])
        for pid in estimate.values
    ]
    return sorted(values, key=lambda v: v.provider), estimate


@dataclass(frozen=True)
class _Computed:
    snapshot: PeriodSnapshot
    values: list[ProviderValue]
    lines: list[dict[str, Any]]
    total_value: float
    estimate: PeriodEstimate | None = None


def _compute(
    session: Session,
    period: Period,
    pool_minor: int | None,
    currency: str,
    min_minor: int | None,
) -> _Computed:
    """The lines of `period`'s statement from the current credits and carried balances."""
    snapshot = period_snapshot(session, period)
    values, estimate = period_values(session, period, snapshot)
    if not values and pool_minor != 0:
        # A pool of 0 on a period without credit still pays what is carried in and the
        # adjustments the statement carries (a correction before the period has outputs).
        raise EmptyStatementError(
            f"no query served in {period.label} has any credit; nothing to put on a statement"
            + ("" if pool_minor is None else " (a pool of 0 pays only what is carried in)")
        )
    amounts: dict[int, int] = {}
    payouts: dict[int, Any] = {}
    if pool_minor is not None:
        # Keyed by name so that equal remainders go to the alphabetically first provider.
        by_name = allocate(pool_minor, {v.provider: Fraction(v.value) for v in values})
        amounts = {v.provider_id: by_name[v.provider] for v in values}
        payouts = apply_minimum_payout(amounts, carried_balances(session, currency), min_minor)
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
                "provider_id": pid,
                "value": v.value if v else 0.0,
                "share": v.share if v else 0.0,
                "amount_minor": None if pool_minor is None else amounts.get(pid, 0),
                "carried_in_minor": payout.carried_in if payout else 0,
                "payable_minor": payout.payable if payout else None,
                "carried_forward_minor": payout.carried_forward if payout else 0,
            }
        )
    total = math.fsum(snapshot.credits["credit"].to_list()) if estimate is None else estimate.total
    return _Computed(snapshot, values, lines, total, estimate)


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


def _overlapping_pool(
    session: Session, start: datetime, end: datetime, exclude: int | None, final_only: bool
) -> m.Statement | None:
    stmt = select(m.Statement).where(
        m.Statement.pool_minor.is_not(None),
        m.Statement.period_start < end,
        m.Statement.period_end > start,
        m.Statement.id != (exclude if exclude is not None else -1),
    )
    if final_only:
        stmt = stmt.where(m.Statement.status == "final")
    return session.scalar(stmt.order_by(m.Statement.id).limit(1))


def build_statement(
    session: Session,
    period: Period,
    pool: Decimal | None,
    currency: str = "USD",
    min_payout: Decimal | None = None,
    allow_empty: bool = False,
) -> m.Statement:
    """Build (or rebuild) the draft statement for `period` from the current credits.

    A period without credit can have a statement with a pool of 0, which pays what is carried
    in and the adjustments it carries; `allow_empty` builds one with neither yet (to carry
    an adjustment about to be added).

    With `pool` None the statement has values and shares only (amounts are NULL). Amounts
    carried in are the providers' carried-forward balances in the journal (what final
    statements held back and no final statement has paid yet). Raises `StatementFinalError` if
    the period's statement is final, `EmptyStatementError` if no query served in the period
    earned credit, `MoneyError` for a bad currency or amount, `ConflictError` if the draft
    carries adjustments in another currency or the pool overlaps another statement's.
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
    lock_ledger(session)

    statement = find_statement(session, period)
    if statement is not None and statement.status == "final":
        raise StatementFinalError(
            f"statement {statement.id} for {statement.period_label} is final and cannot be "
            "rebuilt; add an adjustment to the next open statement instead"
        )
    if pool_minor is not None:
        overlapping = _overlapping_pool(
            session, start, end, statement.id if statement is not None else None, False
        )
        if overlapping is not None:
            raise ConflictError(
                f"period {period.label} overlaps statement {overlapping.id} "
                f"({overlapping.period_label}), which already allocates a pool"
            )
    if statement is not None:
        other = session.scalar(
            select(m.Adjustment.currency)
            .where(m.Adjustment.statement_id == statement.id, m.Adjustment.currency != currency)
            .limit(1)
        )
        if other is not None or (pool_minor is None and _has_adjustments(session, statement.id)):
            raise ConflictError(
                f"statement {statement.id} ({statement.period_label}) carries adjustments in "
                f"{other or statement.currency}; it can only be rebuilt with a pool in "
                f"{other or statement.currency}"
            )

    computed = _compute(session, period, pool_minor, currency, min_minor)
    if (
        not computed.lines
        and not allow_empty
        and (statement is None or not _has_adjustments(session, statement.id))
    ):
        raise EmptyStatementError(
            f"no query served in {period.label} has any credit, and nothing is carried in or "
            "adjusted; nothing to put on a statement"
        )

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
        session.execute(
            delete(m.StatementEstimate.__table__).where(
                m.StatementEstimate.__table__.c.statement_id == statement.id
            )
        )
        session.expire(statement, ["lines", "runs"])
    statement.period_label = period.label
    statement.currency = currency
    statement.minor_units = places
    statement.pool_minor = pool_minor
    statement.min_payout_minor = min_minor
    statement.total_value = computed.total_value
    statement.query_count = computed.snapshot.query_count
    statement.unattributed_count = computed.snapshot.unattributed_count
    statement.status = "draft"
    statement.created_at = m.utcnow()
    session.flush()

    if computed.lines:  # none on a period without credit that nothing is carried into yet
        session.execute(
            insert(m.StatementLine.__table__),
            [{"statement_id": statement.id, **line} for line in computed.lines],
        )
    if computed.snapshot.runs:
        session.execute(
            insert(m.statement_runs),
            [{"statement_id": statement.id, "run_id": r} for r in computed.snapshot.runs],
        )
    if computed.estimate is not None:
        session.execute(
            insert(m.StatementEstimate.__table__),
            [
                {"statement_id": statement.id, "provider_id": pid, "share_half_width": half}
                for pid, half in sorted(computed.estimate.half_widths.items())
            ],
        )
    session.flush()
    session.expire(statement, ["lines", "runs"])
    return statement


def _has_adjustments(session: Session, statement_id: int) -> bool:
    return (
        session.scalar(
            select(m.Adjustment.id).where(m.Adjustment.statement_id == statement_id).limit(1)
        )
        is not None
    )


_LINE_FIELDS = (
    "provider_id",
    "value",
    "share",
    "amount_minor",
    "carried_in_minor",
    "payable_minor",
    "carried_forward_minor",
)


def _stored_lines(session: Session, statement_id: int) -> list[dict[str, Any]]:
    t = m.StatementLine.__table__
    rows = session.execute(
        select(*[t.c[f] for f in _LINE_FIELDS])
        .where(t.c.statement_id == statement_id)
        .order_by(t.c.provider_id)
    ).all()
    return [dict(zip(_LINE_FIELDS, row, strict=True)) for row in rows]


def unfinished_runs(session: Session) -> list[m.AttributionRun]:
    """Attribution runs not marked finished (interrupted, or still recording)."""
    return list(
        session.scalars(
            select(m.AttributionRun)
            .where(m.AttributionRun.status != "finished")
            .order_by(m.AttributionRun.started_at, m.AttributionRun.id)
        )
    )


def finalize_statement(
    session: Session, statement_id: int, allow_unfinished: bool = False
) -> m.Statement:
    """Make a draft statement final; from then on neither the ledger nor the database changes it.

    Under the ledger's lock, the draft is checked against the current credits and carried
    balances (a draft that is out of date must be rebuilt first), the money is booked as
    balanced transfers (pool → payable, carry → payable, payable → carry, adjustments →
    payable, payable → paid), and the printed content is stored with its sha256, chained to
    the previous final statement's. Refuses while an attribution run is unfinished, unless
    `allow_unfinished` (its later credits for this period would be refused).
    """
    lock_ledger(session)
    statement = get_statement(session, statement_id)
    session.refresh(statement, with_for_update=True)
    if statement.status == "final":
        raise StatementFinalError(f"statement {statement.id} ({statement.period_label}) is final")
    label = f"statement {statement.id} ({statement.period_label})"
    unfinished = unfinished_runs(session)
    if unfinished and not allow_unfinished:
        names = ", ".join(run.id[:16] for run in unfinished[:3])
        raise ConflictError(
            f"{label} cannot be finalised while attribution run{'s' if len(unfinished) > 1 else ''}"
            f" {names}{' …' if len(unfinished) > 3 else ''} "
            f"{'are' if len(unfinished) > 1 else 'is'} unfinished (its credits for this period "
            "would never be paid); resume it with `ledger attribute`, or finalise with "
            "--allow-unfinished"
        )
    if statement.pool_minor is not None:
        overlapping = _overlapping_pool(
            session, statement.period_start, statement.period_end, statement.id, True
        )
        if overlapping is not None:
            raise ConflictError(
                f"{label} overlaps final statement {overlapping.id} "
                f"({overlapping.period_label}), whose pool already pays that time"
            )
    try:
        computed = _rebuilt(session, statement)
    except EmptyStatementError as exc:
        raise ConflictError(f"{label} is out of date: {exc}; rebuild it") from exc
    if not _matches(session, statement, computed):
        raise ConflictError(
            f"{label} is out of date with the ledger (credits recorded or amounts carried "
            "forward since it was built); save it again (`ledger report --period "
            f"{statement.period_label} --save`) and check it before finalising"
        )
    user = database_user(session)
    now = m.utcnow()
    if statement.pool_minor is not None:
        _book_transfers(session, statement, user, now)
    _seal(session, statement, user, now)
    session.flush()
    return statement


def _matches(session: Session, statement: m.Statement, computed: _Computed) -> bool:
    """Whether a stored draft holds what `computed` (built now) would: lines, runs, totals."""
    fresh = sorted(
        ({f: line[f] for f in _LINE_FIELDS} for line in computed.lines),
        key=lambda line: line["provider_id"],
    )
    return (
        fresh == _stored_lines(session, statement.id)
        and sorted(run.id for run in statement.runs) == computed.snapshot.runs
        and computed.total_value == statement.total_value
        and computed.snapshot.query_count == statement.query_count
    )


def _rebuilt(session: Session, statement: m.Statement) -> _Computed:
    """What building `statement` again now, with its own settings, gives."""
    period = Period(
        statement.period_label,
        statement.period_start.replace(tzinfo=UTC),
        statement.period_end.replace(tzinfo=UTC),
    )
    return _compute(
        session, period, statement.pool_minor, statement.currency, statement.min_payout_minor
    )


def draft_is_current(session: Session, statement: m.Statement) -> bool:
    """Whether a saved draft is what building it again now would give (`finalize_statement`
    accepts only such a draft)."""
    try:
        computed = _rebuilt(session, statement)
    except EmptyStatementError:
        return False
    return _matches(session, statement, computed)


def _book_transfers(session: Session, statement: m.Statement, user: str, now: datetime) -> None:
    """The balanced journal entries of closing `statement` (one with a pool)."""
    cur = statement.currency
    rows: list[dict[str, Any]] = []

    def move(kind: str, debit: str, credit: str, pid: int, minor: int, adj: int | None = None):
        if minor < 0:
            debit, credit, minor = credit, debit, -minor
        if minor:
            rows.append(
                {
                    "statement_id": statement.id,
                    "adjustment_id": adj,
                    "kind": kind,
                    "debit_account": debit,
                    "credit_account": credit,
                    "provider_id": pid,
                    "currency": cur,
                    "amount_minor": minor,
                    "created_at": now,
                    "created_by": user,
                }
            )

    payable: dict[int, int] = {}
    for line in _stored_lines(session, statement.id):
        pid = line["provider_id"]
        move("allocation", "pool", "payable", pid, line["amount_minor"] or 0)
        move("carry_in", "carry", "payable", pid, line["carried_in_minor"])
        move("holdback", "payable", "carry", pid, line["carried_forward_minor"])
        payable[pid] = payable.get(pid, 0) + (line["payable_minor"] or 0)
    for adj_id, pid, minor in session.execute(
        select(m.Adjustment.id, m.Adjustment.provider_id, m.Adjustment.amount_minor)
        .where(m.Adjustment.statement_id == statement.id)
        .order_by(m.Adjustment.id)
    ):
        move("adjustment", "adjustments", "payable", pid, minor, adj_id)
        payable[pid] = payable.get(pid, 0) + minor
    for pid in sorted(payable):
        move("payment", "payable", "paid", pid, payable[pid])
    if rows:
        session.execute(insert(m.Transfer.__table__), rows)


def statement_content(session: Session, statement: m.Statement) -> dict[str, Any]:
    """What a statement prints, as a JSON-ready document (the sealed content of a final one)."""
    summary = _live_summary(session, statement)
    rows = _live_rows(session, statement)
    return {
        "statement": {
            key: (value.isoformat() if isinstance(value, datetime) else value)
            for key, value in summary.items()
            if key not in ("runs", "adjustments", "content_sha256", "previous_sha256")
        },
        "lines": rows,
        "adjustments": [
            {
                key: (value.isoformat() if isinstance(value, datetime) else value)
                for key, value in adj.items()
            }
            for adj in summary["adjustments"]
        ],
        # What the statement rests on, not the runs' status, which moves on (a run closed
        # with --allow-unfinished finishes later).
        "runs": [{"run_id": r["run_id"], "index_id": r["index_id"]} for r in summary["runs"]],
        "previous_sha256": statement.previous_sha256,
    }


def content_hash(content_text: str) -> str:
    """The sha256 a final statement stores: of its canonical content (which names the previous
    final statement's hash, so every final statement vouches for the ones before it)."""
    return hashlib.sha256(content_text.encode("utf-8")).hexdigest()


def _chain_head(session: Session) -> m.Statement | None:
    return session.scalar(
        select(m.Statement)
        .where(m.Statement.final_seq.is_not(None))
        .order_by(m.Statement.final_seq.desc())
        .limit(1)
    )


def _seal(
    session: Session,
    statement: m.Statement,
    user: str,
    now: datetime,
    legacy: dict[str, Any] | None = None,
) -> None:
    with session.no_autoflush:
        _seal_unflushed(session, statement, user, now, legacy)


def _seal_unflushed(
    session: Session,
    statement: m.Statement,
    user: str,
    now: datetime,
    legacy: dict[str, Any] | None,
) -> None:
    head = _chain_head(session)
    statement.final_seq = (head.final_seq if head is not None else 0) + 1
    statement.previous_sha256 = head.content_sha256 if head is not None else None
    statement.finalized_at = now
    statement.finalized_by = user
    statement.status = "final"
    content = statement_content(session, statement)
    if legacy is not None:
        content["legacy"] = legacy
    text = canonical_json(content)
    statement.content = text
    statement.content_sha256 = content_hash(text)


def seal_legacy_final_statements(session: Session) -> int:
    """Book and seal final statements made before the journal existed (migration 0003), in the
    order they were finalised; returns how many."""
    legacy = list(
        session.scalars(
            select(m.Statement)
            .where(m.Statement.status == "final", m.Statement.content_sha256.is_(None))
            .order_by(m.Statement.finalized_at, m.Statement.id)
        )
    )
    # Before the journal, results could still be recorded into a closed period; the audit
    # checks these statements against the results current when they were finalised, and
    # nothing recorded after this moment.
    marker = {"sealed_at": m.utcnow().isoformat(), "by": "migration 0003"}
    for statement in legacy:
        user = statement.finalized_by or "before-journal"
        now = statement.finalized_at or m.utcnow()
        if statement.pool_minor is not None:
            _book_transfers(session, statement, user, now)
        _seal(session, statement, user, now, legacy=marker)
        session.flush()
    return len(legacy)


def add_adjustment(
    session: Session,
    corrects_statement_id: int,
    provider: str,
    amount: Decimal,
    reason: str,
    carrier: Period | None = None,
    open_next: bool = False,
) -> m.Adjustment:
    """Correct a final statement by `amount` (positive: owed to the provider; negative: owed back).

    The adjustment is attached to an open (draft) statement with a pool in the same currency,
    whose period starts at or after the corrected period's end: the statement of `carrier`
    (built with a pool of 0 if it has none yet), or by default the first such draft. Where
    there is none, `open_next` builds a draft with a pool of 0 for the first period after the
    corrected one, of the same kind (2024-Q3 → 2024-Q4), that is not final; without it,
    `LedgerError`. Raises `LedgerError` too if the corrected statement is a draft (rebuild it
    instead).
    """
    lock_ledger(session)
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
    target = _carrier(session, corrected, carrier, open_next)
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
        currency=corrected.currency,
        reason=reason.strip(),
        created_at=m.utcnow(),
        created_by=database_user(session),
    )
    session.add(adjustment)
    session.flush()
    return adjustment


def _carrier(
    session: Session, corrected: m.Statement, period: Period | None, open_next: bool
) -> m.Statement:
    """The open statement that carries a correction of `corrected` (see `add_adjustment`)."""
    from ledger.periods import next_period, parse_period

    open_drafts = (
        select(m.Statement)
        .where(
            m.Statement.status == "draft",
            m.Statement.currency == corrected.currency,
            m.Statement.pool_minor.is_not(None),
            m.Statement.period_start >= corrected.period_end,
        )
        .order_by(m.Statement.period_start, m.Statement.id)
        .limit(1)
        .with_for_update()
    )
    if period is None:
        target = session.scalar(open_drafts)
        if target is not None:
            return target
        if not open_next:
            raise LedgerError(
                f"no open statement in {corrected.currency} after {corrected.period_label}; "
                "save the next period's draft statement first"
            )
        period = next_period(parse_period(corrected.period_label))
        while (found := find_statement(session, period)) is not None and found.status == "final":
            period = next_period(period)
    if to_utc_naive(period.start) < corrected.period_end:
        raise LedgerError(
            f"a correction of {corrected.period_label} goes on a later period's statement, not "
            f"{period.label}"
        )
    target = find_statement(session, period)
    if target is None or target.pool_minor is None:
        return build_statement(session, period, Decimal(0), corrected.currency, allow_empty=True)
    if target.status == "final":
        raise StatementFinalError(f"statement {target.id} ({target.period_label}) is final")
    if target.currency != corrected.currency:
        raise LedgerError(
            f"statement {target.id} ({target.period_label}) is in {target.currency}; a "
            f"correction of {corrected.period_label} is in {corrected.currency}"
        )
    return target


SEALED_LINE_KEYS = (
    "provider",
    "value",
    "amount_minor",
    "carried_in_minor",
    "carried_forward_minor",
    "adjustments_minor",
    "payable_minor",
)


def sealed_content(statement: m.Statement) -> dict[str, Any]:
    """What a final statement sealed; `LedgerError` if it is not the document the ledger wrote
    (not JSON, or without the statement, lines, adjustments and runs it prints)."""
    try:
        content = json.loads(statement.content or "")
        if not isinstance(content, dict):
            raise ValueError
        content["adjustments"], content["runs"], content["statement"]["queries"]  # noqa: B018
        for line in content["lines"]:
            for key in SEALED_LINE_KEYS:
                line[key]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerError(
            f"statement {statement.id} ({statement.period_label}): its sealed content is "
            "damaged; `ledger audit` reports what changed"
        ) from exc
    return content


def statement_adjustments(session: Session, statement_id: int) -> list[dict[str, Any]]:
    """Adjustments carried by a statement, each with the statement and line it corrects."""
    statement = get_statement(session, statement_id)
    if statement.status == "final" and statement.content is not None:
        return [
            {**adj, "created_at": datetime.fromisoformat(adj["created_at"])}
            for adj in sealed_content(statement)["adjustments"]
        ]
    return _live_adjustments(session, statement_id)


def _live_adjustments(session: Session, statement_id: int) -> list[dict[str, Any]]:
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
            m.Adjustment.currency,
            m.Adjustment.created_by,
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
            "amount": format_minor(minor, currency),
            "currency": currency,
            "reason": reason,
            "corrects_statement_id": corrects_id,
            "corrects_period": corrects_label,
            "corrects_line_id": line_id,
            "created_at": created_at,
            "created_by": created_by,
        }
        for (
            adj_id,
            name,
            minor,
            reason,
            corrects_id,
            corrects_label,
            line_id,
            created_at,
            currency,
            created_by,
        ) in rows
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
    "share_half_width": pl.Float64,
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
    A final statement's rows are the ones it sealed (provider names as they were then).
    """
    statement = get_statement(session, statement_id)
    if statement.status == "final" and statement.content is not None:
        rows = sealed_content(statement)["lines"]
    else:
        rows = _live_rows(session, statement)
    return pl.DataFrame(rows, schema=ROW_SCHEMA)


def _live_rows(session: Session, statement: m.Statement) -> list[dict[str, Any]]:
    """A statement's rows from its lines and adjustments as the tables hold them now."""
    statement_id = statement.id
    cur = statement.currency
    pooled = statement.pool_minor is not None
    adjustments: dict[str, int] = {}
    for adj in _live_adjustments(session, statement_id):
        adjustments[adj["provider"]] = adjustments.get(adj["provider"], 0) + adj["amount_minor"]
    # No sample before revision 0006, whose tables migration 0003 cannot read.
    estimated = {} if session.info.get(LEGACY_SEALING) else half_widths(session, statement_id)
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
        if estimated:  # only on statements estimated from a sample: others seal as before
            rows[-1]["share_half_width"] = estimated.get(line.provider_id, 0.0)
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
    return rows


def statement_summary(session: Session, statement_id: int) -> dict[str, Any]:
    """Period, pool, currency, status, counts, the runs (and their indexes) the statement rests
    on, and the adjustments it carries; for a final statement, as it was sealed, with who
    finalised it and its content hash."""
    s = get_statement(session, statement_id)
    if s.status == "final" and s.content is not None:
        content = sealed_content(s)
        head = content["statement"]
        summary = {
            **head,
            "period_start": datetime.fromisoformat(head["period_start"]),
            "period_end": datetime.fromisoformat(head["period_end"]),
            "created_at": datetime.fromisoformat(head["created_at"]),
            "finalized_at": datetime.fromisoformat(head["finalized_at"]),
            "runs": content["runs"],
            "adjustments": statement_adjustments(session, statement_id),
        }
    else:
        summary = _live_summary(session, s)
    summary["content_sha256"] = s.content_sha256
    summary["previous_sha256"] = s.previous_sha256
    return summary


def _live_summary(session: Session, s: m.Statement) -> dict[str, Any]:
    cur = s.currency
    summary = {
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
        "finalized_by": s.finalized_by,
        "final_seq": s.final_seq,
        "runs": [
            {"run_id": run.id, "index_id": run.index_id, "status": run.status} for run in s.runs
        ],
        "adjustments": _live_adjustments(session, s.id),
    }
    sample = None if session.info.get(LEGACY_SEALING) else statement_sample(session, s)
    if sample is not None:  # only on statements estimated from a sample: others seal as before
        summary["sample"] = sample
    return summary
