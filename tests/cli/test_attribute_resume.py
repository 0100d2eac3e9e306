"""A crash in the middle of `attribute` loses nothing and double-counts nothing on re-run."""

from __future__ import annotations

import pytest
from sqlalchemy import text

import ledger.jobs as jobs
from ledger.db import make_engine, session_scope, upgrade
from ledger.periods import parse_period
from ledger.registry import add_provider
from ledger.statements import build_statement, statement_rows
from tests.cli.workspace import PROVIDERS


def fresh_ledger(url: str, workspace, tmp_path):
    engine = make_engine(url)
    upgrade(engine)
    with session_scope(engine) as session:
        for name in PROVIDERS:
            add_provider(session, name)
    for name in PROVIDERS:
        jobs.register_shards(engine, [str(workspace / "shards" / f"{name}-000.jsonl")], name)
    from attribution import IndexConfig, ProjectionConfig

    config = IndexConfig(projection=ProjectionConfig(kind="random", k_in=6, k_out=6))
    jobs.build_ledger_index(
        engine,
        str(workspace / "model"),
        tmp_path / "idx",
        config,
        max_length=48,
        batch_size=8,
        show_progress=False,
    )
    return engine


def counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
            for t in ("queries", "query_results", "credits", "top_examples")
        }


def test_crash_mid_attribution_then_rerun_equals_a_clean_run(workspace, tmp_path, monkeypatch):
    outputs = str(workspace / "queries.jsonl")
    clean = fresh_ledger(f"sqlite:///{tmp_path / 'clean.db'}", workspace, tmp_path)
    jobs.attribute_outputs(clean, outputs, batch_size=2, show_progress=False)

    crashed = fresh_ledger(f"sqlite:///{tmp_path / 'crashed.db'}", workspace, tmp_path)
    real = jobs.record_results
    calls = {"n": 0}

    def failing(session, run_id, results):
        calls["n"] += 1
        if calls["n"] == 3:
            real(session, run_id, results)  # written inside the transaction, then lost
            raise RuntimeError("killed")
        return real(session, run_id, results)

    monkeypatch.setattr(jobs, "record_results", failing)
    with pytest.raises(RuntimeError, match="killed"):
        jobs.attribute_outputs(crashed, outputs, batch_size=2, show_progress=False)
    assert counts(crashed)["query_results"] == 4  # two batches of two committed
    monkeypatch.setattr(jobs, "record_results", real)
    summary = jobs.attribute_outputs(crashed, outputs, batch_size=2, show_progress=False)
    assert summary.skipped == 4 and summary.attributed == summary.queries - 4

    assert counts(crashed) == counts(clean)
    period = parse_period("2024-Q3")
    lines = []
    for engine in (clean, crashed):
        with session_scope(engine) as session:
            s = build_statement(session, period, None)
            lines.append(statement_rows(session, s.id).select("provider", "value", "share"))
    assert lines[0].equals(lines[1])  # bit for bit
