"""The long-running jobs behind the command line: registering shards, building the gradient
index over the ledger's shards, and attributing served outputs into the ledger.

Each job validates all of its input before writing anything, and writes in transactions, so a
bad input or a crash leaves the ledger as it was and a re-run neither loses nor double-counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, case, func, select
from sqlalchemy.orm import Session

from attribution import GradientIndex, IndexConfig, ScoreConfig
from attribution.data import (
    Query,
    ShardSpec,
    read_jsonl,
    read_queries,
    sha256_file,
)
from attribution.device import resolve_device, resolve_precision
from attribution.language import (
    check_model_matches,
    index_language_model,
    index_precision,
    load_checkpoints,
    model_info,
    shards_info,
)
from attribution.lm import (
    encode_query,
    lm_loss,
    load_causal_lm,
    position_limit,
    query_batches,
    resolve_max_length,
)
from attribution.manifest import code_version, package_versions, seal, write_json
from attribution.progress import progress
from attribution.scoring import score_queries
from attribution.types import IndexDamagedError, InputError
from ledger import models as m
from ledger.db import session_scope
from ledger.errors import ConflictError, LedgerError, NotFoundError
from ledger.recording import (
    ProviderCredit,
    QueryRecord,
    QueryResult,
    TopExample,
    already_recorded,
    closed_period_outputs,
    finish_run,
    record_results,
    start_run,
    to_utc_naive,
    weight_problem,
    weight_to_micros,
)
from ledger.recording import resolve_run_id as _resolve_run_id
from ledger.registry import list_shards, register_index
from ledger.registry import register_shards as register_shards  # where callers found it
from ledger.samples import SamplePlan, draw_from_file, record_design, redraw_problems
from ledger.torchrun import Job
from ledger.workspace import Workspace

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"  # local paths an index was built from; not part of its manifest


def ledger_shards(session: Session) -> list[ShardSpec]:
    """The registered shards as attribution specs, refusing any whose content has changed."""
    shards = list_shards(session)
    if not shards:
        raise LedgerError("no training shards registered; add some with `ledger shards add`")
    names = _shard_names([s.path for s in shards])
    workspace = Workspace.of(session)
    specs = []
    for shard in shards:
        path = workspace.locate(shard.path)  # where it is now, checked by its sha256
        if not os.path.isfile(path):
            raise InputError(path, None, None, "registered shard file is missing")
        digest = sha256_file(path)
        if digest != shard.sha256:
            raise ConflictError(
                f"shard {path}: content changed since it was registered "
                f"(sha256 {shard.sha256[:12]}, now {digest[:12]}); register it under a new path"
            )
        specs.append(ShardSpec(path, shard.provider.name, names[shard.path], digest))
    return specs


def _shard_names(paths: list[str]) -> dict[str, str]:
    """Short, stable shard names for example ids: the file name, with a hash of the full path
    added where two registered shards share a file name."""
    counts: dict[str, int] = {}
    for path in paths:
        counts[os.path.basename(path)] = counts.get(os.path.basename(path), 0) + 1
    return {
        path: os.path.basename(path)
        if counts[os.path.basename(path)] == 1
        else f"{os.path.basename(path)}@{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        for path in paths
    }


def index_directory(
    root: Path,
    info: dict,
    shards: list[ShardSpec],
    config: IndexConfig,
    max_length: int,
    batch_size: int,
) -> Path:
    """Where the index of these inputs lives: a directory named by their fingerprint (`info` is
    the model's `model_info`), so a re-run resumes it and other inputs never reuse it."""
    key = json.dumps(
        {
            "model": info,
            "data": shards_info(shards, max_length, batch_size),
            "config": config.to_dict(),
        },
        sort_keys=True,
    )
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def build_ledger_index(
    engine: Engine,
    model_dir: str,
    root: Path,
    config: IndexConfig,
    *,
    max_length: int | None,
    batch_size: int,
    show_progress: bool,
    checkpoint_dirs: tuple[str, ...] = (),
    device: str = "auto",
    precision: str = "float32",
) -> GradientIndex:
    """Build (or resume) the index of every registered shard and record it in the ledger.
    `device` (auto, cpu, cuda, cuda:N) and `precision` (of the model's passes): see
    `attribution.language.index_language_model`.
    `max_length` None: 128 tokens per chunk, or the model's position limit when smaller.
    `checkpoint_dirs`: earlier checkpoints of the model's run, indexed with it."""
    with session_scope(engine) as session:
        shards = ledger_shards(session)
    log.info("%d registered shards checked against their sha256", len(shards))
    target = resolve_device(device)  # an unavailable GPU is refused before any work
    dtype = resolve_precision(precision)
    # A bad model fails here, before any file is written.
    loaded = load_causal_lm(model_dir, dtype, device=target)
    checkpoints = load_checkpoints(checkpoint_dirs, precision, target)
    max_length = resolve_max_length(loaded[0], model_dir, max_length)
    info = model_info(model_dir, checkpoint_dirs, precision)
    out = index_directory(root, info, shards, config, max_length, batch_size)
    log.info(
        "model %s loaded on %s in %s; %d tokens per chunk; index folder %s",
        model_dir, target, precision, max_length, out,
    )  # fmt: skip
    index = index_language_model(
        model_dir,
        shards,
        out,
        config,
        max_length=max_length,
        batch_size=batch_size,
        show_progress=show_progress,
        loaded=loaded,
        info=info,
        checkpoint_dirs=checkpoint_dirs,
        loaded_checkpoints=checkpoints,
        device=target,
        precision=precision,
    )
    if Job().main:  # once per torchrun job
        with session_scope(engine) as session:
            workspace = Workspace.of(session)
            # Inside the workspace, the model is recorded relative to the index, so that the
            # two are found together wherever the workspace moves.
            source = {
                "model_dir": workspace.relative_to(model_dir, out),
                "shards": [s.path for s in shards],
            }
            if checkpoint_dirs:
                source["checkpoint_dirs"] = [workspace.relative_to(d, out) for d in checkpoint_dirs]
            write_json(out / SOURCE_FILE, source)
            register_index(session, index.id, workspace.store(out), index.manifest)
        log.info("index %s (%d rows) recorded in the ledger", index.id, index.rows)
    indexed = set(index.metadata_columns(["shard"])["shard"].unique().to_list())
    for shard in shards:
        if shard.name not in indexed:
            log.warning(
                "shard %s (provider %s) yields no training example of 2 or more tokens: "
                "it earns no credit",
                shard.path,
                shard.provider,
            )
    return index


def open_ledger_index(session: Session, index_ref: str | None) -> GradientIndex:
    """The index named by id (or a prefix of it) or path; by default the newest registered."""
    if index_ref and os.path.isdir(index_ref):
        index = GradientIndex.open(index_ref)
        if session.get(m.GradientIndex, index.id) is None:
            raise NotFoundError(f"index {index_ref} is not registered in this ledger")
        return index
    stmt = select(m.GradientIndex).order_by(m.GradientIndex.created_at.desc())
    if index_ref:
        stmt = stmt.where(m.GradientIndex.id.startswith(index_ref.lower()))
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFoundError(
            f"no gradient index {index_ref!r} in the ledger"
            if index_ref
            else "no gradient index in the ledger; build one with `ledger index --model DIR`"
        )
    return GradientIndex.open(Workspace.of(session).locate(row.path))


def _index_source(index: GradientIndex) -> dict:
    """Where the index's model, checkpoints and shards were when it was built ({} if unknown)."""
    source = index.root / SOURCE_FILE
    if not source.exists():
        return {}
    try:
        found = json.loads(source.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        found = exc
    if not isinstance(found, dict):
        raise InputError(
            str(source), None, None,
            "unreadable (it records where the index's model was); delete it and pass --model DIR",
        )  # fmt: skip
    return found


def _near_index(index: GradientIndex, recorded: str, home: Path | None) -> str:
    """A path recorded relative to the index directory: next to the index where it is, or next
    to where the ledger has it (`home`) when the index was moved apart from its workspace."""
    here = os.path.normpath(index.root / recorded)
    if home is not None and not os.path.exists(here):
        return os.path.normpath(home / recorded)
    return here


def index_model_dir(
    index: GradientIndex, workspace: Workspace | None = None, home: Path | None = None
) -> str | None:
    """Where the index's model is: recorded relative to the index (`_near_index`), or where it
    was built, or the same place in the workspace's new location (`ledger.workspace`); the
    model is checked against the manifest's hashes before it is used."""
    found = _index_source(index).get("model_dir")
    if found is None or not os.path.isabs(found):
        return found if found is None else _near_index(index, found, home)
    return found if workspace is None else workspace.locate(found)


def index_home(session: Session, index: GradientIndex) -> Path | None:
    """Where the ledger has the index registered, now (`ledger.workspace`)."""
    row = session.get(m.GradientIndex, index.id)
    return None if row is None else Path(Workspace.of(session).locate(row.path))


def index_checkpoint_dirs(
    index: GradientIndex,
    given: tuple[str, ...] = (),
    workspace: Workspace | None = None,
    home: Path | None = None,
) -> tuple[str, ...]:
    """The index's further checkpoints: `given` (they moved), else where they were built
    (found as `index_model_dir` finds the model)."""
    recorded = _index_source(index).get("checkpoint_dirs", [])
    return tuple(given) or tuple(
        _near_index(index, d, home)
        if not os.path.isabs(d)
        else (d if workspace is None else workspace.locate(d))
        for d in recorded
    )


@dataclass
class AttributeSummary:
    run_id: str
    index_id: str
    queries: int
    attributed: int
    skipped: int
    unattributed: int

    def as_dict(self) -> dict:
        return asdict(self)


def run_manifest(index: GradientIndex, queries_path: str, config: ScoreConfig) -> dict:
    """The manifest of an attribution run: everything needed to re-run and verify it."""
    score = {k: v for k, v in asdict(config).items() if k not in ("memory_budget_mb", "dense")}
    return seal(
        {
            "kind": "attribution-run",
            "index_id": index.id,
            "model": {
                k: index.manifest["model"].get(k) for k in ("weights_sha256", "tokenizer_sha256")
            },
            "queries_file": {
                "name": os.path.basename(queries_path),
                "sha256": sha256_file(queries_path),
            },
            "score": score,
            "credit": "w_q * positive RelatIF sum per provider / positive sum over all providers",
            "packages": package_versions(),
            "code_version": code_version(),
        }
    )


def check_known_queries(session: Session, queries: list[Query], path: str) -> None:
    """Refuse queries whose id the ledger already holds with another time, weight or text."""
    by_id = {q.id: q for q in queries}
    table = m.Query.__table__
    ids = list(by_id)
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(
                table.c.external_id, table.c.served_at, table.c.weight_micros, table.c.text_sha256
            ).where(table.c.external_id.in_(ids[start : start + 500]))
        )
        for ext, served_at, weight, text in rows:
            q = by_id[ext]
            for name, old, new in (
                ("timestamp", served_at, to_utc_naive(q.timestamp)),
                ("weight", weight, weight_to_micros(q.weight, ext)),
                ("prompt", text, q.text_sha256),
            ):
                if old != new:
                    raise InputError(
                        path,
                        query_lines(path).get(ext),
                        name,
                        f"query {ext!r} is already in the ledger with another "
                        f"{name if name != 'prompt' else 'prompt/completion'}",
                    )


def check_open_periods(session: Session, queries: list[Query], path: str) -> None:
    """Refuse outputs served in a period whose statement is final: their credits would never be
    paid (the database refuses them too). Names the first such output's line."""
    closed = closed_period_outputs(session, [(q.id, q.timestamp) for q in queries])
    if closed:
        ext, label = closed[0]
        more = f" (and {len(closed) - 1} more)" if len(closed) > 1 else ""
        raise InputError(
            path,
            query_lines(path).get(ext),
            "timestamp",
            f"output {ext!r} was served in {label}, whose statement is final{more}; credits "
            "for a closed period are refused: remove these outputs, or correct the period "
            "with `ledger statements adjust`",
        )


def write_with_retry(engine: Engine, write: Callable[[Session], Any], attempts: int = 5) -> Any:
    """Run `write` in its own transaction, again when the database aborted it for a deadlock or
    a serialisation failure with another writer (PostgreSQL), which leaves nothing written."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            with session_scope(engine) as session:
                return write(session)
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
            if code not in ("40P01", "40001") or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def check_storable(queries: list[Query], path: str) -> None:
    """Refuse, before anything is written, a query that the ledger's columns cannot hold: an id
    longer than `queries.external_id`, or a weight that is not a whole number of millionths
    within BIGINT `weight_micros`."""
    id_length = m.Query.__table__.c.external_id.type.length
    for q in queries:
        problem = weight_problem(q.weight)
        if len(q.id) <= id_length and problem is None:
            continue
        line, obj = next(
            ((line, obj) for line, obj in read_jsonl(path) if str(obj.get("id")) == q.id),
            (None, {}),
        )
        if len(q.id) > id_length:
            raise InputError(path, line, "id", f"longer than {id_length} characters ({len(q.id)})")
        field = "revenue" if obj.get("revenue") is not None else "weight"
        raise InputError(path, line, field, f"{obj.get(field, str(q.weight))!r} {problem}")


def query_lines(path: str) -> dict[str, int]:
    """Line number of each query id in a queries file (for errors found after parsing)."""
    return {str(obj.get("id")): line for line, obj in read_jsonl(path)}


def query_max_length(index: GradientIndex, model) -> int:
    """Tokens per output when scoring: the index's chunk length (128 when it records none),
    never more than the positions the model's config declares."""
    max_length = int(index.manifest["data"].get("max_length", 128))
    limit = position_limit(model)
    return max_length if limit is None else min(max_length, limit[1])


def check_encodable(queries: list[Query], tokenizer, max_length: int, path: str) -> None:
    """Refuse, before anything is written, an output the tokenizer turns into no completion."""
    for q in queries:
        try:
            encode_query(q, tokenizer, max_length, warn=False)  # scoring warns, once
        except InputError as exc:
            line = query_lines(path).get(q.id)
            raise InputError(path, line, exc.field, exc.message) from exc


def query_results(index: GradientIndex, queries: list[Query], result) -> list[QueryResult]:
    """Ledger rows of scored queries: credits w_q · share, and the top examples."""
    shares = result.shares()
    unattributed = result.unattributed()
    top_rows = result.top_rows[result.top_rows >= 0]
    meta = {r["row"]: r for r in index.rows_metadata(top_rows).iter_rows(named=True)}
    out = []
    for qi, q in enumerate(queries):
        record = QueryRecord(q.id, q.timestamp.astimezone(UTC), q.weight, q.text_sha256)
        credits, top = [], []
        if not unattributed[qi]:
            w = float(q.weight)
            credits = [
                ProviderCredit(p, float(result.positive[qi, j]), w * float(shares[qi, j]))
                for j, p in enumerate(result.providers)
                if result.positive[qi, j] > 0
            ]
        rank = 0
        for row, score in zip(result.top_rows[qi], result.top_scores[qi], strict=True):
            if row < 0:
                continue
            rank += 1
            ex = meta[int(row)]
            top.append(
                TopExample(
                    rank, ex["example_id"], ex["shard"], int(row), ex["provider"], float(score)
                )
            )
        out.append(QueryResult(record, credits, top, bool(unattributed[qi])))
    return out


QUERY_BATCH = 16
"""Outputs per batch of query gradients."""


def attribute_outputs(
    engine: Engine,
    outputs: str,
    *,
    index_ref: str | None = None,
    model_dir: str | None = None,
    config: ScoreConfig | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
    checkpoint_dirs: tuple[str, ...] = (),
    sample: SamplePlan | None = None,
    device: str = "auto",
) -> AttributeSummary:
    """Attribute every served output in `outputs` (jsonl) and record credits in the ledger;
    with `sample`, only the outputs of that probability sample of the file, whose design is
    recorded with the run (`ledger.samples`).

    One transaction per batch; (run, query) pairs already recorded are skipped, so a killed run
    resumes and a repeated run changes nothing.
    """
    config = config or ScoreConfig()
    job = Job()  # a rank of a torchrun job scores its share of each batch of outputs
    queries = read_queries(outputs)  # every line is validated before anything is written
    if not queries:
        raise InputError(outputs, None, None, "no queries in the file")
    check_storable(queries, outputs)
    log.info("%s: %d outputs read and checked", outputs, len(queries))
    drawn = None
    if sample is not None:
        drawn = draw_from_file(outputs, queries, sample)
        chosen = set(drawn.ids)
        queries = [q for q in queries if q.id in chosen]
    with session_scope(engine) as session:
        index = open_ledger_index(session, index_ref)
        check_known_queries(session, queries, outputs)
        workspace, home = Workspace.of(session), index_home(session, index)
    model_dir = model_dir or index_model_dir(index, workspace, home)
    if model_dir is None:
        raise LedgerError("the index does not record its model; pass --model DIR")
    checkpoint_dirs = index_checkpoint_dirs(index, checkpoint_dirs, workspace, home)
    check_model_matches(model_dir, index, checkpoint_dirs)
    log.info("index %s at %s; model %s matches its manifest", index.id, index.root, model_dir)
    target = resolve_device(device)
    precision = index_precision(index)  # queries run as the training examples did
    model, tokenizer = load_causal_lm(model_dir, resolve_precision(precision), device=target)
    checkpoints = load_checkpoints(checkpoint_dirs, precision, target)
    max_length = query_max_length(index, model)
    check_encodable(queries, tokenizer, max_length, outputs)
    manifest = run_manifest(index, outputs, config)
    if drawn is not None:
        manifest = seal({**manifest, "sample": {"id": drawn.id, **drawn.document}})
    with session_scope(engine) as session:
        done = already_recorded(session, manifest["id"], [q.id for q in queries])
        todo = [q for q in queries if q.id not in done]
        check_open_periods(session, todo, outputs)
        if job.main:
            start_run(session, manifest["id"], index.id, manifest)
            if drawn is not None:
                record_design(session, manifest["id"], drawn)
    job.barrier()
    log.info(
        "run %s: %d outputs to attribute, %d already recorded", manifest["id"], len(todo), len(done)
    )
    unattributed = 0
    if todo:
        starts = range(0, len(todo), batch_size)
        for start in progress(starts, desc="attributing", enabled=show_progress, unit="batch"):
            group = job.share(todo[start : start + batch_size], QUERY_BATCH)  # all in one process
            rows = []
            if group:
                batches = query_batches(group, tokenizer, max_length, batch_size=QUERY_BATCH)
                result = score_queries(
                    model, lm_loss, batches, index, config, checkpoints, device=target
                )
                unattributed += int(np.sum(result.unattributed()))
                rows = query_results(index, group, result)
            rows = job.to_writer(engine, rows)
            if rows:
                write_with_retry(
                    engine,
                    lambda session, rows=rows: record_results(session, manifest["id"], rows),
                )
    job.barrier()
    unattributed = job.total(unattributed)
    if job.main:
        with session_scope(engine) as session:
            finish_run(session, manifest["id"])
    return AttributeSummary(
        manifest["id"], index.id, len(queries), len(todo), len(done), unattributed
    )


@dataclass
class Verification:
    run_id: str
    checks: dict[str, bool]
    sampled: int
    agreeing: int
    max_credit_difference: float
    notes: list[str] = field(default_factory=list)
    """Why a check failed, where a reason is known (a damaged index file, tampered credits)."""
    seed: int | None = None
    """The seed that drew the sample (`verify_run(seed=...)` draws the same one again)."""
    outputs: int = 0
    """How many outputs the run recorded (all of them have their stored credits checked)."""
    sampled_outputs: list[str] = field(default_factory=list)
    """The ids of the outputs re-computed."""

    @property
    def ok(self) -> bool:
        """Every check passed and at least one re-computed output matched the ledger."""
        return all(self.checks.values()) and 0 < self.agreeing == self.sampled

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


STORED_CHECK = "stored credits add up to each output's weight"
REDRAW_CHECK = "sample re-drawn from its seed is the recorded one"


def stored_credit_problems(session: Session, run_id: str, limit: int = 3) -> tuple[int, list[str]]:
    """Check, in SQL, every output run `run_id` recorded: its credits add up to its weight
    (none when unattributed), and each credit is weight × its influence sum / the output's
    total. Returns the number of outputs and up to `limit` problems, naming the outputs.

    Cheap next to re-computing, so it covers the outputs a sample leaves out: credits rewritten
    in SQL are seen unless the rewrite keeps both the sums and the influence shares.
    """
    from ledger.audit import CREDIT_SUM_TOLERANCE

    r, q, c = m.QueryResult.__table__, m.Query.__table__, m.Credit.__table__
    weight = q.c.weight_micros / 1e6
    share_error = func.abs(c.c.credit - weight * c.c.positive_sum / r.c.positive_total)
    rows = session.execute(
        select(
            q.c.external_id,
            q.c.weight_micros,
            r.c.unattributed,
            func.count(c.c.credit),
            func.sum(c.c.credit),
            func.max(case((r.c.positive_total > 0, share_error), else_=None)),
        )
        .select_from(
            r.join(q, q.c.id == r.c.query_id).outerjoin(
                c, (c.c.run_id == r.c.run_id) & (c.c.query_id == r.c.query_id)
            )
        )
        .where(r.c.run_id == run_id)
        .group_by(q.c.external_id, q.c.weight_micros, r.c.unattributed)
        .order_by(q.c.external_id)
    ).all()
    problems: list[str] = []
    for ext, micros, unattributed, n, total, worst in rows:
        w = micros / 1e6
        allowed = CREDIT_SUM_TOLERANCE * max(1.0, w)
        if unattributed and n:
            problems.append(f"output {ext!r} is unattributed but has {n} credit(s)")
        elif not unattributed and abs(float(total or 0.0) - w) > allowed:
            problems.append(f"output {ext!r}: stored credits add up to {total!r}, weight {w}")
        elif worst is not None and float(worst) > allowed:
            problems.append(
                f"output {ext!r}: a stored credit is not weight × its share of the influence"
            )
    shown = problems[:limit]
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more output(s)")
    return len(rows), shown


def verify_run(
    engine: Engine,
    run_id: str,
    outputs: str | None = None,
    *,
    model_dir: str | None = None,
    sample: int | None = 8,
    seed: int | None = None,
    tolerance: float = 1e-4,
    checkpoint_dirs: tuple[str, ...] = (),
    device: str = "auto",
    index_dir: str | None = None,
) -> Verification:
    """Re-check a run from its manifest: ids, file hashes, model, every output's stored credits
    (`stored_credit_problems`), and a re-computed sample of `sample` outputs (None: all).
    `index_dir`: where the run's index is now, if not where the ledger finds it (its manifest
    id and block hashes are checked like the index's own).

    The sample is drawn at random from the outputs the run recorded, with `seed` (a fresh
    unpredictable one when None, reported in the result so that the same sample can be drawn
    again): a fixed sample could be avoided by whoever tampers with the others. Each sampled
    output is compared with this run's own stored result, also where a later run superseded it
    (a final statement may rest on a superseded run).
    """
    from attribution.manifest import verify_id
    from ledger.recording import get_run, query_explanation

    seed = secrets.randbits(63) if seed is None else seed
    with session_scope(engine) as session:
        run = get_run(session, _resolve_run_id(session, run_id))
        manifest = json.loads(run.manifest)
        workspace = Workspace.of(session)
        index_path, index_id, run_id = run.index.path, run.index_id, run.id
        home = Path(workspace.locate(index_path))
        index_path = index_dir or str(home)
        recorded = set(
            session.scalars(
                select(m.Query.external_id)
                .join(m.QueryResult, m.QueryResult.query_id == m.Query.id)
                .where(m.QueryResult.run_id == run_id)
            )
        )
        n_outputs, stored_problems = stored_credit_problems(session, run_id)
    outputs = outputs or manifest["queries_file"]["name"]
    if not os.path.isfile(outputs):
        raise InputError(outputs, None, None, "queries file of the run not found (pass --outputs)")
    run_ok = verify_id(manifest) and manifest["id"] == run_id
    queries_ok = sha256_file(outputs) == manifest["queries_file"]["sha256"]

    def verification(
        checks: dict[str, bool], notes: list[str], *counts: Any, ids: list[str] | None = None
    ) -> Verification:
        checks = {**checks, STORED_CHECK: not stored_problems}
        sampled, agreeing, worst = counts or (0, 0, float("nan"))
        return Verification(
            run_id, checks, sampled, agreeing, worst, notes + stored_problems, seed, n_outputs,
            ids or [],
        )  # fmt: skip

    try:
        index = GradientIndex.open(index_path)
    except IndexDamagedError as exc:
        checks = {
            "run manifest id": run_ok,
            "index files intact": False,
            "queries file sha256": queries_ok,
        }
        return verification(checks, [str(exc)])
    checks = {
        "run manifest id": run_ok,
        "index manifest id": verify_id(index.manifest) and index.id == index_id,
        "index blocks sha256": [sha256_file(f) for f in index.block_files()]
        == [b["sha256"] for b in index.manifest["blocks"]],
        "queries file sha256": queries_ok,
    }
    sample_notes: list[str] = []
    if queries_ok:  # a sampled run: its sample is drawn again from the file and its seed
        with session_scope(engine) as session:
            redrawn = redraw_problems(session, run_id, outputs, read_queries(outputs))
        if redrawn is not None:
            checks[REDRAW_CHECK] = not redrawn
            sample_notes = redrawn
    model_dir = model_dir or index_model_dir(index, workspace, home)
    checkpoint_dirs = index_checkpoint_dirs(index, checkpoint_dirs, workspace, home)
    try:
        check_model_matches(model_dir, index, checkpoint_dirs)
        checks["model weights, tokenizer and config"] = True
    except InputError as exc:
        checks["model weights, tokenizer and config"] = False
        return verification(checks, [str(exc)])
    if not queries_ok:
        note = f"{outputs} is not the run's queries file: no output was re-computed"
        return verification(checks, [note])
    queries = [q for q in read_queries(outputs) if q.id in recorded]
    if not queries:
        return verification(checks, ["the run recorded none of the file's outputs"])
    rng = np.random.default_rng(seed)
    size = len(queries) if sample is None else min(sample, len(queries))
    picked = sorted(rng.choice(len(queries), size=size, replace=False))
    group = [queries[i] for i in picked]
    config = ScoreConfig(**manifest["score"])
    target = resolve_device(device)
    precision = index_precision(index)
    model, tokenizer = load_causal_lm(model_dir, resolve_precision(precision), device=target)
    max_length = query_max_length(index, model)
    job = Job()  # a rank of a torchrun job re-computes its share of the sample
    mine = job.share(group, QUERY_BATCH)
    fresh = []
    if mine:
        result = score_queries(
            model, lm_loss, query_batches(mine, tokenizer, max_length, QUERY_BATCH), index,
            config, load_checkpoints(checkpoint_dirs, precision, target), device=target,
        )  # fmt: skip
        fresh = query_results(index, mine, result)
    agreeing, worst = 0, 0.0
    with session_scope(engine) as session:
        for qr in fresh:
            stored = query_explanation(session, qr.query.external_id, run_id=run_id)
            diff, agrees = compare_result(stored, qr, tolerance)
            worst = max(worst, diff)
            agreeing += agrees
    counted, agreeing, worst = job.combine(len(fresh), agreeing, worst)
    return verification(checks, sample_notes, counted, agreeing, worst, ids=[q.id for q in group])


def compare_result(stored: dict, fresh: QueryResult, tolerance: float) -> tuple[float, bool]:
    """How far a re-computed result is from the recorded one, and whether it agrees.

    Scores are float32 sums, so a re-computation in a different batch (other padding, other
    reduction order) moves them by about 1e-6 of their size. A result agrees when every
    provider's credit is within ``tolerance`` × max(1, weight) of the recorded one, and the top
    examples agree: rank by rank the same scores, each row in both lists with the same score,
    and a row in only one list scored at the cut-off (all to within ``tolerance`` of the largest
    score). Near-ties may so trade places, or in and out of the last place; nothing else.
    """
    old = {c["provider"]: c["credit"] for c in stored["credits"]}
    new = {c.provider: c.credit for c in fresh.credits}
    diff = max(
        (abs(old.get(p, 0.0) - new.get(p, 0.0)) for p in old.keys() | new.keys()), default=0.0
    )
    credits_agree = diff <= tolerance * max(1.0, float(fresh.query.weight))
    recorded = {t["row"]: t["score"] for t in stored["top"]}
    computed = {t.row: t.score for t in fresh.top}
    scale = max(map(abs, [*recorded.values(), *computed.values()]), default=0.0) or 1.0

    def close(x: float, y: float) -> bool:
        return abs(x - y) <= tolerance * scale

    cutoff = min(recorded.values(), default=0.0)
    scores = {**recorded, **computed}
    top_agrees = (
        len(recorded) == len(computed)
        and all(map(close, recorded.values(), computed.values()))  # rank by rank
        and all(close(s, computed[r]) for r, s in recorded.items() if r in computed)
        and all(close(scores[r], cutoff) for r in recorded.keys() ^ computed.keys())
    )
    return diff, credits_agree and top_agrees
