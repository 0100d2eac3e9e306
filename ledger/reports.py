"""A period's statement as analysts read it: previewed or saved, with every line carrying its
statement, and exported as JSON, CSV, Parquet or Excel.

`ledger report` shows a preview: the statement is built in a transaction that is rolled back,
so looking leaves nothing behind. `--save` keeps it as a draft, `--finalize` closes it, and
`ledger statements discard` removes a saved draft (never a final statement).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import polars as pl
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from ledger import guards
from ledger import models as m
from ledger.errors import EmptyStatementError, LedgerError
from ledger.money import format_minor, from_minor, normalize_currency, parse_amount, to_minor
from ledger.periods import Period
from ledger.statements import (
    build_statement,
    carried_balances,
    draft_is_current,
    find_statement,
    get_statement,
    statement_rows,
    statement_summary,
)

PREVIEW = "preview"
"""The status a statement shows while it is only looked at (built, shown, rolled back)."""

LINE_FIELDS = ("statement_id", "period", "currency", "status")
"""What every exported line carries of its statement, after the provider's own columns."""

MONEY_TOTALS = (
    "amount_minor",
    "carried_in_minor",
    "carried_forward_minor",
    "adjustments_minor",
    "payable_minor",
)


@contextmanager
def preview_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction is always rolled back: what is built in it is only shown."""
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    guards.install(session)
    try:
        yield session
    finally:
        session.rollback()
        session.close()


def prepare_statement(
    session: Session,
    period: Period,
    pool: str | Decimal | None,
    currency: str | None,
    min_payout: str | Decimal | None,
) -> tuple[m.Statement, bool]:
    """The statement of `period` as `ledger report` shows it: a final statement as it is (any
    pool, currency or minimum given must be its own), otherwise a draft built from the current
    credits in this session (the caller commits it to save it, or rolls it back to preview);
    and whether it was built here.

    A saved draft that is up to date with the ledger is returned as saved unless another
    `pool`, `currency` or `min_payout` is given; otherwise it is rebuilt, keeping its pool,
    currency and minimum payout unless they are given. A `currency`
    other than a saved draft's needs a `pool` in it (a rebuild); otherwise it is refused, as it
    is for a final statement: it is never silently ignored. Without either, USD.
    """
    statement = find_statement(session, period)
    if currency is not None and statement is not None:
        check_currency(statement, currency, rebuilding=pool is not None)
    if currency is None:
        currency = statement.currency if statement is not None else "USD"
    pool_amount = parse_amount(pool, currency) if pool is not None else None
    minimum = parse_amount(min_payout, currency) if min_payout is not None else None
    if statement is not None and statement.status == "final":
        label = f"statement {statement.id} for {period.label} is final with another"
        if pool_amount is not None and statement.pool_minor != to_minor(pool_amount, currency):
            raise LedgerError(f"{label} pool; it cannot change")
        if minimum is not None and statement.min_payout_minor != to_minor(minimum, currency):
            raise LedgerError(f"{label} minimum payout; it cannot change")
        return statement, False
    if (
        statement is not None
        and (pool_amount is None or to_minor(pool_amount, currency) == statement.pool_minor)
        and (minimum is None or to_minor(minimum, currency) == statement.min_payout_minor)
        and normalize_currency(currency) == statement.currency
        and draft_is_current(session, statement)
    ):
        return statement, False  # the saved draft, as it was saved
    if statement is not None and pool is None and statement.pool_minor is not None:
        currency = statement.currency
        pool_amount = from_minor(statement.pool_minor, currency)
        if statement.min_payout_minor is not None and minimum is None:
            minimum = from_minor(statement.min_payout_minor, currency)
    try:
        return build_statement(session, period, pool_amount, currency, minimum), True
    except EmptyStatementError:
        # A period without credit pays, with a pool of 0, what is carried in to it.
        if pool_amount is not None or not carried_balances(session, normalize_currency(currency)):
            raise
        return build_statement(session, period, Decimal(0), currency, minimum), True


def check_currency(statement: m.Statement, currency: str, rebuilding: bool) -> None:
    """Refuse a currency the statement would not be shown in: a final statement's is fixed,
    and a saved draft with a pool keeps its own unless it is rebuilt with a pool in the new
    one."""
    wanted = normalize_currency(currency)
    if wanted == statement.currency:
        return
    label = f"statement {statement.id} for {statement.period_label}"
    if statement.status == "final":
        raise LedgerError(f"{label} is final in {statement.currency}, not {wanted}")
    if not rebuilding and statement.pool_minor is not None:
        raise LedgerError(
            f"{label} is a draft in {statement.currency}; --currency {wanted} needs a --pool "
            f"in {wanted} to rebuild it"
        )


def statement_report(session: Session, statement_id: int, preview: bool = False) -> dict:
    """The data behind `ledger report --format json` (and every other format of it).

    Shape::

        {"statement": {id, period, period_start, period_end, status, currency, pool_minor,
                       pool, min_payout, total_value, queries, unattributed_queries,
                       created_at, finalized_at, finalized_by, final_seq, content_sha256,
                       previous_sha256,
                       runs: [{run_id, index_id[, status]}],
                       adjustments: [{id, provider, amount_minor, amount, currency, reason,
                                      corrects_statement_id, corrects_period,
                                      corrects_line_id, created_at, created_by}],
                       totals: {value, share, amount_minor, amount, carried_in_minor,
                                carried_forward_minor, adjustments_minor, payable_minor,
                                payable}},
         "lines": [{provider, value, share, amount_minor, amount, carried_in_minor,
                    carried_forward_minor, adjustments_minor, payable_minor, payable,
                    statement_id, period, currency, status}]}

    Lines are sorted by value, largest first. Money is exact: `*_minor` integers in the
    currency's minor units and decimal strings (`amount`, `payable`, `pool`); money fields are
    null for a statement without a pool. `totals.payable` is what the statement pays: amounts,
    plus carried in, less carried forward, plus adjustments. With `preview` the statement was
    built only to be shown (its transaction is rolled back): `id` and every line's
    `statement_id` are null and `status` is "preview".
    """
    summary = statement_summary(session, statement_id)
    rows = statement_rows(session, statement_id).to_dicts()
    if preview:
        summary = {**summary, "id": None, "status": PREVIEW, "created_at": None}
    stamp = {
        "statement_id": summary["id"],
        "period": summary["period"],
        "currency": summary["currency"],
        "status": summary["status"],
    }
    lines = [{**row, **stamp} for row in rows]
    summary["totals"] = _totals(rows, summary["currency"], summary["pool_minor"] is not None)
    return {"statement": summary, "lines": lines}


def _totals(rows: list[dict[str, Any]], currency: str, pooled: bool) -> dict[str, Any]:
    totals: dict[str, Any] = {
        "value": math.fsum(r["value"] for r in rows),
        "share": math.fsum(r["share"] for r in rows),
    }
    for key in MONEY_TOTALS:
        totals[key] = sum(r[key] or 0 for r in rows) if pooled else None
    totals["amount"] = format_minor(totals["amount_minor"], currency) if pooled else None
    totals["payable"] = format_minor(totals["payable_minor"], currency) if pooled else None
    return totals


def report_frame(doc: dict) -> pl.DataFrame:
    """The lines of a `statement_report` as a table for CSV, Parquet and Excel: one row per
    provider (`line` = "provider") and a last row of totals (`line` = "total", no provider),
    each carrying its statement's id, period, currency and status."""
    from ledger.statements import ROW_SCHEMA

    schema = {
        **ROW_SCHEMA,
        "statement_id": pl.Int64,
        "period": pl.String,
        "currency": pl.String,
        "status": pl.String,
        "line": pl.String,
    }
    s = doc["statement"]
    stamp = {key: s[key] for key in ("period", "currency", "status")}
    total = {**s["totals"], "provider": None, "statement_id": s["id"], **stamp, "line": "total"}
    rows = [{**line, "line": "provider"} for line in doc["lines"]] + [total]
    return pl.DataFrame(rows, schema=schema)


def write_report(doc: dict, fmt: str, out: str) -> None:
    """Write a `statement_report` as csv, parquet or xlsx to `out`."""
    frame = report_frame(doc)
    if fmt == "parquet":
        frame.write_parquet(out)
    elif fmt == "xlsx":
        frame.write_excel(out, worksheet="statement", autofit=True)
    else:
        frame.write_csv(out)


def discard_draft(session: Session, statement_id: int) -> m.Statement:
    """Delete a saved draft statement with its lines, estimates and run links; a final one is
    refused (and the database refuses it too), and so is a draft that carries adjustments
    (corrections of closed periods are kept: move them by finalising the draft)."""
    from sqlalchemy import delete

    from ledger.db import lock_ledger
    from ledger.errors import StatementFinalError

    lock_ledger(session)
    statement = get_statement(session, statement_id)
    label = f"statement {statement.id} ({statement.period_label})"
    if statement.status == "final":
        raise StatementFinalError(f"{label} is final; it can never be discarded")
    carried = session.scalar(
        select(m.Adjustment.id).where(m.Adjustment.statement_id == statement.id).limit(1)
    )
    if carried is not None:
        raise LedgerError(
            f"{label} carries adjustment {carried}; a correction of a closed period is kept, "
            "so this draft cannot be discarded"
        )
    for table in (m.StatementLine.__table__, m.StatementEstimate.__table__):
        session.execute(delete(table).where(table.c.statement_id == statement.id))
    session.execute(delete(m.statement_runs).where(m.statement_runs.c.statement_id == statement.id))
    session.expire(statement, ["lines", "runs"])
    session.delete(statement)
    session.flush()
    return statement
