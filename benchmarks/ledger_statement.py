"""Benchmark: record 1,000,000 credit rows into a ledger and build a statement from them.

Runs on SQLite (a temporary file, the default) or PostgreSQL (`--db postgresql://...`: the
database must be empty, and keeps the benchmark's rows afterwards). Inserts go through
`ledger.recording.record_results`, the same code path `ledger attribute` uses (SQLite:
executemany; PostgreSQL: COPY; one transaction per batch); the figure includes writing the
queries and per-(run, query) result rows too. Top examples are left out (top-k = 0) so that the
rows/s figure is about credit rows. The statement is built with `ledger.statements.build_statement`
(read the period's credits, deterministic per-provider sums, exact largest-remainder allocation).

    python benchmarks/ledger_statement.py [--queries 100000] [--providers 10] [--db PATH|URL]

Prints the JSON report and saves it in benchmarks/results/ledger_statement.json under the
engine's name ("sqlite" or "postgresql"), keeping the other engine's last result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine  # noqa: E402

from ledger.db import (  # noqa: E402
    has_ledger_tables,
    make_engine,
    session_scope,
    upgrade,
)
from ledger.periods import parse_period  # noqa: E402
from ledger.recording import (  # noqa: E402
    ProviderCredit,
    QueryRecord,
    QueryResult,
    finish_run,
    record_results,
    start_run,
)
from ledger.registry import add_shard, register_index  # noqa: E402
from ledger.statements import (  # noqa: E402
    build_statement,
    finalize_statement,
    statement_rows,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_results(
    n_queries: int,
    providers: list[str],
    seed: int,
    start: datetime = datetime(2024, 7, 1),
    prefix: str = "q",
) -> list[QueryResult]:
    rng = random.Random(seed)
    out = []
    for i in range(n_queries):
        pos = [rng.random() + 1e-6 for _ in providers]
        total = sum(pos)
        credits = [ProviderCredit(p, s, s / total) for p, s in zip(providers, pos, strict=True)]
        served = start + timedelta(seconds=rng.randrange(90 * 86400))
        record = QueryRecord(f"{prefix}{i:08d}", served, Decimal(1), sha(prefix + str(i)))
        out.append(QueryResult(record, credits, [], unattributed=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--providers", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10_000, help="queries per transaction")
    parser.add_argument(
        "--db",
        default=None,
        help="SQLite file, or a database URL (postgresql://user@host:port/db); default: temp",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "ledger_statement.json",
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.db and "://" in args.db:
        url = args.db
    else:
        db_path = Path(args.db) if args.db else Path(tmp.name) / "bench.db"
        if db_path.exists():
            db_path.unlink()
        url = f"sqlite:///{db_path}"
    engine = make_engine(url)
    engine_name = engine.dialect.name
    if has_ledger_tables(engine):
        raise SystemExit(f"{args.db} already holds a ledger; give an empty database")
    upgrade(engine)
    providers = [f"provider-{i:02d}" for i in range(args.providers)]
    results = make_results(args.queries, providers, seed=0)
    credit_rows = sum(len(r.credits) for r in results)

    run_id = sha("bench-run")
    with session_scope(engine) as s:
        for p in providers:
            add_shard(s, f"data/{p}.jsonl", sha(p), p, 1000)
        index_id = sha("bench-index")
        register_index(s, index_id, "/tmp/index", {"bench": True})
        start_run(s, run_id, index_id, {"bench": True})

    # As in production, the previous quarter is closed: the guards that refuse credits for a
    # closed period then check every batch against a final statement.
    with session_scope(engine) as s:
        record_results(s, run_id, make_results(1000, providers, 1, datetime(2024, 4, 1), "p"))
        previous = build_statement(s, parse_period("2024-Q2"), Decimal("1000"), "USD")
        finalize_statement(s, previous.id, allow_unfinished=True)

    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(results), args.batch):
        with session_scope(engine) as s:
            record_results(s, run_id, results[i : i + args.batch])
    insert_s, insert_cpu = time.perf_counter() - t0, time.process_time() - c0
    with session_scope(engine) as s:
        finish_run(s, run_id)

    t0, c0 = time.perf_counter(), time.process_time()
    with session_scope(engine) as s:
        statement = build_statement(s, parse_period("2024-Q3"), Decimal("250000"), "USD")
        sid = statement.id
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    with session_scope(engine) as s:
        rows = statement_rows(s, sid)
    assert sum(rows["amount_minor"]) == 25_000_000

    report = {
        "benchmark": "ledger_statement",
        "database": "sqlite (file)" if engine_name == "sqlite" else _server(engine),
        "insert_path": "ledger.recording.record_results ("
        + ("executemany" if engine_name == "sqlite" else "COPY FROM STDIN")
        + f"), {args.batch} queries per transaction, top-k 0, previous quarter final",
        "command": "python benchmarks/ledger_statement.py"
        + ("" if engine_name == "sqlite" else " --db postgresql://..."),
        "queries": args.queries,
        "providers": args.providers,
        "credit_rows": credit_rows,
        "insert_seconds": round(insert_s, 3),
        "insert_credit_rows_per_second": round(credit_rows / insert_s),
        "insert_cpu_seconds": round(insert_cpu, 3),
        "statement_seconds": round(build_s, 3),
        "statement_credit_rows_per_second": round(credit_rows / build_s),
        "statement_cpu_seconds": round(build_cpu, 3),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "statement_lines": rows.height,
        "targets": {"insert_rows_per_second": 100_000, "statement_seconds": 5.0},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }
    engine.dispose()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "benchmark" in saved:  # the older single-engine layout held a SQLite result
        saved = {"sqlite": saved}
    saved[engine_name] = report
    args.out.write_text(json.dumps(saved, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _server(engine: Engine) -> str:
    """The PostgreSQL server's version and its durability settings, for the report."""
    with engine.connect() as conn:
        version = conn.exec_driver_sql("SHOW server_version").scalar()
        fsync = conn.exec_driver_sql("SHOW fsync").scalar()
        commit = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
    return f"postgresql {version} (local, fsync={fsync}, synchronous_commit={commit})"


if __name__ == "__main__":
    main()
