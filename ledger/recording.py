"""Recording attribution runs and their per-query credits, idempotently.

A run's results are written with bulk Core inserts inside the caller's transaction
(`ledger.db.session_scope`), so a crash leaves nothing half-written. Recording a (run, query)
pair that is already recorded is skipped, so re-running a command never double-counts. When a
query is recorded by a newer run, that run's result becomes the query's current one and the
older result is kept but superseded (``is_current`` false): credits are replaced, never summed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    Integer,
    SmallInteger,
    String,
    any_,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ledger import models as m
from ledger.db import lock_ledger
from ledger.errors import ClosedPeriodError, ConflictError, LedgerError, NotFoundError
from ledger.liveness import hold, release
from ledger.models import utcnow
from ledger.money import MAX_MINOR, decimal_places, fits_bigint
from ledger.registry import canonical_json, check_sha256, get_index

WEIGHT_PLACES = 6
WEIGHT_SCALE = 10**WEIGHT_PLACES
MAX_WEIGHT = Decimal(MAX_MINOR).scaleb(-WEIGHT_PLACES)
"""The largest weight `weight_micros` (BIGINT millionths) holds: 9223372036854.775807."""
_CHUNK = 500  # keeps IN (...) lists well under every driver's parameter limit

T = TypeVar("T")


@dataclass(frozen=True)
class QueryRecord:
    """A served output: its id, when it was served (naive means UTC), weight, text sha256."""

    external_id: str
    served_at: datetime
    weight: Decimal
    text_sha256: str


@dataclass(frozen=True)
class ProviderCredit:
    """One provider's part of a query: Σ of its positive scores, and w_q · that / Σ over all."""

    provider: str
    positive_sum: float
    credit: float


@dataclass(frozen=True)
class TopExample:
    """One of the most influential training examples for a query (rank 1 = most)."""

    rank: int
    example_id: str
    shard: str
    row: int
    provider: str
    score: float


@dataclass(frozen=True)
class QueryResult:
    """What one run found for one query: per-provider credits and top examples.

    `unattributed` is true when every score was non-positive; `credits` must then be empty.
    """

    query: QueryRecord
    credits: list[ProviderCredit]
    top: list[TopExample]
    unattributed: bool


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _member_of(session: Session, column: Any, values: Sequence[Any]) -> Iterator[Any]:
    """WHERE clauses `column IN values`, a chunk each: one array parameter per 20,000 values on
    PostgreSQL (``= ANY(...)``), 5,000 bound values per chunk on SQLite."""
    if session.connection().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        for chunk in _chunks(values, 20_000):
            yield column == any_(bindparam(None, list(chunk), type_=ARRAY(column.type)))
    else:
        for chunk in _chunks(values, 5_000):
            yield column.in_(chunk)


def to_utc_naive(moment: datetime) -> datetime:
    """A UTC timestamp without tzinfo, as the ledger stores it (naive input is taken as UTC)."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def weight_to_micros(weight: Decimal | int | str, external_id: str = "?") -> int:
    """A query weight as an exact integer number of millionths; refuses floats and > 6 decimals."""
    if isinstance(weight, float | bool):
        raise LedgerError(f"query {external_id!r}: weight {weight!r} must be a Decimal, not float")
    try:
        value = Decimal(weight)
    except (InvalidOperation, ValueError, TypeError) as exc:
        raise LedgerError(f"query {external_id!r}: weight {weight!r} is not a number") from exc
    if not value.is_finite() or value < 0:
        raise LedgerError(f"query {external_id!r}: weight {weight!r} must be finite and >= 0")
    problem = weight_problem(value)
    if problem is not None:
        raise LedgerError(f"query {external_id!r}: weight {weight!r} {problem}")
    return int(value.scaleb(WEIGHT_PLACES))


def weight_problem(value: Decimal) -> str | None:
    """Why a finite, non-negative weight cannot be stored as whole millionths in the BIGINT
    ``weight_micros`` column (too many decimal places, or too large), or None if it can."""
    if decimal_places(value) > WEIGHT_PLACES:
        return f"has more than {WEIGHT_PLACES} decimal places; the ledger keeps millionths"
    if not fits_bigint(value, WEIGHT_PLACES):
        return f"is too large for the ledger (its limit is {MAX_WEIGHT})"
    return None


def micros_to_weight(micros: int) -> Decimal:
    """The exact `Decimal` weight of an integer number of millionths."""
    return (Decimal(micros) / WEIGHT_SCALE).normalize()


def start_run(
    session: Session, run_id: str, index_id: str, manifest: dict[str, Any]
) -> m.AttributionRun:
    """Record the start of an attribution run over a registered gradient index.

    Idempotent: the same id with the same index and manifest returns the existing run (so an
    interrupted run can be resumed); the same id with a different one raises `ConflictError`.
    """
    run_id = check_sha256(run_id, "run id")
    text = canonical_json(manifest)
    existing = session.get(m.AttributionRun, run_id)
    if existing is not None:
        if existing.index_id != index_id or existing.manifest != text:
            raise ConflictError(f"run {run_id} already exists with a different index or manifest")
        if existing.status != "finished":  # resumed: this process works on it now
            hold(_engine_of(session), run_id)
        return existing
    get_index(session, index_id)
    run = m.AttributionRun(
        id=run_id, index_id=index_id, manifest=text, status="running", started_at=utcnow()
    )
    session.add(run)
    session.flush()
    hold(_engine_of(session), run_id)
    return run


def get_run(session: Session, run_id: str) -> m.AttributionRun:
    """The attribution run with this id; raises `NotFoundError` otherwise."""
    run = session.get(m.AttributionRun, run_id)
    if run is None:
        raise NotFoundError(f"unknown attribution run {run_id!r}")
    return run


def finish_run(session: Session, run_id: str) -> m.AttributionRun:
    """Mark a run finished (idempotent); a finished run accepts no new results."""
    run = get_run(session, run_id)
    if run.status != "finished":
        run.status = "finished"
        run.finished_at = utcnow()
        session.flush()
    release(_engine_of(session), run_id)
    return run


def _engine_of(session: Session) -> Engine:
    bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def list_runs(session: Session) -> list[m.AttributionRun]:
    """All attribution runs, oldest first."""
    return list(
        session.scalars(
            select(m.AttributionRun).order_by(m.AttributionRun.started_at, m.AttributionRun.id)
        )
    )


def already_recorded(session: Session, run_id: str, external_ids: list[str]) -> set[str]:
    """Which of these queries already have a result recorded for this run."""
    found: set[str] = set()
    for member in _member_of(session, m.Query.external_id, list(dict.fromkeys(external_ids))):
        found.update(
            session.scalars(
                select(m.Query.external_id)
                .join(m.QueryResult, m.QueryResult.query_id == m.Query.id)
                .where(m.QueryResult.run_id == run_id, member)
            )
        )
    return found


def _validate(result: QueryResult) -> None:
    ext = result.query.external_id
    if not isinstance(ext, str) or not ext:
        raise LedgerError(f"query id {ext!r} must be a non-empty string")
    check_sha256(result.query.text_sha256, f"text sha256 of query {ext!r}")
    credits = result.credits
    if result.unattributed and credits:
        raise LedgerError(f"query {ext!r} is marked unattributed but has credits")
    if not result.unattributed and not credits:
        raise LedgerError(f"query {ext!r} has no credits; mark it unattributed instead")
    if len({c.provider for c in credits}) != len(credits):
        raise LedgerError(f"query {ext!r}: a provider is credited twice")
    for c in credits:
        # Chained comparisons are False for NaN, so this also refuses NaN and infinities.
        if not 0.0 < c.positive_sum < math.inf:
            raise LedgerError(
                f"query {ext!r}, provider {c.provider!r}: positive_sum {c.positive_sum!r} "
                "must be a finite number > 0"
            )
        if not 0.0 <= c.credit < math.inf:
            raise LedgerError(
                f"query {ext!r}, provider {c.provider!r}: credit {c.credit!r} must be finite "
                "and >= 0"
            )
    if credits:
        weight = float(result.query.weight)
        total = math.fsum([c.credit for c in credits])
        if abs(total - weight) > 1e-6 * max(1.0, weight):
            raise LedgerError(
                f"query {ext!r}: credits sum to {total!r}, not to the query's weight {weight}"
            )
    if result.top and len({t.rank for t in result.top}) != len(result.top):
        raise LedgerError(f"query {ext!r}: top examples repeat a rank")


def _copy_type(sql_type: Any) -> str:
    """The PostgreSQL type whose binary COPY format a column of this SQL type reads."""
    if isinstance(sql_type, Boolean):
        return "bool"
    if isinstance(sql_type, BigInteger):
        return "int8"
    if isinstance(sql_type, SmallInteger):
        return "int2"
    if isinstance(sql_type, Integer):
        return "int4"
    if isinstance(sql_type, Float):
        return "float8"
    if isinstance(sql_type, DateTime):
        return "timestamptz" if sql_type.timezone else "timestamp"
    if isinstance(sql_type, String):  # Text and VARCHAR: the server checks the length
        return "text"
    raise TypeError(f"no binary COPY type for {sql_type!r}")


def _bulk_insert(
    session: Session, table: Any, columns: list[str], rows: list[tuple], or_ignore: bool = False
) -> None:
    """Insert many rows in one statement execution.

    On SQLite the driver's executemany is used directly: it is several times faster than
    building a parameter dictionary per row, and SQLite needs no batching of its own. On
    PostgreSQL with psycopg 3 the rows are streamed with ``COPY ... FROM STDIN`` in the same
    transaction (an order of magnitude faster than multi-row INSERTs; triggers and constraints
    still apply). Other databases go through SQLAlchemy's Core insert, which batches rows
    (insertmanyvalues).
    """
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "sqlite":
        # Values must be stored exactly as SQLAlchemy stores them (e.g. datetimes as text with
        # microseconds, which keeps text comparisons of timestamps correct), so use its
        # bind processors.
        processors = [
            (i, proc)
            for i, col in enumerate(columns)
            if not isinstance(table.c[col].type, Float)  # values are already floats
            and (proc := table.c[col].type._cached_bind_processor(dialect)) is not None
        ]
        if processors:
            converted = []
            for row in rows:
                values = list(row)
                for i, proc in processors:
                    values[i] = proc(values[i])
                converted.append(tuple(values))
            rows = converted
        placeholders = ", ".join("?" for _ in columns)
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        sql = f"{verb} INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders})"
        connection.exec_driver_sql(sql, rows)
    elif dialect.name == "postgresql" and dialect.driver == "psycopg":
        # The rows go to COPY in PostgreSQL's binary format, each value in its column's type
        # (psycopg's C writer formats them): no text for the server to parse, floats and
        # times bit for bit, None as NULL. Triggers and constraints apply as to any insert.
        raw = connection.connection.dbapi_connection
        copy_sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)"
        with raw.cursor() as cursor, cursor.copy(copy_sql) as copy:
            copy.set_types([_copy_type(table.c[c].type) for c in columns])
            for row in rows:
                copy.write_row(row)
    else:
        session.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])


def _check_same_queries(
    known: dict[str, tuple[Any, ...]], wanted: dict[str, tuple[datetime, int, str]]
) -> None:
    for ext, (_qid, served_at, weight_micros, text_sha) in known.items():
        if (served_at, weight_micros, text_sha) != wanted[ext]:
            raise ConflictError(
                f"query {ext!r} was recorded before with a different served_at, weight or text hash"
            )


def _insert_queries(session: Session, rows: list[tuple]) -> None:
    """Insert new queries; one that another writer inserted meanwhile is left as it is."""
    table = m.Query.__table__
    columns = ["external_id", "served_at", "weight_micros", "text_sha256", "created_at"]
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # Usually every one is new: COPY them, under a savepoint. If another writer inserted
        # some meanwhile, undo that and insert what is missing, skipping the others' rows.
        import psycopg

        try:
            with session.begin_nested():
                _bulk_insert(session, table, columns, rows)
            return
        except (IntegrityError, psycopg.IntegrityError):  # COPY raises the driver's own error
            pass
        for chunk in _chunks(rows, 20_000):
            connection.exec_driver_sql(
                f"INSERT INTO queries ({', '.join(columns)}) SELECT * FROM unnest("
                "%s::varchar[], %s::timestamp[], %s::bigint[], %s::varchar[], %s::timestamp[]) "
                "ON CONFLICT (external_id) DO NOTHING",
                tuple(list(col) for col in zip(*chunk, strict=True)),
            )
    else:  # SQLite: the ledger's other database
        _bulk_insert(session, table, columns, rows, or_ignore=True)


def closed_period_outputs(
    session: Session, served: list[tuple[str, datetime]]
) -> list[tuple[str, str]]:
    """(external id, period label) of the outputs served in a period whose statement is final."""
    finals = session.execute(
        select(m.Statement.period_start, m.Statement.period_end, m.Statement.period_label)
        .where(m.Statement.status == "final")
        .order_by(m.Statement.period_start)
    ).all()
    if not finals:
        return []
    found = []
    for ext, at in served:
        at = to_utc_naive(at)
        for start, end, label in finals:
            if start <= at < end:
                found.append((ext, label))
                break
    return found


def _query_ids(session: Session, external_ids: Iterable[str]) -> dict[str, tuple[Any, ...]]:
    table = m.Query.__table__
    rows: dict[str, tuple[Any, ...]] = {}
    for member in _member_of(session, table.c.external_id, list(external_ids)):
        for row in session.execute(
            select(
                table.c.external_id,
                table.c.id,
                table.c.served_at,
                table.c.weight_micros,
                table.c.text_sha256,
            ).where(member)
        ):
            rows[row[0]] = tuple(row[1:])
    return rows


def _provider_ids(session: Session, names: set[str], create: bool) -> dict[str, int]:
    from ledger.registry import get_or_create_provider

    ids: dict[str, int] = {}
    for chunk in _chunks(sorted(names)):
        for name, pid in session.execute(
            select(m.Provider.name, m.Provider.id).where(m.Provider.name.in_(chunk))
        ):
            ids[name] = pid
    missing = sorted(names - ids.keys())
    if missing and not create:
        raise NotFoundError(
            f"unknown provider{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
            "register the shards that carry them first"
        )
    for name in missing:
        ids[name] = get_or_create_provider(session, name).id
    return ids


def record_results(
    session: Session, run_id: str, results: list[QueryResult], create_providers: bool = False
) -> int:
    """Write a batch of query results of a run; returns how many (run, query) pairs were new.

    Runs inside the caller's transaction. Pairs already recorded for this run are skipped. A
    query seen before must have the same served_at, weight and text hash (else `ConflictError`).
    A newly recorded pair becomes the query's current result; earlier runs' results for that
    query are marked superseded. Providers must be registered unless `create_providers`.
    """
    run = get_run(session, run_id)
    by_id: dict[str, QueryResult] = {}
    for result in results:
        _validate(result)
        ext = result.query.external_id
        if ext in by_id:
            raise LedgerError(f"query {ext!r} appears twice in one batch")
        by_id[ext] = result
    if not by_id:
        return 0

    wanted = {
        ext: (
            to_utc_naive(r.query.served_at),
            weight_to_micros(r.query.weight, ext),
            r.query.text_sha256.lower(),
        )
        for ext, r in by_id.items()
    }
    lock_ledger(session, exclusive=False)
    known = _query_ids(session, wanted)
    _check_same_queries(known, wanted)
    now = utcnow()
    new_queries = [
        (ext, served_at, weight_micros, text_sha, now)
        for ext, (served_at, weight_micros, text_sha) in wanted.items()
        if ext not in known
    ]
    if new_queries:
        # Another writer may record the same new outputs at the same moment: the database keeps
        # one row per external id, and both writers then read that row back and compare.
        _insert_queries(session, new_queries)
        known = _query_ids(session, wanted)
        _check_same_queries(known, wanted)
    query_id = {ext: row[0] for ext, row in known.items()}
    if session.connection().dialect.name == "postgresql":
        # Writers of the same outputs take turns, so the second sees the first's result and
        # supersedes it: one current result per output (the database's unique index holds it).
        for member in _member_of(session, m.Query.id, sorted(query_id.values())):
            session.execute(
                select(m.Query.id).where(member).order_by(m.Query.id).with_for_update()
            ).all()
    done = already_recorded(session, run_id, list(wanted))
    todo = [(query_id[ext], r) for ext, r in by_id.items() if ext not in done]
    if not todo:
        return 0
    if run.status == "finished":
        raise LedgerError(f"run {run_id} is finished; it accepts no new results")
    closed = closed_period_outputs(
        session, [(ext, known[ext][1]) for ext in by_id if ext not in done]
    )
    if closed:
        ext, label = closed[0]
        raise ClosedPeriodError(
            f"{len(closed)} output{'s' if len(closed) > 1 else ''} (first: {ext!r}) "
            f"{'were' if len(closed) > 1 else 'was'} served in {label}, whose statement is "
            "final; credits for a closed period are refused (correct it with an adjustment "
            "on an open statement)"
        )

    names = {c.provider for _, r in todo for c in r.credits} | {
        t.provider for _, r in todo for t in r.top
    }
    provider_id = _provider_ids(session, names, create_providers)

    qr = m.QueryResult.__table__
    for member in _member_of(session, qr.c.query_id, [qid for qid, _ in todo]):
        session.execute(update(qr).where(member, qr.c.is_current).values(is_current=False))
    now = utcnow()
    _bulk_insert(
        session,
        qr,
        ["run_id", "query_id", "unattributed", "positive_total", "is_current", "recorded_at"],
        [
            (
                run_id,
                qid,
                r.unattributed,
                math.fsum([c.positive_sum for c in r.credits]),
                True,
                now,
            )
            for qid, r in todo
        ],
    )
    _bulk_insert(
        session,
        m.Credit.__table__,
        ["run_id", "query_id", "provider_id", "positive_sum", "credit"],
        [
            (run_id, qid, provider_id[c.provider], float(c.positive_sum), float(c.credit))
            for qid, r in todo
            for c in r.credits
        ],
    )
    _bulk_insert(
        session,
        m.TopExample.__table__,
        ["run_id", "query_id", "rank", "example_id", "shard", "row", "provider_id", "score"],
        [
            (
                run_id,
                qid,
                t.rank,
                t.example_id,
                t.shard,
                t.row,
                provider_id[t.provider],
                float(t.score),
            )
            for qid, r in todo
            for t in r.top
        ],
    )
    return len(todo)


def query_explanation(
    session: Session, external_id: str, run_id: str | None = None
) -> dict[str, Any]:
    """The current result for a query (or its result in run `run_id`, superseded or not): its
    run, credits (largest first) and top examples.

    Raises `NotFoundError` if the query is unknown or has never been attributed (by that run).
    """
    query = session.scalar(select(m.Query).where(m.Query.external_id == external_id))
    if query is None:
        raise NotFoundError(f"unknown query {external_id!r}")
    which = m.QueryResult.is_current if run_id is None else m.QueryResult.run_id == run_id
    result = session.scalar(select(m.QueryResult).where(m.QueryResult.query_id == query.id, which))
    if result is None:
        by = "" if run_id is None else f" by run {run_id[:16]}"
        raise NotFoundError(f"query {external_id!r} has no attribution result{by}")
    run = get_run(session, result.run_id)
    index = run.index
    credits = session.execute(
        select(m.Provider.name, m.Credit.positive_sum, m.Credit.credit)
        .join(m.Provider, m.Provider.id == m.Credit.provider_id)
        .where(m.Credit.run_id == run.id, m.Credit.query_id == query.id)
        .order_by(m.Credit.credit.desc(), m.Provider.name)
    ).all()
    top = session.execute(
        select(
            m.TopExample.rank,
            m.TopExample.example_id,
            m.TopExample.shard,
            m.TopExample.row,
            m.Provider.name,
            m.TopExample.score,
        )
        .join(m.Provider, m.Provider.id == m.TopExample.provider_id)
        .where(m.TopExample.run_id == run.id, m.TopExample.query_id == query.id)
        .order_by(m.TopExample.rank)
    ).all()
    return {
        "external_id": query.external_id,
        "served_at": query.served_at,
        "weight": str(micros_to_weight(query.weight_micros)),
        "text_sha256": query.text_sha256,
        "run_id": run.id,
        "index_id": index.id,
        "recorded_at": result.recorded_at,
        "unattributed": result.unattributed,
        "credits": [
            {"provider": name, "positive_sum": pos, "credit": credit}
            for name, pos, credit in credits
        ],
        "top": [
            {
                "rank": rank,
                "example_id": example_id,
                "shard": shard,
                "row": row,
                "provider": provider,
                "score": score,
            }
            for rank, example_id, shard, row, provider, score in top
        ],
    }


def resolve_run_id(session: Session, ref: str) -> str:
    """The full id of the attribution run whose id is `ref` or starts with it."""
    ids = session.scalars(
        select(m.AttributionRun.id).where(m.AttributionRun.id.startswith(ref.lower()))
    ).all()
    if len(ids) > 1:
        raise LedgerError(f"run id prefix {ref!r} is ambiguous ({len(ids)} runs)")
    if not ids:
        raise NotFoundError(f"unknown attribution run {ref!r}")
    return ids[0]
