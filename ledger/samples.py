"""Sampled attribution runs in the ledger: drawing a run's sample from its queries file,
recording the design, estimating a sampled period's shares, re-drawing a sample to verify it,
and planning a sample's size from a pilot. The mathematics is in `ledger.sampling`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from attribution.manifest import canonical_json, package_versions
from attribution.types import InputError
from ledger import models as m
from ledger.errors import ConflictError, LedgerError
from ledger.periods import Period
from ledger.recording import to_utc_naive, weight_to_micros
from ledger.sampling import Draw, draw_sample, estimate_shares

if TYPE_CHECKING:
    from attribution.data import Query

TIME_STRATA = {"month": "%Y-%m", "day": "%Y-%m-%d", "year": "%Y"}
"""`--strata` names that mean the output's served time (UTC), not a field of the file."""
METHOD = "stratified randomised systematic PPS (Hartley-Rao), numpy default_rng(seed)"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class SamplePlan:
    """What `ledger attribute --sample/--sample-rate` asks for."""

    seed: int
    sample: int | None = None
    """Outputs to attribute (exactly this many)."""
    rate: float | None = None
    """Or a fraction of the file's outputs (rounded up)."""
    size_field: str | None = None
    """Field whose value is each output's size (PPS); None: every output equally likely."""
    strata_field: str | None = None


@dataclass(frozen=True)
class DrawnSample:
    """A plan drawn on a queries file: the draw, and the design document the ledger keeps."""

    draw: Draw
    document: dict[str, Any]
    ids: list[str]
    lines: list[int]
    served: list[datetime]
    strata: list[dict[str, Any]]

    @property
    def id(self) -> str:
        return design_id(self.document)


def design_id(document: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def _size(path: str, line: int, obj: dict, name: str) -> Decimal:
    value = obj.get(name)
    if value is None:
        raise InputError(path, line, name, "missing (it is the sample's size field)")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InputError(path, line, name, f"expected a number, got {type(value).__name__}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise InputError(path, line, name, f"not a number: {value!r}") from exc
    if not number.is_finite() or number < 0:
        raise InputError(path, line, name, f"must be a finite number ≥ 0, got {value!r}")
    return number


def _stratum(path: str, line: int, obj: dict, name: str, query: Query) -> str:
    if name in TIME_STRATA:
        return query.timestamp.strftime(TIME_STRATA[name])
    value = obj.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, str | int):
        raise InputError(path, line, name, "missing or not a string (it is the sample's strata)")
    text = str(value)
    if not text or len(text) > 200:
        raise InputError(path, line, name, "a stratum is 1 to 200 characters")
    return text


def draw_from_file(path: str, queries: list[Query], plan: SamplePlan) -> DrawnSample:
    """Read sizes and strata from every line of `path` (whose parsed `queries` are given, in
    file order), then draw the plan's sample. Bad input: `InputError` naming line and field."""
    from attribution.data import read_jsonl, sha256_file

    sizes: list[Decimal] = []
    strata: list[str] = []
    lines: list[int] = []
    for (line, obj), query in zip(read_jsonl(path), queries, strict=True):
        size = Decimal(1) if plan.size_field is None else _size(path, line, obj, plan.size_field)
        if size == 0 and query.weight != 0:
            raise InputError(
                path, line, plan.size_field,
                f"0 for an output of weight {query.weight}: it could never be drawn, but it "
                "carries credit",
            )  # fmt: skip
        sizes.append(size)
        strata.append("all" if plan.strata_field is None else _stratum(
            path, line, obj, plan.strata_field, query
        ))  # fmt: skip
        lines.append(line)
    population = len(queries)
    # The rate as the decimal it was written as: 0.1 × 30 is 3, not 3.0000000000000004 → 4.
    rate = Decimal(str(plan.rate or 0))
    n = plan.sample if plan.sample is not None else math.ceil(rate * population)
    drawable = sum(1 for s in sizes if s > 0)
    if n < 1 or n > drawable:
        raise InputError(
            path, None, None,
            f"a sample of {n} cannot be drawn from {drawable} outputs of positive size",
        )  # fmt: skip
    try:
        draw = draw_sample(np.array([float(s) for s in sizes]), strata, n, plan.seed)
    except ValueError as exc:
        raise InputError(path, None, None, str(exc)) from exc
    strata_rows = []
    for h, label in enumerate(draw.strata):
        members = np.flatnonzero(draw.stratum_of == h)
        strata_rows.append(
            {
                "stratum": label,
                "population_count": int(len(members)),
                "size_total": str(sum((sizes[i] for i in members), Decimal(0))),
                "weight_micros_total": sum(
                    weight_to_micros(queries[i].weight, queries[i].id) for i in members
                ),
                "sample_count": draw.allocation[h],
                "certainty_count": int((draw.probability[members] >= 1.0).sum()),
            }
        )
    taken = draw.indices
    document = {
        "method": METHOD,
        "design": "pps" if plan.size_field else "uniform",
        "seed": plan.seed,
        "requested": {"sample": plan.sample} if plan.sample is not None else {"rate": plan.rate},
        "sample_count": int(len(taken)),
        "size_field": plan.size_field,
        "strata_field": plan.strata_field,
        "queries_file": {"sha256": sha256_file(path)},
        "population_count": population,
        "strata": strata_rows,
        "numpy": package_versions().get("numpy"),
        "units": {queries[i].id: float(draw.probability[i]) for i in taken},
    }
    return DrawnSample(
        draw,
        document,
        [queries[i].id for i in taken],
        [lines[i] for i in taken],
        [to_utc_naive(queries[i].timestamp) for i in taken],
        strata_rows,
    )


def record_design(session: Session, run_id: str, drawn: DrawnSample) -> None:
    """Record the design, its strata and its sampled outputs (once: a resumed run finds them)."""
    did = drawn.id
    if session.get(m.SampleDesign, did) is not None:
        return
    doc = drawn.document
    session.execute(
        insert(m.SampleDesign.__table__),
        [
            {
                "id": did,
                "run_id": run_id,
                "queries_sha256": doc["queries_file"]["sha256"],
                "method": doc["design"],
                "seed": doc["seed"],
                "size_field": doc["size_field"],
                "strata_field": doc["strata_field"],
                "population_count": doc["population_count"],
                "sample_count": doc["sample_count"],
                "document": canonical_json(doc),
                "created_at": m.utcnow(),
            }
        ],
    )
    session.execute(
        insert(m.SampleStratum.__table__), [{"design_id": did, **row} for row in drawn.strata]
    )
    draw = drawn.draw
    taken = draw.indices
    session.execute(
        insert(m.SampleUnit.__table__),
        [
            {
                "design_id": did,
                "external_id": ext,
                "line": line,
                "served_at": served,
                "stratum": draw.strata[int(draw.stratum_of[i])],
                "inclusion_probability": float(draw.probability[i]),
            }
            for ext, line, served, i in zip(
                drawn.ids, drawn.lines, drawn.served, taken, strict=True
            )
        ],
    )


def plan_of(document: dict[str, Any]) -> SamplePlan:
    """The plan a recorded design was drawn from."""
    requested = document["requested"]
    return SamplePlan(
        seed=int(document["seed"]),
        sample=requested.get("sample"),
        rate=requested.get("rate"),
        size_field=document["size_field"],
        strata_field=document["strata_field"],
    )


def redraw_problems(
    session: Session, run_id: str, path: str, queries: list[Query]
) -> list[str] | None:
    """Re-draw a sampled run's sample from its file and seed; the problems found (none: the
    same outputs, strata and inclusion probabilities as recorded). None for a run that
    attributed every output of its file."""
    design = session.scalar(select(m.SampleDesign).where(m.SampleDesign.run_id == run_id))
    if design is None:
        return None
    recorded_doc = json.loads(design.document)
    problems = []
    if design_id(recorded_doc) != design.id:
        problems.append(f"sample design {design.id[:16]}: its document does not match its id")
    fresh = draw_from_file(path, queries, plan_of(recorded_doc))
    # numpy's version is recorded for the auditor; a newer one that draws the same is fine.
    changed = sorted(
        k for k in recorded_doc if k != "numpy" and recorded_doc[k] != fresh.document.get(k)
    )
    if changed:
        problems.append(
            f"re-drawn sample differs from the recorded design in: {changed} (numpy "
            f"{recorded_doc.get('numpy')} recorded, {fresh.document.get('numpy')} here)"
        )
    units = {
        ext: (stratum, pi)
        for ext, stratum, pi in session.execute(
            select(
                m.SampleUnit.external_id, m.SampleUnit.stratum, m.SampleUnit.inclusion_probability
            ).where(m.SampleUnit.design_id == design.id)
        )
    }
    draw = fresh.draw
    redrawn = {
        ext: (draw.strata[int(draw.stratum_of[i])], float(draw.probability[i]))
        for ext, i in zip(fresh.ids, draw.indices, strict=True)
    }
    if units != redrawn:
        missing, extra = sorted(units.keys() - redrawn), sorted(redrawn.keys() - units)
        problems.append(
            f"re-drawn sample differs from the recorded outputs ({len(missing)} recorded not "
            f"re-drawn, {len(extra)} re-drawn not recorded, "
            f"{sum(units[k] != redrawn[k] for k in units.keys() & redrawn.keys())} with "
            "another stratum or probability)"
        )
    attributed = set(
        session.scalars(
            select(m.Query.external_id)
            .join(m.QueryResult, m.QueryResult.query_id == m.Query.id)
            .where(m.QueryResult.run_id == run_id)
        )
    )
    if attributed - units.keys():
        problems.append(f"{len(attributed - units.keys())} output(s) attributed outside the sample")
    return problems


@dataclass(frozen=True)
class PeriodEstimate:
    """A sampled period's estimate: per provider id, the HT value, share and 95% half-width."""

    values: dict[int, float]
    shares: dict[int, float]
    half_widths: dict[int, float]
    total: float


def estimate_period(
    session: Session, period: Period, credits: Any, runs: list[str]
) -> PeriodEstimate | None:
    """Estimate `period` from the designs of its sampled runs; None when no run is sampled.

    `credits`: the period snapshot's frame (query_id, provider_id, credit) of current credits;
    `runs`: the runs those results come from. Refuses (`ConflictError`) a period that mixes
    runs attributed in full with sampled ones, or whose sampled outputs lack a current result
    from their own run (unfinished, or re-attributed by another run)."""
    designs = dict(
        session.execute(
            select(m.SampleDesign.run_id, m.SampleDesign.id).where(m.SampleDesign.run_id.in_(runs))
        ).all()
    )
    if not designs:
        return None
    full = [r for r in runs if r not in designs]
    if full:
        raise ConflictError(
            f"{period.label} mixes outputs attributed in full (run {full[0][:16]}"
            f"{' and others' if len(full) > 1 else ''}) with a sample (run "
            f"{sorted(designs)[0][:16]}); a statement rests on one or the other: give the "
            "period's outputs to one sampled run, or attribute them all"
        )
    start, end = to_utc_naive(period.start), to_utc_naive(period.end)
    u, q, r = m.SampleUnit.__table__, m.Query.__table__, m.QueryResult.__table__
    rows = session.execute(
        select(
            u.c.design_id, u.c.stratum, u.c.external_id, u.c.inclusion_probability,
            u.c.served_at, q.c.id, r.c.run_id,
        )
        .select_from(
            u.outerjoin(q, q.c.external_id == u.c.external_id).outerjoin(
                r, (r.c.query_id == q.c.id) & r.c.is_current
            )
        )
        .where(u.c.design_id.in_(list(designs.values())))
        .order_by(u.c.design_id, u.c.external_id)
    ).all()  # fmt: skip
    run_of = {did: run for run, did in designs.items()}
    missing = [
        ext for did, _, ext, _, served, _, run in rows
        if start <= served < end and run != run_of[did]
    ]  # fmt: skip
    if missing:
        raise ConflictError(
            f"{period.label}: {len(missing)} sampled output(s) (first {missing[0]!r}) have no "
            "current result from their sample's run: resume it with `ledger attribute`; an "
            "output re-attributed by another run leaves its sample incomplete"
        )
    strata = {key: h for h, key in enumerate(sorted({(row[0], row[1]) for row in rows}))}
    index = {row[5]: i for i, row in enumerate(rows) if row[5] is not None}
    providers = sorted(set(credits["provider_id"].to_list()))
    column = {pid: j for j, pid in enumerate(providers)}
    y = np.zeros((len(rows), len(providers)))
    for qid, pid, credit in credits.select("query_id", "provider_id", "credit").iter_rows():
        if qid not in index:
            raise ConflictError(
                f"{period.label}: a credited output is not in its run's recorded sample "
                "(`ledger verify` the run)"
            )
        y[index[qid], column[pid]] += credit
    in_domain = np.array([start <= row[4] < end for row in rows])
    est = estimate_shares(
        y,
        np.array([row[3] for row in rows]),
        np.array([strata[(row[0], row[1])] for row in rows]),
        in_domain,
    )
    half = est.half_width
    return PeriodEstimate(
        {pid: float(est.value[j]) for pid, j in column.items()},
        {pid: float(est.share[j]) for pid, j in column.items()},
        {pid: float(half[j]) for pid, j in column.items()},
        est.total,
    )


def statement_sample(session: Session, statement: m.Statement) -> dict[str, Any] | None:
    """The sample a statement's lines were estimated from: its designs, the sampled outputs
    served in its period, their estimated number in the population (Σ 1/π) and the interval's
    confidence; None for a statement of outputs attributed in full."""
    runs = select(m.statement_runs.c.run_id).where(m.statement_runs.c.statement_id == statement.id)
    designs = sorted(
        session.scalars(select(m.SampleDesign.id).where(m.SampleDesign.run_id.in_(runs)))
    )
    if not designs:
        return None
    u = m.SampleUnit.__table__
    probabilities = session.scalars(
        select(u.c.inclusion_probability).where(
            u.c.design_id.in_(designs),
            u.c.served_at >= statement.period_start,
            u.c.served_at < statement.period_end,
        )
    ).all()
    return {
        "designs": designs,
        "sampled_outputs": len(probabilities),
        "estimated_outputs": round(math.fsum(1.0 / p for p in probabilities), 3),
        "confidence": CONFIDENCE,
    }


def half_widths(session: Session, statement_id: int) -> dict[int, float]:
    """Provider id → 95% half-width of its share on a statement estimated from a sample."""
    t = m.StatementEstimate.__table__
    return dict(
        session.execute(
            select(t.c.provider_id, t.c.share_half_width).where(t.c.statement_id == statement_id)
        ).all()
    )


@dataclass(frozen=True)
class SizePlan:
    """What `ledger sample-size` answers: outputs to attribute, and how long that takes."""

    period: str
    provider: str
    share: float
    precision: float
    design: str
    outputs: int
    population: float
    pilot_outputs: int
    outputs_per_second: float | None
    seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def plan_sample_size(
    session: Session,
    period: Period,
    precision: float,
    weighted: bool = True,
    throughput: float | None = None,
) -> SizePlan:
    """From the period's recorded credits (a pilot, attributed in full or from a sample), the
    sample size for a 95% half-width `precision` on the largest share (`ledger.sampling.
    required_sample_size`), and its time at `throughput` outputs/s (default: the pilot runs'
    own, results recorded over the time from their start to their finish)."""
    from ledger.sampling import required_sample_size
    from ledger.statements import period_snapshot

    snapshot = period_snapshot(session, period)
    start, end = to_utc_naive(period.start), to_utc_naive(period.end)
    r, q = m.QueryResult.__table__, m.Query.__table__
    rows = session.execute(
        select(q.c.id, q.c.weight_micros, r.c.run_id)
        .select_from(r.join(q, q.c.id == r.c.query_id))
        .where(r.c.is_current, q.c.served_at >= start, q.c.served_at < end)
        .order_by(q.c.id)
    ).all()
    if not rows or snapshot.credits.height == 0:
        raise LedgerError(f"no credited output in {period.label}: attribute a pilot sample first")
    estimate_period(session, period, snapshot.credits, snapshot.runs)  # refuses mixed pilots
    designs = dict(
        session.execute(
            select(m.SampleDesign.run_id, m.SampleDesign.id).where(
                m.SampleDesign.run_id.in_(snapshot.runs)
            )
        ).all()
    )
    probability = {}
    if designs:
        u = m.SampleUnit.__table__
        probability = dict(
            session.execute(
                select(q.c.id, u.c.inclusion_probability)
                .select_from(u.join(q, q.c.external_id == u.c.external_id))
                .where(u.c.design_id.in_(list(designs.values())))
            ).all()
        )
    index = {qid: i for i, (qid, _, _) in enumerate(rows)}
    providers = sorted(set(snapshot.credits["provider_id"].to_list()))
    column = {pid: j for j, pid in enumerate(providers)}
    y = np.zeros((len(rows), len(providers)))
    for qid, pid, credit in snapshot.credits.select(
        "query_id", "provider_id", "credit"
    ).iter_rows():
        y[index[qid], column[pid]] += credit
    pi = np.array([probability.get(qid, 1.0) for qid, _, _ in rows])
    sizes = np.array([w / 1e6 if weighted else 1.0 for _, w, _ in rows])
    population = math.fsum((1.0 / pi).tolist())
    n, p = required_sample_size(y, sizes, pi, precision, population)
    share = float(estimate_shares(y, pi, np.zeros(len(rows), dtype=np.int64)).share[p])
    name = session.scalar(select(m.Provider.name).where(m.Provider.id == providers[p]))
    if throughput is None:
        throughput = _measured_throughput(session, snapshot.runs)
    return SizePlan(
        period.label, str(name), share, precision, "pps on weight" if weighted else "uniform",
        min(n, math.ceil(population)), population, len(rows), throughput,
        None if not throughput else n / throughput,
    )  # fmt: skip


def _measured_throughput(session: Session, runs: list[str]) -> float | None:
    """Outputs recorded per second by finished runs: Σ results / Σ (finished − started)."""
    r = m.QueryResult.__table__
    counts = dict(
        session.execute(
            select(r.c.run_id, func.count()).where(r.c.run_id.in_(runs)).group_by(r.c.run_id)
        ).all()
    )
    seconds, outputs = 0.0, 0
    for run in session.scalars(select(m.AttributionRun).where(m.AttributionRun.id.in_(runs))):
        if run.finished_at is not None and run.finished_at > run.started_at:
            seconds += (run.finished_at - run.started_at).total_seconds()
            outputs += counts.get(run.id, 0)
    return outputs / seconds if seconds > 0 and outputs else None
