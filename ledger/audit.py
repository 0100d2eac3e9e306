"""`ledger audit` and `ledger verify --statement`: re-check every invariant from the tables.

The database refuses what would break the invariants (docs/invariants.md); these checks find
what got past it anyway: an owner who disabled triggers, a restored backup, an edited copy.
Each check reads the tables directly and recomputes what a final statement sealed:

- its content hash and its link to the previous final statement (the chain);
- its content, rebuilt from its lines, adjustments, runs and provider names now;
- its values, re-summed from the current credits of its period (bit for bit, `math.fsum`);
- its journal: allocation, carry, hold-back, adjustment and payment transfers against its lines;

and across the ledger: one current result per output, credits that add up to each output's
weight, carried-forward balances that are never negative and match the statements, final pools
that never overlap, adjustments in their statement's currency, and no result recorded into a
period after its statement was finalised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger import models as m
from ledger.errors import LedgerError
from ledger.periods import Period
from ledger.registry import canonical_json
from ledger.statements import (
    account_balances,
    content_hash,
    get_statement,
    period_snapshot,
    period_values,
    provider_values,
    sealed_content,
    statement_content,
)

CREDIT_SUM_TOLERANCE = 1e-6
"""An output's credits are floats that add up to its weight: w·p_i/Σp summed in float64 is
within a few ulps of w; 1e-6 × max(1, w) is the tolerance the recorder itself enforces."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class AuditReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, problems: list[str]) -> None:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        self.checks.append(Check(name, not problems, shown))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def verify_statement(session: Session, statement_id: int) -> AuditReport:
    """Every check of one final statement (a draft has nothing sealed to check)."""
    report = AuditReport()
    statement = get_statement(session, statement_id)
    label = f"statement {statement.id} ({statement.period_label})"
    if statement.status != "final":
        report.add("statement is final", [f"{label} is a draft; nothing is sealed yet"])
        return report
    report.add("content hash", _hash_problems(statement, label))
    report.add("chain link to the previous final statement", _chain_problems(session, statement))
    report.add(
        "content equals its lines, adjustments, runs and names",
        _content_problems(session, statement, label),
    )
    report.add(
        "values equal the period's current credits", _value_problems(session, statement, label)
    )
    if statement.pool_minor is not None:
        report.add("journal matches the lines", _journal_problems(session, statement, label))
    return report


def _sealed(statement: m.Statement) -> dict[str, Any] | None:
    """A final statement's sealed content, or None when it is missing or not the document the
    ledger writes (which the hash check reports)."""
    try:
        return sealed_content(statement)
    except LedgerError:
        return None


def _hash_problems(statement: m.Statement, label: str) -> list[str]:
    if statement.content is None or statement.content_sha256 is None:
        return [f"{label} has no sealed content"]
    if content_hash(statement.content) != statement.content_sha256:
        return [f"{label}: its content does not match its sha256 (changed after finalisation)"]
    sealed = _sealed(statement)
    if sealed is None:
        return [f"{label}: its sealed content is not a statement the ledger wrote"]
    if sealed.get("previous_sha256") != statement.previous_sha256:
        return [f"{label}: the previous hash it sealed differs from the one stored"]
    return []


def _chain_problems(session: Session, statement: m.Statement) -> list[str]:
    if statement.final_seq is None:
        return [f"statement {statement.id} has no place in the chain"]
    if statement.final_seq == 1:
        return (
            []
            if statement.previous_sha256 is None
            else ["the first final statement names a predecessor"]
        )
    previous = session.scalar(
        select(m.Statement).where(m.Statement.final_seq == statement.final_seq - 1)
    )
    if previous is None:
        return [f"final statement number {statement.final_seq - 1} is missing from the chain"]
    if previous.content_sha256 != statement.previous_sha256:
        return [
            f"statement {statement.id} names {statement.previous_sha256!r} before it, but "
            f"statement {previous.id} has {previous.content_sha256!r}"
        ]
    return []


def _content_problems(session: Session, statement: m.Statement, label: str) -> list[str]:
    sealed = _sealed(statement)
    if sealed is None:
        return [f"{label} has no readable sealed content"]
    with session.no_autoflush:
        now = statement_content(session, statement)
    if "legacy" in sealed:  # sealed by the migration, with a note of when
        now["legacy"] = sealed["legacy"]
    if canonical_json(now) == statement.content:
        return []
    now = json.loads(canonical_json(now))
    changed = sorted(key for key in sealed if sealed.get(key) != now.get(key))
    return [f"{label}: its {', '.join(changed)} changed after it was finalised"]


def _value_problems(session: Session, statement: m.Statement, label: str) -> list[str]:
    sealed = _sealed(statement)
    if sealed is None:
        return [f"{label} has no readable sealed content"]
    period = Period(
        statement.period_label,
        statement.period_start.replace(tzinfo=UTC),
        statement.period_end.replace(tzinfo=UTC),
    )
    # Statements sealed by the migration are checked against the results current when they
    # were finalised: before the journal, results could still be recorded into a closed period.
    as_of = statement.finalized_at if "legacy" in sealed else None
    snapshot = period_snapshot(session, period, as_of=as_of)
    # A period attributed from a sample is re-estimated from its design (ledger.samples).
    estimated = period_values(session, period, snapshot)[0] if as_of is None else None
    if estimated is None:
        estimated = provider_values(session, snapshot.credits)
    values = {v.provider: v.value for v in estimated}
    problems = []
    for line in sealed["lines"]:
        now = values.pop(line["provider"], 0.0)
        if now != line["value"]:
            problems.append(
                f"{label}: {line['provider']} value {line['value']!r} sealed, {now!r} now"
            )
    for name, value in sorted(values.items()):
        problems.append(f"{label}: {name} has value {value!r} now but no line")
    runs = sorted(r["run_id"] for r in sealed["runs"])
    if runs != snapshot.runs:
        problems.append(f"{label}: rests on runs {runs} sealed, {snapshot.runs} now")
    head = sealed["statement"]
    if snapshot.query_count != head["queries"]:
        problems.append(f"{label}: {head['queries']} outputs sealed, {snapshot.query_count} now")
    return problems


def _journal_problems(session: Session, statement: m.Statement, label: str) -> list[str]:
    # Every transfer of a statement moves money into or out of a provider's payable account:
    # signed by that direction, each kind must equal what the sealed line says.
    t = m.Transfer.__table__
    booked: dict[tuple[str, int], int] = {}
    for kind, debit, credit, pid, minor in session.execute(
        select(
            t.c.kind, t.c.debit_account, t.c.credit_account, t.c.provider_id, t.c.amount_minor
        ).where(t.c.statement_id == statement.id)
    ):
        sign = 1 if credit == "payable" else -1 if debit == "payable" else 0
        booked[(kind, pid)] = booked.get((kind, pid), 0) + sign * minor
    names = dict(session.execute(select(m.Provider.name, m.Provider.id)).all())
    expected: dict[tuple[str, int], int] = {}
    sealed = _sealed(statement)
    if sealed is None:
        return [f"{label} has no readable sealed content"]
    for line in sealed["lines"]:
        pid = names.get(line["provider"])
        if pid is None:
            return [f"{label}: provider {line['provider']!r} is no longer in the ledger"]
        for kind, minor in (
            ("allocation", line["amount_minor"] or 0),
            ("carry_in", line["carried_in_minor"]),
            ("holdback", -line["carried_forward_minor"]),
            ("adjustment", line["adjustments_minor"] or 0),
            ("payment", -(line["payable_minor"] or 0)),
        ):
            if minor:
                expected[(kind, pid)] = expected.get((kind, pid), 0) + minor
    problems = []
    for key in sorted(set(expected) | set(booked)):
        if expected.get(key, 0) != booked.get(key, 0):
            kind, pid = key
            problems.append(
                f"{label}: {kind} of provider {pid} is {expected.get(key, 0)} on the statement "
                f"but {booked.get(key, 0)} in the journal"
            )
    allocated = sum(v for (kind, _), v in booked.items() if kind == "allocation")
    if allocated != statement.pool_minor:
        problems.append(f"{label}: {allocated} allocated from a pool of {statement.pool_minor}")
    return problems


def audit_ledger(session: Session) -> AuditReport:
    """Every invariant of the ledger; `report.ok` is false on any breach."""
    report = AuditReport()
    r, q, c = m.QueryResult.__table__, m.Query.__table__, m.Credit.__table__
    doubled = session.execute(
        select(r.c.query_id, func.count())
        .where(r.c.is_current)
        .group_by(r.c.query_id)
        .having(func.count() > 1)
    ).all()
    report.add(
        "one current result per output",
        [f"output {qid} has {n} current results" for qid, n in doubled],
    )
    problems = []
    rows = session.execute(
        select(q.c.external_id, q.c.weight_micros, func.sum(c.c.credit), r.c.unattributed)
        .select_from(
            r.join(q, q.c.id == r.c.query_id).outerjoin(
                c, (c.c.run_id == r.c.run_id) & (c.c.query_id == r.c.query_id)
            )
        )
        .where(r.c.is_current)
        .group_by(q.c.external_id, q.c.weight_micros, r.c.unattributed)
    )
    for ext, micros, total, unattributed in rows:
        weight = micros / 1e6
        total = float(total or 0.0)
        if unattributed:
            if total:
                problems.append(f"output {ext!r} is unattributed but has credits")
        elif abs(total - weight) > CREDIT_SUM_TOLERANCE * max(1.0, weight):
            problems.append(f"output {ext!r}: credits add up to {total!r}, weight {weight}")
    report.add("each output's credits add up to its weight", problems)

    finals = list(
        session.scalars(
            select(m.Statement).where(m.Statement.status == "final").order_by(m.Statement.final_seq)
        )
    )
    seqs = [s.final_seq for s in finals]
    report.add(
        "final statements form one chain",
        [] if seqs == list(range(1, len(finals) + 1)) else [f"finalisation numbers {seqs}"],
    )
    for statement in finals:
        for check in verify_statement(session, statement.id).checks:
            report.checks.append(
                Check(f"statement {statement.id}: {check.name}", check.ok, check.detail)
            )

    carried: dict[tuple[int, str], int] = {}
    names = dict(session.execute(select(m.Provider.name, m.Provider.id)).all())
    for statement in finals:
        for line in (_sealed(statement) or {"lines": []})["lines"]:
            key = (names.get(line["provider"], -1), statement.currency)
            carried[key] = (
                carried.get(key, 0) + line["carried_forward_minor"] - line["carried_in_minor"]
            )
    balances = account_balances(session, "carry")
    problems = [
        f"provider {pid} {cur}: carry balance {balances.get((pid, cur), 0)}, statements carry "
        f"{carried.get((pid, cur), 0)}"
        for pid, cur in sorted(set(carried) | set(balances))
        if balances.get((pid, cur), 0) != carried.get((pid, cur), 0)
    ]
    problems += [
        f"provider {pid} {cur}: carried-forward balance {v} is negative (paid twice)"
        for (pid, cur), v in sorted(balances.items())
        if v < 0
    ]
    report.add("carried-forward money is paid once", problems)
    payable = account_balances(session, "payable")
    report.add(
        "every closed payable is settled",
        [
            f"provider {pid} {cur}: payable balance {v}"
            for (pid, cur), v in sorted(payable.items())
            if v
        ],
    )

    pooled = [s for s in finals if s.pool_minor is not None]
    problems = [
        f"statements {a.id} ({a.period_label}) and {b.id} ({b.period_label}) both pay for the same time"
        for i, a in enumerate(pooled)
        for b in pooled[i + 1 :]
        if a.period_start < b.period_end and b.period_start < a.period_end
    ]
    report.add("final pools never overlap", problems)

    a, s = m.Adjustment.__table__, m.Statement.__table__
    wrong = session.execute(
        select(a.c.id, a.c.currency, s.c.currency)
        .join(s, s.c.id == a.c.statement_id)
        .where(a.c.currency != s.c.currency)
    ).all()
    report.add(
        "adjustments are in their statement's currency",
        [f"adjustment {aid} in {ac} on a statement in {sc}" for aid, ac, sc in wrong],
    )

    problems = []
    for statement in finals:
        sealed = _sealed(statement) or {}
        since = statement.finalized_at
        if "legacy" in sealed:
            since = max(since, datetime.fromisoformat(sealed["legacy"]["sealed_at"]))
        late = session.scalar(
            select(func.count())
            .select_from(r.join(q, q.c.id == r.c.query_id))
            .where(
                q.c.served_at >= statement.period_start,
                q.c.served_at < statement.period_end,
                r.c.recorded_at > since,
            )
        )
        if late:
            problems.append(
                f"statement {statement.id} ({statement.period_label}): {late} results recorded "
                "after it was finalised"
            )
    report.add("no credits recorded into a closed period", problems)
    return report
