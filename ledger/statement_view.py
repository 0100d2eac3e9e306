"""What the HTML statement and the web view show, read from the ledger without writing to it.

A statement's lines and head come from `statement_rows` and `statement_summary`, the functions
behind `ledger report --format json`, so a page shows the numbers the report prints. Around them:
each provider's values on the earlier statements of the same kind of period (the trend), the
outputs that earned each provider most in the period, and the runs (with their manifests) the
statement rests on. A provider's own view (`provider=`) keeps that provider's rows only and the
pool total: no other provider's name, line, output credit, example or adjustment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger import models as m
from ledger.errors import NotFoundError
from ledger.recording import micros_to_weight
from ledger.registry import get_provider
from ledger.statements import get_statement, list_statements, statement_rows, statement_summary

PREVIEW = "preview"
"""The status of a statement built only to be shown (as `ledger report` names it)."""
TOP_OUTPUTS = 5
"""Outputs listed per provider on a statement: those that earned the provider most credit."""

_GRANULARITY = (
    ("year", re.compile(r"^[0-9]{4}$")),
    ("half", re.compile(r"^[0-9]{4}-H[12]$")),
    ("quarter", re.compile(r"^[0-9]{4}-Q[1-4]$")),
    ("month", re.compile(r"^[0-9]{4}-[0-9]{2}$")),
)


def granularity(label: str) -> str:
    """year, half, quarter, month, or range (explicit dates): what periods a trend compares."""
    for name, pattern in _GRANULARITY:
        if pattern.match(label):
            return name
    return "range"


@dataclass
class StatementView:
    """Everything one statement's page or file shows."""

    summary: dict[str, Any]
    lines: list[dict[str, Any]]
    trend: list[dict[str, Any]]
    """One row per (earlier or this) statement and provider: period, value, share, amount."""
    top_outputs: dict[str, list[dict[str, Any]]]
    """Provider name → its outputs in the period with the largest credit, largest first."""
    runs: list[dict[str, Any]]
    provider: str | None = None
    """Set for one provider's own statement."""
    provider_ids: dict[str, int] = field(default_factory=dict)
    total_amount_minor: int | None = None
    total_payable_minor: int | None = None


def provider_by_id(session: Session, provider_id: int) -> m.Provider:
    """The provider with this id; `NotFoundError` otherwise."""
    provider = session.get(m.Provider, provider_id)
    if provider is None:
        raise NotFoundError(f"unknown provider {provider_id}")
    return provider


def statement_view(
    session: Session, statement_id: int, provider: str | None = None, preview: bool = False
) -> StatementView:
    """The statement with its trend, top outputs and runs; one provider's part if `provider`.
    With `preview` the statement was built only to be shown (`ledger report` without --save):
    it has no id and its status is "preview", as in the report's JSON.

    Raises `NotFoundError` for an unknown statement, or a provider without a line on it.
    """
    summary = statement_summary(session, statement_id)
    if preview:
        summary = {**summary, "id": None, "status": PREVIEW, "created_at": None}
    lines = statement_rows(session, statement_id).to_dicts()
    names = [line["provider"] for line in lines]
    ids = _provider_ids(session, names)
    total_amount = _sum_minor(lines, "amount_minor")
    total_payable = _sum_minor(lines, "payable_minor")
    if provider is not None:
        get_provider(session, provider)  # an unknown name is told apart from one without a line
        lines = [line for line in lines if line["provider"] == provider]
        if not lines:
            raise NotFoundError(
                f"provider {provider!r} has no line on statement {statement_id} "
                f"({summary['period']})"
            )
        names = [provider]
        summary = {
            **summary,
            "adjustments": [a for a in summary["adjustments"] if a["provider"] == provider],
        }
    trend = statement_trend(session, statement_id, names, summary["status"])
    top = top_outputs(session, statement_id, [ids[n] for n in names if n in ids])
    runs = [run_details(session, r["run_id"], with_index=provider is None) for r in summary["runs"]]
    return StatementView(
        summary=summary,
        lines=lines,
        trend=trend,
        top_outputs={n: top.get(ids.get(n, -1), []) for n in names},
        runs=runs,
        provider=provider,
        provider_ids={n: ids[n] for n in names if n in ids},
        total_amount_minor=total_amount,
        total_payable_minor=total_payable,
    )


def _sum_minor(lines: list[dict[str, Any]], key: str) -> int | None:
    values = [line[key] for line in lines if line[key] is not None]
    return sum(values) if values else None


def _provider_ids(session: Session, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    return {
        name: pid
        for pid, name in session.execute(
            select(m.Provider.id, m.Provider.name).where(m.Provider.name.in_(names))
        )
    }


def statement_trend(
    session: Session, statement_id: int, providers: list[str], status: str | None = None
) -> list[dict[str, Any]]:
    """`providers`' lines on this statement and every earlier one of the same kind of period
    (quarters with quarters, months with months), oldest first; a provider without a line on
    an earlier statement is left out of that period. `status`: this statement's, as shown."""
    this = get_statement(session, statement_id)
    kind = granularity(this.period_label)
    wanted = set(providers)
    rows: list[dict[str, Any]] = []
    for s in list_statements(session):
        if s.period_start > this.period_start or granularity(s.period_label) != kind:
            continue
        for line in statement_rows(session, s.id).to_dicts():
            if line["provider"] in wanted:
                row = _trend_row(s, line)
                if s.id == statement_id and status is not None:
                    row["status"] = status
                    row["statement_id"] = None if status == PREVIEW else s.id
                rows.append(row)
    return rows


def _trend_row(s: m.Statement, line: dict[str, Any]) -> dict[str, Any]:
    return {
        "statement_id": s.id,
        "period": s.period_label,
        "period_start": s.period_start,
        "status": s.status,
        "currency": s.currency,
        "provider": line["provider"],
        "value": line["value"],
        "share": line["share"],
        "amount": line["amount"],
        "payable": line["payable"],
    }


def provider_history(session: Session, provider_id: int) -> list[dict[str, Any]]:
    """The provider's line on every statement, oldest period first."""
    provider = provider_by_id(session, provider_id)
    rows = []
    for s in list_statements(session):
        for line in statement_rows(session, s.id).to_dicts():
            if line["provider"] == provider.name:
                rows.append(_trend_row(s, line))
    return rows


def top_outputs(
    session: Session, statement_id: int, provider_ids: list[int], limit: int = TOP_OUTPUTS
) -> dict[int, list[dict[str, Any]]]:
    """Per provider id: the outputs served in the statement's period, with current results
    from the runs the statement rests on, that earned the provider the most credit (ties by
    output id)."""
    s = get_statement(session, statement_id)
    run_ids = [r["run_id"] for r in statement_summary(session, statement_id)["runs"]]
    if not provider_ids or not run_ids:
        return {}
    c, r, q = m.Credit, m.QueryResult, m.Query
    ranked = (
        select(
            c.provider_id,
            q.id.label("query_id"),
            q.external_id,
            q.served_at,
            q.weight_micros,
            c.credit,
            c.run_id,
            func.row_number()
            .over(partition_by=c.provider_id, order_by=(c.credit.desc(), q.external_id))
            .label("rank"),
        )
        .join(r, (r.run_id == c.run_id) & (r.query_id == c.query_id))
        .join(q, q.id == c.query_id)
        .where(
            r.is_current,
            c.run_id.in_(run_ids),
            c.provider_id.in_(provider_ids),
            q.served_at >= s.period_start,
            q.served_at < s.period_end,
        )
        .subquery()
    )
    out: dict[int, list[dict[str, Any]]] = {}
    for row in session.execute(
        select(ranked).where(ranked.c.rank <= limit).order_by(ranked.c.provider_id, ranked.c.rank)
    ).mappings():
        out.setdefault(row["provider_id"], []).append(
            {
                "query_id": row["query_id"],
                "output": row["external_id"],
                "served_at": row["served_at"],
                "weight": str(micros_to_weight(row["weight_micros"])),
                "credit": row["credit"],
                "run_id": row["run_id"],
            }
        )
    return out


def run_details(session: Session, run_id: str, with_index: bool = True) -> dict[str, Any]:
    """A run's status, times and manifest, and (`with_index`) its index's path and manifest,
    which lists every shard's provider."""
    run = session.get(m.AttributionRun, run_id)
    if run is None:
        raise NotFoundError(f"unknown run {run_id!r}")
    manifest = json.loads(run.manifest)
    details: dict[str, Any] = {
        "run_id": run.id,
        "index_id": run.index_id,
        "status": run.status,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "queries_file": (manifest.get("queries_file") or {}).get("name"),
        "manifest": manifest,
    }
    if with_index:
        details["index_path"] = run.index.path
        details["index_manifest"] = json.loads(run.index.manifest)
    return details


def list_run_rows(session: Session) -> list[dict[str, Any]]:
    """Every attribution run, oldest first, with its output count."""
    counts = dict(
        session.execute(
            select(m.QueryResult.run_id, func.count()).group_by(m.QueryResult.run_id)
        ).all()
    )
    rows = []
    for run in session.scalars(
        select(m.AttributionRun).order_by(m.AttributionRun.started_at, m.AttributionRun.id)
    ):
        manifest = json.loads(run.manifest)
        rows.append(
            {
                "run_id": run.id,
                "index_id": run.index_id,
                "status": run.status,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "outputs": counts.get(run.id, 0),
                "queries_file": (manifest.get("queries_file") or {}).get("name"),
            }
        )
    return rows


def provider_rows(session: Session) -> list[dict[str, Any]]:
    """Every provider with the number of statements it has a line on."""
    lines = dict(
        session.execute(
            select(m.StatementLine.provider_id, func.count()).group_by(m.StatementLine.provider_id)
        ).all()
    )
    return [
        {"id": p.id, "provider": p.name, "statements": lines.get(p.id, 0)}
        for p in session.scalars(select(m.Provider).order_by(m.Provider.name))
    ]


def output_by_id(session: Session, query_id: int) -> str:
    """The external id of the output with this ledger id; `NotFoundError` otherwise."""
    query = session.get(m.Query, query_id)
    if query is None:
        raise NotFoundError(f"unknown output {query_id}")
    return query.external_id


def as_text(value: Any) -> str:
    """A cell's text: ISO-like times, nothing for None."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)
