"""Statements of a period attributed from a probability sample (ledger.samples), on SQLite and
PostgreSQL: Horvitz-Thompson values and ratio shares written out by hand, the pool allocated
exactly on them, 95% half-widths kept and sealed, the audit clean, and mixed or incomplete
periods refused."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from attribution.data import read_queries
from attribution.types import InputError
from ledger.audit import audit_ledger
from ledger.db import session_scope
from ledger.errors import ConflictError
from ledger.periods import parse_period
from ledger.recording import finish_run, record_results, start_run
from ledger.samples import SamplePlan, draw_from_file, record_design
from ledger.sampling import Z95
from ledger.statements import build_statement, finalize_statement, statement_rows, statement_summary
from tests.ledger.helpers import record_run, result, setup_index, sha

PROVIDERS = ["alpha", "beta", "gamma"]


def _outputs(tmp_path: Path, n: int = 300) -> Path:
    rng = np.random.default_rng(11)
    start = datetime(2024, 7, 1, tzinfo=UTC)
    path = tmp_path / "log.jsonl"
    with path.open("w") as f:
        for i in range(n):
            served = start + timedelta(hours=int(rng.integers(0, 24 * 91)))
            f.write(
                json.dumps(
                    {
                        "id": f"q{i}",
                        "timestamp": served.isoformat(),
                        "prompt": "p",
                        "completion": f"c{i}",
                        "revenue": f"{rng.uniform(0.5, 4):.2f}",
                    }
                )
                + "\n"
            )
    return path


def _positive(i: int) -> dict[str, float]:
    """Known influence sums per provider (output 7k unattributed)."""
    if i % 7 == 0:
        return {}
    return {"alpha": 1 + i % 3, "beta": 1 + i % 5, "gamma": 0.5 + (i % 4) / 2}


def _sampled_run(engine: Engine, path: Path, plan: SamplePlan, label: str, keep=None):
    queries = read_queries(path)
    drawn = draw_from_file(str(path), queries, plan)
    by_id = {q.id: q for q in queries}
    chosen = [by_id[ext] for ext in drawn.ids if keep is None or keep(ext)]
    results = [
        result(q.id, q.timestamp.replace(tzinfo=None), _positive(int(q.id[1:])), q.weight)
        for q in chosen
    ]
    with session_scope(engine) as session:
        index_id = setup_index(session, PROVIDERS)
        run_id = sha("run:" + label)
        start_run(session, run_id, index_id, {"run": label, "sample": drawn.id})
        record_design(session, run_id, drawn)
        record_results(session, run_id, results)
        finish_run(session, run_id)
    return drawn, queries


def _by_hand(drawn, queries, start: datetime, end: datetime) -> tuple[dict, dict, dict]:
    """HT values Σ y/π, ratio shares and the Hájek variance, written out independently."""
    by_id = {q.id: q for q in queries}
    draw = drawn.draw
    units = []
    for ext, i in zip(drawn.ids, draw.indices, strict=True):
        q = by_id[ext]
        pos = _positive(int(ext[1:]))
        total = sum(pos.values())
        inside = start <= q.timestamp.replace(tzinfo=None) < end
        y = {
            p: float(q.weight) * pos.get(p, 0) / total if total and inside else 0.0
            for p in PROVIDERS
        }
        units.append((int(draw.stratum_of[i]), float(draw.probability[i]), y))
    values = {p: math.fsum(y[p] / pi for _, pi, y in units) for p in PROVIDERS}
    whole = math.fsum(values.values())
    shares = {p: values[p] / whole for p in PROVIDERS}
    variance = {}
    for p in PROVIDERS:
        v = 0.0
        for h in {s for s, _, _ in units}:
            rows = [
                (pi, (y[p] - shares[p] * sum(y.values())) / whole)
                for s, pi, y in units
                if s == h and pi < 1
            ]
            if len(rows) < 2:
                continue
            c = [1 - pi for pi, _ in rows]
            e = [z / pi for pi, z in rows]
            b = sum(ci * ei for ci, ei in zip(c, e, strict=True)) / sum(c)
            v += (
                len(rows)
                / (len(rows) - 1)
                * sum(ci * (ei - b) ** 2 for ci, ei in zip(c, e, strict=True))
            )
        variance[p] = v
    return values, shares, variance


@pytest.mark.parametrize("period_label", ["2024-Q3", "2024-08"])
def test_a_sampled_period_is_estimated_allocated_exactly_and_audits_clean(
    engine: Engine, tmp_path: Path, period_label: str
) -> None:
    path = _outputs(tmp_path)
    plan = SamplePlan(seed=5, sample=60, size_field="revenue", strata_field="month")
    drawn, queries = _sampled_run(engine, path, plan, "sampled")
    period = parse_period(period_label)
    start, end = period.start.replace(tzinfo=None), period.end.replace(tzinfo=None)
    values, shares, variance = _by_hand(drawn, queries, start, end)
    with session_scope(engine) as session:
        statement = build_statement(session, period, Decimal("1000.00"), "USD")
        sid = statement.id
        rows = {r["provider"]: r for r in statement_rows(session, sid).to_dicts()}
        summary = statement_summary(session, sid)
    for p in PROVIDERS:
        # The statement's value is an fsum of y/π like ours: equal to the last bit or two.
        assert math.isclose(rows[p]["value"], values[p], rel_tol=1e-14)
        assert math.isclose(rows[p]["share"], shares[p], rel_tol=1e-12)
        assert math.isclose(rows[p]["share_half_width"], Z95 * math.sqrt(variance[p]), rel_tol=1e-9)
    assert sum(r["amount_minor"] for r in rows.values()) == 100000
    assert summary["sample"]["designs"] == [drawn.id]
    in_period = [
        i for i, ext in zip(drawn.draw.indices, drawn.ids, strict=True)
        if start <= next(q for q in queries if q.id == ext).timestamp.replace(tzinfo=None) < end
    ]  # fmt: skip
    assert summary["sample"]["sampled_outputs"] == len(in_period)
    with session_scope(engine) as session:
        finalize_statement(session, sid)
    with session_scope(engine) as session:
        assert audit_ledger(session).ok, audit_ledger(session).as_dict()
        sealed = {r["provider"]: r for r in statement_rows(session, sid).to_dicts()}
        assert sealed == rows
    with pytest.raises(Exception, match="final"), engine.begin() as conn:
        conn.execute(text("UPDATE statement_estimates SET share_half_width = 0"))


def test_the_recorded_sample_is_append_only(engine: Engine, tmp_path: Path) -> None:
    _sampled_run(engine, _outputs(tmp_path), SamplePlan(seed=1, sample=20), "s")
    for sql in (
        "UPDATE sample_units SET inclusion_probability = 1",
        "DELETE FROM sample_strata",
        "UPDATE sample_designs SET seed = 2",
    ):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text(sql))


def test_a_period_mixing_full_and_sampled_outputs_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    _sampled_run(engine, _outputs(tmp_path), SamplePlan(seed=2, sample=30), "sampled")
    with session_scope(engine) as session:
        index_id = setup_index(session, PROVIDERS)
        record_run(session, index_id, "full", [result("other", datetime(2024, 8, 1), {"beta": 1})])
    with pytest.raises(ConflictError, match="mixes outputs attributed in full"):
        with session_scope(engine) as session:
            build_statement(session, parse_period("2024-Q3"), None)


def test_a_sample_with_outputs_not_yet_attributed_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    _sampled_run(
        engine, _outputs(tmp_path), SamplePlan(seed=3, sample=30), "partial",
        keep=lambda ext: int(ext[1:]) % 3 != 0,
    )  # fmt: skip
    with pytest.raises(ConflictError, match="no current result from their sample's run"):
        with session_scope(engine) as session:
            build_statement(session, parse_period("2024-Q3"), None)


def test_a_sample_rate_takes_that_fraction_of_the_outputs_rounded_up(tmp_path: Path) -> None:
    path = _outputs(tmp_path, 30)
    queries = read_queries(path)
    assert len(draw_from_file(str(path), queries, SamplePlan(seed=1, rate=0.1)).ids) == 3
    assert len(draw_from_file(str(path), queries, SamplePlan(seed=1, rate=0.15)).ids) == 5


def test_an_output_of_size_zero_that_carries_credit_is_refused_with_its_line(
    tmp_path: Path,
) -> None:
    path = _outputs(tmp_path, 5)
    lines = path.read_text().splitlines()
    row = json.loads(lines[3])
    lines[3] = json.dumps({**row, "cost": 0})
    path.write_text("\n".join(json.dumps({**json.loads(x), "cost": 1}) for x in lines[:3])
                    + "\n" + lines[3] + "\n" + "\n".join(
                        json.dumps({**json.loads(x), "cost": 2}) for x in lines[4:]) + "\n")  # fmt: skip
    with pytest.raises(InputError, match=r"line 4.*cost.*could never be drawn"):
        draw_from_file(
            str(path), read_queries(path), SamplePlan(seed=1, sample=2, size_field="cost")
        )
