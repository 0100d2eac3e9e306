"""A crash in the middle of `attribute` loses nothing and double-counts nothing on re-run."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import text

import ledger.jobs as jobs
from ledger.cli import cli
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
    # A statement read now says that it rests on a run that never finished.
    report = ["--db", str(crashed.url), "report", "--period", "2024-Q3"]
    foot = CliRunner().invoke(cli, report).stdout.strip().splitlines()[-1]
    assert foot.startswith("Rests on runs: ") and "unfinished: interrupted" in foot
    monkeypatch.setattr(jobs, "record_results", real)
    summary = jobs.attribute_outputs(crashed, outputs, batch_size=2, show_progress=False)
    assert summary.skipped == 4 and summary.attributed == summary.queries - 4
    foot = CliRunner().invoke(cli, report).stdout.strip().splitlines()[-1]
    assert foot.startswith("Rests on runs: ") and "unfinished" not in foot

    assert counts(crashed) == counts(clean)
    period = parse_period("2024-Q3")
    lines = []
    for engine in (clean, crashed):
        with session_scope(engine) as session:
            s = build_statement(session, period, None)
            lines.append(statement_rows(session, s.id).select("provider", "value", "share"))
    assert lines[0].equals(lines[1])  # bit for bit


def test_a_second_process_starting_the_same_run_meanwhile_is_a_one_line_error(
    workspace, tmp_path, monkeypatch
):
    """Two `attribute` commands on one file at once: the other process records the run
    between this one's check for it and its insert. The collision is one line, nothing is
    written by the loser, and a re-run resumes the run to a clean run's ledger."""
    from ledger.models import AttributionRun as Run

    outputs = str(workspace / "queries.jsonl")
    clean = fresh_ledger(f"sqlite:///{tmp_path / 'clean.db'}", workspace, tmp_path)
    jobs.attribute_outputs(clean, outputs, batch_size=2, show_progress=False)

    url = f"sqlite:///{tmp_path / 'race.db'}"
    engine = fresh_ledger(url, workspace, tmp_path)
    real = jobs.start_run

    def other_process_first(session, run_id, index_id, manifest):
        other_engine = make_engine(url)
        with session_scope(other_engine) as other:
            real(other, run_id, index_id, manifest)
        other_engine.dispose()
        looked_up = session.get
        # This process checked before the other one wrote: it finds no run.
        monkeypatch.setattr(
            session, "get", lambda kind, *a, **k: None if kind is Run else looked_up(kind, *a, **k)
        )
        try:
            return real(session, run_id, index_id, manifest)
        finally:
            monkeypatch.setattr(session, "get", looked_up)

    monkeypatch.setattr(jobs, "start_run", other_process_first)
    args = ["--db", url, "attribute", "--outputs", outputs]
    result = CliRunner().invoke(cli, args, env={"LEDGER_QUIET": "1"})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: another process wrote the same ledger rows at the same time")
    assert lines[0].endswith("re-run the command to resume")
    assert counts(engine) == dict.fromkeys(counts(engine), 0)
    monkeypatch.setattr(jobs, "start_run", real)
    result = CliRunner().invoke(cli, args, env={"LEDGER_QUIET": "1"})
    assert result.exit_code == 0, result.output
    assert counts(engine) == counts(clean)
