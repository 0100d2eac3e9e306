"""Small builders of ledger test data, shared by the ledger tests."""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal

from sqlalchemy.orm import Session

from ledger.recording import (
    ProviderCredit,
    QueryRecord,
    QueryResult,
    TopExample,
    finish_run,
    record_results,
    start_run,
)
from ledger.registry import add_shard, register_index


def sha(text: str) -> str:
    """sha256 hex of a string."""
    return hashlib.sha256(text.encode()).hexdigest()


def setup_index(session: Session, providers: list[str]) -> str:
    """Register one shard per provider and an index over them; returns the index id."""
    for name in providers:
        add_shard(session, f"data/{name}.jsonl", sha(name), name, 10)
    index_id = sha("index:" + ",".join(providers))
    register_index(session, index_id, "/tmp/index", {"shards": providers})
    return index_id


def result(
    external_id: str,
    served_at: datetime,
    positive: dict[str, float],
    weight: Decimal = Decimal(1),
) -> QueryResult:
    """A query result whose credits follow credit = w * pos / Σ pos (unattributed if empty)."""
    total = sum(positive.values())
    credits = [
        ProviderCredit(name, pos, float(weight) * pos / total) for name, pos in positive.items()
    ]
    top = [
        TopExample(rank, f"{name}-{rank}", f"data/{name}.jsonl", rank, name, pos)
        for rank, (name, pos) in enumerate(sorted(positive.items()), start=1)
    ]
    return QueryResult(
        QueryRecord(external_id, served_at, weight, sha(external_id)),
        credits,
        top,
        unattributed=not positive,
    )


def record_run(
    session: Session, index_id: str, label: str, results: list[QueryResult]
) -> tuple[str, int]:
    """Start, record and finish a run; returns (run id, number recorded)."""
    run_id = sha("run:" + label)
    start_run(session, run_id, index_id, {"run": label})
    n = record_results(session, run_id, results)
    finish_run(session, run_id)
    return run_id, n
